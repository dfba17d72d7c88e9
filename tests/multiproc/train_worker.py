"""torchrun worker: a few tiny-recipe training steps at a given CP size (DP fills the rest of the
world); rank 0 saves the losses and the final weights (TP=1 layout)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()

    from megatron_vlm.parallel import destroy_parallel
    from megatron_vlm.parallel.tensor_parallel import full_state
    from megatron_vlm.training.config import apply_overrides
    from megatron_vlm.training.recipes import tiny_cpu
    from megatron_vlm.training.trainer import Trainer

    cfg = apply_overrides(tiny_cpu(), [
        "data.max_seq_len=256", "schedule.global_batch_tokens=1024", "schedule.train_steps=3",
        "checkpoint.interval=0", f"log.run_dir={args.run_dir}", "log.tensorboard=false", "log.interval=100",
        f"parallel.context_parallel={args.cp}", f"parallel.tensor_parallel={args.tp}"])
    trainer = Trainer(cfg, log=lambda _: None)
    losses = trainer.train()
    weights = full_state(trainer.model)
    if dist.get_rank() == 0:
        torch.save({"losses": torch.tensor(losses, dtype=torch.float64), "weights": weights}, args.out)
    destroy_parallel()


if __name__ == "__main__":
    main()
