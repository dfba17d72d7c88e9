"""What the studies cost in GPU time, from the paper's budget and model FLOPs (an estimate, not a
measurement): ``python -m megatron_vlm.study.cost [--gpus 64]`` prints the README's table.

* FLOPs per trained token: ``training/flops.py`` for Qwen2.5-VL-7B on one pool-native sample
  (Table 10a: 85.3K tokens, ~35 Letter pages at 144 DPI, 112 x 88 patches each), forward + backward
  of LM and ViT (recompute not counted, as MFU conventionally excludes it).
* Throughput: the paper's own, 5B tokens in 2.9K H20 hours (Table 6), is 38% MFU on H20 (148 TFLOPs
  bf16 dense); other GPUs are costed at that MFU and at a lower one (our trainer's GPU throughput is
  not measured yet: tools/bench/train_step.py on a GPU gives it).
* A study costs its distinct runs x the per-run budget (evaluation, data building not counted);
  studies sharing a --work share identical runs (e.g. Table 1's extract-single is Table 16's
  extract-single at 4e6), so all six together cost fewer runs than their sum.
"""

from __future__ import annotations

import argparse
from typing import Optional

from megatron_vlm.study.ablations import ABLATIONS

K = 1024
PAPER_RUN_TOKENS = 5 * 2**30
PAPER_RUN_H20_HOURS = 2900.0  # Table 6: "5B tokens (2.9K H20 hours)"
SAMPLE_TOKENS = int(85.3 * K)  # Table 10a mean
SAMPLE_PAGES = 35
PAGE_GRID = (1, 112, 88)  # patches of a Letter page at 144 DPI after smart_resize (2,464 LM tokens)


def flops_per_token() -> float:
    from megatron_vlm.config import PRESETS
    from megatron_vlm.training.flops import training_step_flops

    flops = training_step_flops(PRESETS["7b"](), [SAMPLE_TOKENS], [PAGE_GRID] * SAMPLE_PAGES, logit_tokens=256)
    return flops / SAMPLE_TOKENS


def paper_mfu() -> float:
    from megatron_vlm.training.flops import PEAK_BF16_FLOPS

    return flops_per_token() * PAPER_RUN_TOKENS / (PAPER_RUN_H20_HOURS * 3600 * PEAK_BF16_FLOPS["H20"])


def run_gpu_hours(gpu: str, mfu: Optional[float] = None, tokens: int = PAPER_RUN_TOKENS) -> float:
    from megatron_vlm.training.flops import PEAK_BF16_FLOPS

    return flops_per_token() * tokens / (PEAK_BF16_FLOPS[gpu] * (mfu or paper_mfu())) / 3600


def distinct_runs(names: Optional[list[str]] = None) -> dict[str, int]:
    """Runs per study, and (key 'all six') the distinct runs when they share one --work."""
    from megatron_vlm.study.commands import StudyConfig, run_key

    out, every = {}, set()
    for name in names or list(ABLATIONS):
        cfg = StudyConfig(name, "/work", vqa="/vqa", base_checkpoint="/base", launcher="slurm")
        keys = {run_key(cfg, v) for v in ABLATIONS[name].variants}
        out[name] = len(keys)
        every |= keys
    out["all six (one --work)"] = len(every)
    return out


def table(gpus: int = 64, low_mfu: float = 0.25) -> str:
    mfu = paper_mfu()
    h20, h100, h100_low = run_gpu_hours("H20"), run_gpu_hours("H100"), run_gpu_hours("H100", low_mfu)
    lines = [f"| study | runs | H20 (paper's throughput) | H100/H200 at {100 * mfu:.0f}% MFU | H100/H200 at "
             f"{100 * low_mfu:.0f}% MFU |", "|---|---:|---:|---:|---:|"]
    for name, runs in distinct_runs().items():
        cells = [f"{runs * hours / gpus / 24:.1f} days" if runs * hours / gpus > 48 else f"{runs * hours / gpus:.0f} h"
                 for hours in (h20, h100, h100_low)]
        lines.append(f"| {name} | {runs} | " + " | ".join(cells) + " |")
    head = (f"Per 5B-token run: {flops_per_token() / 1e9:.0f} GFLOPs per token, {h20:,.0f} H20 GPU-hours "
            f"({h20 / gpus:.1f} h on {gpus}), {h100:,.0f} H100 GPU-hours at {100 * mfu:.0f}% MFU "
            f"({h100 / gpus:.1f} h on {gpus}); wall time on {gpus} GPUs, runs one after another:")
    return head + "\n\n" + "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--low-mfu", type=float, default=0.25)
    args = p.parse_args(argv)
    print(table(args.gpus, args.low_mfu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
