"""Multimodal rotary position embedding (mRoPE) of Qwen2.5-VL.

Each of the ``head_dim / 2`` rotary frequencies belongs to one position axis: the first
``section[0]`` to time, the next ``section[1]`` to height, the last ``section[2]`` to width. A token
at 3-D position (t, h, w) is rotated by angle ``pos[axis(i)] * inv_freq[i]`` in frequency pair i;
the two rotate-half halves of the head share the same angles. Text tokens have t = h = w, so for
text this is ordinary 1-D RoPE.

This module is the pure-PyTorch reference (and the CPU path). Angles depend only on each token's
own positions, so packed rows and context-parallel chunks need no offsets: slice the positions with
the tokens and the result is the same.
"""

from __future__ import annotations

from typing import Sequence

import torch


def inverse_frequencies(head_dim: int, rope_theta: float, device=None) -> torch.Tensor:
    """``1 / theta^(2i / head_dim)`` for i < head_dim / 2, in fp32 (as the reference computes it)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (rope_theta**exponent)


def axis_of_frequency(section: Sequence[int], device=None) -> torch.Tensor:
    """[head_dim / 2] int64: which position axis (0 t, 1 h, 2 w) drives each frequency pair."""
    return torch.repeat_interleave(torch.arange(3, device=device), torch.tensor(list(section), device=device))


def mrope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, section: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, head_dim] in fp32 for 3-D positions ``position_ids`` [3, T]."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 3:
        raise ValueError(f"mRoPE wants position ids of shape [3, T], got {tuple(position_ids.shape)}")
    if sum(section) != inv_freq.numel():
        raise ValueError(f"mrope section {list(section)} does not cover {inv_freq.numel()} frequencies")
    axis = axis_of_frequency(section, device=position_ids.device)
    # [T, head_dim/2]: each frequency reads the position of its own axis.
    pos = position_ids.float().index_select(0, axis).t()
    angles = pos * inv_freq.float().to(position_ids.device)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., H, D] by tables [..., D] (the same leading dims, broadcast over heads).

    The tables are cast to ``x``'s dtype first, as the reference implementation does, so bf16
    runs round the same way HF transformers does.
    """
    cos = cos.to(x.dtype).unsqueeze(-2)
    sin = sin.to(x.dtype).unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


def apply_mrope(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query and key (GQA: their head counts may differ) with precomputed tables."""
    return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
