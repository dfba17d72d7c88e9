#!/usr/bin/env python
"""Per-GPU memory of a Qwen2.5-VL LongPT step over TP x CP x DP layouts and sequence lengths.

  python tools/bench/memory_estimator.py [--model 7b] [--gpus 8] [--lengths 32K,64K,128K,256K]
                                         [--gpu-memory-gib 80] [--no-recompute] [--logit-tokens N|all]

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
from megatron_vlm.parallel.context_parallel import ContextParallelError, check_heads  # noqa: E402
from megatron_vlm.parallel.memory import Layout, Workload, plan_memory  # noqa: E402

GIB = 1024**3


def parse_length(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024**2}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def layouts(gpus: int, heads: int, kv_heads: int):
    for tp in (1, 2, 4, 8):
        for cp in (1, 2, 4, 8):
            if gpus % (tp * cp) or heads % tp:
                continue
            try:
                if cp > 1:
                    check_heads(heads // tp, max(kv_heads // tp, 1), cp)
            except ContextParallelError:
                continue
            yield Layout(tp=tp, cp=cp, dp=gpus // (tp * cp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="7b", choices=sorted(PRESETS))
    parser.add_argument("--gpus", type=int, default=8, help="GPUs holding one model replica group")
    parser.add_argument("--lengths", default="32K,64K,128K,256K")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--no-recompute", action="store_true")
    parser.add_argument("--logit-tokens", default="512", help="supervised tokens projected to the vocab, or 'all'")
    parser.add_argument("--bf16-grads", action="store_true", help="bf16 gradient buffer instead of fp32 main grads")
    parser.add_argument("--fsdp", action="store_true", help="shard weights and grads over DP x CP (ZeRO-3)")
    parser.add_argument("--breakdown", action="store_true", help="print every term of every row")
    args = parser.parse_args()

    cfg = PRESETS[args.model]()
    logit_tokens = None if args.logit_tokens == "all" else int(args.logit_tokens)
    print(f"Qwen2.5-VL-{args.model}: {cfg.language.num_layers} LM layers, ViT depth {cfg.vision.depth}; "
          f"recompute {'off' if args.no_recompute else 'full'}; logits for "
          f"{'all tokens' if logit_tokens is None else f'{logit_tokens} tokens'}; {args.gpus} GPUs; grads "
          f"{'bf16' if args.bf16_grads else 'fp32'}{'; weights+grads sharded (FSDP)' if args.fsdp else ''}")
    header = f"{'length':>7} {'TP':>3} {'CP':>3} {'DP':>3} {'weights+grads+opt':>18} {'activations':>12} {'total GiB':>10}  fits {args.gpu_memory_gib:g} GiB"
    print(header)
    print("-" * len(header))
    for length in (parse_length(x) for x in args.lengths.split(",")):
        for layout in layouts(args.gpus, cfg.language.num_attention_heads, cfg.language.num_kv_heads):
            work = Workload(length, logit_tokens=logit_tokens, recompute=not args.no_recompute,
                            fp32_grads=not args.bf16_grads, shard_weights_and_grads=args.fsdp)
            plan = plan_memory(cfg, layout, work)
            static = sum(v for k, v in plan.parts.items() if k.split()[0] in ("weights", "gradients", "optimizer"))
            dynamic = plan.total - static
            fits = "yes" if plan.total <= args.gpu_memory_gib * GIB * 0.92 else "no"  # 8% for allocator slack
            print(f"{length // 1024:>6}K {layout.tp:>3} {layout.cp:>3} {layout.dp:>3} {static / GIB:>18.1f} "
                  f"{dynamic / GIB:>12.1f} {plan.total / GIB:>10.1f}  {fits}")
            if args.breakdown:
                for name, value in plan.parts.items():
                    print(f"{'':>20}{name:<55}{value / GIB:>8.2f} GiB")


if __name__ == "__main__":
    main()
