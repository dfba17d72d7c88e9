"""Run one ablation end to end, resumably: build each distinct data variant once, check it against
its claim, train every variant, check the saved mRoPE base, evaluate every final checkpoint, compare.

Work folder (shared by studies: identical data or runs are built once, whoever asks first)::

  WORK/data/<data key>/      mix.jsonl + stats (tools/mix_data.py), mix.* (tools/preprocess_data.py),
                             DONE.json (the checked statistics; its presence skips the build)
  WORK/runs/<run key>/       the trainer's run_dir; done = its final checkpoint iter_<total steps> exists
                             (slurm: slurm_job holds the submitted job id while it is queued or running)
  WORK/evals/<eval key>/<run key>/   tools/evaluate.py output; done = report.json exists
  WORK/exports/<run key>/    HF export (table3_short only; done = config.json exists)
  WORK/<study>/              summary.json, summary.md, comparison/ (tools/compare_runs.py), logs/
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from megatron_vlm.common.storage import atomic_write_bytes, atomic_write_json
from megatron_vlm.study import commands as C
from megatron_vlm.study.ablations import ABLATIONS, Ablation, Variant
from megatron_vlm.study.checks import StudyCheckError, Tolerances, check_data, check_rope

DONE = "DONE.json"
SLURM_JOB = "slurm_job"


class StudyError(RuntimeError):
    """A step failed or an input is missing: the message says which, where its log is and what to do."""


class StudyRunner:
    def __init__(self, cfg: C.StudyConfig, log: Callable[[str], None] = print,
                 tolerances: Tolerances = Tolerances()):
        if cfg.ablation not in ABLATIONS:
            raise StudyError(f"unknown study {cfg.ablation!r}; choose one of {list(ABLATIONS)}")
        self.cfg = cfg
        try:
            self.ablation: Ablation = ABLATIONS[cfg.ablation].select(cfg.variants)
        except ValueError as err:
            raise StudyError(str(err)) from None
        self.tolerances = tolerances
        self._log = log
        self._lock = threading.Lock()
        self.study_dir = os.path.join(cfg.work, self.ablation.name)
        self.logs = os.path.join(self.study_dir, "logs")

    # ------------------------------------------------------------------ helpers
    def log(self, line: str) -> None:
        with self._lock:
            self._log(line)

    def execute(self, label: str, argv: list[str], env: Optional[dict] = None) -> str:
        """Run one command (or print it under --dry-run); its output goes to a log file. Returns stdout."""
        if self.cfg.dry_run:
            self.log(C.display(argv, env))
            return ""
        os.makedirs(self.logs, exist_ok=True)
        log_path = os.path.join(self.logs, label.replace("/", "_") + ".log")
        self.log(f"[study] {label}: running (log {log_path})")
        with open(log_path, "w") as f:
            f.write(C.display(argv, env) + "\n\n")
            f.flush()
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=f, text=True, cwd=C.REPO,
                                  env={**os.environ, **(env or {})})
            f.write(proc.stdout)
        if proc.returncode != 0:
            with open(log_path, errors="replace") as f:
                tail = "".join(f.readlines()[-15:])
            raise StudyError(f"{label} failed (exit {proc.returncode}); command and output in {log_path}; "
                             f"last lines:\n{tail}")
        return proc.stdout

    def validate(self) -> None:
        """Inputs the study needs, named (not checked under --dry-run: the plan prints with placeholders)."""
        cfg, ab = self.cfg, self.ablation
        if cfg.dry_run:
            return
        missing = []
        if not cfg.vqa:
            missing.append("--vqa (folder of synthesized task files VQA/<task>.jsonl)")
        for v in ab.variants:
            for task in v.data.tasks:
                path = C.task_file(cfg, task, v.data.distribution)
                if cfg.vqa and not os.path.isfile(path):
                    missing.append(f"{path} (tools/synthesize_vqa.py --task {task})")
        if ab.needs_short_data and not (cfg.short_data and os.path.isfile(cfg.short_data)):
            missing.append(f"--short-data (LLaVA or samples JSONL){': ' + cfg.short_data if cfg.short_data else ''}")
        if not cfg.smoke and not (cfg.base_checkpoint and os.path.isdir(cfg.base_checkpoint)):
            missing.append("--base-checkpoint (a model directory from tools/checkpoint/convert.py hf-to-megatron)")
        if not cfg.eval_data:
            missing.append("--eval-data (tools/evaluate.py --data spec, e.g. mmlb:DIR,images=DIR)")
        if missing:
            raise StudyError(f"{ab.name}: missing input(s): " + "; ".join(dict.fromkeys(missing)))

    # ------------------------------------------------------------------ data
    def data_dir(self, variant: Variant) -> str:
        return os.path.join(self.cfg.work, "data", C.data_key(self.cfg, variant.data))

    def build_data(self, variant: Variant) -> dict:
        """mix + preprocess once per data key, then the statistics check; DONE.json marks it built."""
        out = self.data_dir(variant)
        key = os.path.basename(out)
        done = os.path.join(out, DONE)
        if os.path.isfile(done) and not self.cfg.dry_run:
            with open(done) as f:
                record = json.load(f)
            self.log(f"[study] data {key}: built (skipped)")
            return record
        if self.cfg.dry_run:
            self.log(f"# data {key} ({variant.data.task_mix_arg()}, {variant.data.distribution}, short "
                     f"{variant.data.short_ratio:g}); then its MIX.stats.json is checked against the claim")
        else:
            os.makedirs(out, exist_ok=True)
        self.execute(f"data-{key}-mix", C.mix_command(self.cfg, variant.data, out))
        stats_path = os.path.join(out, "mix.stats.json")
        summary = None
        if not self.cfg.dry_run:  # check before spending time on preprocessing
            with open(stats_path) as f:
                summary = check_data(variant, json.load(f), stats_path, self.tolerances)
        self.execute(f"data-{key}-preprocess", C.preprocess_command(self.cfg, out))
        record = {"key": key, "setting": variant.data.task_mix_arg(), "distribution": variant.data.distribution,
                  "short_ratio": variant.data.short_ratio, "prefix": os.path.join(out, "mix"),
                  "stats": stats_path, "summary": summary}
        if not self.cfg.dry_run:
            atomic_write_json(done, record)
        return record

    # ------------------------------------------------------------------ runs
    def run_dir(self, variant: Variant) -> str:
        return os.path.join(self.cfg.work, "runs", C.run_key(self.cfg, variant))

    def eval_dir(self, name_key: str) -> str:
        return os.path.join(self.cfg.work, "evals", C.eval_key(self.cfg), name_key)

    def _slurm_pending(self, run_dir: str) -> Optional[str]:
        path = os.path.join(run_dir, SLURM_JOB)
        if not os.path.isfile(path):
            return None
        job = open(path).read().strip()
        try:
            state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                                   timeout=60).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None
        return f"job {job} {state.lower()}" if state else None

    def run_variant(self, variant: Variant, data: dict) -> dict:
        """Train (unless the final checkpoint exists), check its mRoPE base, evaluate, export (Table 3)."""
        cfg = self.cfg
        run_dir = self.run_dir(variant)
        key = os.path.basename(run_dir)
        ckpt = C.final_checkpoint(cfg, variant, run_dir)
        record = {"variant": variant.name, "claims": variant.claims(), "data": data["key"], "run_dir": run_dir,
                  "checkpoint": ckpt, "status": "planned"}
        if cfg.dry_run:
            self.log(f"# run {variant.name} -> {run_dir} (done when {ckpt} exists; then its config.json and "
                     f"checkpoint config must say rope_theta {variant.rope_theta:g})")
        trained = os.path.isdir(ckpt) and not cfg.dry_run
        if not trained:
            argv, env = C.train_command(cfg, variant, data["prefix"], run_dir)
            if cfg.launcher == "slurm":
                pending = None if cfg.dry_run else self._slurm_pending(run_dir)
                if pending:
                    self.log(f"[study] run {variant.name}: {pending} (not resubmitted)")
                    return {**record, "status": pending}
                if not cfg.dry_run:
                    os.makedirs(run_dir, exist_ok=True)
                job = self.execute(f"run-{variant.name}-sbatch", argv, env).strip().split(";")[0]
                if not cfg.dry_run:
                    atomic_write_bytes(os.path.join(run_dir, SLURM_JOB), job.encode())
                    self.log(f"[study] run {variant.name}: submitted as job {job}")
                    return {**record, "status": f"job {job} submitted"}
            else:
                self.execute(f"run-{variant.name}-train", argv, env)
                if not cfg.dry_run and not os.path.isdir(ckpt):
                    raise StudyError(f"run {variant.name} ended without its final checkpoint {ckpt}; see "
                                     f"{self.logs}/run-{variant.name}-train.log")
        else:
            self.log(f"[study] run {variant.name}: trained (skipped), {ckpt}")
        if not cfg.dry_run:
            record["rope"] = check_rope(variant, run_dir, ckpt)
        record["eval_dir"] = self.evaluate(variant.name, key, ckpt)
        if self.ablation.short_context_eval:
            record["export"] = self.export(variant.name, key, ckpt)
        record["status"] = "evaluated"
        return record

    def evaluate(self, name: str, key: str, checkpoint: str) -> str:
        out = self.eval_dir(key)
        if os.path.isfile(os.path.join(out, "report.json")) and not self.cfg.dry_run:
            self.log(f"[study] eval {name}: report exists (skipped), {out}")
            return out
        self.execute(f"eval-{name}", C.eval_command(self.cfg, name, checkpoint, out))
        return out

    def export(self, name: str, key: str, checkpoint: str) -> str:
        out = os.path.join(self.cfg.work, "exports", key)
        if os.path.isfile(os.path.join(out, "config.json")) and not self.cfg.dry_run:
            return out
        self.execute(f"export-{name}", C.export_command(self.cfg, checkpoint, out))
        return out

    # ------------------------------------------------------------------ the study
    def run(self) -> dict:
        cfg, ab = self.cfg, self.ablation
        self.validate()
        self.log(f"[study] {ab.name}: {ab.title} ({ab.source}); {len(ab.variants)} variant(s); work {cfg.work}")
        summary = {"study": ab.name, "title": ab.title, "source": ab.source, "note": ab.note,
                   "settings": {k: v for k, v in vars(cfg).items() if k not in ("python",)}, "data": {},
                   "variants": {}, "base": None, "comparison": None, "short_context": None}
        builds: dict[str, Variant] = {}
        for v in ab.variants:
            builds.setdefault(C.data_key(cfg, v.data), v)
        jobs = max(1, cfg.jobs if not cfg.dry_run else 1)
        try:
            built = self._map(self.build_data, list(builds.values()), jobs)
        except StudyCheckError as err:
            raise StudyError(str(err)) from None
        data_of = dict(zip(builds, built))
        summary["data"] = data_of
        self._write_summary(summary)

        def one(v: Variant) -> dict:
            return self.run_variant(v, data_of[C.data_key(cfg, v.data)])

        try:
            results = self._map(one, list(ab.variants), jobs if cfg.launcher != "slurm" else 1)
        except StudyCheckError as err:
            raise StudyError(str(err)) from None
        for r in results:
            summary["variants"][r["variant"]] = r
        if cfg.base_checkpoint:
            summary["base"] = {"checkpoint": cfg.base_checkpoint,
                               "eval_dir": self.evaluate("base", "base-" + C.settings_digest(
                                   {"base": cfg.base_checkpoint}), cfg.base_checkpoint)}
        self._write_summary(summary)
        pending = [r["variant"] for r in results if r["status"] != "evaluated"]
        if pending and not cfg.dry_run:
            self.log(f"[study] {len(pending)} run(s) not finished ({', '.join(pending)}); rerun this command when "
                     f"they are: it skips what is done and evaluates and compares the rest")
            summary["pending"] = pending
            self._write_summary(summary)
            return summary
        if ab.short_context_eval:
            summary["short_context"] = self.short_context_hook(results)
        summary["comparison"] = self.compare(results, summary)
        self._write_summary(summary)
        if not cfg.dry_run:
            self.log(f"[study] done: {summary['comparison']}/comparison.md; summary "
                     f"{os.path.join(self.study_dir, 'summary.md')}")
        return summary

    @staticmethod
    def _map(fn, items: list, jobs: int) -> list:
        """``fn`` over ``items``, ``jobs`` at a time, in order; the first failure propagates."""
        if jobs <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(min(jobs, len(items))) as pool:
            return list(pool.map(fn, items))

    def compare(self, results: list[dict], summary: dict) -> str:
        out = os.path.join(self.study_dir, "comparison")
        runs = ([("base", summary["base"]["eval_dir"])] if summary.get("base") else []) + [
            (r["variant"], r["eval_dir"]) for r in results]
        if not self.cfg.dry_run and not os.path.isfile(os.path.join(C.REPO, "tools", "compare_runs.py")):
            raise StudyError("tools/compare_runs.py not found (it writes the comparison table); the evaluations "
                             f"are in {os.path.dirname(runs[0][1])}; update the checkout and rerun")
        self.execute(f"compare-{self.ablation.name}", C.compare_command(self.cfg, self.ablation, runs, out))
        return out

    def short_context_hook(self, results: list[dict]) -> dict:
        """Table 3: the HF exports exist; write (not run) the VLMEvalKit config and command."""
        exports = {r["variant"]: r["export"] for r in results}
        folder = os.path.join(self.study_dir, "short_context")
        config_path = os.path.join(folder, "vlmevalkit.json")
        command = (f"cd VLMEvalKit && python run.py --config {config_path} "
                   f"--work-dir {os.path.join(folder, 'results')} --reuse")
        script = ("#!/usr/bin/env bash\n"
                  "# Table 3: short-context benchmarks of each run's HF export with VLMEvalKit\n"
                  "# (git clone https://github.com/open-compass/VLMEvalKit && pip install -e VLMEvalKit; one GPU per\n"
                  "# model; MMMU/MathVista answer extraction uses VLMEvalKit's judge: set its OPENAI_API_KEY).\n"
                  "# Not run by the study. Benchmarks: " + ", ".join(C.SHORT_CONTEXT_BENCHMARKS) + "\n"
                  "set -euo pipefail\n" + command + "\n")
        if self.cfg.dry_run:
            self.log(f"# write {config_path} and {folder}/run_vlmevalkit.sh (not run):\n# {command}")
        else:
            os.makedirs(folder, exist_ok=True)
            atomic_write_json(config_path, C.vlmevalkit_config(exports))
            atomic_write_bytes(os.path.join(folder, "run_vlmevalkit.sh"), script.encode())
            os.chmod(os.path.join(folder, "run_vlmevalkit.sh"), 0o755)
            self.log(f"[study] short-context evaluation (Table 3), not run here: {folder}/run_vlmevalkit.sh\n"
                     f"  {command}")
        return {"exports": exports, "config": config_path, "script": os.path.join(folder, "run_vlmevalkit.sh"),
                "command": command}

    # ------------------------------------------------------------------ summary
    def _write_summary(self, summary: dict) -> None:
        if self.cfg.dry_run:
            return
        os.makedirs(self.study_dir, exist_ok=True)
        atomic_write_json(os.path.join(self.study_dir, "summary.json"), summary)
        atomic_write_bytes(os.path.join(self.study_dir, "summary.md"), format_summary(summary).encode())


def format_summary(summary: dict) -> str:
    """Markdown: per variant its claims and the measured data statistics (and the saved mRoPE base)."""
    lines = [f"# {summary['study']}: {summary['title']}", "", f"{summary['source']}. {summary.get('note') or ''}",
             "", "| variant | claimed task shares | measured task shares | distribution | long share (mix / pool) "
             "| short share | rope claimed | rope saved | status |", "|---|---|---|---|---|---|---|---|---|"]
    data = summary["data"]
    for name, r in summary["variants"].items():
        d = data.get(r["data"], {}).get("summary") or {}
        per_task = d.get("per_task", {})
        claims = r["claims"]
        claimed = ", ".join(f"{t} {100 * s:.0f}%" for t, s in claims["task_shares"].items())
        measured = ", ".join(f"{t} {100 * row['token_share']:.1f}%" for t, row in per_task.items())
        long = ", ".join(f"{t} {100 * row['long_share']:.0f}% / {100 * (row['pool_long_share'] or 0):.0f}%"
                         for t, row in per_task.items() if t != "short") + f" (>= {d.get('long_threshold')})"
        short = f"{100 * per_task['short']['token_share']:.1f}%" if "short" in per_task else "0%"
        saved = sorted(set((r.get("rope") or {}).get("found", {}).values()))
        lines.append(f"| {name} | {claimed} | {measured} | {claims['distribution']} | {long} | {short} | "
                     f"{claims['rope_theta']:g} | {', '.join(f'{x:g}' for x in saved)} | {r['status']} |")
    lines += ["", "Long share: samples with at least the data's long threshold (tokens, in brackets). Data folders: "
              + ", ".join(sorted(data)) + "."]
    if summary.get("comparison"):
        lines += ["", f"Comparison: {summary['comparison']}/comparison.md"]
    if summary.get("short_context"):
        lines += ["", f"Short-context evaluation (not run): `{summary['short_context']['command']}`"]
    return "\n".join(lines) + "\n"


__all__ = ["StudyError", "StudyRunner", "format_summary"]
