"""The command lines a study runs: one function per tool, argv lists (printed by ``--dry-run``).

Each step is the project's own CLI (tools/mix_data.py, tools/preprocess_data.py, the trainer through
examples/longpt_128k.sh / torchrun / python, tools/evaluate.py, tools/checkpoint/convert.py,
tools/compare_runs.py), so a study does nothing a user could not do by hand.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Optional

from megatron_vlm.study.ablations import Ablation, DataSetting, Variant, settings_digest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHERS = ("slurm", "torchrun", "local")
SLURM_SCRIPT = "examples/longpt_128k.sh"
# VLMEvalKit dataset names of the paper's six short-context benchmarks (Table 3, Appendix B.7)
SHORT_CONTEXT_BENCHMARKS = ("MMBench_DEV_EN_V11", "RealWorldQA", "MMMU_DEV_VAL", "MMMU_Pro_10c", "MathVista_MINI",
                            "OCRBench")


@dataclass
class StudyConfig:
    """Everything a study needs besides its ablation. Paths are used as given (made absolute)."""

    ablation: str
    work: str
    vqa: Optional[str] = None  # folder of synthesized task files: VQA/<task>.jsonl (tools/synthesize_vqa.py)
    long_vqa: Optional[str] = None  # same layout, longer documents: the long-biased variants draw from it
    short_data: Optional[str] = None  # LLaVA conversation JSONL or samples JSONL
    short_image_root: Optional[str] = None
    base_checkpoint: Optional[str] = None  # tools/checkpoint/convert.py hf-to-megatron output
    launcher: str = "slurm"
    recipe: str = "qwen25vl_7b_longpt_128k"
    nproc_per_node: int = 8  # torchrun
    nodes: Optional[int] = None  # slurm: sbatch --nodes (None: the script's 8)
    token_budget: str = "5B"  # of the mixture and of training (schedule.train_tokens), per run
    max_seq_len: int = 128 * 1024
    seed: int = 0
    long_threshold: Optional[int] = None  # None: tools/mix_data.py's 100K
    # smoke: instead of a fixed threshold, the length that this share of each variant's input samples
    # reach (0.236 = the paper's pool-native share >= 100K, Table 11)
    long_pool_share: Optional[float] = None
    train_sets: list[str] = field(default_factory=list)  # extra trainer --set for every run
    eval_data: list[str] = field(default_factory=list)  # tools/evaluate.py --data specs
    eval_lengths: str = "64K,128K"
    overall_lengths: Optional[str] = None  # compare_runs / evaluate --overall-lengths (None: 64K, 128K)
    judge: str = "auto"
    eval_args: list[str] = field(default_factory=list)  # more tools/evaluate.py arguments
    eval_prefix: list[str] = field(default_factory=list)  # e.g. srun --gpus 1 (evaluation on a GPU node)
    variants: Optional[list[str]] = None
    jobs: int = 1  # local/torchrun: runs (train + eval) at once
    dry_run: bool = False
    smoke: bool = False
    overlong: str = "drop"  # tools/preprocess_data.py --overlong
    preprocess_workers: int = 8
    allow_repeat: bool = False
    python: str = sys.executable

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        self.work = os.path.abspath(self.work)
        for name in ("vqa", "long_vqa", "short_data", "short_image_root", "base_checkpoint"):
            value = getattr(self, name)
            if value:
                setattr(self, name, os.path.abspath(value))


def display(argv: list[str], env: Optional[dict[str, str]] = None) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (prefix + " " if prefix else "") + shlex.join(argv)


def tool(cfg: StudyConfig, name: str) -> list[str]:
    return [cfg.python, os.path.join(REPO, "tools", name)]


# ---------------------------------------------------------------------------- data
def task_file(cfg: StudyConfig, task: str, distribution: str) -> str:
    root = cfg.long_vqa if distribution == "long-biased" and cfg.long_vqa else cfg.vqa
    return os.path.join(root or "VQA", f"{task}.jsonl")


def data_key(cfg: StudyConfig, setting: DataSetting) -> str:
    """Folder name of a data variant: readable settings + a hash of everything that shapes the data."""
    payload = {"setting": setting, "pool": cfg.vqa, "long_pool": cfg.long_vqa, "short": cfg.short_data,
               "budget": cfg.token_budget, "seq": cfg.max_seq_len, "seed": cfg.seed, "long": cfg.long_threshold,
               "overlong": cfg.overlong, "cp": _cp_size(cfg), "long_pool_share": cfg.long_pool_share}
    return f"{setting.slug()}-{settings_digest(payload)}"


def mix_command(cfg: StudyConfig, setting: DataSetting, out_dir: str) -> list[str]:
    argv = tool(cfg, "mix_data.py") + ["--input", *[task_file(cfg, t, setting.distribution) for t in setting.tasks],
                                       "--output", os.path.join(out_dir, "mix.jsonl"),
                                       "--task-mix", setting.task_mix_arg(), "--distribution", setting.distribution,
                                       "--token-budget", str(cfg.token_budget), "--max-seq-len",
                                       str(cfg.max_seq_len if cfg.overlong == "drop" else 0), "--seed", str(cfg.seed)]
    if setting.short_ratio > 0:
        argv += ["--short-data", cfg.short_data or "SHORT_DATA", "--short-ratio", f"{setting.short_ratio:g}"]
        if cfg.short_image_root:
            argv += ["--short-image-root", cfg.short_image_root]
    threshold = cfg.long_threshold
    if threshold is None and cfg.long_pool_share:
        threshold = quantile_threshold([task_file(cfg, t, setting.distribution) for t in setting.tasks],
                                       cfg.long_pool_share)
    if threshold is not None:
        argv += ["--long-threshold", str(threshold)]
    if cfg.allow_repeat:
        argv.append("--allow-repeat")
    return argv + ["--no-progress"]


def quantile_threshold(files: list[str], share: float) -> Optional[int]:
    """The sample length (``meta.num_tokens``) that ``share`` of the samples in ``files`` reach (None
    when the files are absent, e.g. under --dry-run before the smoke inputs exist)."""
    import json

    import numpy as np

    lengths = []
    for path in files:
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            lengths += [json.loads(line)["meta"]["num_tokens"] for line in f if line.strip()]
    if not lengths:
        return None
    return int(np.quantile(np.asarray(lengths), 1 - share, method="higher"))


def preprocess_command(cfg: StudyConfig, out_dir: str) -> list[str]:
    return tool(cfg, "preprocess_data.py") + [
        "--input", os.path.join(out_dir, "mix.jsonl"), "--output-prefix", os.path.join(out_dir, "mix"),
        "--max-seq-len", str(cfg.max_seq_len), "--overlong", cfg.overlong, "--workers", str(cfg.preprocess_workers),
        "--pack", "--cp-size", str(_cp_size(cfg)), "--no-progress"]


# ---------------------------------------------------------------------------- training
def _recipe_config(cfg: StudyConfig, variant: Optional[Variant] = None):
    from megatron_vlm.training.config import apply_overrides
    from megatron_vlm.training.recipes import RECIPES

    if cfg.recipe not in RECIPES:
        raise ValueError(f"--recipe {cfg.recipe!r} unknown; choose one of {sorted(RECIPES)}")
    overrides = common_train_sets(cfg) + (variant.train_overrides() if variant else [])
    return apply_overrides(RECIPES[cfg.recipe](), overrides)


def _cp_size(cfg: StudyConfig) -> int:
    return int(_recipe_config(cfg).parallel.context_parallel)


def common_train_sets(cfg: StudyConfig) -> list[str]:
    """Every run of a study trains on its data's max_seq_len and the same token budget (equal budgets)."""
    sets = [f"data.max_seq_len={cfg.max_seq_len}"]
    if not any(s.startswith("schedule.train_steps=") for s in cfg.train_sets):
        from megatron_vlm.mixing.mixer import parse_token_count

        sets.append(f"schedule.train_tokens={parse_token_count(cfg.token_budget)}")
    return sets + list(cfg.train_sets)


def run_key(cfg: StudyConfig, variant: Variant) -> str:
    """Folder name of a training run: its data, mRoPE base and overrides (identical runs of two studies
    share it, e.g. Table 1's extract-single is Table 16's extract-single at 4e6)."""
    payload = {"data": data_key(cfg, variant.data), "sets": variant.train_overrides() + common_train_sets(cfg),
               "recipe": cfg.recipe, "base": cfg.base_checkpoint}
    return f"{variant.data.slug()}-rope{variant.rope_theta:g}-{settings_digest(payload)}".replace("+", "")


def final_checkpoint(cfg: StudyConfig, variant: Variant, run_dir: str) -> str:
    """Where the run's last checkpoint lands (iter_<total steps>): its existence marks the run done."""
    train = _recipe_config(cfg, variant)
    # training/checkpoint.py's iteration_dir (not imported: it loads torch and megatron for a file name)
    return os.path.join(train.checkpoint.dir or os.path.join(run_dir, "checkpoints"), f"iter_{train.total_steps():07d}")


def train_command(cfg: StudyConfig, variant: Variant, data_prefix: str, run_dir: str) -> tuple[list[str], dict]:
    """(argv, extra environment) of one run with the chosen launcher."""
    sets = common_train_sets(cfg) + variant.train_overrides()
    if cfg.launcher == "slurm":
        env = {"RECIPE": cfg.recipe, "DATA_PREFIX": data_prefix, "RUN_DIR": run_dir,
               "MODEL_DIR": cfg.base_checkpoint or "BASE_CHECKPOINT"}
        argv = ["sbatch", "--parsable", f"--job-name={variant.name}", f"--output={run_dir}/slurm-%j.out",
                "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items())]
        if cfg.nodes:
            argv.append(f"--nodes={cfg.nodes}")
        argv.append(os.path.join(REPO, SLURM_SCRIPT))
        for s in sets:
            argv += ["--set", s]
        return argv, {}
    head = (["torchrun", "--nproc_per_node", str(cfg.nproc_per_node)] if cfg.launcher == "torchrun"
            else [cfg.python])
    argv = head + ["-m", "megatron_vlm.train", "--recipe", cfg.recipe]
    for s in ([f"model.load={cfg.base_checkpoint}"] if cfg.base_checkpoint else []) + [
            f"data.prefix={data_prefix}", f"log.run_dir={run_dir}"] + sets:
        argv += ["--set", s]
    return argv, {}


# ---------------------------------------------------------------------------- evaluation and comparison
def eval_key(cfg: StudyConfig) -> str:
    return settings_digest({"data": cfg.eval_data, "lengths": cfg.eval_lengths, "judge": cfg.judge,
                            "args": cfg.eval_args})


def eval_command(cfg: StudyConfig, name: str, checkpoint: str, out_dir: str) -> list[str]:
    argv = list(cfg.eval_prefix) + tool(cfg, "evaluate.py")
    for spec in cfg.eval_data or ["mmlb:MMLONGBENCH_DIR,images=IMAGES_DIR"]:
        argv += ["--data", spec]
    argv += ["--lengths", cfg.eval_lengths, "--model", f"{name}=megatron:{checkpoint}", "--judge", cfg.judge,
             "--output", out_dir, "--no-progress"]
    if cfg.overall_lengths:
        argv += ["--overall-lengths", cfg.overall_lengths]
    return argv + list(cfg.eval_args)


def compare_command(cfg: StudyConfig, ablation: Ablation, runs: list[tuple[str, str]], out_dir: str) -> list[str]:
    argv = tool(cfg, "compare_runs.py")
    for name, eval_dir in runs:
        argv += ["--run", f"{name}={eval_dir}"]
    argv += ["--output", out_dir, "--paper-table", ablation.paper_table,
             "--title", f"{ablation.name}: {ablation.title} ({ablation.source})"]
    if cfg.overall_lengths:
        argv += ["--overall-lengths", cfg.overall_lengths]
    return argv


def export_command(cfg: StudyConfig, checkpoint: str, out_dir: str) -> list[str]:
    return tool(cfg, os.path.join("checkpoint", "convert.py")) + ["megatron-to-hf", "--in-dir", checkpoint,
                                                                  "--out-dir", out_dir]


def vlmevalkit_config(exports: dict[str, str]) -> dict:
    """VLMEvalKit ``run.py --config`` JSON: each HF export as a Qwen2.5-VL model, the six benchmarks."""
    return {"model": {name: {"class": "Qwen2VLChat", "model_path": path, "min_pixels": 1280 * 28 * 28,
                             "max_pixels": 16384 * 28 * 28, "use_custom_prompt": False}
                      for name, path in exports.items()},
            "data": {name: {"class": "ImageMCQDataset" if name in ("MMBench_DEV_EN_V11", "RealWorldQA")
                            else "MMMUDataset" if name == "MMMU_DEV_VAL"
                            else "MMMUProDataset" if name.startswith("MMMU_Pro")
                            else "MathVista" if name.startswith("MathVista") else "OCRBench",
                            "dataset": name} for name in SHORT_CONTEXT_BENCHMARKS}}


__all__ = ["LAUNCHERS", "REPO", "SHORT_CONTEXT_BENCHMARKS", "StudyConfig", "common_train_sets", "compare_command",
           "data_key", "display", "eval_command", "eval_key", "export_command", "final_checkpoint", "mix_command",
           "preprocess_command", "run_key", "task_file", "train_command", "vlmevalkit_config"]
