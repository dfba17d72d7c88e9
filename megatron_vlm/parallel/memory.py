"""Per-GPU memory plan for a LongPT step: weights, gradients, optimizer state and activations.

The activation terms count what *our* modules save for backward, tensor by tensor (bf16 training,
flash-style attention that keeps q, k, v, the output and an fp32 log-sum-exp):

LM layer, per token (TP = t, no sequence parallelism, so norms and residuals are not split):
  two RMSNorms: fp32 copy of the input (4H) + normalised bf16 (2H) + scaled output (2H)  = 16H
  attention: rotated q, k, v (2(H + 2·kv)/t), output (2H/t), log-sum-exp (4·heads/t)
  SwiGLU MLP: fc1 output [gate|up] (4F/t), silu(gate) (2F/t), an internal add (2F/t), product (2F/t)
ViT block, per patch (replicated over TP): norms 16h, q/k/v/out 8h, lse 4·heads, MLP 8f.
``tests/unit/test_memory_plan.py`` checks these against the bytes autograd actually saves.

Full recompute keeps only each layer's (block's) input plus one layer's working set. Logits cost
10 bytes per vocabulary entry per token (bf16 logits, fp32 copy, fp32 softmax), so the step should
project only supervised tokens (``output_index``). Under CP every rank embeds the whole row and
encodes its share of the images (see ``context_parallel``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_vlm.config import LanguageConfig, Qwen25VLConfig, VisionConfig

BF16 = 2
FP32 = 4


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    cp: int = 1
    dp: int = 1


@dataclass(frozen=True)
class Workload:
    seq_len: int
    image_token_share: float = 0.95  # pages are ~95% of a LongPT row (the rest: prompt + answer)
    logit_tokens: Optional[int] = 512  # supervised tokens projected to the vocabulary; None = all
    recompute: bool = True  # full activation recompute, LM layers and ViT blocks
    fp32_grads: bool = True  # Megatron DDP's fp32 main-grad buffer (False: bf16 grads)
    shard_weights_and_grads: bool = False  # FSDP / ZeRO-3 over DP x CP (the paper's FSDP 4)


def lm_layer_bytes_per_token(lm: LanguageConfig, tp: int) -> float:
    h, f, heads, kv = lm.hidden_size, lm.ffn_hidden_size, lm.num_attention_heads, lm.num_kv_heads * lm.head_dim
    norms = 2 * (FP32 * h + BF16 * h + BF16 * h)
    attention = (BF16 * (h + 2 * kv) + BF16 * h + FP32 * heads) / tp
    mlp = 5 * BF16 * f / tp
    return norms + attention + mlp


def vision_block_bytes_per_patch(vis: VisionConfig) -> float:
    h, f = vis.hidden_size, vis.intermediate_size
    return 2 * (FP32 * h + 2 * BF16 * h) + 4 * BF16 * h + FP32 * vis.num_heads + 4 * BF16 * f


def lm_parameters(lm: LanguageConfig, tp: int) -> float:
    h, f, kv = lm.hidden_size, lm.ffn_hidden_size, lm.num_kv_heads * lm.head_dim
    per_layer = (h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * f) / tp + 2 * h
    vocab = lm.vocab_size * h / tp * (1 if lm.tie_word_embeddings else 2)
    return lm.num_layers * per_layer + vocab + h


def vision_parameters(vis: VisionConfig, lm_hidden: int) -> float:
    h, f = vis.hidden_size, vis.intermediate_size
    block = 4 * h * h + 4 * h + 3 * h * f + 2 * f + h + 2 * h
    merged = h * vis.merge_unit
    merger = h + merged * merged + merged + merged * lm_hidden + lm_hidden
    return vis.depth * block + vis.patch_dim * h + merger


@dataclass
class MemoryPlan:
    layout: Layout
    workload: Workload
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def plan_memory(cfg: Qwen25VLConfig, layout: Layout, work: Workload) -> MemoryPlan:
    lm, vis = cfg.language, cfg.vision
    tp, cp, dp = layout.tp, layout.cp, layout.dp
    params = lm_parameters(lm, tp) + vision_parameters(vis, lm.hidden_size)
    tokens = work.seq_len / cp
    patches = vis.merge_unit * work.image_token_share * work.seq_len / cp
    layer = lm_layer_bytes_per_token(lm, tp) * tokens
    block = vision_block_bytes_per_patch(vis) * patches
    if work.recompute:
        lm_act = lm.num_layers * BF16 * lm.hidden_size * tokens + layer
        vis_act = vis.depth * BF16 * vis.hidden_size * patches + block
    else:
        lm_act = lm.num_layers * layer
        vis_act = vis.depth * block
    merger = (2 * (FP32 + 2 * BF16) * vis.hidden_size + 2 * BF16 * vis.hidden_size) * patches
    logit_tokens = tokens if work.logit_tokens is None else min(work.logit_tokens, tokens)
    shard = dp * cp if work.shard_weights_and_grads else 1
    grad_bytes = FP32 if work.fp32_grads else BF16
    parts = {
        "weights (bf16)": BF16 * params / shard,
        f"gradients ({'fp32' if work.fp32_grads else 'bf16'})": grad_bytes * params / shard,
        "optimizer (fp32 master + Adam, sharded over DP x CP)": 3 * FP32 * params / (dp * cp),
        "LM activations": lm_act,
        "ViT activations": vis_act + merger,
        "row embeddings (whole row on every CP rank)": 2 * BF16 * lm.hidden_size * work.seq_len,
        "rotary tables": 2 * BF16 * lm.head_dim * tokens,
        "logits + cross-entropy": (BF16 + 2 * FP32) * lm.vocab_size / tp * logit_tokens,
    }
    if cp > 1:  # all-to-all staging of q, k, v for one layer
        parts["CP all-to-all buffers"] = 2 * BF16 * (lm.hidden_size + 2 * lm.num_kv_heads * lm.head_dim) / tp * tokens
    return MemoryPlan(layout, work, parts)
