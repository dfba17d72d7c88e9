"""Fused mRoPE kernels on the GPU (skipped without CUDA): the CUDA extension and the Triton kernel,
forward and backward, against an fp32 reference; bf16/fp16 error at most twice the PyTorch path's."""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.kernels import mrope

pytestmark = pytest.mark.gpu
SECTION = (16, 24, 24)


def _available(backend):
    x = torch.zeros(1, 1, 128, device="cuda")
    try:
        mrope.select_mrope_backend(x, backend)
    except RuntimeError:
        pytest.skip(f"{backend} kernel not available")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [28, 4])  # 7B query heads and KV heads
def test_kernel_forward_backward(backend, dtype, heads):
    _available(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = 4099
    x = torch.randn(tokens, heads, 128, device="cuda", generator=g).to(dtype)
    pos = torch.randint(0, 131072, (3, tokens), device="cuda", generator=g)
    inv = mrope.inverse_frequencies(128, 4e6, device="cuda")
    cos, sin = mrope.mrope_cos_sin(pos, inv.double(), SECTION)
    exact = mrope.apply_rotary(x.double(), cos.double(), sin.double())
    fused = mrope.apply_mrope_fused(x, pos, inv, SECTION, backend=backend)
    unfused = mrope.apply_rotary(x, *mrope.mrope_cos_sin(pos, inv, SECTION))
    fused_err = (fused.double() - exact).abs().max().item()
    unfused_err = (unfused.double() - exact).abs().max().item()
    assert fused_err <= 2 * unfused_err + 1e-6, (fused_err, unfused_err)

    grad = torch.randn_like(x)
    a = x.clone().requires_grad_()
    mrope.apply_mrope_fused(a, pos, inv, SECTION, backend=backend).backward(grad)
    b = x.double().clone().requires_grad_()
    mrope.apply_rotary(b, cos.double(), sin.double()).backward(grad.double())
    c = x.clone().requires_grad_()
    mrope.apply_rotary(c, *mrope.mrope_cos_sin(pos, inv, SECTION)).backward(grad)
    assert (a.grad.double() - b.grad).abs().max() <= 2 * (c.grad.double() - b.grad).abs().max() + 1e-6


def test_cuda_binding_checks_inputs_loudly():
    _available("cuda")
    from megatron_vlm import _C

    x = torch.randn(8, 2, 128, device="cuda")
    pos = torch.zeros(3, 8, dtype=torch.long, device="cuda")
    inv = mrope.inverse_frequencies(128, 1e6, device="cuda")
    with pytest.raises(RuntimeError, match="positions must be"):
        _C.mrope_rotate(x, torch.empty_like(x), pos[:, :4], inv, 16, 24, False)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        _C.mrope_rotate(x.cpu(), torch.empty_like(x).cpu(), pos.cpu(), inv.cpu(), 16, 24, False)
    with pytest.raises(RuntimeError, match="inv_freq"):
        _C.mrope_rotate(x, torch.empty_like(x), pos, inv.half(), 16, 24, False)
