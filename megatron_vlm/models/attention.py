"""Variable-length (packed, THD) attention behind one interface.

A packed row holds several documents back to back; ``cu_seqlens`` ([N+1], int32, starting at 0)
marks their borders. Every backend here attends only *within* a document: no token ever sees a
token of another packed document. Backends, fastest first:

* ``flash_attn``  - ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16), when importable;
* ``torch_varlen`` - ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16);
* ``sdpa``        - exact reference: one ``scaled_dot_product_attention`` call per document
  (any device, any dtype). This is the CPU path and the oracle for the fast ones.

``select_backend`` picks the first that can run the given tensors; ``VLM_ATTN_BACKEND`` in the
environment (or the ``backend`` argument) forces one, and forcing an unusable one is an error.

``cached_attention`` is the inference counterpart (KV-cache decoding): new queries attend to the
cached keys/values of earlier tokens plus their own (one SDPA call, any device and dtype).
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")


@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore
    except Exception:  # ImportError, or a broken CUDA build
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _torch_varlen_func():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


def _usable(backend: str, q: torch.Tensor) -> bool:
    fast_dtype = q.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash_attn":
        return q.is_cuda and fast_dtype and _flash_attn_func() is not None
    if backend == "torch_varlen":
        return q.is_cuda and fast_dtype and _torch_varlen_func() is not None
    return backend == "sdpa"


def select_backend(q: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend that will run ``q``: the forced one (argument or env) or the fastest usable."""
    forced = backend or os.environ.get("VLM_ATTN_BACKEND") or None
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"unknown attention backend {forced!r}; choose one of {BACKENDS}")
        if not _usable(forced, q):
            raise RuntimeError(
                f"attention backend {forced!r} cannot run {q.dtype} tensors on {q.device} "
                "(missing package, CPU tensors, or fp32); unset VLM_ATTN_BACKEND to auto-select"
            )
        return forced
    return next(b for b in BACKENDS if _usable(b, q))


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    softmax_scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention over packed documents.

    q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq a multiple of Hkv (GQA); cu_seqlens: [N+1] int32 with
    ``cu_seqlens[-1] == T``; max_seqlen: longest document (a Python int, so no device sync).
    Returns [T, Hq, D].
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention wants [T, H, D] tensors, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key heads ({k.shape[1]})")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    chosen = select_backend(q, backend)
    if chosen == "flash_attn":
        return _flash_attn_func()(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            softmax_scale=scale, causal=causal,
        )
    if chosen == "torch_varlen":
        return _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    return _sdpa_per_document(q, k, v, cu_seqlens, causal, scale)


@functools.lru_cache(maxsize=None)
def _parameter_names(fn) -> frozenset:
    """Keyword names ``fn`` accepts: read once per function, not per attention call."""
    return frozenset(inspect.signature(fn).parameters)


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    fn = _torch_varlen_func()
    params = _parameter_names(fn)
    kwargs = {"scale": scale}
    if "is_causal" in params:  # torch <= 2.11 spelling
        kwargs["is_causal"] = causal
    else:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu = cu_seqlens.to(torch.int32)
    return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


def _sdpa_per_document(q, k, v, cu_seqlens, causal, scale):
    """Exact reference: each document is attended on its own, so cross-document leakage is
    impossible by construction. One host read of ``cu_seqlens`` per call (fine on CPU)."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to T={q.shape[0]}, got {bounds[0]}..{bounds[-1]}")
    gqa = q.shape[1] != k.shape[1]
    out = q.new_empty(q.shape)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        # [s, H, D] -> [H, s, D]
        qd, kd, vd = (t[start:end].transpose(0, 1) for t in (q, k, v))
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=scale, enable_gqa=gqa)
        out[start:end] = od.transpose(0, 1)
    return out


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention of ``s`` new tokens to a key/value cache that already holds them (decoding).

    q: [B, Hq, s, D], the queries of the last ``s`` tokens; k, v: [B, Hkv, L, D] with L >= s, the
    cache including those tokens (Hq a multiple of Hkv: GQA). Query ``i`` of the ``s`` attends to
    keys ``0 .. L - s + i`` (causal, aligned to the end). One new token (s = 1) attends to all L
    keys without a mask. Returns [B, Hq, s, D].
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"cached_attention wants [B, H, S, D] tensors, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key heads ({k.shape[1]})")
    s, total = q.shape[2], k.shape[2]
    if s > total:
        raise ValueError(f"{s} queries but only {total} cached keys: append the new keys first")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    mask = None
    if s > 1:  # bottom-right causal mask: query i sees the past and new tokens 0..i
        rows = torch.arange(s, device=q.device)[:, None] + (total - s)
        mask = torch.arange(total, device=q.device)[None, :] <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])
