"""Reassemble tensor-parallel shards into the TP=1 layout (for export, checks and tests).

Megatron marks sharded parameters with ``tensor_model_parallel`` and ``partition_dim``; most are
plain concatenations of the rank shards. The gated MLP's ``linear_fc1`` is not: each rank holds
``[gate_r; up_r]``, so the TP=1 ``[gate; up]`` is rebuilt from the halves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _all_gather(tensor: torch.Tensor, dim: int) -> list[torch.Tensor]:
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def full_tensor(name: str, param: torch.nn.Parameter, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the parameter itself or its gradient) in the TP=1 layout. Collective over TP."""
    return gather_tensor_parallel(name, tensor, bool(getattr(param, "tensor_model_parallel", False)),
                                  getattr(param, "partition_dim", 0))


def gather_tensor_parallel(name: str, tensor: torch.Tensor, sharded: bool, dim: int) -> torch.Tensor:
    """A TP-local tensor in the TP=1 layout (``sharded`` along ``dim``). Collective over TP."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1 or not sharded:
        return tensor
    parts = _all_gather(tensor, dim)
    if name.endswith("mlp.linear_fc1.weight"):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=dim)


def full_state(model: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) in the TP=1 layout, on every rank."""
    out = {}
    for name, param in model.named_parameters():
        tensor = param.grad if grads else param.data
        if tensor is None:
            tensor = torch.zeros_like(param)
        out[name] = full_tensor(name, param, tensor.detach())
    return out
