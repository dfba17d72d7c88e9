#!/usr/bin/env python
"""Per-GPU memory of a Qwen2.5-VL LongPT step over TP x CP x DP layouts and sequence lengths.

  python tools/bench/memory_estimator.py [--model 7b] [--gpus 64] [--lengths 32K,64K,128K,256K]
                                         [--gpu-memory-gib 79.6] [--no-recompute] [--logit-tokens N|all]

The static terms are the trainer's (FSDP2 over DP x CP: fp32 weights, gradients and AdamW moments
sharded, bf16 units gathered while they run); the first layout that fits is the recommendation
(fewest model-parallel ranks; CP before TP).

The activation terms count what our modules save (checked against autograd in
tests/unit/test_memory_plan.py); see megatron_vlm/parallel/memory.py for each term. Where a GPU
is lent, compare a row with `torch.cuda.max_memory_allocated()` of tools/bench/train_step.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron_vlm.config import PRESETS  # noqa: E402
from megatron_vlm.parallel.memory import (Workload, candidate_layouts, plan_memory,  # noqa: E402
                                         recommend_layout, static_bytes)

GIB = 1024**3


def parse_length(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024**2}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="7b", choices=sorted(PRESETS))
    parser.add_argument("--gpus", type=int, default=64, help="GPUs of the run (the 128K recipe: 8 nodes x 8)")
    parser.add_argument("--lengths", default="32K,64K,128K,256K")
    parser.add_argument("--gpu-memory-gib", type=float, default=79.6,
                        help="usable GPU memory (H100 80GB: 79.6 GiB; H20 96GB: 95.6; H200: 139.8)")
    parser.add_argument("--no-recompute", action="store_true")
    parser.add_argument("--logit-tokens", default="512", help="supervised tokens projected to the vocab, or 'all'")
    parser.add_argument("--breakdown", action="store_true", help="print every term of every row")
    args = parser.parse_args()

    cfg = PRESETS[args.model]()
    logit_tokens = None if args.logit_tokens == "all" else int(args.logit_tokens)
    print(f"Qwen2.5-VL-{args.model}: {cfg.language.num_layers} LM layers, ViT depth {cfg.vision.depth}; "
          f"recompute {'off' if args.no_recompute else 'full'}; logits for "
          f"{'all tokens' if logit_tokens is None else f'{logit_tokens} tokens'}; {args.gpus} GPUs; "
          "FSDP2 over DP x CP (fp32 weights, grads, AdamW sharded)")
    header = f"{'length':>7} {'TP':>3} {'CP':>3} {'DP':>3} {'weights+grads+opt':>18} {'activations':>12} {'total GiB':>10}  fits {args.gpu_memory_gib:g} GiB"
    print(header)
    print("-" * len(header))
    for length in (parse_length(x) for x in args.lengths.split(",")):
        work = Workload(length, logit_tokens=logit_tokens, recompute=not args.no_recompute)
        for layout in candidate_layouts(args.gpus, cfg.language.num_attention_heads, cfg.language.num_kv_heads):
            plan = plan_memory(cfg, layout, work)
            static = static_bytes(plan)
            dynamic = plan.total - static
            fits = "yes" if plan.total <= args.gpu_memory_gib * GIB * 0.92 else "no"  # 8% for allocator slack
            print(f"{length // 1024:>6}K {layout.tp:>3} {layout.cp:>3} {layout.dp:>3} {static / GIB:>18.1f} "
                  f"{dynamic / GIB:>12.1f} {plan.total / GIB:>10.1f}  {fits}")
            if args.breakdown:
                for name, value in plan.parts.items():
                    print(f"{'':>20}{name:<65}{value / GIB:>8.2f} GiB")
        best = recommend_layout(cfg, args.gpus, work, args.gpu_memory_gib)
        print(f"  {length // 1024}K recommended: " + (
            f"TP={best.layout.tp} CP={best.layout.cp} DP={best.layout.dp} ({best.total / GIB:.1f} GiB); "
            f"--set parallel.tensor_parallel={best.layout.tp} --set parallel.context_parallel={best.layout.cp}"
            if best else f"none fits {args.gpu_memory_gib:g} GiB"))


if __name__ == "__main__":
    main()
