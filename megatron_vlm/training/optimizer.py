"""Optimizer construction, freezing, and gradient handling for the CPU (single-process or gloo) path.

On GPU the trainer uses Megatron-Core's DistributedDataParallel + distributed optimizer instead
(see ``trainer.py``); here a torch AdamW over the same parameters, with Megatron's convention of no
weight decay on biases and norm weights, and a TP-aware global gradient norm.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_vlm.training.config import ModelConfig, OptimConfig


def apply_freezing(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Freeze the vision tower (patch embedding + blocks), the merger and/or the language model."""
    for name, param in model.named_parameters():
        frozen = ((cfg.freeze_vision and name.startswith("vision.") and not name.startswith("vision.merger."))
                  or (cfg.freeze_merger and name.startswith("vision.merger."))
                  or (cfg.freeze_language and name.startswith("language_model.")))
        param.requires_grad_(not frozen)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("every parameter is frozen: nothing to train")


def build_adamw(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)


def all_reduce_gradients(model: torch.nn.Module) -> None:
    """Sum gradients over the data-parallel x context-parallel group (the loss is already divided by
    the global number of supervised tokens, so the sum is the global mean)."""
    if parallel_state.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Global L2 norm over all ranks' gradients (TP shards summed once, replicas counted once), and
    clip to ``max_norm``. Returns the norm before clipping."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    grads = []
    for param in model.parameters():
        if param.grad is None:
            continue
        grads.append(param.grad)
        sq = param.grad.detach().double().pow(2).sum()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            sharded += sq
        else:
            replicated += sq
    total = sharded + replicated / tp
    if tp > 1:
        dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    norm = math.sqrt(float(total))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for grad in grads:
            grad.mul_(scale)
    return norm
