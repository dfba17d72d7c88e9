"""``python -m megatron_vlm.study STUDY --vqa V --short-data S --base-checkpoint C --work DIR``:
one of the paper's ablations end to end (data, training, evaluation at 64K/128K, comparison table).

Studies: table1_tasks, fig2_length, table2_ratio, table3_short, table16_rope, final
(megatron_vlm/study/ablations.py). ``--dry-run`` prints every command; ``--smoke`` runs every variant
on a CPU with the tiny model in minutes. A rerun skips what is done (data built, final checkpoint
present, evaluation report present); with ``--launcher slurm`` runs are submitted with sbatch and the
study is rerun once they finish.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Optional

from megatron_vlm import cli


def build_parser() -> argparse.ArgumentParser:
    from megatron_vlm.study.ablations import ABLATIONS
    from megatron_vlm.study.commands import LAUNCHERS

    LONG_THRESHOLD = 100 * 1024  # tools/mix_data.py's (megatron_vlm.mixing.mixer imports numpy: not for --help)

    p = argparse.ArgumentParser(prog="python -m megatron_vlm.study", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=list(ABLATIONS), help="which ablation")
    p.add_argument("--work", required=True, metavar="DIR", help="work folder (data, runs, evals; shared by studies)")
    p.add_argument("--vqa", metavar="DIR", help="synthesized task files DIR/<task>.jsonl (tools/synthesize_vqa.py "
                                                "--output DIR/<task>.jsonl); not a document pool")
    p.add_argument("--long-vqa", metavar="DIR", help="same layout from 50-100-page documents: long-biased variants "
                                                     "draw from it (default: --vqa)")
    p.add_argument("--short-data", metavar="FILE", help="short-context data (LLaVA conversation or samples JSONL)")
    p.add_argument("--short-image-root", metavar="DIR", help="folder the short data's image paths are relative to")
    p.add_argument("--base-checkpoint", metavar="DIR", help="the model to continue from (convert.py hf-to-megatron)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="slurm",
                   help="slurm: sbatch examples/longpt_128k.sh per run; torchrun or local: run here, one at a time "
                        "(or --jobs at once)")
    p.add_argument("--recipe", default="qwen25vl_7b_longpt_128k", help="training recipe of every run")
    p.add_argument("--nproc-per-node", type=int, default=8, help="torchrun processes")
    p.add_argument("--nodes", type=int, default=None, help="slurm: nodes per run (default: the script's 8)")
    p.add_argument("--token-budget", default="5B", metavar="N[K|M|B]",
                   help="tokens per run, of the mixture and of training (equal budgets)")
    p.add_argument("--max-seq-len", type=cli.token_count, default=cli.MAX_SEQ_LEN, metavar="N[K]",
                   help="packed row length (data.max_seq_len)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mixtures")
    p.add_argument("--long-threshold", default=str(LONG_THRESHOLD), metavar="N[K]",
                   help="what counts as long (statistics and long-biased sampling); 100K = 102,400")
    p.add_argument("--set", dest="train_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer override for every run (repeatable)")
    p.add_argument("--eval-data", action="append", default=[], metavar="SPEC",
                   help="tools/evaluate.py --data (MMLongBench: mmlb:DIR,images=DIR), repeatable")
    p.add_argument("--eval-lengths", default="64K,128K", help="evaluation lengths")
    p.add_argument("--judge", default="auto", help="tools/evaluate.py --judge (auto: MMLongBench's rule metric; "
                                                   "mmlb:URL,model=NAME,prompts=DIR: the paper's LLM judge)")
    p.add_argument("--eval-args", default="", metavar="'ARGS'",
                   help="more tools/evaluate.py arguments, one shell-quoted string (e.g. '--mmlb-dir MMLongBench')")
    p.add_argument("--eval-prefix", default="", metavar="'CMD'",
                   help="command the evaluations run under, e.g. 'srun --gpus 1 --time 8:00:00'")
    p.add_argument("--variants", default=None, metavar="A,B", help="only these variants (names as in the study)")
    p.add_argument("--jobs", type=int, default=1, help="torchrun/local: runs (train + eval) at once")
    p.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
    p.add_argument("--smoke", action="store_true",
                   help="every variant on this CPU with the tiny model and generated inputs (ignores the inputs)")
    return p


def main(argv: Optional[list] = None) -> int:
    from megatron_vlm.study.checks import StudyCheckError
    from megatron_vlm.study.commands import StudyConfig
    from megatron_vlm.study.runner import StudyError, StudyRunner

    args = build_parser().parse_args(argv)
    try:
        cfg = StudyConfig(
            ablation=args.study, work=args.work, vqa=args.vqa, long_vqa=args.long_vqa, short_data=args.short_data,
            short_image_root=args.short_image_root, base_checkpoint=args.base_checkpoint, launcher=args.launcher,
            recipe=args.recipe, nproc_per_node=args.nproc_per_node, nodes=args.nodes, token_budget=args.token_budget,
            max_seq_len=args.max_seq_len, seed=args.seed, long_threshold=cli.token_count(args.long_threshold),
            train_sets=args.train_sets, eval_data=args.eval_data, eval_lengths=args.eval_lengths, judge=args.judge,
            eval_args=shlex.split(args.eval_args), eval_prefix=shlex.split(args.eval_prefix),
            variants=[v for v in args.variants.split(",") if v] if args.variants else None, jobs=args.jobs,
            dry_run=args.dry_run, smoke=args.smoke)
        if cfg.smoke:
            from megatron_vlm.study.smoke import prepare

            cfg = prepare(cfg)
        StudyRunner(cfg).run()
    except (StudyError, StudyCheckError, ValueError, RuntimeError) as err:
        raise cli.UserError(str(err)) from err
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
