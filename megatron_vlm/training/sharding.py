"""Data parallelism for training: torch FSDP2 over the data x context-parallel group, around
Megatron's tensor-parallel layers. The same code runs on a CPU (gloo) and on a GPU cluster (NCCL).

Why FSDP2 rather than Megatron DDP + its distributed optimizer: the latter only runs on CUDA, so
the code users run on GPUs could not be the code the CPU suite runs. ``fully_shard`` runs over gloo.

What it does, on every device:

* parameters are stored sharded over DP x CP in fp32 (the main weights); each unit (one LM layer,
  one ViT block, the embedding, the output layer, the root) is all-gathered in the compute dtype
  (bf16) just before it runs and freed after; gradients are reduce-scattered in fp32;
* gradients are **summed** over DP x CP, not averaged: the loss is already divided by the global
  number of supervised tokens (``trainer.py``), so the sum is the gradient of the global mean;
* parameters that tensor parallelism replicates (the vision tower, norms, biases of replicated
  layers) have their gradients averaged over the TP group, so the replicas stay bit-identical even
  when a backward kernel is not deterministic;
* the gradient norm is global: TP shards summed once, TP replicas counted once, DP shards summed.

Megatron's TP attributes (``tensor_model_parallel``, ``partition_dim``) do not survive FSDP's
re-wrapping of parameters, so they are recorded first in a ``ParamLayout`` per parameter name.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from megatron_vlm.parallel.param_layout import ParamLayout

def data_parallel_group() -> dist.ProcessGroup:
    """Gradients are reduced (and parameters sharded) over data x context parallel ranks."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that get their own FSDP unit, in execution order: each one's parameters are
    gathered only while it runs. The root (``model`` itself) holds what is left."""
    core = model
    units: list[torch.nn.Module] = []
    units.extend(core.vision.blocks)
    units.append(core.vision.merger)
    lm = core.language_model
    tied = lm.lm.tie_word_embeddings  # the output layer reads the embedding weight: keep both in the root
    if not tied:
        units.append(lm.embedding.word_embeddings)
    units.extend(lm.decoder.layers)
    if not tied:
        units.append(lm.output_layer)
    return units


def shard_model(model: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device,
                layouts: dict[str, ParamLayout]) -> torch.nn.Module:
    """Apply FSDP2 in place (the module keeps its class and parameter names) and return it."""
    group = data_parallel_group()
    mesh = DeviceMesh.from_group(group, device.type)
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)  # the model casts what it needs (fp32 rotary)
    params_of = {id(p): n for n, p in model.named_parameters()}

    def placement(param: torch.nn.Parameter):
        return Shard(layouts[params_of[id(param)]].fsdp_dim)

    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, mp_policy=policy, shard_placement_fn=placement)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, not mean (see the module docstring); sum-only collectives also run on gloo.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def local(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """This rank's part of a (possibly FSDP-sharded) tensor."""
    if tensor is None:
        return None
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def average_replicated_gradients(model: torch.nn.Module, layouts: dict[str, ParamLayout]) -> None:
    """Average the gradients of TP-replicated parameters over the TP group (after FSDP's
    reduce-scatter, so on 1/(DP x CP) of the data): replicas then take identical optimizer steps."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return
    group = parallel_state.get_tensor_model_parallel_group()
    for name, param in model.named_parameters():
        grad = local(param.grad)
        if grad is None or layouts[name].tensor_parallel:
            continue
        dist.all_reduce(grad, group=group)
        grad.div_(tp)


def clip_gradients(model: torch.nn.Module, layouts: dict[str, ParamLayout], max_norm: float) -> float:
    """Global L2 norm of the gradient over every rank (TP shards summed, TP replicas once, DP x CP
    shards summed), then scale to ``max_norm``. Returns the norm before clipping."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    grads, sharded, replicated = [], [], []
    for name, param in model.named_parameters():
        grad = local(param.grad)
        if grad is None:
            continue
        grads.append(grad)
        (sharded if layouts[name].tensor_parallel else replicated).append(grad)
    device = grads[0].device if grads else torch.device("cpu")
    total = _sum_of_squares(sharded, device) + _sum_of_squares(replicated, device) / tp
    if dist.get_world_size() > 1:  # DP x CP shards and TP shards: every rank holds a distinct part
        dist.all_reduce(total)
    norm = math.sqrt(float(total))
    if max_norm > 0 and norm > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm


def _sum_of_squares(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        total += t.detach().double().pow(2).sum()
    return total


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of this rank's TP shard, in the unsharded sizes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def full_state(model: torch.nn.Module, layouts: dict[str, ParamLayout], grads: bool = False) -> dict[str, torch.Tensor]:
    """A copy of every parameter (or its gradient) in the TP=1, unsharded layout, on every rank (for tests,
    checks and export of small models). Collective over DP x CP and TP."""
    from megatron_vlm.parallel.tensor_parallel import gather_tensor_parallel

    out = {}
    for name, param in model.named_parameters():
        tensor = param.grad if grads else param.detach()
        if tensor is None:
            tensor = torch.zeros_like(param)
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        layout = layouts[name]
        # a copy: on one rank full_tensor() and the gather return the parameter's own storage
        out[name] = gather_tensor_parallel(name, tensor, layout.tensor_parallel, layout.partition_dim).clone()
    return out
