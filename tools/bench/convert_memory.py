#!/usr/bin/env python
"""Peak memory of checkpoint conversion relative to the checkpoint's size.

  python tools/bench/convert_memory.py [--hidden 1536 --layers 12 ...] [--workdir DIR]

Writes a random bf16 Qwen2.5-VL checkpoint of the given geometry (7B geometry needs ~16 GB of disk
and RAM; the default is ~2.4 GB), then runs ``hf-to-megatron`` and ``megatron-to-hf`` as child
processes and prints each one's peak resident memory (ru_maxrss) as a ratio to the checkpoint's
bytes on disk. The target is <= 1.5x. A child that only imports the libraries is measured too,
so the ratio can be read with and without that fixed cost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CLI = os.path.join(REPO, "tools", "checkpoint", "convert.py")


_MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_of(cmd: list[str]) -> int:
    """Peak RSS in bytes of ``cmd``, run under a fresh wrapper process so that RUSAGE_CHILDREN
    sees this command alone (Linux reports ru_maxrss in KiB)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return int(out.stdout.strip()) * 1024


def make_checkpoint(path: str, args: argparse.Namespace) -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, REPO)
    from megatron_vlm.config import LanguageConfig, Qwen25VLConfig, VisionConfig

    half = args.hidden // args.heads // 2  # rotary frequency pairs, split t:h:w like 16:24:24
    spatial = half * 3 // 8
    section = (half - 2 * spatial, spatial, spatial)
    cfg = Qwen25VLConfig(
        language=LanguageConfig(vocab_size=151936, hidden_size=args.hidden, num_layers=args.layers,
                                num_attention_heads=args.heads, num_kv_heads=args.kv_heads,
                                ffn_hidden_size=args.ffn, mrope_section=section),
        vision=VisionConfig(depth=args.vision_depth, out_hidden_size=args.hidden,
                            fullatt_block_indexes=(args.vision_depth - 1,)),
    ).validate()
    torch.set_default_dtype(torch.bfloat16)
    config = Qwen2_5_VLConfig(**cfg.to_hf_dict())
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="1GB")


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
               if f.endswith(".safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=8960)
    parser.add_argument("--vision-depth", type=int, default=8)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="convert_mem_")
    hf, meg, back = (os.path.join(work, d) for d in ("hf", "meg", "back"))
    try:
        if not os.path.isdir(hf):
            make_checkpoint(hf, args)
        size = dir_bytes(hf)
        baseline = peak_rss_of([sys.executable, "-c", "import torch, transformers, megatron.core, megatron_vlm.checkpoint.convert"])
        shutil.rmtree(meg, ignore_errors=True)
        to_meg = peak_rss_of([sys.executable, CLI, "hf-to-megatron", "--hf-dir", hf, "--out-dir", meg])
        shutil.rmtree(back, ignore_errors=True)
        to_hf = peak_rss_of([sys.executable, CLI, "megatron-to-hf", "--in-dir", meg, "--out-dir", back])
        gb = 1024**3
        print(f"checkpoint (bf16 safetensors): {size / gb:.2f} GiB; import-only process: {baseline / gb:.2f} GiB")
        for name, peak in (("hf-to-megatron", to_meg), ("megatron-to-hf", to_hf)):
            print(f"{name:15s} peak RSS {peak / gb:.2f} GiB = {peak / size:.2f}x checkpoint "
                  f"({(peak - baseline) / size:.2f}x without the import-only baseline)")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
