"""``--smoke``: every variant of a study end to end on a CPU in minutes, with the tiny model.

Inputs are made as the quickstart makes them (examples/quickstart.sh), smaller: generated report
PDFs, document pools at 24 DPI (63 tokens a page), offline-teacher synthesis of only the tasks the
study uses, a held-out set from separate documents, and (for short-data studies) one-page LLaVA
records from the pool's pages. They are built once under WORK/smoke_inputs (a marker per item).

What is scaled down, and how:
* rows of 2,048 tokens; OCR-full transcriptions (10-13K tokens here) are truncated to them
  (``--overlong truncate``; the statistics are of the untruncated mixture);
* the token budget is 12K per variant (equal for all; ~9 samples of a task), sampled with
  ``--allow-repeat``;
* "long" is, per data variant, the 76.4th percentile of its input samples' lengths, so that the
  pool-native share of long samples is the paper's 23.6% (Table 11: >= 100K of samples up to 128K);
  long-biased then needs 83.9% from the pool's ~10 long samples, which a 12K budget allows;
* two training steps of one row, evaluated at 1K and 2K (the 64K/128K of the smoke) on 2 held-out
  questions with the rule judge, 8 new tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable

from megatron_vlm.common.storage import atomic_write_bytes
from megatron_vlm.study.ablations import ABLATIONS
from megatron_vlm.study.commands import REPO, StudyConfig

ROW = 2048
TRAIN_DOCS, EVAL_DOCS = 6, 2
SAMPLES_PER_TASK = {"ocr-full": TRAIN_DOCS}  # one full transcription per document
DEFAULT_SAMPLES = 40
POOL_NATIVE_LONG_SHARE = 0.236  # Table 11


def _run(argv: list[str], log: Callable[[str], None], label: str) -> None:
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"smoke input {label} failed (exit {proc.returncode}): {' '.join(argv)}\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    log(f"[smoke] {label}: done")


def _once(marker: str, build: Callable[[], None]) -> None:
    if os.path.isfile(marker):
        return
    build()
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    atomic_write_bytes(marker, b"done\n")


def make_short_data(pool: str, out: str) -> int:
    """One-page LLaVA records (image + 'first line of this page' -> its first text block): short-context
    data in the format the paper mixes (LLaVA-OneVision conversations). Returns the record count."""
    from megatron_vlm.pool.records import load_blocks, read_manifest

    lines = []
    for record in read_manifest(pool):
        for page, blocks in zip(record.pages, load_blocks(pool, record)):
            text = next((b["text"].strip() for b in blocks["blocks"]
                         if b["label"] in ("title", "section", "paragraph") and b.get("text", "").strip()), "")
            if not text:
                continue
            lines.append(json.dumps({"id": f"{record.doc_id}-p{page.page}", "image": page.image, "conversations": [
                {"from": "human", "value": "<image>\nWhat is the first line of text on this page?"},
                {"from": "gpt", "value": text[:120]}]}))
    if not lines:
        raise RuntimeError(f"no page of {pool} has text for short-data records")
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    return len(lines)


def prepare(cfg: StudyConfig, log: Callable[[str], None] = print) -> StudyConfig:
    """Build the tiny inputs (once) and return the study's settings scaled to a CPU."""
    root = os.path.join(cfg.work, "smoke_inputs")
    os.makedirs(root, exist_ok=True)
    py = sys.executable
    ablation = ABLATIONS[cfg.ablation].select(cfg.variants)
    tasks = sorted(set(ablation.tasks) | ({"extract-single"} if ablation.needs_short_data else set()))

    def pdfs(kind: str, count: int, seed: int):
        _run([py, "-m", "megatron_vlm.pool.synthetic_pdfs", f"{root}/pdfs/{kind}", "--corpus", str(count),
              "--seed", str(seed)], log, f"PDFs ({kind})")

    def pool(name: str, src: str):
        _run([py, "tools/build_doc_pool.py", "--input", f"{root}/pdfs/{src}", "--output", f"{root}/{name}",
              "--dpi", "24", "--min-pages", "8", "--workers", "1"], log, f"document pool {name}")

    def synthesize(pool_dir: str, task: str, out: str, samples: int, seed: int):
        _run([py, "tools/synthesize_vqa.py", "--pool", pool_dir, "--task", task, "--output", out, "--num-samples",
              str(samples), "--teacher", "offline", "--min-pages", "8", "--max-pages", "60", "--seed", str(seed),
              "--no-progress"], log, f"synthesis {task} ({os.path.basename(out)})")

    short = f"{root}/short/llava.jsonl" if ablation.needs_short_data else None

    def short_data():
        os.makedirs(os.path.dirname(short), exist_ok=True)
        log(f"[smoke] short data: {make_short_data(f'{root}/pool', short)} one-page records")

    # three stages, each two processes at a time (independent builds; two cores)
    stages = [
        [(f"{root}/pdfs_train.done", lambda: pdfs("train", TRAIN_DOCS, 1)),
         (f"{root}/pdfs_eval.done", lambda: pdfs("eval", EVAL_DOCS, 2))],
        [(f"{root}/pool.done", lambda: pool("pool", "train")),
         (f"{root}/pool_eval.done", lambda: pool("pool_eval", "eval"))],
        [(f"{root}/heldout.done", lambda: synthesize(f"{root}/pool_eval", "extract-single",
                                                     f"{root}/eval/heldout.jsonl", 4, 7))]
        + [(f"{root}/vqa/{task}.done", lambda task=task: synthesize(
            f"{root}/pool", task, f"{root}/vqa/{task}.jsonl", SAMPLES_PER_TASK.get(task, DEFAULT_SAMPLES), 0))
           for task in tasks]
        + ([(f"{root}/short.done", short_data)] if short else []),
    ]
    if not cfg.dry_run:  # --dry-run prints the plan only: nothing is built
        for stage in stages:
            with ThreadPoolExecutor(2) as pool_:
                for future in [pool_.submit(_once, marker, build) for marker, build in stage]:
                    future.result()
    return replace(
        cfg, vqa=f"{root}/vqa", long_vqa=None, short_data=short, short_image_root=f"{root}/pool" if short else None,
        base_checkpoint=None, launcher="local", recipe="tiny_cpu", token_budget="12K", max_seq_len=ROW,
        long_threshold=None, long_pool_share=POOL_NATIVE_LONG_SHARE, allow_repeat=True, overlong="truncate",
        preprocess_workers=0,
        train_sets=[f"schedule.global_batch_tokens={ROW}", "schedule.train_steps=2", "checkpoint.interval=2",
                    "log.interval=1", "log.tensorboard=false", "data.num_workers=0", *cfg.train_sets],
        eval_data=[f"samples:{root}/eval/heldout.jsonl,pool={root}/pool_eval"], eval_lengths="1K,2K",
        overall_lengths="1K,2K", judge="rules", eval_args=["--limit", "2", "--max-new-tokens", "8"], eval_prefix=[],
        jobs=max(cfg.jobs, 2))


__all__ = ["make_short_data", "prepare"]
