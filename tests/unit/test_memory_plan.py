"""The memory plan's activation terms against the bytes autograd really saves in our modules.

Attention is swapped for a stand-in that saves exactly what flash attention saves (q, k, v, the
output and an fp32 log-sum-exp), because the CPU math path keeps fp32 copies and the full
probability matrix, which no GPU run has.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_vlm.config import LanguageConfig, Qwen25VLConfig, VisionConfig, qwen25vl_7b
from megatron_vlm.parallel.memory import (Layout, Workload, lm_layer_bytes_per_token, lm_parameters,
                                          plan_memory, vision_block_bytes_per_patch, vision_parameters)


class _FlashLike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale):
        with torch.no_grad():
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                 is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
                                                 ).transpose(0, 1).contiguous()  # [T, H, D] like flash
        lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # not exercised: only the saved set matters here
        raise NotImplementedError


def _flash_like(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale=None, backend=None):
    return _FlashLike.apply(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)


def _saved_activation_bytes(fn, module: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd saves, parameters (and views of them) excluded."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


CFG = Qwen25VLConfig(
    language=LanguageConfig(vocab_size=1024, hidden_size=256, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                            ffn_hidden_size=768, mrope_section=(8, 12, 12)),
    vision=VisionConfig(depth=1, hidden_size=128, num_heads=2, intermediate_size=320, out_hidden_size=256,
                        fullatt_block_indexes=(0,))).validate()


def test_lm_layer_activation_bytes_match_what_autograd_saves(megatron_world, monkeypatch):
    from megatron_vlm.checkpoint.convert import build_model
    from megatron_vlm.models import language
    from megatron_vlm.models.qwen2_5_vl import packed_seq_params

    monkeypatch.setattr(language, "varlen_attention", _flash_like)
    model = build_model(CFG, torch.bfloat16).train()
    seq = 512
    ids = torch.randint(0, 1000, (1, seq))
    positions = torch.arange(seq)[None, None].expand(3, 1, seq)
    params = packed_seq_params(torch.tensor([0, seq], dtype=torch.int32))
    lm = model.language_model
    hidden = lm.embed_tokens(ids).detach().requires_grad_()
    rope = lm.rotary(positions, torch.bfloat16)
    cos, _ = rope.tables()
    layer = lm.decoder.layers[0]
    measured = _saved_activation_bytes(lambda: layer(hidden_states=hidden, attention_mask=None,
                                                     rotary_pos_emb=rope, packed_seq_params=params),
                                       layer)
    measured -= 2 * cos.untyped_storage().nbytes()  # the rotary tables are shared by all layers
    predicted = lm_layer_bytes_per_token(CFG.language, tp=1) * seq
    assert abs(measured - predicted) <= 0.03 * predicted, (measured, predicted)


def test_vision_block_activation_bytes_match_what_autograd_saves(monkeypatch):
    from megatron_vlm.models import vision as vision_module

    monkeypatch.setattr(vision_module, "varlen_attention", _flash_like)
    tower = vision_module.Qwen25VisionModel(CFG.vision).to(torch.bfloat16).train()
    grid = torch.tensor([[1, 16, 16]])
    plan = vision_module.vision_plan(grid, CFG.vision)
    patches = 256
    x = torch.randn(patches, CFG.vision.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    angles = tower.rotary_pos_emb(plan.rotary_pos)
    emb = torch.cat((angles, angles), dim=-1).unsqueeze(1)
    cos, sin = emb.cos(), emb.sin()
    block = tower.blocks[0]
    measured = _saved_activation_bytes(lambda: block(x, plan.cu_seqlens, plan.max_seqlen, cos, sin), block)
    measured -= cos.untyped_storage().nbytes() + sin.untyped_storage().nbytes()
    predicted = vision_block_bytes_per_patch(CFG.vision) * patches
    assert abs(measured - predicted) <= 0.05 * predicted, (measured, predicted)


def test_parameter_counts_match_the_models(megatron_world):
    from megatron_vlm.checkpoint.convert import build_model

    model = build_model(CFG, torch.float32, init=False)
    lm_count = sum(p.numel() for n, p in model.named_parameters() if n.startswith("language_model."))
    vision_count = sum(p.numel() for n, p in model.named_parameters() if n.startswith("vision."))
    assert lm_parameters(CFG.language, tp=1) == lm_count
    assert vision_parameters(CFG.vision, CFG.language.hidden_size) == vision_count


def test_7b_plan_is_consistent():
    cfg = qwen25vl_7b()
    # 7B: ~8.3B parameters with the vision tower, as published
    params = lm_parameters(cfg.language, 1) + vision_parameters(cfg.vision, cfg.language.hidden_size)
    assert 8.0e9 < params < 8.6e9
    one = plan_memory(cfg, Layout(tp=1, cp=1, dp=8), Workload(seq_len=131072))
    two = plan_memory(cfg, Layout(tp=1, cp=2, dp=4), Workload(seq_len=131072))
    assert two.parts["LM activations"] == pytest.approx(one.parts["LM activations"] / 2)
    full_logits = plan_memory(cfg, Layout(cp=2, dp=4), Workload(seq_len=131072, logit_tokens=None))
    assert full_logits.parts["logits + cross-entropy"] > 50 * 2**30  # why output_index exists


@pytest.mark.parametrize("recipe,gpu_gib", [("qwen25vl_7b_longpt_128k", 95.6), ("qwen25vl_7b_longpt_128k_80gb", 79.6)],
                         ids=["H20-96GB", "H100-80GB"])
def test_the_128k_recipes_use_the_layout_the_estimator_recommends_and_fit(recipe, gpu_gib):
    """The plan's static terms are the trainer's (FSDP2 over DP x CP); each 7B 128K recipe runs in
    the layout recommended for its GPU, and that layout fits with 8% to spare."""
    from megatron_vlm.parallel.memory import recommend_layout, static_bytes
    from megatron_vlm.training.recipes import RECIPES

    cfg = RECIPES[recipe]()
    model = qwen25vl_7b()
    gpus = 64
    work = Workload(seq_len=cfg.data.max_seq_len, recompute=cfg.model.recompute)
    best = recommend_layout(model, gpus, work, gpu_gib)
    assert best is not None
    assert (best.layout.tp, best.layout.cp) == (cfg.parallel.tensor_parallel, cfg.parallel.context_parallel)
    assert best.total <= 0.92 * gpu_gib * 2**30
    # sharded fp32 weights + grads + two moments = 16 bytes per parameter over DP x CP
    params = lm_parameters(model.language, 1) + vision_parameters(model.vision, model.language.hidden_size)
    sharded = sum(v for k, v in best.parts.items() if "(sharded over" in k) + best.parts["AdamW moments (2 x fp32, sharded over DP x CP)"]
    assert sharded == pytest.approx(16 * params / gpus)
    assert static_bytes(best) < 8 * 2**30
