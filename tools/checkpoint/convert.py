#!/usr/bin/env python
"""Convert Qwen2.5-VL checkpoints between Hugging Face and megatron-vlm, and verify conversions.

  python tools/checkpoint/convert.py hf-to-megatron --hf-dir HF --out-dir MEG [--tp N] [--rope-theta 4e6]
  python tools/checkpoint/convert.py megatron-to-hf --in-dir MEG --out-dir HF2 [--layout current|legacy]
  python tools/checkpoint/convert.py verify --hf-dir HF --megatron-dir MEG [--dtype fp32] [--tol X]

The Megatron side is a megatron-core distributed checkpoint: written once, it loads at any
tensor-parallel size (``--tp`` only checks that the model divides by it). ``verify`` prints the max
abs logit difference as its last line and exits 1 above the tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron_vlm import cli  # noqa: E402


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True)

    h2m = sub.add_parser("hf-to-megatron", help="HF safetensors -> Megatron distributed checkpoint",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    h2m.add_argument("--hf-dir", required=True, help="HF checkpoint folder (config.json + safetensors)")
    h2m.add_argument("--out-dir", required=True, help="Megatron model folder to write")
    h2m.add_argument("--force", action="store_true", help="replace a checkpoint already in --out-dir")
    h2m.add_argument("--tp", type=int, default=1, help="tensor-parallel size to validate for (any TP loads)")
    h2m.add_argument("--rope-theta", type=float, default=None, help="new rope base, e.g. 4e6 for LongPT")
    h2m.add_argument("--dtype", default="auto", help="fp32|bf16|fp16|auto (auto: the checkpoint's)")

    m2h = sub.add_parser("megatron-to-hf", help="Megatron distributed checkpoint -> HF safetensors",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m2h.add_argument("--in-dir", required=True, help="Megatron model folder (hf-to-megatron's or training's export)")
    m2h.add_argument("--out-dir", required=True, help="HF checkpoint folder to write")
    m2h.add_argument("--layout", choices=("source", "current", "legacy"), default="source",
                     help="HF key names: those of the checkpoint converted from (source), current "
                          "(model.language_model.*, transformers >= 4.52 in memory) or legacy (model.* / "
                          "visual.*, what published checkpoints and save_pretrained use; all versions load it)")
    m2h.add_argument("--dtype", default="auto", help="fp32|bf16|fp16|auto (auto: the checkpoint's)")
    m2h.add_argument("--rope-theta", type=float, default=None, help="write this rope base into config.json")
    m2h.add_argument("--max-shard-size-gb", type=float, default=5.0, help="largest safetensors shard (GiB)")

    ver = sub.add_parser("verify", help="compare HF and Megatron logits on fixed inputs",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ver.add_argument("--hf-dir", required=True, help="HF checkpoint folder")
    ver.add_argument("--megatron-dir", required=True, help="Megatron model folder")
    ver.add_argument("--dtype", default="fp32", help="fp32|bf16|fp16: dtype both models run in")
    ver.add_argument("--tol", type=float, default=None, help="max abs logit diff allowed (default by dtype)")

    return parser


def _stopped(args) -> str:
    if args.command == "verify":
        return "stopped: verification not finished (nothing is written); rerun the same command"
    extra = " with --force" if args.command == "hf-to-megatron" else ""
    return f"stopped: {args.out_dir} is incomplete and unusable; rerun the same command{extra}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.on_stop(lambda: _stopped(args))

    import torch
    from megatron_vlm.checkpoint import convert
    from megatron_vlm.checkpoint.hf_mapping import CheckpointMismatch
    from megatron_vlm.config import ConfigError

    try:
        if args.command == "hf-to-megatron":
            if args.force:
                _remove_checkpoint(args.out_dir)
            convert.hf_to_megatron(args.hf_dir, args.out_dir, args.tp, args.rope_theta,
                                   convert.parse_dtype(args.dtype))
        elif args.command == "megatron-to-hf":
            convert.megatron_to_hf(args.in_dir, args.out_dir, args.layout, convert.parse_dtype(args.dtype),
                                   args.rope_theta, int(args.max_shard_size_gb * 1024**3))
        else:
            from megatron_vlm.checkpoint.verify import default_tolerance, verify

            dtype = convert.parse_dtype(args.dtype) or torch.float32
            tol = default_tolerance(dtype, args.tol)
            worst = verify(args.hf_dir, args.megatron_dir, dtype)
            verdict = "OK" if worst <= tol else f"FAIL (tolerance {tol:g})"
            print(f"max abs logit diff: {worst:.6e} {verdict}")
            return 0 if worst <= tol else 1
    except (ConfigError, CheckpointMismatch, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        from megatron_vlm.parallel import destroy_parallel
        destroy_parallel()
    return 0


def _remove_checkpoint(out_dir: str) -> None:
    """--force: remove the model checkpoint files hf-to-megatron writes (nothing else in the folder)."""
    import shutil

    from megatron_vlm.checkpoint import dist as dist_ckpt

    if os.path.isdir(os.path.join(out_dir, dist_ckpt.MODEL_SUBDIR)):
        shutil.rmtree(os.path.join(out_dir, dist_ckpt.MODEL_SUBDIR))


if __name__ == "__main__":
    cli.run_cli(main)
