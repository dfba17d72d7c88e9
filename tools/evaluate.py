#!/usr/bin/env python
"""Long-document VQA evaluation at 8K-512K (MMLongBench-style), several models side by side.

  python tools/evaluate.py --data SPEC [--data SPEC ...] --lengths 8K,16K,32K,64K,128K,256K,512K \\
      --model [NAME=]BACKEND:PATH_OR_URL [--model ...] \\
      [--judge mmlb:URL[,model=NAME],prompts=MMLONGBENCH_DIR | openai:URL[,model=NAME] | mmlb-rules | rules] \\
      [--limit N] [--output DIR] [--seed 0] [--max-new-tokens 128] [--parallel 8] [--max-pixels N]
  python tools/evaluate.py score --predictions FILE.jsonl [--judge ...] [--output DIR]
  python tools/evaluate.py holdout --pool POOL --num-docs N --output eval_hashes.txt

Data SPECs: ``mmlb:mmlb_data/documentQA,images=mmlb_image`` (MMLongBench as published),
``mmlb-doc:MMLongBench-Doc/data`` (MMLongBench-Doc's original release: samples.json + PDFs, rendered
once at 144 DPI into OUT/page_cache), ``samples:heldout.jsonl,pool=POOL`` (our held-out Samples),
``niah:POOL`` (needle suite),
``mmlb-niah:mmlb_data/NIAH,images=mmlb_image`` (MMLongBench's standardised MM-NIAH, prompted from
--mmlb-dir, scored by its rules, reported as the paper: Ret., Count, Reas., AVG.).
Backends: ``openai:http://host:8000/v1`` (vLLM ...), ``hf:HF_DIR``, ``megatron:MODEL_DIR``.
Give ``--model`` twice to compare a checkpoint with its base model at every length.

Output (resumable: a rerun generates only what is missing and re-judges nothing already judged):
``DIR/instances/<dataset>.jsonl`` (every context: pages, negatives added, tokens),
``DIR/predictions/<model>.jsonl``, ``DIR/scored/<model>.jsonl`` (with ``score`` 0-1),
``DIR/judge_cache.jsonl``, ``DIR/report.{json,md}``, ``DIR/eval_curve.png``, ``DIR/dropped.json``
and ``DIR/eval_hashes.txt`` (SHA-256 of the pool documents used: pass it to
``tools/build_doc_pool.py --exclude-hashes`` so training never sees them).
The ``score`` subcommand re-scores saved predictions (JSONL with question, answer, answer_format,
prediction) with a new judge, writes them with ``score`` under ``--output`` and prints the mean last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter, defaultdict
from typing import Optional

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_vlm import cli  # noqa: E402

SUBCOMMANDS = ("run", "score", "holdout")
OFFICIAL = "official"  # --max-test-samples: each MMLongBench config's own value


# ------------------------------------------------------------------------- arguments
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", default="auto",
                   help="mmlb:URL[,model=NAME],prompts=DIR: MMLongBench v1.1's LLM judge (the paper's score) with "
                        "the prompts of your MMLongBench checkout DIR; openai:URL[,model=NAME]: our LLM judge; "
                        "mmlb-rules (MMLongBench's official rule metric), rules (ours), or auto: mmlb-rules for "
                        "MMLongBench datasets, rules for the others")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable with the judge's API key")
    p.add_argument("--judge-parallel", type=int, default=4, help="judge requests at once")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="build contexts, generate, score, report (the default)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--data", action="append", required=True, metavar="SPEC",
                     help="mmlb:DIR,images=DIR | mmlb-doc:DIR[,cache=DIR] | samples:FILE[,pool=POOL][,negatives=POOL] | niah:POOL | "
                          "mmlb-niah:NIAH_DIR,images=DIR (repeatable)")
    run.add_argument("--lengths", default="8K,16K,32K,64K,128K", help="token budgets (binary K/M)")
    run.add_argument("--model", action="append", default=[], metavar="[NAME=]BACKEND:PATH_OR_URL",
                     help="openai:URL[,model=..][,images=data|path] | hf:DIR[,dtype=..] | megatron:DIR[,dtype=..]; "
                          "repeat to compare models (the first is the baseline)")
    run.add_argument("--limit", type=int, default=None, help="examples per dataset (the first N)")
    run.add_argument("--max-test-samples", type=_max_test_samples, default=OFFICIAL, metavar="N|all|official",
                     help="MMLongBench records per (dataset, length) file, chosen as the official loader does; "
                          "official: each benchmark's config (100 document QA, 50 MM-NIAH)")
    run.add_argument("--output", default="eval_results", help="output folder")
    run.add_argument("--seed", type=int, default=0, help="seed of the per-example negative choice")
    run.add_argument("--max-new-tokens", type=int, default=128, help="longest generated answer (tokens)")
    run.add_argument("--max-pixels", type=int, default=None, help="image pixel cap (None: Qwen2.5-VL's 12845056)")
    run.add_argument("--min-pixels", type=int, default=None, help="image pixel floor (None: Qwen2.5-VL's 3136)")
    run.add_argument("--parallel", type=int, default=8, help="requests at once for openai backends")
    run.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the models' API key")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP request")
    run.add_argument("--tokenizer", default=None, help="tokenizer folder for token counts (None: Qwen2.5-VL's, built offline)")
    run.add_argument("--training-pool", action="append", default=[], metavar="POOL",
                     help="a training pool: its documents (by SHA-256) are never evaluated on or used as negatives")
    run.add_argument("--overall-lengths", default=None,
                     help="lengths of the overall average (None: 64K and 128K as the paper, else all)")
    run.add_argument("--no-published", action="store_true",
                     help="build every length ourselves even where an MMLongBench file for it exists")
    run.add_argument("--keep-errors", action="store_true", help="on resume, do not retry failed generations")
    run.add_argument("--prompt-format", choices=("auto", "mmlb", "ours"), default="auto",
                     help="prompt of the model under test: mmlb is MMLongBench's own (data.py load_doc_qa, read "
                          "from --mmlb-dir) for its document-QA data, ours is our labelled-pages prompt; auto "
                          "(default): mmlb for MMLongBench data, ours for the rest")
    run.add_argument("--mmlb-dir", default=None, metavar="DIR",
                     help="your MMLongBench checkout, whose data.py holds the official prompt (default: the "
                          "prompts=DIR of --judge mmlb:...)")
    run.add_argument("--build-only", action="store_true", help="only build and write the contexts")
    _common(run)

    score = sub.add_parser("score", help="re-score saved predictions",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    score.add_argument("--predictions", required=True, action="append", metavar="FILE",
                       help="JSONL with question, answer, answer_format, prediction (repeatable)")
    score.add_argument("--output", default=None, help="folder for the scored JSONL (default: next to the input)")
    _common(score)

    hold = sub.add_parser("holdout", help="pick held-out documents of a pool, write their SHA-256 list",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hold.add_argument("--pool", required=True, help="document pool folder (tools/build_doc_pool.py)")
    hold.add_argument("--num-docs", type=int, default=None, help="how many (default: all)")
    hold.add_argument("--seed", type=int, default=0, help="seed of the document choice")
    hold.add_argument("--exclude-hashes", action="append", default=[], help="documents not to pick (hash lists)")
    hold.add_argument("--output", required=True, help="the hash list to write")
    return parser


def _subcommand_first(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Options may come before or after the subcommand: move the subcommand to the front (no
    subcommand means ``run``). Values of options are skipped, so ``--output score`` stays a value."""
    takes_value = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                takes_value |= {o for a in sub._actions if a.nargs != 0 for o in a.option_strings}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in SUBCOMMANDS:
            return [token] + argv[:i] + argv[i + 1:]
        if token == "--" or not token.startswith("-"):
            break
        i += 2 if token in takes_value else 1
    if argv[:1] in (["-h"], ["--help"]):
        return argv
    return ["run"] + argv  # the form: no subcommand means run


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    return parser.parse_args(_subcommand_first(argv, parser))


# ------------------------------------------------------------------------- helpers
def _fingerprint(inst, settings: str = "") -> str:
    """What a saved prediction depends on: the context, the question, the prompt wording, the
    generation settings and the model. A rerun reuses a prediction only if all of these match."""
    from megatron_vlm.eval.prompt import DOCQA_INSTRUCTION, NIAH_INSTRUCTION

    payload = json.dumps([[[i.kind, i.doc_id, i.page, i.image, i.tokens, i.text] for i in inst.items],
                          inst.question, DOCQA_INSTRUCTION, NIAH_INSTRUCTION, settings])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "model"


def _write_jsonl(path: str, records) -> None:
    from megatron_vlm.common.storage import atomic_write_bytes, dumps

    atomic_write_bytes(path, "".join(dumps(r) + "\n" for r in records).encode("utf-8"))


def _dropped_counts(dropped) -> dict:
    counts: dict = defaultdict(Counter)
    for d in dropped:
        counts[d.dataset][d.reason] += 1
    return {k: dict(v) for k, v in counts.items()}


def _max_test_samples(text: str):
    from megatron_vlm.eval.data import parse_max_test_samples

    if str(text).strip().lower() == OFFICIAL:
        return OFFICIAL
    try:
        return parse_max_test_samples(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _make_scorer(args, cache_path: str, mmlb_datasets=()):
    from megatron_vlm.eval.judge import make_scorer

    return make_scorer(args.judge, cache_path, args.judge_api_key_env, args.judge_parallel,
                       mmlb_datasets=mmlb_datasets)


# ------------------------------------------------------------------------- run
def build_instances(args, out_dir: str):
    """Every (dataset, length, example) context, written to instances/; returns (instances, dropped,
    sets, the prompt config of the model under test)."""
    from tqdm import tqdm

    from megatron_vlm.data.image_processing import MAX_PIXELS, MIN_PIXELS
    from megatron_vlm.eval.backends import load_cached_tokenizer
    from megatron_vlm.eval.build import Instance, instantiate, parse_lengths
    from megatron_vlm.eval.data import MMLB_MAX_TEST_SAMPLES, DataConfig, Dropped, load_data, pool_documents
    from megatron_vlm.eval.mmniah import MMNIAH_MAX_TEST_SAMPLES
    from megatron_vlm.eval.prompt import TokenCounter

    lengths = parse_lengths(args.lengths)
    exclude = set()
    for pool in args.training_pool:
        exclude |= {d.sha256 for d in pool_documents(pool, DataConfig()).values() if d.sha256}
    official = args.max_test_samples == OFFICIAL
    cfg = DataConfig(max_pixels=args.max_pixels or MAX_PIXELS, min_pixels=args.min_pixels or MIN_PIXELS,
                     limit=args.limit, seed=args.seed,
                     max_test_samples=MMLB_MAX_TEST_SAMPLES if official else args.max_test_samples,
                     mmniah_max_test_samples=MMNIAH_MAX_TEST_SAMPLES if official else args.max_test_samples,
                     work_dir=os.path.join(out_dir, "niah_images"), cache_dir=os.path.join(out_dir, "page_cache"),
                     exclude_hashes=frozenset(exclude))
    sets = [s for spec in args.data for s in load_data(spec, cfg)]
    names = Counter(s.name for s in sets)
    if any(n > 1 for n in names.values()):
        raise SystemExit(f"error: two --data sources give the same dataset name(s) "
                         f"{sorted(k for k, n in names.items() if n > 1)}; rename one with ,name=...")
    mmlb_names = [s.name for s in sets if s.info.get("kind") == "mmlb"]
    try:  # budgets count the tokens of the prompt each example is really sent with
        prompt = _prompt_config(args, [e for s in sets for e in s.examples], mmlb_names)
    except ValueError as err:
        raise PromptSetupError(str(err)) from None
    counter = TokenCounter(load_cached_tokenizer(args.tokenizer), prompt)
    instances: list[Instance] = []
    dropped: list[Dropped] = []
    used_docs: dict[str, str] = {}
    for s in sets:
        dropped.extend(s.dropped)
        rows = []
        for example in tqdm(s.examples, desc=f"contexts {s.name}", disable=args.no_progress, unit="example"):
            for n in lengths:
                if not example.evaluated_at(n):  # MMLongBench: this length's file did not choose it
                    continue
                result = instantiate(example, n, s.negatives, counter, args.seed, use_published=not args.no_published)
                if isinstance(result, Dropped):
                    result.where = f"{example.id} @ {n} tokens"
                    dropped.append(result)
                    continue
                instances.append(result)
                rows.append(result.to_dict())
        _write_jsonl(os.path.join(out_dir, "instances", f"{_safe_name(s.name)}.jsonl"), rows)
        hashes = {d.doc_id: d.sha256 for d in s.negatives if d.sha256}
        hashes.update({e.doc.doc_id: e.doc.sha256 for e in s.examples if e.doc is not None and e.doc.sha256})
        for inst in instances:
            if inst.dataset == s.name:
                for item in inst.items:
                    if item.doc_id in hashes:
                        used_docs[item.doc_id] = hashes[item.doc_id]
    if used_docs:
        from megatron_vlm.common.storage import atomic_write_bytes

        atomic_write_bytes(os.path.join(out_dir, "eval_hashes.txt"),
                           ("# SHA-256 of the pool documents this evaluation uses: exclude them from training\n"
                            + "".join(f"{h}  {d}\n" for d, h in sorted(used_docs.items()))).encode())
    return instances, dropped, sets, prompt


class PromptSetupError(ValueError):
    """The prompt of the model under test cannot be set up (no MMLongBench checkout, ...)."""


def _prompt_config(args, instances, mmlb_names):
    """The prompt of the model under test: MMLongBench's own for its document-QA data (read from the
    checkout given by --mmlb-dir, else by the judge's prompts=DIR), ours for the rest."""
    from megatron_vlm.eval.judge import parse_judge_spec
    from megatron_vlm.eval.mmlb_prompt import load_official_docqa_prompt
    from megatron_vlm.eval.prompt import PromptConfig, uses_official_prompt

    cfg = PromptConfig(format=args.prompt_format, mmlb_datasets=tuple(mmlb_names))
    docqa = any(uses_official_prompt(i, cfg) for i in instances)
    mmniah = any(i.task == "mmniah" for i in instances)
    if not docqa and not mmniah:
        return cfg
    checkout = args.mmlb_dir
    if checkout is None:
        kind, _, options = parse_judge_spec(args.judge)
        checkout = options.get("prompts") if kind == "mmlb" else None
    if checkout is None and not docqa:
        raise ValueError("MMLongBench's MM-NIAH is prompted as the official run does, with the templates of your "
                         "MMLongBench checkout: give --mmlb-dir DIR (git clone "
                         "https://github.com/EdinburghNLP/MMLongBench)")
    if mmniah:
        from megatron_vlm.eval.mmniah import load_official_niah_prompts
        cfg.mmniah = load_official_niah_prompts(checkout)
    if not docqa:
        return cfg
    if checkout is None:
        raise ValueError("MMLongBench data is prompted as the official run does (--prompt-format "
                         f"{args.prompt_format}), whose template is read from your MMLongBench checkout: give "
                         "--mmlb-dir DIR (git clone https://github.com/EdinburghNLP/MMLongBench), or "
                         "--prompt-format ours for our own prompt")
    cfg.official = load_official_docqa_prompt(checkout)
    return cfg


def generate(args, spec, instances, out_dir: str, mmlb_names=(), prompt=None) -> list[dict]:
    """Predictions of one model for every instance, appended as they come (resumable)."""
    from tqdm import tqdm

    from megatron_vlm.data.image_processing import MAX_PIXELS, MIN_PIXELS
    from megatron_vlm.common.storage import JsonlAppender, read_jsonl
    from megatron_vlm.eval.backends import BackendError, GenerationConfig, RequestRejected, make_backend
    from megatron_vlm.eval.build import format_length

    path = os.path.join(out_dir, "predictions", f"{_safe_name(spec.name)}.jsonl")
    from megatron_vlm.eval.prompt import PromptConfig
    prompt = prompt or PromptConfig()
    settings = [spec.kind, spec.target, sorted(spec.options.items()), args.max_new_tokens,
                args.max_pixels, args.min_pixels]
    if prompt.format != "ours" and prompt.official is not None:  # the official prompt's texts change the answers
        settings.append(["mmlb-prompt", prompt.official.digest])
    if prompt.mmniah is not None:
        settings.append(["mmniah-prompt", prompt.mmniah.digest])
    settings = json.dumps(settings)
    fingerprints = {i.key: _fingerprint(i, settings) for i in instances}
    done = {}
    for r in read_jsonl(path, repair=True):
        if args.keep_errors or not r.get("error"):
            done[(r["key"], r.get("context"))] = r
    todo = [i for i in instances if (i.key, fingerprints[i.key]) not in done]
    print(f"[{spec.name}] {len(instances) - len(todo)} predictions on disk, {len(todo)} to generate", flush=True)
    if todo:
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, max_pixels=args.max_pixels or MAX_PIXELS,
                               min_pixels=args.min_pixels or MIN_PIXELS, timeout=args.timeout,
                               api_key_env=args.api_key_env, prompt=prompt)
        backend = make_backend(spec, cfg, args.parallel)

        def one(inst):
            start, error, prediction = time.time(), None, ""
            try:
                prediction = backend.generate(inst)
            except RequestRejected:
                raise  # bad key, model name or URL: every request would fail; main() stops the run
            except (BackendError, RuntimeError, ValueError, OSError) as err:
                error = f"{type(err).__name__}: {err}"[:1000]
            record = {"key": inst.key, "context": fingerprints[inst.key], "model": spec.name,
                      "dataset": inst.dataset, "length": inst.length, "length_label": format_length(inst.length),
                      "id": inst.example_id, "task": inst.task, "question": inst.question, "answer": inst.answer,
                      "answer_format": inst.answer_format, "prediction": prediction.strip(), "error": error,
                      "seconds": round(time.time() - start, 3), "gold_doc_id": inst.gold_doc_id,
                      "evidence_pages": inst.evidence_pages, **inst.summary()}
            if inst.meta.get("doc_name") is not None:  # the judge's question names it (MMLongBench)
                record["doc_name"] = inst.meta["doc_name"]
            if inst.meta.get("depth") is not None:
                record["depth"] = inst.meta["depth"]
            return record

        bar = tqdm(total=len(todo), desc=f"generate {spec.name}", disable=args.no_progress, unit="answer")
        with JsonlAppender(path) as out:
            if backend.parallel > 1:  # Ctrl-C does not wait for the requests in flight
                for record in cli.thread_map(one, todo, backend.parallel):
                    out.append(record)
                    done[(record["key"], record["context"])] = record
                    bar.update()
            else:
                for inst in todo:
                    record = one(inst)
                    out.append(record)
                    done[(record["key"], record["context"])] = record
                    bar.update()
        bar.close()
        backend.close()
        failed = [i for i in todo if done[(i.key, fingerprints[i.key])].get("error")]
        if failed:
            from megatron_vlm.eval.judge import is_mmlb_dataset
            excluded = sum(1 for i in failed if i.task == "mmniah" or
                           (i.task == "docqa" and is_mmlb_dataset(i.dataset, mmlb_names)))
            how = [f"{excluded} of MMLongBench data excluded from its average as the official run does"] if excluded else []
            how += [f"{len(failed) - excluded} scored 0"] if len(failed) > excluded else []
            print(f"[{spec.name}] {len(failed)} generation(s) failed ({'; '.join(how)}; rerun to retry them)",
                  file=sys.stderr)
    return [_with_doc_name(done[(i.key, fingerprints[i.key])], i) for i in instances]


def _with_doc_name(record: dict, inst) -> dict:
    """Predictions written before records carried ``doc_name`` get it from their instance."""
    if "doc_name" in record or inst.meta.get("doc_name") is None:
        return record
    return dict(record, doc_name=inst.meta["doc_name"])


def run(args) -> int:
    from megatron_vlm.common.storage import atomic_write_json
    from megatron_vlm.eval.backends import check_model_spec, parse_model_spec
    from megatron_vlm.eval.build import parse_lengths
    from megatron_vlm.eval.judge import JudgeError, score_records
    from megatron_vlm.eval.report import write_report

    out_dir = args.output

    def stopped() -> str:
        kept = sum(cli.count_lines(os.path.join(out_dir, "predictions", f"{_safe_name(s.name)}.jsonl"))
                   for s in specs)
        judged = cli.count_lines(os.path.join(out_dir, "judge_cache.jsonl"))
        return (f"stopped: {kept} predictions and {judged} judged answers kept in {out_dir}; "
                f"{cli.RESUME} (only what is missing is redone)")

    specs = []
    cli.on_stop(stopped)
    specs = [parse_model_spec(m) for m in args.model]
    for spec in specs:
        check_model_spec(spec)
    if not specs and not args.build_only:
        raise SystemExit("error: give at least one --model (or --build-only)")
    if len({s.name for s in specs}) != len(specs):
        raise SystemExit("error: two --model entries have the same name; name them: --model base=hf:DIR")
    parse_lengths(args.lengths)  # a bad --lengths fails before anything is written
    os.makedirs(out_dir, exist_ok=True)
    try:
        instances, dropped, sets, prompt = build_instances(args, out_dir)
    except PromptSetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    dropped_counts = _dropped_counts(dropped)
    atomic_write_json(os.path.join(out_dir, "dropped.json"),
                      {"counts": dropped_counts, "items": [d.to_dict() for d in dropped]})
    for s in sets:
        print(f"dataset {s.name}: {len(s.examples)} examples, {len(s.negatives)} negative documents, "
              f"{len(s.dropped)} records dropped", flush=True)
        if s.info.get("evidence_offset_warning"):
            print(f"warning: {s.name}: evidence_offset {s.info['evidence_offset']}: "
                  f"{s.info['evidence_offset_warning']}", file=sys.stderr)
    if dropped:
        print(f"dropped: {len(dropped)} (example, length) pairs or records; reasons in "
              f"{os.path.join(out_dir, 'dropped.json')}", flush=True)
    if args.build_only:
        print(f"wrote {len(instances)} contexts to {os.path.join(out_dir, 'instances')}")
        return 0
    if not instances:
        print("error: no example could be instantiated at any length (see dropped.json)", file=sys.stderr)
        return 1
    mmlb_names = [s.name for s in sets if s.info.get("kind") == "mmlb"]
    scorer = _make_scorer(args, os.path.join(out_dir, "judge_cache.jsonl"), mmlb_names)
    all_scored = []
    try:
        for spec in specs:
            predictions = generate(args, spec, instances, out_dir, mmlb_names, prompt)
            scored = score_records(predictions, scorer, not args.no_progress, f"score {spec.name}")
            _write_jsonl(os.path.join(out_dir, "scored", f"{_safe_name(spec.name)}.jsonl"), scored)
            all_scored.extend(scored)
    except JudgeError as err:
        print(f"error: {err}; judged answers are cached, rerun to resume", file=sys.stderr)
        return 1
    finally:
        if hasattr(scorer, "close"):
            scorer.close()
    overall = parse_lengths(args.overall_lengths) if args.overall_lengths else None
    report = write_report(all_scored, out_dir, [s.name for s in specs], overall, dropped=dropped_counts,
                          mmlb_datasets=mmlb_names)
    print(f"report: {os.path.join(out_dir, 'report.md')} (+ report.json, eval_curve.png)")
    for suite in report["suites"].values():
        for model, data in suite["models"].items():
            per = ", ".join(f"{lab} {data['lengths'][lab]['AVG']:.2f}" for lab in report["length_labels"]
                            if data["lengths"].get(lab, {}).get("AVG") is not None)
            overall_value = data["overall"]
            print(f"{suite['title']} | {model}: {per} | overall "
                  f"{'–' if overall_value is None else format(overall_value, '.2f')}")
    return 0


# ------------------------------------------------------------------------- score
def score(args) -> int:
    from megatron_vlm.eval.judge import JudgeError, score_records
    from megatron_vlm.eval.report import write_report
    from megatron_vlm.eval.scoring import normalize_format
    from megatron_vlm.common.jsonl import iter_jsonl_lines

    good: list[tuple[str, dict]] = []
    bad: list[str] = []
    for path in args.predictions:
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} does not exist")
        for number, where, record in iter_jsonl_lines(path):
            if isinstance(record, json.JSONDecodeError):
                bad.append(f"{where}: not valid JSON ({record.msg})")
                continue
            if not isinstance(record, dict):
                bad.append(f"{where}: not a JSON object")
                continue
            missing = [k for k in ("question", "answer", "answer_format", "prediction") if k not in record]
            if missing:
                bad.append(f"{where}: missing field(s) {missing}")
                continue
            try:
                normalize_format(record["answer_format"])
            except ValueError as err:
                bad.append(f"{where}: {err}")
                continue
            good.append((path, record))
    for message in bad:
        print(f"skipped {message}", file=sys.stderr)
    if not good:
        print("error: no usable prediction records", file=sys.stderr)
        return 1
    out_dir = args.output or os.path.dirname(os.path.abspath(args.predictions[0]))
    os.makedirs(out_dir, exist_ok=True)
    cache = os.path.join(out_dir, "judge_cache.jsonl")
    cli.on_stop(lambda: (f"stopped: {cli.count_lines(cache)} judged answers kept in {cache} (of {len(good)} "
                         f"records); no scored file written yet; {cli.RESUME}"))
    scorer = _make_scorer(args, os.path.join(out_dir, "judge_cache.jsonl"))
    try:
        scored = score_records([r for _, r in good], scorer, not args.no_progress)
    except JudgeError as err:
        print(f"error: {err}; judged answers are cached, rerun to resume", file=sys.stderr)
        return 1
    finally:
        if hasattr(scorer, "close"):
            scorer.close()
    by_file: dict[str, list[dict]] = defaultdict(list)
    for (path, _), record in zip(good, scored):
        by_file[path].append(record)
    for path, records in by_file.items():
        stem = os.path.splitext(os.path.basename(path))[0]
        target = os.path.join(out_dir, f"{stem}.scored.jsonl")
        _write_jsonl(target, records)
        print(f"wrote {len(records)} scored records to {target}")
    if all(all(k in r for k in ("model", "dataset", "length")) for r in scored):
        write_report(scored, out_dir)
        print(f"report: {os.path.join(out_dir, 'report.md')}")
    fallbacks = sum(1 for r in scored if str(r.get("scored_by", "")).startswith("rules ("))
    if fallbacks:
        print(f"{fallbacks} record(s) scored by the rules because the judge's reply was unusable", file=sys.stderr)
    unparsed = sum(1 for r in scored if "(reply unparsed" in str(r.get("scored_by", "")))
    if unparsed:
        print(f"{unparsed} record(s) scored 0 because the judge's reply could not be parsed (MMLongBench's rule)",
              file=sys.stderr)
    if bad:
        print(f"{len(bad)} line(s) skipped (listed above)", file=sys.stderr)
    mean = sum(r["score"] for r in scored) / len(scored)
    print(f"mean score: {mean:.6f} ({len(scored)} records)")
    return 0


# ------------------------------------------------------------------------- holdout
def holdout(args) -> int:
    from megatron_vlm.common.inputs import read_hash_list
    from megatron_vlm.eval.data import pick_heldout_documents, write_hash_list

    exclude = set()
    for path in args.exclude_hashes:
        exclude |= read_hash_list(path)
    docs = pick_heldout_documents(args.pool, args.num_docs, args.seed, exclude_hashes=exclude)
    n = write_hash_list(args.output, docs)
    print(f"wrote {n} held-out document hashes to {args.output}; build training pools with "
          f"--exclude-hashes {args.output}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from megatron_vlm.eval.backends import RequestRejected

    try:
        return {"run": run, "score": score, "holdout": holdout}[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RequestRejected as err:  # a server refused the key, the model name or the URL
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    cli.run_cli(main)
