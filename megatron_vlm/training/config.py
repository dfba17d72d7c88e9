"""Training configuration as nested dataclasses; every value can be overridden by ``key=value``.

``--set optim.lr=2e-5 --set data.max_seq_len=65536`` walks the dataclass tree; values are parsed as
Python/JSON literals (numbers, booleans, lists, ``None``) and checked against the field's type.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | 3b | 7b | 32b | 72b (random init) unless a checkpoint is given
    load: Optional[str] = None  # a model directory from `convert.py hf-to-megatron` (or a training run's)
    rope_theta: Optional[float] = None  # override, e.g. 4e6 for 128K LongPT
    dtype: str = "bf16"  # compute dtype on every device (main weights, grads and AdamW stay fp32); or fp32
    recompute: bool = False  # full activation recompute (LM layers and ViT blocks)
    freeze_vision: bool = False
    freeze_merger: bool = False
    freeze_language: bool = False


@dataclass
class DataConfig:
    prefix: Optional[str] = None  # tools/preprocess_data.py output prefix (None: synthetic data)
    max_seq_len: int = 131072  # tokens per packed row
    num_workers: int = 2
    seed: int = 1234
    synthetic_documents: int = 64  # synthetic data only: how many documents to generate


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    context_parallel: int = 1


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class ScheduleConfig:
    global_batch_tokens: int = 4 * 1024**2  # 4M = 32 rows x 128K
    train_tokens: Optional[int] = 5 * 1024**3  # the run's token budget (5B in the paper)
    train_steps: Optional[int] = None  # overrides train_tokens when set


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # where the run writes checkpoints (default: <run_dir>/checkpoints)
    interval: int = 500  # steps between checkpoints
    keep_last: int = 3
    resume: bool = True  # continue from the latest checkpoint in `dir` if there is one


@dataclass
class LogConfig:
    run_dir: str = "runs/default"
    interval: int = 1  # steps between console/TensorBoard lines
    tensorboard: bool = True


@dataclass
class TrainConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 1234

    def rows_per_step(self) -> int:
        rows, remainder = divmod(self.schedule.global_batch_tokens, self.data.max_seq_len)
        if rows < 1 or remainder:
            raise ValueError(f"schedule.global_batch_tokens {self.schedule.global_batch_tokens} must be a positive "
                             f"multiple of data.max_seq_len {self.data.max_seq_len}")
        return rows

    def total_steps(self) -> int:
        if self.schedule.train_steps is not None:
            return int(self.schedule.train_steps)
        if not self.schedule.train_tokens:
            raise ValueError("set schedule.train_tokens or schedule.train_steps")
        return -(-int(self.schedule.train_tokens) // self.schedule.global_batch_tokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    hint = annotation
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = args[0]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ValueError(f"--set {key}: expected {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ValueError(f"--set {key}: expected int, got {value!r}")
    return value


def parse_value(text: str) -> Any:
    """``1e-5`` -> float, ``true`` -> True, ``[1,2]`` -> list, ``4M``/``5B`` -> binary multiples, else str."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    suffix = {"k": 1024, "m": 1024**2, "b": 1024**3, "g": 1024**3}.get(lowered[-1:])
    if suffix and lowered[:-1].replace(".", "", 1).isdigit():
        return int(float(lowered[:-1]) * suffix)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node: Any = config
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(node) or not hasattr(node, part):
                raise ValueError(f"--set {key}: unknown section {part!r}")
            node = getattr(node, part)
        leaf = parts[-1]
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if leaf not in fields:
            raise ValueError(f"--set {key}: unknown key {leaf!r}; known: {sorted(fields)}")
        hints = typing.get_type_hints(type(node))
        setattr(node, leaf, _coerce(parse_value(raw), hints[leaf], key))
    return config
