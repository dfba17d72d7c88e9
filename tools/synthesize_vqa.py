#!/usr/bin/env python
"""Synthesize long-document VQA (or OCR-transcription) training samples from a document pool.

  python tools/synthesize_vqa.py --pool POOL --task extract-single|extract-multi|reasoning|ocr-full|ocr-needle \
      --output OUT.jsonl --num-samples N [--teacher offline|openai] [--base-url URL --model NAME] \
      [--concurrency K] [--seed S] [--min-pages 32 --max-pages 50]

Writes OUT.jsonl (one training sample per line, the megatron_vlm/data/samples.py format; schema in
megatron_vlm/synthesis/synthesize.py and the README), OUT.dropped.jsonl (every dropped job and why),
OUT.report.json (counts, drop reasons, token statistics, question kinds, teacher usage and cost) and
OUT.settings.json. A rerun with the same settings resumes: finished jobs are skipped, nothing is
duplicated. The openai teacher reads its API key from the environment variable named by
--api-key-env (default OPENAI_API_KEY); the key is never printed or written.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_vlm import cli  # noqa: E402
from megatron_vlm.synthesis.synthesize import ALL_TASKS, OCR_TASKS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pool", required=True, help="document pool folder (tools/build_doc_pool.py)")
    p.add_argument("--task", required=True, choices=ALL_TASKS, help="what to synthesize")
    p.add_argument("--output", required=True, metavar="OUT.jsonl", help="samples file (appended; resumable)")
    p.add_argument("--num-samples", type=int, required=True, help="samples wanted in OUT.jsonl")
    p.add_argument("--seed", type=int, default=0, help="seed of document, segment and page choices")
    p.add_argument("--force", action="store_true", help=cli.FORCE_HELP)
    g = p.add_argument_group("documents and segments")
    g.add_argument("--min-pages", type=int, default=32, help="use documents with at least this many pages")
    g.add_argument("--max-pages", type=int, default=50, help="use documents with at most this many pages")
    g.add_argument("--segment-min-pages", type=int, default=8, help="shortest segment given to the teacher")
    g.add_argument("--segment-max-pages", type=int, default=15, help="longest segment given to the teacher")
    g.add_argument("--max-seq-len", type=cli.token_count, default=cli.MAX_SEQ_LEN,
                   help=cli.MAX_SEQ_LEN_HELP + "; 0: no limit")
    cli.DeprecatedAlias.add(g, "--max-seq-tokens", "--max-seq-len", dest="max_seq_len", type=cli.token_count)
    g.add_argument("--max-needles", type=int, default=3, help="ocr-needle: at most this many pages to transcribe")
    g.add_argument("--max-jobs", type=int, default=None, help="stop after this many jobs (default 5 x N + 20)")
    g.add_argument("--tokenizer", default=None, help="Qwen2.5-VL tokenizer folder (default: the built one)")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", choices=("offline", "openai"), default="offline",
                   help="offline: facts from the pool's text layer; openai: an OpenAI-compatible endpoint")
    g.add_argument("--base-url", default=None, help="e.g. http://localhost:8000/v1 (vLLM, SGLang, a hosted API)")
    g.add_argument("--model", default=None, help="model name at the endpoint")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--concurrency", type=int, default=8, help="requests (and jobs) in flight")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    g.add_argument("--max-retries", type=int, default=5, help="retries per request (429, 5xx, timeouts)")
    g.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds (doubles, jittered)")
    g.add_argument("--max-reasks", type=int, default=1, help="follow-ups after a reply without usable JSON")
    g.add_argument("--temperature", type=float, default=0.7, help="teacher sampling temperature")
    g.add_argument("--max-completion-tokens", type=int, default=2048, help="longest teacher reply (tokens)")
    g.add_argument("--exemplars", type=int, default=2, help="in-context exemplars per request")
    g.add_argument("--image-max-pixels", type=int, default=None, help="downscale pages sent to the teacher")
    g.add_argument("--cache-dir", default=None, help="response cache (default: OUT's folder/teacher_cache)")
    g.add_argument("--no-cache", action="store_true", help="do not cache teacher responses")
    g.add_argument("--price-input", type=float, default=0.0, help="USD per million prompt tokens (cost report)")
    g.add_argument("--price-output", type=float, default=0.0, help="USD per million completion tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="log retries and re-asks")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_teacher(args: argparse.Namespace):
    from megatron_vlm.synthesis.teachers import OpenAIConfig

    if args.task in OCR_TASKS:
        return None
    if args.teacher == "offline":
        from megatron_vlm.synthesis.offline_teacher import OfflineTeacher

        return OfflineTeacher()
    from megatron_vlm.synthesis.teachers import OpenAITeacher

    if not args.base_url or not args.model:
        raise ValueError("--teacher openai needs --base-url and --model")
    cache = None if args.no_cache else (args.cache_dir or os.path.join(
        os.path.dirname(os.path.abspath(args.output)), "teacher_cache"))
    return OpenAITeacher(OpenAIConfig(
        base_url=args.base_url, model=args.model, api_key_env=args.api_key_env, concurrency=args.concurrency,
        timeout_s=args.timeout, max_retries=args.max_retries, backoff_s=args.backoff, max_reasks=args.max_reasks,
        temperature=args.temperature, max_completion_tokens=args.max_completion_tokens, exemplars=args.exemplars,
        cache_dir=cache, price_input_per_mtok=args.price_input, price_output_per_mtok=args.price_output,
        image_max_pixels=args.image_max_pixels))


def summary(report: dict) -> str:
    counts = report["counts"]
    lines = [f"status: {report['status']}",
             f"samples: {counts['accepted']} of {counts['requested']} requested; dropped jobs: {counts['dropped']}"]
    for reason, n in counts["dropped_by_reason"].items():
        lines.append(f"  dropped {reason}: {n}")
    docs = report["documents"]
    lines.append(f"documents: {docs['eligible']} of {docs['in_pool']} eligible: page window {docs['page_window']} "
                 f"(filtered: {docs['filtered_by_page_window'] or 'none'}), fit --max-seq-len {docs['max_seq_len']} "
                 f"(filtered: {docs['filtered_by_length'] or 'none'})")
    if report["tokens"]:
        t = report["tokens"]
        lines.append(f"tokens per sample: min {t['min']:,} mean {t['mean']:,} max {t['max']:,}; total {t['total']:,}")
    kinds = report.get("question_kinds") or {}
    if kinds:
        total = sum(kinds.values())
        lines.append("question kinds: " + ", ".join(f"{k} {n} ({100 * n / total:.0f}%)" for k, n in kinds.items()))
    usage = report["teacher_usage_total"]
    if usage.get("requests") or usage.get("cache_hits"):
        lines.append(f"teacher: {usage.get('requests', 0)} requests ({usage.get('retries', 0)} retries, "
                     f"{usage.get('reasks', 0)} re-asks), {usage.get('cache_hits', 0)} cache hits, "
                     f"{usage.get('prompt_tokens', 0):,} prompt + {usage.get('completion_tokens', 0):,} completion "
                     f"tokens, ${usage.get('cost_usd', 0.0):.4f}")
    lines.append(f"report: {report['files']['report']}")
    return "\n".join(lines)


def _start_again(output: str) -> None:
    """--force: remove OUT.jsonl and its sidecars (the teacher cache is kept)."""
    from megatron_vlm.synthesis.synthesize import sidecar

    for path in (output, *(sidecar(output, n) for n in ("dropped.jsonl", "report.json", "settings.json"))):
        if os.path.isfile(path):
            os.unlink(path)


def main(argv=None) -> int:
    from megatron_vlm.common.locks import lock_path_for, output_lock

    args = parse_args(argv)
    with output_lock(lock_path_for(args.output), args.output):  # one writer per output: a second run is refused
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    from megatron_vlm.synthesis.synthesize import SynthesisConfig, Synthesizer, shortfall, sidecar
    from megatron_vlm.synthesis.teachers import TeacherFatalError

    cli.on_stop(lambda: (f"stopped: {cli.count_lines(args.output)} of {args.num_samples} samples written to "
                         f"{args.output} (report: {sidecar(args.output, 'report.json')}); {cli.RESUME}"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        teacher = build_teacher(args)
        config = SynthesisConfig(
            pool=args.pool, task=args.task, output=args.output, num_samples=args.num_samples, seed=args.seed,
            min_pages=args.min_pages, max_pages=args.max_pages, segment_min_pages=args.segment_min_pages,
            segment_max_pages=args.segment_max_pages, max_seq_tokens=args.max_seq_len or None,
            max_jobs=args.max_jobs, concurrency=args.concurrency, max_needles=args.max_needles,
            tokenizer=args.tokenizer, progress=not args.no_progress)
        config.validate()
        if args.force:
            _start_again(args.output)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def run() -> dict:
        synth = Synthesizer(config, teacher)
        try:
            return await synth.run()
        finally:
            if teacher is not None:
                await teacher.aclose()

    try:
        report = asyncio.run(run())
    except TeacherFatalError as exc:
        print(f"error: the teacher cannot be used: {exc}", file=sys.stderr)
        return 3
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(report))
    short = shortfall(report)
    if short is not None:  # fewer samples than asked is a failure, with the reason
        print(f"error: {short}", file=sys.stderr)
        return 1
    return 0 if report["status"] == "complete" else 1


if __name__ == "__main__":
    cli.run_cli(main)
