"""Per-GPU memory plan for a LongPT step: weights, gradients, optimizer state and activations.

Static terms are what the trainer does (``training/sharding.py``, FSDP2 over DP x CP around TP):
fp32 main weights, fp32 gradients and the two fp32 AdamW moments, all sharded over DP x CP; in
flight, the unsharded bf16 weights of the unit that runs and of the one prefetched, and one unit's
unsharded gradient (bf16, then its fp32 copy for the reduce-scatter). The largest unit is the
embedding or the output layer (vocab x hidden / TP), else an LM layer; the root unit (patch
embedding, final norm; with tied embeddings also the embedding) stays gathered for the whole step.

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


def fsdp_unit_parameters(cfg: Qwen25VLConfig, tp: int) -> dict[str, float]:
    """Parameters (per TP rank) of each kind of FSDP unit ``training/sharding.shard_units`` makes."""
    lm, vis = cfg.language, cfg.vision
    h, f, kv = lm.hidden_size, lm.ffn_hidden_size, lm.num_kv_heads * lm.head_dim
    vocab = lm.vocab_size * h / tp
    vh, vf = vis.hidden_size, vis.intermediate_size
    tied = lm.tie_word_embeddings
    return {
        "LM layer": (h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * f) / tp + 2 * h,
        "ViT block": 4 * vh * vh + 4 * vh + 3 * vh * vf + 2 * vf + vh + 2 * vh,
        "embedding": 0.0 if tied else vocab,
        "output layer": 0.0 if tied else vocab,
        "root": vis.patch_dim * vh + h + (vocab if tied else 0.0),
    }


STATIC_PREFIXES = ("fp32", "AdamW", "gathered", "one")  # the parts that do not scale with the row


def static_bytes(plan: "MemoryPlan") -> float:
    return sum(v for k, v in plan.parts.items() if k.startswith(STATIC_PREFIXES))


def candidate_layouts(gpus: int, heads: int, kv_heads: int, max_tp: int = 8):
    """TP x CP x DP layouts of ``gpus`` GPUs that the model's heads allow, fewest model-parallel
    ranks first (CP before TP at equal size: it cuts every activation, and TP stays in a node)."""
    from megatron_vlm.parallel.context_parallel import ContextParallelError, check_heads

    found = []
    for tp in (1, 2, 4, 8):
        for cp in (1, 2, 4, 8, 16):
            if tp > max_tp or gpus % (tp * cp) or heads % tp:
                continue
            if cp > 1:
                try:
                    check_heads(heads // tp, max(kv_heads // tp, 1), cp)
                except ContextParallelError:
                    continue
            found.append(Layout(tp=tp, cp=cp, dp=gpus // (tp * cp)))
    return sorted(found, key=lambda lay: (lay.tp * lay.cp, lay.tp))


def recommend_layout(cfg: Qwen25VLConfig, gpus: int, work: Workload, gpu_memory_gib: float,
                     slack: float = 0.92) -> Optional["MemoryPlan"]:
    """The first layout (see ``candidate_layouts``) whose plan fits ``slack`` of the GPU's memory
    (8% for the allocator's fragmentation and the CUDA context), or None."""
    for layout in candidate_layouts(gpus, cfg.language.num_attention_heads, cfg.language.num_kv_heads):
        plan = plan_memory(cfg, layout, work)
        if plan.total <= gpu_memory_gib * 1024**3 * slack:
            return plan
    return None


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
    shard = dp * cp
    units = fsdp_unit_parameters(cfg, tp)
    largest = max(units["embedding"], units["output layer"], units["LM layer"], units["ViT block"])
    parts = {
        "fp32 main weights (sharded over DP x CP)": FP32 * params / shard,
        "fp32 gradients (sharded over DP x CP)": FP32 * params / shard,
        "AdamW moments (2 x fp32, sharded over DP x CP)": 2 * FP32 * params / shard,
        "gathered bf16 weights (root + running unit + prefetched unit)": BF16 * (units["root"] + 2 * largest),
        "one unit's unsharded gradient (bf16 + fp32 for reduce-scatter)": (BF16 + FP32) * largest,
        "LM activations": lm_act,
        "ViT activations": vis_act + merger,
        "row embeddings (whole row on every CP rank)": 2 * BF16 * lm.hidden_size * work.seq_len,
        "rotary tables": 2 * BF16 * lm.head_dim * tokens,
        "logits + cross-entropy": (BF16 + 2 * FP32) * lm.vocab_size / tp * logit_tokens,
    }
    if cp > 1:  # all-to-all staging of q, k, v for one layer
        parts["CP all-to-all buffers"] = 2 * BF16 * (lm.hidden_size + 2 * lm.num_kv_heads * lm.head_dim) / tp * tokens
    return MemoryPlan(layout, work, parts)
