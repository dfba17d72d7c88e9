"""mRoPE reference against HF transformers' Qwen2.5-VL rotary code and a textbook 1-D RoPE."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLRotaryEmbedding,
    apply_multimodal_rotary_pos_emb,
)

from megatron_vlm.kernels.mrope import apply_mrope, apply_rotary, inverse_frequencies, mrope_cos_sin

HEAD_DIM = 128
SECTION = (16, 24, 24)
TOL = 1e-5


def _hf_rotary(theta):
    cfg = Qwen2_5_VLTextConfig(hidden_size=2 * HEAD_DIM, num_attention_heads=2, num_key_value_heads=1,
                               rope_theta=theta, rope_scaling={"type": "mrope", "mrope_section": list(SECTION)})
    return Qwen2_5_VLRotaryEmbedding(cfg)


def _inputs(t=257, hq=4, hkv=2, seed=0, max_pos=5000):
    g = torch.Generator().manual_seed(seed)
    # every axis its own random positions, so a wrong axis-to-frequency mapping shows
    pos = torch.stack([torch.randint(0, max_pos, (t,), generator=g) for _ in range(3)])
    q = torch.randn(t, hq, HEAD_DIM, generator=g)
    k = torch.randn(t, hkv, HEAD_DIM, generator=g)
    return pos, q, k


def _hf_apply(theta, pos, q, k):
    """HF layout: q/k [B, H, S, D], position ids [3, B, S], cos/sin [3, B, S, D]; back to [S, H, D]."""
    rot = _hf_rotary(theta)
    cos, sin = rot(q, pos[:, None, :])
    qh, kh = apply_multimodal_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin,
                                             list(SECTION))
    return qh[0].transpose(0, 1), kh[0].transpose(0, 1)


def _ours(theta, pos, q, k):
    cos, sin = mrope_cos_sin(pos, inverse_frequencies(HEAD_DIM, theta), SECTION)
    return apply_mrope(q, k, cos, sin)


def textbook_rope(x, positions, theta):
    """1-D rotate-half RoPE in float64: pair (i, i + D/2) rotated by pos * theta^(-2i/D)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    angle = positions.double()[:, None] * freqs  # [T, D/2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    x1, x2 = x.double()[..., : d // 2], x.double()[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@pytest.mark.parametrize("theta", [1e6, 4e6])
def test_inverse_frequencies_match_hf(theta):
    ours = inverse_frequencies(HEAD_DIM, theta)
    assert ours.dtype == torch.float32 and ours.shape == (HEAD_DIM // 2,)
    assert torch.equal(ours, _hf_rotary(theta).inv_freq)
    exact = theta ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    assert torch.allclose(ours.double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("theta", [1e6, 4e6])
def test_matches_hf_fp32(theta):
    pos, q, k = _inputs(seed=int(theta) % 97)
    qo, ko = _ours(theta, pos, q, k)
    qh, kh = _hf_apply(theta, pos, q, k)
    assert qo.shape == q.shape and ko.shape == k.shape
    assert (qo - qh).abs().max().item() <= TOL
    assert (ko - kh).abs().max().item() <= TOL
    assert (qo - q).abs().max().item() > 0.5  # the rotation did something


@pytest.mark.parametrize("theta", [1e6, 4e6])
def test_matches_hf_bf16(theta):
    pos, q, k = _inputs(seed=3)
    qb, kb = q.bfloat16(), k.bfloat16()
    qo, ko = _ours(theta, pos, qb, kb)
    qh, kh = _hf_apply(theta, pos, qb, kb)
    q32, k32 = _hf_apply(theta, pos, q, k)
    assert qo.dtype == torch.bfloat16 and ko.dtype == torch.bfloat16
    for ours, ref, ref32 in ((qo, qh, q32), (ko, kh, k32)):
        torch.testing.assert_close(ours, ref, rtol=1.6e-2, atol=1e-2)  # same rounding as HF
        torch.testing.assert_close(ours.float(), ref32, rtol=0, atol=6e-2)  # and near fp32


def test_theta_matters():
    """1e6 and 4e6 give different results, so the comparisons above can tell them apart."""
    pos, q, k = _inputs()
    assert (_ours(1e6, pos, q, k)[0] - _hf_apply(4e6, pos, q, k)[0]).abs().max().item() > 1e-2


def test_section_order_matters():
    """Swapping the t and w position rows changes the result (axes are not interchangeable)."""
    pos, q, k = _inputs()
    assert (_ours(1e6, pos[[2, 1, 0]], q, k)[0] - _hf_apply(1e6, pos, q, k)[0]).abs().max().item() > 1e-2


def _zigzag(t, ranks):
    """Context-parallel zig-zag: 2 * ranks pieces, rank r keeps pieces r and 2 * ranks - 1 - r."""
    pieces = torch.arange(t).tensor_split(2 * ranks)
    return [torch.cat((pieces[r], pieces[2 * ranks - 1 - r])) for r in range(ranks)]


def _random_chunks(t, seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(t, generator=g)
    cuts = sorted(torch.randint(1, t, (5,), generator=g).tolist())
    return [c for c in perm.tensor_split(cuts) if c.numel()]


@pytest.mark.parametrize("split", ["zigzag", "random"])
def test_context_parallel_chunks_equal_full_rows(split):
    pos, q, k = _inputs(t=320, seed=11)
    full_q, full_k = _ours(1e6, pos, q, k)
    chunks = _zigzag(320, 4) if split == "zigzag" else _random_chunks(320, 5)
    seen = torch.zeros(320, dtype=torch.long)
    for idx in chunks:
        cq, ck = _ours(1e6, pos[:, idx], q[idx], k[idx])
        assert torch.equal(cq, full_q[idx]) and torch.equal(ck, full_k[idx])
        seen[idx] += 1
    assert torch.equal(seen, torch.ones(320, dtype=torch.long))  # the chunks tile the row


@pytest.mark.parametrize("theta", [1e6, 4e6])
def test_text_tokens_are_plain_rope(theta):
    t = 200
    g = torch.Generator().manual_seed(2)
    p = torch.randint(0, 512, (t,), generator=g)
    q = torch.randn(t, 3, HEAD_DIM, generator=g)
    k = torch.randn(t, 1, HEAD_DIM, generator=g)
    qo, ko = _ours(theta, p.expand(3, t), q, k)
    # fp32 angles (pos * inv_freq rounded) vs float64 ones: error grows with position, < 2e-4 below 512
    assert (qo.double() - textbook_rope(q, p, theta)).abs().max().item() <= 2e-4
    assert (ko.double() - textbook_rope(k, p, theta)).abs().max().item() <= 2e-4
    # small positions: tight
    p_small = torch.arange(t) % 16
    qs, _ = _ours(theta, p_small.expand(3, t), q, k)
    assert (qs.double() - textbook_rope(q, p_small, theta)).abs().max().item() <= TOL


def test_apply_rotary_broadcasts_over_heads():
    pos, q, _ = _inputs(t=9, hq=5)
    cos, sin = mrope_cos_sin(pos, inverse_frequencies(HEAD_DIM, 1e6), SECTION)
    assert cos.shape == (9, HEAD_DIM) and cos.dtype == torch.float32
    whole = apply_rotary(q, cos, sin)
    for h in range(5):
        assert torch.equal(apply_rotary(q[:, h:h + 1], cos, sin)[:, 0], whole[:, h])


def test_position_zero_is_identity():
    _, q, k = _inputs(t=6)
    qo, ko = _ours(1e6, torch.zeros(3, 6, dtype=torch.long), q, k)
    assert torch.equal(qo, q) and torch.equal(ko, k)


@pytest.mark.parametrize("shape", [(7,), (2, 7), (4, 7), (3, 1, 7)])
def test_position_ids_must_be_3_by_t(shape):
    inv = inverse_frequencies(HEAD_DIM, 1e6)
    with pytest.raises(ValueError, match=r"\[3, T\]"):
        mrope_cos_sin(torch.zeros(shape, dtype=torch.long), inv, SECTION)


@pytest.mark.parametrize("section", [(16, 24, 16), (16, 24, 32), (32, 32, 32)])
def test_section_must_cover_half_head_dim(section):
    inv = inverse_frequencies(HEAD_DIM, 1e6)
    with pytest.raises(ValueError, match="section"):
        mrope_cos_sin(torch.zeros(3, 7, dtype=torch.long), inv, section)
