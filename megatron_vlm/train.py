"""Train: ``python -m megatron_vlm.train --recipe NAME [--set key=value ...]`` (torchrun for >1 GPU).

The resolved config is printed and saved as <run_dir>/config.json; checkpoints go to
<run_dir>/checkpoints (or checkpoint.dir) and a rerun resumes from the latest one.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def build_parser() -> argparse.ArgumentParser:
    from megatron_vlm.training.recipes import RECIPES

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES),
                        help="training recipe (megatron_vlm/training/recipes.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config value, e.g. --set optim.lr=2e-5 --set data.prefix=data/mix")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_vlm.training.config import apply_overrides
    from megatron_vlm.training.recipes import RECIPES

    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")

    from megatron_vlm.cli import UserError

    try:
        cfg = apply_overrides(RECIPES[args.recipe](), args.overrides)
        cfg.rows_per_step()
    except ValueError as exc:  # a bad --set: say which, no traceback
        raise UserError(str(exc)) from exc
    print(cfg.to_json(), flush=True)
    if args.print_config:
        return 0

    from megatron_vlm.parallel import destroy_parallel
    from megatron_vlm.training.trainer import Trainer

    try:
        try:
            trainer = Trainer(cfg)
        except (ValueError, FileNotFoundError) as exc:  # settings or inputs the user can fix (MVLM_DEBUG=1: traceback)
            raise UserError(str(exc)) from exc
        trainer.train()
        if trainer.step >= trainer.total_steps and (not cfg.checkpoint.interval or trainer.step % cfg.checkpoint.interval):
            trainer.save()  # always leave the final weights
    finally:
        close = getattr(getattr(locals().get("trainer"), "source", None), "close", None)
        if close is not None:
            close()  # data-loader workers exit now, not at interpreter exit
        destroy_parallel()
    return 0


if __name__ == "__main__":
    from megatron_vlm.cli import run_cli

    run_cli(main)  # a stop before training starts, or a config error: one line, no traceback
