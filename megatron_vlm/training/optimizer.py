"""Freezing and the optimizer: torch AdamW over the (FSDP-sharded, fp32) parameters, with
Megatron's convention of no weight decay on biases and norm weights, on every device.

Gradient reduction and clipping live in ``sharding.py``.
"""

from __future__ import annotations

import torch

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


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices only: never to biases or norm weights (1-D)."""
    return param.dim() >= 2 and not name.endswith(".bias")


def build_adamw(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Call after freezing (frozen parameters get no optimizer state) and after sharding."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, weight_decay=cfg.weight_decay)
