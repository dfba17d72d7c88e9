"""The fused mRoPE path against the fp32 PyTorch reference: the Triton kernel under
TRITON_INTERPRET=1 on CPU (forward, backward, GQA, dtypes, context-parallel chunks) and the
dispatcher's errors. The CUDA kernel's tests are in tests/gpu/test_mrope_kernel.py."""

from __future__ import annotations

import importlib

import pytest
import torch

from megatron_vlm.kernels import mrope

pytest.importorskip("triton")
SECTION = (16, 24, 24)


@pytest.fixture
def interpreted(monkeypatch):
    """Re-decorate the Triton kernel under the interpreter (triton.jit reads the env var then)."""
    import megatron_vlm.kernels.mrope_triton as module

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    importlib.reload(module)
    yield
    monkeypatch.delenv("TRITON_INTERPRET")
    importlib.reload(module)


def _inputs(tokens=50, heads=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads, 128, generator=g).to(dtype)
    pos = torch.stack([torch.randint(0, 3000, (tokens,), generator=g) for _ in range(3)])  # distinct axes
    return x, pos, mrope.inverse_frequencies(128, 1e6)


def _reference64(x, pos, inv):
    cos, sin = mrope.mrope_cos_sin(pos, inv.double(), SECTION)
    return mrope.apply_rotary(x.double(), cos.double(), sin.double())


def test_triton_forward_matches_fp32_reference(interpreted):
    x, pos, inv = _inputs()
    out = mrope.apply_mrope_fused(x, pos, inv, SECTION, backend="triton")
    ref = mrope.apply_rotary(x, *mrope.mrope_cos_sin(pos, inv, SECTION))
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_error_within_twice_the_pytorch_path(interpreted, dtype):
    x, pos, inv = _inputs(dtype=dtype)
    exact = _reference64(x, pos, inv)
    fused = mrope.apply_mrope_fused(x, pos, inv, SECTION, backend="triton")
    unfused = mrope.apply_rotary(x, *mrope.mrope_cos_sin(pos, inv, SECTION))
    assert fused.dtype == dtype
    fused_err = (fused.double() - exact).abs().max().item()
    unfused_err = (unfused.double() - exact).abs().max().item()
    assert fused_err <= 2 * unfused_err, (fused_err, unfused_err)


def test_triton_backward_matches_reference(interpreted):
    x, pos, inv = _inputs(tokens=20, heads=3)
    grad = torch.randn_like(x)
    a = x.clone().requires_grad_()
    mrope.apply_mrope_fused(a, pos, inv, SECTION, backend="triton").backward(grad)
    b = x.clone().requires_grad_()
    mrope.apply_rotary(b, *mrope.mrope_cos_sin(pos, inv, SECTION)).backward(grad)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=2e-5)


def test_mrope_object_gqa_and_cp_chunks(interpreted):
    """q with 8 heads, k with 2 (GQA), [S, B, H, D] layout; and any token subset (a context-parallel
    zig-zag chunk) rotated alone equals those rows of the whole: positions are per token."""
    s, b = 24, 1
    q = torch.randn(s, b, 8, 128)
    k = torch.randn(s, b, 2, 128)
    pos = torch.randint(0, 900, (3, s * b))
    inv = mrope.inverse_frequencies(128, 4e6)
    fused = mrope.MRope(pos, inv, SECTION, torch.float32, backend="triton").apply(q, k)
    ref = mrope.MRope(pos, inv, SECTION, torch.float32, backend="reference").apply(q, k)
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    chunk = torch.cat([torch.arange(0, 3), torch.arange(18, 21)])  # chunks 0 and 7 of 8
    part = mrope.apply_mrope_fused(q[chunk, 0].contiguous(), pos[:, chunk], inv, SECTION, backend="triton")
    torch.testing.assert_close(part, fused[0][chunk, 0], rtol=0, atol=1e-6)


def test_dispatch_errors_and_cpu_default():
    x, _, _ = _inputs(tokens=2, heads=1)
    assert mrope.select_mrope_backend(x) == "reference"
    with pytest.raises(RuntimeError, match="CUDA extension"):
        mrope.select_mrope_backend(x, "cuda")
    with pytest.raises(ValueError, match="unknown mRoPE backend"):
        mrope.select_mrope_backend(x, "magic")


def test_missing_cuda_extension_is_looked_up_once(monkeypatch):
    """Without megatron_vlm._C, the failed import is remembered: mRoPE is applied twice per layer,
    and every failed import walks sys.path again."""
    import builtins

    getattr(mrope._cuda_extension, "cache_clear", lambda: None)()
    attempts = []
    real_import = builtins.__import__

    def counting_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "megatron_vlm" and fromlist and "_C" in fromlist:
            attempts.append(name)
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", counting_import)
    for _ in range(4):
        assert mrope._cuda_extension() is None
    assert len(attempts) <= 1, attempts


def test_triton_offsets_are_64_bit(interpreted):
    """Token offsets past 2**31 elements (128K tokens x 28 heads x 128 already reach 2**31 / 4; 256K
    tokens of a 64-head q overflow) must not wrap around in int32.

    Honest and small: a [3, 1, 128] fp16 view whose token stride S = 2**30 + 2**20 still fits in
    int32 (so Triton passes it as i32, as it does for real strides), but 2 * S does not. The view
    lives in an 8 GiB *reserved, never committed* anonymous mapping (MAP_NORESERVE), so only the
    touched pages cost memory. The interpreter computes offsets with numpy, exactly as typed: int32
    program ids times an int32 stride wrap, and the wrapped address (2**32 elements lower) is still
    inside the mapping, so an int32 kernel reads zeros for token 2 and writes its output to the
    wrong place instead of crashing. Both the load (x) and the store (out) side are strided."""
    import mmap
    import sys

    import megatron_vlm.kernels.mrope_triton as mrope_triton

    # Python < 3.13 does not export MAP_NORESERVE; 0x4000 on Linux x86-64 and arm64.
    noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else None)
    if noreserve is None or sys.maxsize < 2**40:
        pytest.skip("needs a 64-bit Linux mmap with MAP_NORESERVE")
    stride, base = 2**30 + 2**20, 2**31
    size = base + 2 * stride + 512  # elements
    mapping = mmap.mmap(-1, 2 * size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve)
    try:
        storage = torch.frombuffer(mapping, dtype=torch.float16)
        x = storage.as_strided((3, 1, 128), (stride, 128, 1), base)
        out = storage.as_strided((3, 1, 128), (stride, 128, 1), base + 256)
        values = torch.randn(3, 1, 128, generator=torch.Generator().manual_seed(0)).half()
        x.copy_(values)
        pos = torch.tensor([[7, 70000, 262143]] * 3)
        inv = mrope.inverse_frequencies(128, 1e6)
        expected = mrope.apply_mrope_fused(values, pos, inv, SECTION, backend="reference")
        fused = mrope.apply_mrope_fused(x, pos, inv, SECTION, backend="triton")  # strided x, fresh out
        torch.testing.assert_close(fused, expected, rtol=0, atol=4e-3)
        mrope_triton.rotate(x, pos, inv, SECTION, out)  # strided x and out
        torch.testing.assert_close(out.clone(), expected, rtol=0, atol=4e-3)
    finally:
        del storage, x, out
        mapping.close()
