"""Normalization layers shared by the vision encoder and the language model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, numerically matching Hugging Face's ``Qwen2RMSNorm``.

    The statistics are taken in fp32 (bf16 sums over thousands of channels lose too much), the
    normalized activations are cast back to the input dtype, and only then scaled by ``weight``,
    in that order, so checkpoints converted from HF give the same numbers.

    ``config`` is accepted and ignored: Megatron's ``build_module`` passes it as a keyword.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, config: Any = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
