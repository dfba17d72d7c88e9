#!/usr/bin/env python
"""Mix task JSONL files into one training mixture, with Table 10/11-style statistics and a histogram.

  python tools/mix_data.py --input extract_single.jsonl:1 extract_multi.jsonl:1 reasoning.jsonl:1 \
      --output MIX.jsonl [--distribution pool-native|long-biased] [--token-budget 5B] \
      [--task-mix extract-single:0.4,extract-multi:0.4,reasoning:0.2 | --task-mix none] \
      [--short-data llava.jsonl[:W] ... --short-ratio 0.2 [--short-image-root DIR]] [--seed S]

Defaults follow the MMProLong recipe: 40/40/20 token shares of extract-single / extract-multi /
reasoning, pool-native lengths, no short data. Budgets use binary prefixes (K=2^10, M=2^20,
B=2^30) as the paper does; without --token-budget the mixture is the largest the inputs allow at
these ratios. Writes MIX.jsonl, MIX.stats.json, MIX.stats.md (the tables), MIX.hist.png and
MIX.report.json (every dropped line with its reason, unused samples per pool, warnings). A rerun
with the same inputs and settings does nothing (--force remakes).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_vlm import cli  # noqa: E402
from megatron_vlm.mixing.mixer import (DISTRIBUTIONS, LONG_BIASED_FRACTION, LONG_THRESHOLD, MixConfig,  # noqa: E402
                                         MixError, mix, parse_input_spec, parse_task_mix, parse_token_count)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE[:WEIGHT]",
                   help="task JSONL files (samples format); weights split a task's share among files")
    p.add_argument("--output", required=True, metavar="MIX.jsonl",
                   help="the mixture (MIX.stats.json, MIX.stats.md, MIX.hist.png, MIX.report.json beside it)")
    p.add_argument("--distribution", choices=DISTRIBUTIONS, default="pool-native",
                   help="pool-native: lengths as the pool gives them; long-biased: favour >= 100K samples")
    p.add_argument("--task-mix", default=None, metavar="TASK:SHARE,...",
                   help="token shares per task (default 40/40/20 of extract-single/extract-multi/reasoning); "
                        "'none': the file weights alone set the shares")
    p.add_argument("--token-budget", default=None, metavar="N[K|M|B]", help="tokens in the mixture, e.g. 5B")
    p.add_argument("--short-data", nargs="+", default=[], metavar="FILE[:WEIGHT]",
                   help="short-context data: LLaVA conversation JSONL or samples JSONL")
    p.add_argument("--short-ratio", type=float, default=0.0, help="share of the token budget for --short-data")
    p.add_argument("--short-image-root", default=None, metavar="DIR",
                   help="folder LLaVA image paths are relative to (default: the JSONL's folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample selection and order")
    p.add_argument("--long-threshold", default=str(LONG_THRESHOLD), metavar="N[K]",
                   help="what counts as long (statistics and long-biased sampling); 100K = 102,400")
    p.add_argument("--long-fraction", type=float, default=LONG_BIASED_FRACTION,
                   help="long-biased: share of samples >= --long-threshold")
    p.add_argument("--allow-repeat", action="store_true", help="reuse samples when a pool is short of its share")
    p.add_argument("--max-seq-len", type=cli.token_count, default=cli.MAX_SEQ_LEN, metavar="N[K]",
                   help=cli.MAX_SEQ_LEN_HELP + " (use the trainer's data.max_seq_len); 0: no limit")
    cli.DeprecatedAlias.add(p, "--max-tokens", "--max-seq-len", dest="max_seq_len", type=cli.token_count)
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: built-in)")
    p.add_argument("--check-images", action="store_true",
                   help="read every image header even when records carry image_tokens")
    p.add_argument("--force", action="store_true", help="remake outputs that are up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    from megatron_vlm.common.locks import lock_path_for, output_lock

    args = parse_args(argv)
    with output_lock(lock_path_for(args.output), args.output):  # one writer per output: a second run is refused
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    cli.on_stop(lambda: f"stopped: nothing written ({args.output} is written at the end, all at once); "
                        "rerun the same command")
    try:
        config = MixConfig(
            inputs=[parse_input_spec(s) for s in args.input], output=args.output, distribution=args.distribution,
            task_mix=parse_task_mix(args.task_mix),
            token_budget=parse_token_count(args.token_budget) if args.token_budget else None,
            short_data=[parse_input_spec(s) for s in args.short_data], short_ratio=args.short_ratio,
            short_image_root=args.short_image_root, seed=args.seed,
            long_threshold=parse_token_count(args.long_threshold), long_fraction=args.long_fraction,
            allow_repeat=args.allow_repeat,
            max_tokens=args.max_seq_len or None,
            tokenizer_dir=args.tokenizer, check_images=args.check_images)
        mix(config, progress=not args.no_progress, force=args.force)
    except MixError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
