"""Where the trainer's rows come from: the preprocessed mmap dataset, or synthetic rows."""

from __future__ import annotations

from megatron_vlm.config import Qwen25VLConfig
from megatron_vlm.training.config import TrainConfig
from megatron_vlm.training.synthetic import SyntheticSource


def build_source(cfg: TrainConfig, model_config: Qwen25VLConfig, dp_rank: int, dp_size: int, cp_size: int,
                 pin_memory: bool = False):
    """An object with ``next_rows(count)``, ``state_dict()`` and ``load_state_dict(state)``.

    ``data.prefix`` may list several prefixes as ``PREFIX[:WEIGHT],...`` (a weighted blend); rows
    cycle through epochs in a seeded order, sharded over data-parallel ranks."""
    if cfg.data.prefix is None:
        return SyntheticSource(model_config, cfg.data.seed, cfg.data.max_seq_len, dp_rank, dp_size)
    from megatron_vlm.data.dataset import build_dataset
    from megatron_vlm.data.loader import build_loader

    prefixes, weights = [], []
    for item in str(cfg.data.prefix).split(","):
        path, _, weight = item.partition(":")
        prefixes.append(path)
        weights.append(float(weight) if weight else 1.0)
    dataset = build_dataset(prefixes, weights=weights, seed=cfg.data.seed, max_seq_len=cfg.data.max_seq_len,
                            cp_size=cp_size, tp_size=cfg.parallel.tensor_parallel,
                            pixels="levels" if cfg.data.num_workers else "float32")
    return build_loader(dataset, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.data.seed,
                        num_workers=cfg.data.num_workers, num_epochs=None,
                        pin_memory=pin_memory)
