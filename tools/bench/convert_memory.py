#!/usr/bin/env python
"""Peak memory of checkpoint conversion relative to the checkpoint's size.

  python tools/bench/convert_memory.py [--hidden 1536 --layers 12 ...] [--workdir DIR]

Writes a random bf16 Qwen2.5-VL checkpoint of the given geometry (7B geometry needs ~16 GB of disk
and RAM; the default is ~2.4 GB), then runs ``hf-to-megatron`` and ``megatron-to-hf`` as child
processes, sampling their resident memory, and prints the peaks as ratios to the checkpoint's bytes
on disk: anonymous memory (what the process needs; target <= 1.5x) and anonymous + mapped file
pages (reclaimable page cache of the mmap-read safetensors). A child that only imports the
libraries is measured too, so the ratio can be read with and without that fixed cost.
"""

from __future__ import annotations

import argparse
import os
import time
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CLI = os.path.join(REPO, "tools", "checkpoint", "convert.py")


def peak_memory_of(cmd: list[str], interval: float = 0.02) -> tuple[int, int]:
    """Run ``cmd``; sample /proc/PID/status and return its peak (RssAnon, RssAnon + RssFile) in bytes.

    RssAnon is the memory the process really needs; RssFile counts pages of memory-mapped files
    (safetensors are read through mmap), which the kernel can drop at any time.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    peak_anon = peak_total = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                fields = {k: v for k, v in (line.split(":", 1) for line in f if ":" in line)}
            anon = int(fields["RssAnon"].split()[0]) * 1024
            file = int(fields["RssFile"].split()[0]) * 1024
        except (FileNotFoundError, KeyError, ProcessLookupError):
            break
        peak_anon, peak_total = max(peak_anon, anon), max(peak_total, anon + file)
        time.sleep(interval)
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return peak_anon, peak_total


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
        baseline, _ = peak_memory_of([sys.executable, "-c", "import time, torch, transformers, megatron.core, "
                                      "megatron_vlm.checkpoint.convert; time.sleep(1)"])
        shutil.rmtree(meg, ignore_errors=True)
        to_meg = peak_memory_of([sys.executable, CLI, "hf-to-megatron", "--hf-dir", hf, "--out-dir", meg])
        shutil.rmtree(back, ignore_errors=True)
        to_hf = peak_memory_of([sys.executable, CLI, "megatron-to-hf", "--in-dir", meg, "--out-dir", back])
        gb = 1024**3
        print(f"checkpoint (bf16 safetensors): {size / gb:.2f} GiB; libraries alone: {baseline / gb:.2f} GiB anon")
        for name, (anon, total) in (("hf-to-megatron", to_meg), ("megatron-to-hf", to_hf)):
            print(f"{name:15s} peak anonymous {anon / gb:.2f} GiB = {anon / size:.2f}x checkpoint "
                  f"({(anon - baseline) / size:.2f}x above the libraries); "
                  f"with mapped file pages {total / gb:.2f} GiB = {total / size:.2f}x")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
