"""The vision encoder against Hugging Face's Qwen2.5-VL visual tower (fp32, CPU, random weights)."""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.config import VisionConfig
from megatron_vlm.models.norms import RMSNorm
from megatron_vlm.models.vision import Qwen25VisionModel, vision_plan

hf_vl = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig  # noqa: E402

ATOL = 1e-5
GEOMETRY = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                fullatt_block_indexes=[1, 3])


def _configs() -> tuple[VisionConfig, Qwen2_5_VLVisionConfig]:
    ours = VisionConfig(**{**GEOMETRY, "fullatt_block_indexes": tuple(GEOMETRY["fullatt_block_indexes"])},
                        in_channels=3)
    hf = Qwen2_5_VLVisionConfig(**GEOMETRY, in_channels=3, hidden_act="silu")
    hf._attn_implementation = "sdpa"
    return ours, hf


@pytest.fixture(scope="module")
def models():
    ours_cfg, hf_cfg = _configs()
    torch.manual_seed(0)
    hf = hf_vl.Qwen2_5_VisionTransformerPretrainedModel(hf_cfg).float().eval()
    with torch.no_grad():  # non-trivial weights everywhere, norms included
        for name, p in hf.named_parameters():
            p.copy_((1.0 if "norm" in name or "ln_q" in name else 0.0) + 0.1 * torch.randn_like(p))
    ours = Qwen25VisionModel(ours_cfg).float().eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # names and shapes identical
    return ours, hf


def _pixels(grid: list[list[int]], patch_dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.tensor(grid, dtype=torch.long)
    n = int((g[:, 0] * g[:, 1] * g[:, 2]).sum())
    return torch.randn(n, patch_dim, generator=torch.Generator().manual_seed(seed)), g


GRIDS = {
    "one_image": [[1, 8, 12]],
    "mixed_sizes_partial_windows": [[1, 6, 10], [1, 16, 8], [1, 4, 4]],
    "exact_window_multiple": [[1, 16, 16]],
    "video_and_image": [[2, 8, 12], [1, 6, 6]],
}


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_forward_matches_hf(models, grid):
    ours, hf = models
    pixels, g = _pixels(grid, ours.config.patch_dim)
    with torch.no_grad():
        expected = hf(pixels, g)
        got = ours(pixels, g)
        got_planned = ours(pixels, plan=vision_plan(g, ours.config))
    assert got.shape == (pixels.shape[0] // 4, 64)
    assert (got - expected).abs().max().item() <= ATOL
    torch.testing.assert_close(got_planned, got, atol=0, rtol=0)


@pytest.mark.parametrize("grid", [[[1, 6, 10]], [[1, 16, 8], [2, 8, 12]], [[1, 18, 30], [1, 2, 2]]])
def test_plan_matches_hf_window_index_and_rotary(models, grid):
    ours, hf = models
    g = torch.tensor(grid)
    plan = vision_plan(g, ours.config)
    window_index, cu_window = hf.get_window_index(g)
    torch.testing.assert_close(plan.window_index, window_index, atol=0, rtol=0)
    hf_cu = torch.unique_consecutive(torch.tensor(cu_window, dtype=torch.int32))
    torch.testing.assert_close(plan.cu_window_seqlens, hf_cu, atol=0, rtol=0)
    torch.testing.assert_close(plan.reverse_index, torch.argsort(window_index), atol=0, rtol=0)
    hf_rot = hf.rot_pos_emb(g).view(-1, 4, ours.config.head_dim // 2)[window_index].view(-1, ours.config.head_dim // 2)
    torch.testing.assert_close(ours.rotary_pos_emb(plan.rotary_pos), hf_rot, atol=0, rtol=0)
    assert plan.max_window_seqlen == int((hf_cu[1:] - hf_cu[:-1]).max())


def test_plan_cu_seqlens_int32_from_zero():
    cfg, _ = _configs()
    plan = vision_plan(torch.tensor([[1, 6, 10], [2, 16, 8]]), cfg)
    for cu in (plan.cu_seqlens, plan.cu_window_seqlens):
        assert cu.dtype == torch.int32 and cu[0].item() == 0 and cu[-1].item() == plan.num_patches
    assert plan.cu_seqlens.tolist() == [0, 60, 188, 316]  # one segment per frame
    assert isinstance(plan.max_seqlen, int) and plan.max_seqlen == 128
    assert isinstance(plan.max_window_seqlen, int) and plan.max_window_seqlen == 64
    with pytest.raises(ValueError):
        vision_plan(torch.tensor([[1, 5, 8]]), cfg)  # h not divisible by the merge size


def _grads(model: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(pixels, grid)
    out.sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradients_match_hf_and_recompute(models):
    ours, hf = models
    pixels, g = _pixels(GRIDS["mixed_sizes_partial_windows"], ours.config.patch_dim, seed=2)
    ours.train()
    try:
        _, hf_grads = _grads(hf, pixels, g)
        out, grads = _grads(ours, pixels, g)
        assert grads.keys() == hf_grads.keys()
        for name, grad in grads.items():  # sum() makes grads O(10-50): compare relative to their scale
            scale = hf_grads[name].abs().max().clamp_min(1.0)
            assert ((grad - hf_grads[name]).abs().max() / scale).item() <= ATOL, name

        ours.recompute = True
        out_rc, grads_rc = _grads(ours, pixels, g)
        torch.testing.assert_close(out_rc, out, atol=0, rtol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grads_rc[name], grad, atol=0, rtol=0, msg=name)
    finally:
        ours.recompute = False
        ours.eval()
        ours.zero_grad(set_to_none=True)
        hf.zero_grad(set_to_none=True)


def test_state_dict_has_only_hf_names(models):
    ours, hf = models
    assert list(ours.state_dict().keys()) == list(hf.state_dict().keys())
    assert "rotary_pos_emb.inv_freq" not in ours.state_dict()
    assert ours.patch_embed.proj.weight.shape == (32, 3, 2, 14, 14)


def test_inv_freq_stays_fp32_under_bf16_cast():
    cfg, _ = _configs()
    model = Qwen25VisionModel(cfg)
    ref = model.rotary_pos_emb.inv_freq.clone()
    model.bfloat16()
    assert model.rotary_pos_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq, ref, atol=0, rtol=0)


def test_rmsnorm_matches_hf_and_accepts_config_kwarg():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = RMSNorm(config=object(), hidden_size=16, eps=1e-5)
    ref = Qwen2RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        ref.weight.copy_(norm.weight)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(norm(x), ref(x), atol=0, rtol=0)
    assert list(norm.state_dict()) == ["weight"]
