#!/usr/bin/env python
"""Throughput of the data pipeline on this machine, next to the rate one GPU consumes tokens.

  python tools/bench/data_pipeline.py [--docs 8] [--pages 32-50] [--workers 1,2] [--loader-workers 0,2]
                                      [--rows 4] [--tokenizer DIR] [--mfu 0.4] [--gpu H100]

Builds pool-like data in a temporary folder: documents of 32-50 Letter pages rendered at 144 DPI
(1232 x 1596 px JPEG q85 with text-like blocks, unique per page: 2,508 tokens each), three samples
per document (the three VQA tasks share the pages), then measures

* preprocessing (tools/preprocess_data.py's code): samples/s and tokens/s for each --workers;
* packing (best-fit decreasing) of those samples into 128K rows;
* the training loader: real tokens/s and pages/s per --loader-workers and --pixels format (JPEG decode
  + reference resize + normalize + patchify in worker processes, the row assembly, the hand-over to
  the training process; ``levels`` leaves the normalizing lookup to ``batch.to(device)``);
* the GPU side: tokens/s one GPU trains on at --mfu of its bf16 peak for the 7B geometry on these
  rows (FLOPs as training/flops.py counts them; tools/bench/train_step.py measures it on a GPU),
  and so how many loader workers one GPU needs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from megatron_vlm.config import PRESETS  # noqa: E402
from megatron_vlm.data.dataset import PackedRowDataset  # noqa: E402
from megatron_vlm.data.loader import build_loader  # noqa: E402
from megatron_vlm.data.packing import format_packing_stats  # noqa: E402
from megatron_vlm.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron_vlm.data.samples import Sample  # noqa: E402
from megatron_vlm.training.flops import PEAK_BF16_FLOPS, training_step_flops  # noqa: E402

PAGE_W, PAGE_H = 1232, 1596


def make_page(path: str, rng: np.random.Generator) -> None:
    """A page-like JPEG: white, a title bar, paragraphs of word-sized dark blocks, unique noise."""
    image = Image.new("L", (PAGE_W, PAGE_H), 255)
    draw = ImageDraw.Draw(image)
    draw.rectangle([100, 90, 100 + int(rng.integers(300, 900)), 130], fill=20)
    y = 180
    while y < PAGE_H - 120:
        x = 100
        while x < PAGE_W - 140:
            w = int(rng.integers(20, 110))
            draw.rectangle([x, y, x + w, y + 14], fill=int(rng.integers(0, 90)))
            x += w + int(rng.integers(8, 16))
        y += int(rng.integers(24, 30)) + (40 if rng.random() < 0.1 else 0)
    image.convert("RGB").save(path, format="JPEG", quality=85)


def make_data(folder: str, docs: int, pages: tuple[int, int], seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for d in range(docs):
        n = int(rng.integers(pages[0], pages[1] + 1))
        names = []
        for p in range(n):
            name = f"doc{d:04d}/{p:03d}.jpg"
            os.makedirs(os.path.join(folder, f"doc{d:04d}"), exist_ok=True)
            make_page(os.path.join(folder, name), rng)
            names.append(name)
        for t, task in enumerate(("extract-single", "extract-multi", "reasoning")):
            question = f"According to the section on page {int(rng.integers(1, n + 1))}, what is the value of item {t}?"
            messages = [{"role": "user", "content": [{"type": "image"} for _ in names]
                         + [{"type": "text", "text": question}]},
                        {"role": "assistant", "content": f"The value is {int(rng.integers(0, 10**6))}."}]
            lines.append(Sample(f"doc{d}:{task}", task, names, messages, image_root=folder,
                                image_tokens=[2508] * n).to_json())
    path = os.path.join(folder, "mix.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def gpu_tokens_per_s(dataset: PackedRowDataset, rows: int, mfu: float, peak: float) -> float:
    """Tokens/s one GPU trains on at ``mfu`` of ``peak`` for the 7B geometry on these rows."""
    cfg = PRESETS["7b"]()
    tokens = flops = 0.0
    for r in range(min(rows, len(dataset))):
        samples = dataset.plan.row(r)
        lengths = [int(dataset.samples.lengths[i]) for i in samples]
        grids = [dataset.samples.image_info(j)[:3].tolist() for i in samples for j in dataset.samples.image_indices(i)]
        answers = sum(int(dataset.samples.loss_mask(i).sum()) for i in samples)
        flops += training_step_flops(cfg, lengths, grids, answers)
        tokens += sum(lengths)
    return tokens / (flops / (mfu * peak))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=8, help="documents (3 samples each)")
    p.add_argument("--pages", default="32-50", help="pages per document, MIN-MAX (pool-native: 32-50)")
    p.add_argument("--workers", default="1,2", help="preprocessing worker counts to time")
    p.add_argument("--loader-workers", default="0,2", help="loader worker counts to time")
    p.add_argument("--rows", type=int, default=4, help="rows read per loader measurement")
    p.add_argument("--pixels", default="float32,levels", help="row pixel formats to time (float32, bfloat16, levels)")
    p.add_argument("--device", default=None, help="move each row there (cuda: levels are normalized on the GPU); "
                   "default: time what reaches the training process")
    p.add_argument("--max-seq-len", type=int, default=131072)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the built one)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed GPU model FLOPs utilisation")
    p.add_argument("--gpu", default="H100", choices=sorted(PEAK_BF16_FLOPS))
    p.add_argument("--keep", default=None, help="keep the generated data in this folder")
    args = p.parse_args(argv)
    lo, hi = (int(x) for x in args.pages.split("-"))
    folder = args.keep or tempfile.mkdtemp(prefix="bench-data-")
    os.makedirs(folder, exist_ok=True)
    try:
        start = time.perf_counter()
        mix = make_data(os.path.join(folder, "pool"), args.docs, (lo, hi))
        print(f"generated {args.docs} documents, {3 * args.docs} samples in {time.perf_counter() - start:.1f} s")
        prefix = None
        for workers in (int(w) for w in args.workers.split(",")):
            prefix = os.path.join(folder, f"w{workers}", "ds")
            config = PreprocessConfig(inputs=[mix], output_prefix=prefix, tokenizer_dir=args.tokenizer,
                                      max_seq_len=args.max_seq_len, workers=workers, progress=False)
            start = time.perf_counter()
            stats = preprocess(config, log=lambda *a: None)
            seconds = time.perf_counter() - start
            meta = stats["merged"]
            print(f"preprocess --workers {workers}: {meta['num_samples']} samples, {meta['num_tokens']:,} tokens, "
                  f"{meta['num_images']} distinct pages in {seconds:.1f} s -> {meta['num_samples'] / seconds:.2f} "
                  f"samples/s, {meta['num_tokens'] / seconds:,.0f} tokens/s overall; after "
                  f"{stats['startup_seconds']:.1f} s of start-up: {stats['steady_samples_per_s']:.2f} samples/s, "
                  f"{stats['steady_tokens_per_s']:,.0f} tokens/s)")
        dataset = PackedRowDataset(prefix, max_seq_len=args.max_seq_len)
        print(format_packing_stats(dataset.plan.stats))
        rows = min(args.rows, len(dataset))
        best = 0.0
        for pixels in args.pixels.split(","):
            dataset = PackedRowDataset(prefix, max_seq_len=args.max_seq_len, pixels=pixels)
            for workers in (int(w) for w in args.loader_workers.split(",")):
                loader = build_loader(dataset, num_workers=workers, seed=0,
                                      **({"prefetch_factor": 1} if workers else {}))  # rows are GBs of pixels
                start = time.perf_counter()
                tokens = pages = 0
                for i, batch in enumerate(loader):
                    if args.device:
                        batch = batch.to(args.device)  # what the trainer does (levels become float32 there)
                    tokens += int(batch.cu_seqlens[-1])
                    pages += 0 if batch.image_grid_thw is None else len(batch.image_grid_thw)
                    if i + 1 == rows:
                        break
                seconds = time.perf_counter() - start
                print(f"loader --pixels {pixels} --num-workers {workers}: {rows} rows, {tokens:,} tokens, {pages} "
                      f"pages in {seconds:.1f} s -> {tokens / seconds:,.0f} tokens/s, {pages / seconds:.1f} pages/s")
                best = max(best, tokens / seconds / max(1, workers))
        per_core = best
        gpu = gpu_tokens_per_s(dataset, rows, args.mfu, PEAK_BF16_FLOPS[args.gpu])
        print(f"one {args.gpu} trains the 7B on these rows at ~{gpu:,.0f} tokens/s (MFU {100 * args.mfu:.0f}% of "
              f"{PEAK_BF16_FLOPS[args.gpu] / 1e12:.0f} TFLOP/s bf16, FLOPs per training/flops.py): "
              f"~{gpu / per_core:.2f} loader worker cores of this machine per GPU")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
