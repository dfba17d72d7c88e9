"""GPU checks (skipped without CUDA): the fast varlen attention backends and the whole model in
bf16, each judged against an fp32 reference: our bf16 error may be at most ~2x the error of the
reference implementation's own bf16 path."""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.models.attention import BACKENDS, select_backend, varlen_attention
from megatron_vlm.testing import make_sample, pack
from tests.conftest import random_hf_model

pytestmark = pytest.mark.gpu


def _packed_qkv(dtype, heads=8, kv_heads=2, dim=128, lengths=(700, 1, 333, 1024)):
    g = torch.Generator(device="cuda").manual_seed(0)
    total = sum(lengths)
    q = torch.randn(total, heads, dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(total, kv_heads, dim, device="cuda", generator=g).to(dtype)
    v = torch.randn(total, kv_heads, dim, device="cuda", generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return q, k, v, cu, max(lengths)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
def test_fast_varlen_backends_match_fp32_reference(backend, causal):
    q, k, v, cu, max_len = _packed_qkv(torch.bfloat16)
    try:
        select_backend(q, backend)
    except RuntimeError:
        pytest.skip(f"{backend} not available here")
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    ref = varlen_attention(q.float(), k.float(), v.float(), cu, max_len, causal, backend="sdpa")
    bf16_sdpa = varlen_attention(q, k, v, cu, max_len, causal, backend="sdpa")
    fast = varlen_attention(q, k, v, cu, max_len, causal, backend=backend)
    sdpa_err = (bf16_sdpa.float() - ref).abs().max().item()
    fast_err = (fast.float() - ref).abs().max().item()
    assert fast_err <= 2 * sdpa_err + 1e-3, (fast_err, sdpa_err)

    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    sdpa_grads = torch.autograd.grad(bf16_sdpa, (q, k, v), grad.bfloat16())
    fast_grads = torch.autograd.grad(fast, (q, k, v), grad.bfloat16())
    for r, s, f in zip(ref_grads, sdpa_grads, fast_grads):
        assert (f.float() - r).abs().max() <= 2 * (s.float() - r).abs().max() + 1e-3


def test_model_bf16_matches_hf_within_bf16_error():
    from megatron_vlm.checkpoint.convert import build_model, load_hf_tensors
    from megatron_vlm.config import Qwen25VLConfig
    from megatron_vlm.data.rope_index import packed_mrope_positions
    from megatron_vlm.models.qwen2_5_vl import packed_seq_params

    hf32 = random_hf_model(seed=0).cuda()
    cfg = Qwen25VLConfig.from_hf_dict(hf32.config.to_dict())
    state = hf32.state_dict()
    ours = build_model(cfg, torch.bfloat16).cuda().eval()
    load_hf_tensors(ours, cfg, state.keys(), lambda n: state[n].bfloat16())
    hf16 = random_hf_model(seed=0).to(torch.bfloat16).cuda()

    g = torch.Generator().manual_seed(1)
    docs = [make_sample(cfg, [50, (1, 16, 12), 30], g), make_sample(cfg, [200], g)]
    row, cu = pack(docs)
    positions = packed_mrope_positions(row.input_ids, cu, row.image_grid_thw).cuda()[:, None, :]
    with torch.no_grad():
        ours_logits = ours(row.input_ids[None].cuda(), positions, row.pixel_values.cuda().bfloat16(),
                           row.image_grid_thw.cuda(), packed_seq_params=packed_seq_params(cu.cuda()))[0].float()
        for doc, start, end in zip(docs, cu[:-1].tolist(), cu[1:].tolist()):
            args = dict(input_ids=doc.input_ids[None].cuda(), image_grid_thw=None if doc.image_grid_thw is None
                        else doc.image_grid_thw.cuda())
            pix = doc.pixel_values.cuda() if doc.pixel_values is not None else None
            ref = hf32(**args, pixel_values=pix).logits[0].float()
            hf_bf16 = hf16(**args, pixel_values=None if pix is None else pix.bfloat16()).logits[0].float()
            hf_err = (hf_bf16 - ref).abs().max().item()
            our_err = (ours_logits[start:end] - ref).abs().max().item()
            assert our_err <= 2 * hf_err + 1e-3, (our_err, hf_err)
