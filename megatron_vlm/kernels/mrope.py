"""Multimodal rotary position embedding (mRoPE) of Qwen2.5-VL.

Each of the ``head_dim / 2`` rotary frequencies belongs to one position axis: the first
``section[0]`` to time, the next ``section[1]`` to height, the last ``section[2]`` to width. A token
at 3-D position (t, h, w) is rotated by angle ``pos[axis(i)] * inv_freq[i]`` in frequency pair i;
the two rotate-half halves of the head share the same angles. Text tokens have t = h = w, so for
text this is ordinary 1-D RoPE.

The pure-PyTorch reference (tables + rotate-half) is the CPU path and the oracle; ``MRope`` /
``apply_mrope_fused`` dispatch CUDA tensors to the fused kernel of ``csrc/mrope`` (or its Triton
twin, ``mrope_triton.py``) that computes the angles in-kernel. Angles depend only on each token's
own positions, so packed rows and context-parallel chunks need no offsets: slice the positions with
the tokens and the result is the same.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

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


# ----------------------------------------------------------------------------- fused backends
BACKENDS = ("cuda", "triton", "reference")


@functools.lru_cache(maxsize=None)
def _cuda_extension():
    """The compiled extension, or None; imported once (a failed import is remembered too)."""
    try:
        from megatron_vlm import _C  # built by setup.py where CUDA exists
    except ImportError:
        return None
    return _C if hasattr(_C, "mrope_rotate") else None


def _triton_module():
    try:
        from megatron_vlm.kernels import mrope_triton
    except Exception:  # triton missing, or no backend for it on this machine
        return None
    return mrope_triton


def _triton_usable(x: torch.Tensor) -> bool:
    # Only import Triton where it can run: triton.jit picks the interpreter at decoration time.
    return (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and _triton_module() is not None


def select_mrope_backend(x: torch.Tensor, backend: Optional[str] = None) -> str:
    """The fused kernel for CUDA tensors when built, else Triton, else the PyTorch reference.
    ``VLM_MROPE_BACKEND`` (or ``backend``) forces one; forcing an unusable one is an error."""
    forced = backend or os.environ.get("VLM_MROPE_BACKEND") or None
    usable = {"cuda": lambda: x.is_cuda and _cuda_extension() is not None, "triton": lambda: _triton_usable(x),
              "reference": lambda: True}
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"unknown mRoPE backend {forced!r}; choose one of {BACKENDS}")
        if not usable[forced]():
            raise RuntimeError(f"mRoPE backend {forced!r} cannot run on {x.device}: the CUDA extension is built "
                               "by `pip install -e . --no-build-isolation` on a CUDA machine; Triton needs CUDA "
                               "or TRITON_INTERPRET=1")
        return forced
    return next(b for b in BACKENDS if usable[b]())


def _rotate(backend: str, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
            section: Sequence[int], inverse: bool) -> torch.Tensor:
    out = torch.empty_like(x)
    if backend == "cuda":
        _cuda_extension().mrope_rotate(x, out, positions, inv_freq, int(section[0]), int(section[1]), inverse)
    else:
        _triton_module().rotate(x, positions, inv_freq, section, out, inverse=inverse)
    return out


class _FusedMRope(torch.autograd.Function):
    """y = R(theta) x; the gradient is R(-theta) g, the same kernel with the sine negated."""

    @staticmethod
    def forward(ctx, x, positions, inv_freq, section, backend):
        ctx.save_for_backward(positions, inv_freq)
        ctx.section, ctx.backend = section, backend
        return _rotate(backend, x, positions, inv_freq, section, inverse=False)

    @staticmethod
    def backward(ctx, grad):
        positions, inv_freq = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        return _rotate(ctx.backend, grad, positions, inv_freq, ctx.section, inverse=True), None, None, None, None


def apply_mrope_fused(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                      section: Sequence[int], backend: Optional[str] = None) -> torch.Tensor:
    """Rotate ``x`` [N, H, D] (unit stride on D) by the angles of ``position_ids`` [3, N], computed
    inside the kernel. Falls back to the reference tables where no kernel can run."""
    chosen = select_mrope_backend(x, backend)
    if x.dim() != 3:
        raise ValueError(f"apply_mrope_fused wants [tokens, heads, head_dim], got {tuple(x.shape)}")
    if chosen == "reference":
        cos, sin = mrope_cos_sin(position_ids, inv_freq, section)
        return apply_rotary(x, cos, sin)
    if x.stride(-1) != 1:
        x = x.contiguous()
    positions = position_ids if position_ids.stride(-1) == 1 else position_ids.contiguous()
    return _FusedMRope.apply(x, positions, inv_freq.float().contiguous().to(x.device), tuple(section), chosen)


class MRope:
    """What a decoder layer needs to rotate its q and k: built once per forward by the LM.

    CUDA tensors go through the fused kernel (angles in-kernel); elsewhere the reference cos/sin
    tables are made on first use and shared by every layer of the forward.
    """

    def __init__(self, position_ids: torch.Tensor, inv_freq: torch.Tensor, section: Sequence[int],
                 dtype: torch.dtype, backend: Optional[str] = None):
        self.position_ids, self.inv_freq, self.section = position_ids, inv_freq, tuple(section)
        self.dtype, self.backend = dtype, backend
        self._tables: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tables is None:
            cos, sin = mrope_cos_sin(self.position_ids, self.inv_freq, self.section)
            self._tables = (cos.to(self.dtype), sin.to(self.dtype))  # cast once, as the reference does
        return self._tables

    def apply(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query/key [S, B, H, D] with positions flattened in (s, b) order."""
        backend = select_mrope_backend(query, self.backend)
        if backend == "reference":
            cos, sin = self.tables()
            shape = query.shape[:2] + (cos.shape[-1],)
            return apply_rotary(query, cos.view(shape), sin.view(shape)), apply_rotary(key, cos.view(shape),
                                                                                      sin.view(shape))
        out = []
        for x in (query, key):
            flat = x.reshape(-1, x.shape[-2], x.shape[-1])
            out.append(apply_mrope_fused(flat, self.position_ids, self.inv_freq, self.section, backend).view(x.shape))
        return out[0], out[1]
