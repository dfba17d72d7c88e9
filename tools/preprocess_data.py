#!/usr/bin/env python
"""Tokenize a mixture JSONL into megatron-core indexed datasets (+ image store) and pack it.

  python tools/preprocess_data.py --input MIX.jsonl [MORE.jsonl ...] --output-prefix PREFIX \
      [--tokenizer DIR] [--max-seq-len 131072] [--overlong drop|truncate] [--workers N] \
      [--shard I/N | --shard slurm] [--chunk-size 1024] [--pack [--cp-size C] [--pack-seed S]]
  python tools/preprocess_data.py --input MIX.jsonl --output-prefix PREFIX --merge-only [--pack]
  python tools/preprocess_data.py --output-prefix PREFIX --pack-only --max-seq-len 131072 --cp-size 2

A rerun resumes (finished chunks under PREFIX.parts/ are kept). Shards of a Slurm array each take
a contiguous range of chunks; the shard that finishes last merges them into PREFIX (or run
--merge-only). Output files are described in megatron_vlm/data/indexed.py; every dropped or
truncated sample is listed in PREFIX.report.json with its file:line and reason, and counted on
the console. --pack writes PREFIX.pack.npz (which samples form each row) and prints the packing
efficiency; training can also pack on the fly.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_vlm import cli  # noqa: E402

OVERLONG_POLICIES = ("drop", "truncate")  # megatron_vlm.data.preprocess.OVERLONG_POLICIES (not imported: slow)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", default=[], metavar="JSONL", help="mixture JSONL file(s) of samples")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX", help="output path prefix")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="Qwen2.5-VL tokenizer directory (default: the offline-built one)")
    p.add_argument("--max-seq-len", type=cli.token_count, default=cli.MAX_SEQ_LEN,
                   help=cli.MAX_SEQ_LEN_HELP + " (or truncated, see --overlong); also the packed row length")
    p.add_argument("--overlong", choices=OVERLONG_POLICIES, default="drop",
                   help="samples longer than --max-seq-len: drop them, or keep their first tokens")
    p.add_argument("--verify-images", action="store_true", help="fully decode every image (slow)")
    p.add_argument("--image-root", action="append", default=[], metavar="FOLDER",
                   help="a folder that images of samples without an image_root may come from (repeatable); "
                        "besides it only the input file's own folder is allowed")
    p.add_argument("--force", action="store_true", help=cli.FORCE_HELP)
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=cli.default_workers(), help=cli.WORKERS_HELP)
    g.add_argument("--chunk-size", type=int, default=1024, help="lines per part (the unit of resume)")
    g.add_argument("--sample-timeout", type=float, default=600.0, help="seconds per sample (0: none)")
    g.add_argument("--shard", default="0/1", help="I/N (0-based) or 'slurm' (SLURM_ARRAY_TASK_ID/COUNT)")
    g.add_argument("--no-merge", action="store_true", help="do not merge even when every chunk is done")
    g.add_argument("--merge-only", action="store_true", help="only merge finished chunks")
    g.add_argument("--keep-parts", action="store_true", help="keep PREFIX.parts/ after merging")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("packing")
    g.add_argument("--pack", action="store_true", help="after merging, write PREFIX.pack.npz")
    g.add_argument("--pack-only", action="store_true", help="only (re)pack an existing PREFIX")
    g.add_argument("--cp-size", type=int, default=1, help="context parallel size: documents padded to 2*CP")
    g.add_argument("--tp-size", type=int, default=1, help="with --sequence-parallel: padding x TP")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="the trainer uses sequence parallelism (pads documents to a multiple of 2*CP*TP)")
    g.add_argument("--pack-seed", type=int, default=0, help="tie-breaking seed of the packer")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.pack_only and not args.input:
        p.error("--input is required (unless --pack-only)")
    return args


def pack(prefix: str, max_seq_len: int, cp_size: int, tp_size: int, sequence_parallel: bool, seed: int) -> dict:
    from megatron_vlm.data.dataset import plan_path
    from megatron_vlm.data.indexed import IndexedSamples
    from megatron_vlm.data.packing import format_packing_stats, pack_best_fit_decreasing, pad_multiple_for
    from megatron_vlm.common.storage import atomic_write_json

    samples = IndexedSamples(prefix)
    plan = pack_best_fit_decreasing(samples.lengths, max_seq_len, pad_multiple_for(cp_size, tp_size,
                                                                                   sequence_parallel), seed)
    plan.save(plan_path(prefix))
    atomic_write_json(prefix + ".pack.json", plan.stats)
    print(format_packing_stats(plan.stats))
    return plan.stats


def _stopped(args) -> str:
    import glob

    from megatron_vlm.data.preprocess import parts_dir

    done = len(glob.glob(os.path.join(parts_dir(args.output_prefix), "*.meta.json")))
    return (f"stopped: {done} finished chunk(s) of {args.chunk_size} lines kept in "
            f"{parts_dir(args.output_prefix)}; {cli.RESUME}")


def empty_result(meta: dict, args: argparse.Namespace) -> str:
    """Why a merged dataset holds no sample: one line for the error."""
    by_reason = (meta.get("dropped") or {}).get("by_reason") or {}
    if not by_reason:
        return f"no sample in the input(s) {args.input}: nothing to preprocess"
    parts = [f"{n} too_long over --max-seq-len {args.max_seq_len}" if reason == "too_long" else f"{n} {reason}"
             for reason, n in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))]
    return f"every sample was dropped ({', '.join(parts)}); see {args.output_prefix}.report.json"


def main(argv=None) -> int:
    from megatron_vlm.common.inputs import parse_shard
    from megatron_vlm.common.locks import lock_path_for, output_lock

    args = parse_args(argv)
    try:
        shard = (0, 1) if args.pack_only or args.merge_only else parse_shard(args.shard)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # one writer per output (per shard of it: the shards of one array run side by side)
    with output_lock(lock_path_for(args.output_prefix, shard, suffix=""), args.output_prefix):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    cli.on_stop(lambda: _stopped(args))
    if args.pack_only:
        pack(args.output_prefix, args.max_seq_len, args.cp_size, args.tp_size, args.sequence_parallel,
             args.pack_seed)
        return 0
    from megatron_vlm.data.preprocess import PreprocessConfig, merge_parts, preprocess
    from megatron_vlm.common.inputs import parse_shard

    try:
        shard, num_shards = parse_shard(args.shard)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = PreprocessConfig(inputs=args.input, output_prefix=args.output_prefix, tokenizer_dir=args.tokenizer,
                              max_seq_len=args.max_seq_len, overlong=args.overlong, workers=args.workers,
                              chunk_size=args.chunk_size, verify_images=args.verify_images,
                              sample_timeout=args.sample_timeout, keep_parts=args.keep_parts,
                              progress=not args.no_progress, force=args.force, image_roots=args.image_root)
    try:
        config.validate()
        if args.merge_only:
            meta = merge_parts(config)
            if meta is None:
                return 1
        else:
            meta = preprocess(config, shard, num_shards, merge=not args.no_merge).get("merged")
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if meta is not None and not meta.get("num_samples"):  # an empty dataset is a failure, with the reason
        print(f"error: {empty_result(meta, args)}", file=sys.stderr)
        return 1
    if meta is not None and args.pack:
        pack(args.output_prefix, args.max_seq_len, args.cp_size, args.tp_size, args.sequence_parallel,
             args.pack_seed)
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
