"""Packed (varlen) attention against a dense float64 reference written out here."""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.models.attention import select_backend, varlen_attention

TOL = 1e-5
LENGTHS = [5, 1, 9, 3, 12]  # uneven, with a length-1 document


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("VLM_ATTN_BACKEND", raising=False)


def _cu(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu


def _qkv(lengths, hq, hkv, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    return (torch.randn(t, hq, d, generator=g, dtype=dtype), torch.randn(t, hkv, d, generator=g, dtype=dtype),
            torch.randn(t, hkv, d, generator=g, dtype=dtype))


def dense_reference(q, k, v, lengths, causal, scale=None):
    """Full [T, T] scores in float64 with a block-diagonal (optionally causal) mask."""
    t, hq, d = q.shape
    rep = hq // k.shape[1]
    q64, k64, v64 = q.double(), k.double(), v.double()
    k64 = torch.stack([k64[:, h // rep] for h in range(hq)], dim=1)  # query head h reads kv head h // rep
    v64 = torch.stack([v64[:, h // rep] for h in range(hq)], dim=1)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = doc[:, None] == doc[None, :]
    if causal:
        idx = torch.arange(t)
        allowed = allowed & (idx[None, :] <= idx[:, None])
    scale = d**-0.5 if scale is None else scale
    scores = torch.einsum("qhd,khd->hqk", q64, k64) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v64)


def _run(q, k, v, lengths, causal, scale=None, backend=None):
    return varlen_attention(q, k, v, _cu(lengths), max(lengths), causal, softmax_scale=scale, backend=backend)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hkv", [4, 2, 1])
@pytest.mark.parametrize("scale", [None, 0.37])
def test_sdpa_matches_dense_reference(causal, hkv, scale):
    q, k, v = _qkv(LENGTHS, 4, hkv, seed=hkv)
    out = _run(q, k, v, LENGTHS, causal, scale, backend="sdpa")
    ref = dense_reference(q, k, v, LENGTHS, causal, scale)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() <= TOL


def test_reference_distinguishes_the_variants():
    """The settings above are not interchangeable, so the comparison can fail."""
    q, k, v = _qkv(LENGTHS, 4, 2)
    base = dense_reference(q, k, v, LENGTHS, True)
    for other in (dense_reference(q, k, v, LENGTHS, False), dense_reference(q, k, v, LENGTHS, True, 0.37),
                  dense_reference(q, k, v, [sum(LENGTHS)], True)):
        assert (base - other).abs().max().item() > 1e-2


def test_auto_selected_backend_on_cpu_matches_reference():
    q, k, v = _qkv(LENGTHS, 4, 2, seed=5)
    out = _run(q, k, v, LENGTHS, True)
    assert (out.double() - dense_reference(q, k, v, LENGTHS, True)).abs().max().item() <= TOL


def test_length_one_document_attends_only_to_itself():
    """A one-token document's output is exactly its own value row (per GQA group)."""
    q, k, v = _qkv(LENGTHS, 4, 2, seed=6)
    out = _run(q, k, v, LENGTHS, causal=False)
    row = LENGTHS[0]  # the length-1 document sits right after the first one
    expected = v[row].repeat_interleave(2, dim=0)
    assert torch.allclose(out[row], expected, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_no_leakage_between_documents(causal):
    q, k, v = _qkv(LENGTHS, 4, 2, seed=1)
    cu = _cu(LENGTHS).tolist()
    base = _run(q, k, v, LENGTHS, causal)
    for i in range(len(LENGTHS)):
        s, e = cu[i], cu[i + 1]
        k2, v2 = k.clone(), v.clone()
        k2[s:e] += 3.0 * torch.randn_like(k2[s:e])
        v2[s:e] += 3.0 * torch.randn_like(v2[s:e])
        out = _run(q, k2, v2, LENGTHS, causal)
        outside = torch.ones(sum(LENGTHS), dtype=torch.bool)
        outside[s:e] = False
        assert torch.equal(out[outside], base[outside])
        assert (out[s:e] - base[s:e]).abs().max().item() > 1e-3  # the change did reach its own document


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_gradients_match_dense_reference(causal, hkv):
    q, k, v = _qkv(LENGTHS, 4, hkv, seed=10 + hkv)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(99))
    qa, ka, va = (t.clone().requires_grad_(True) for t in (q, k, v))
    (_run(qa, ka, va, LENGTHS, causal, 0.3, backend="sdpa") * g).sum().backward()
    qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
    (dense_reference(qr, kr, vr, LENGTHS, causal, 0.3) * g.double()).sum().backward()
    for ours, ref in ((qa, qr), (ka, kr), (va, vr)):
        assert ours.grad.shape == ref.grad.shape
        assert (ours.grad.double() - ref.grad).abs().max().item() <= TOL
        assert ref.grad.abs().max().item() > 0.1


def test_select_backend_cpu_fp32_is_sdpa():
    assert select_backend(torch.zeros(4, 2, 8)) == "sdpa"
    assert select_backend(torch.zeros(4, 2, 8), "sdpa") == "sdpa"


@pytest.mark.parametrize("name", ["flash_attn", "torch_varlen"])
def test_forcing_a_gpu_backend_on_cpu_is_an_error(name, monkeypatch):
    q, k, v = _qkv([3, 4], 2, 1)
    with pytest.raises(RuntimeError, match=name) as err:
        select_backend(q, name)
    assert "VLM_ATTN_BACKEND" in str(err.value) and "cpu" in str(err.value).lower()
    with pytest.raises(RuntimeError, match=name):
        _run(q, k, v, [3, 4], True, backend=name)
    monkeypatch.setenv("VLM_ATTN_BACKEND", name)
    with pytest.raises(RuntimeError, match=name):
        select_backend(q)
    with pytest.raises(RuntimeError, match=name):
        _run(q, k, v, [3, 4], True)
    with pytest.raises(RuntimeError, match=name):  # bf16 on CPU is no better
        select_backend(q.bfloat16())


def test_env_var_forcing_sdpa_works(monkeypatch):
    monkeypatch.setenv("VLM_ATTN_BACKEND", "sdpa")
    q, k, v = _qkv([3, 4], 2, 1)
    assert select_backend(q) == "sdpa"
    assert (_run(q, k, v, [3, 4], True).double() - dense_reference(q, k, v, [3, 4], True)).abs().max() <= TOL


def test_unknown_backend_is_a_value_error(monkeypatch):
    q = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="xformers"):
        select_backend(q, "xformers")
    monkeypatch.setenv("VLM_ATTN_BACKEND", "xformers")
    with pytest.raises(ValueError, match="xformers"):
        select_backend(q)


def test_bad_shapes_are_value_errors():
    q, k, v = _qkv([3, 4], 4, 3)
    with pytest.raises(ValueError, match="multiple"):
        _run(q, k, v, [3, 4], True)
    q, k, v = _qkv([3, 4], 4, 2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32), 3, True)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, torch.tensor([1, 3, 7], dtype=torch.int32), 4, True)
    with pytest.raises(ValueError):
        varlen_attention(q[None], k[None], v[None], _cu([3, 4]), 4, True)


def test_torch_varlen_reads_the_signature_once(monkeypatch):
    """The keyword spelling of torch's varlen_attn (is_causal vs window_size, enable_gqa) is looked
    up once per function, not on every attention call of every layer."""
    import inspect

    from megatron_vlm.models import attention

    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append({"scale": scale, "window_size": window_size, "enable_gqa": enable_gqa})
        return q

    looked_up = []
    real_signature = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda fn, *a, **k: looked_up.append(fn) or real_signature(fn, *a, **k))
    monkeypatch.setattr(attention, "_torch_varlen_func", lambda: fake_varlen)
    q, k = torch.randn(6, 4, 8), torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    for _ in range(3):
        attention._torch_varlen(q, k, k, cu, 4, True, 0.5)
    attention._torch_varlen(q, k, k, cu, 4, False, 0.5)
    assert [fn for fn in looked_up if fn is fake_varlen] == [fake_varlen]
    assert calls[0] == {"scale": 0.5, "window_size": (-1, 0), "enable_gqa": True}
    assert calls[-1]["window_size"] == (-1, -1)
