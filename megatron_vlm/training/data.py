"""Where the trainer's rows come from: the preprocessed mmap dataset, or synthetic rows."""

from __future__ import annotations

from megatron_vlm.config import Qwen25VLConfig
from megatron_vlm.training.config import TrainConfig
from megatron_vlm.training.synthetic import SyntheticSource


def build_source(cfg: TrainConfig, model_config: Qwen25VLConfig, dp_rank: int, dp_size: int, cp_size: int):
    if cfg.data.prefix is None:
        return SyntheticSource(model_config, cfg.data.seed, cfg.data.max_seq_len, dp_rank, dp_size)
    raise NotImplementedError("mmap datasets arrive with tools/preprocess_data.py")
