"""One vocabulary of flags: a dest that two tools share has the same option strings and default
(except the commented allowlist); every option has help; ``--help`` is fast (no torch at import)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from collections import defaultdict

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = ["tools/build_doc_pool.py", "tools/synthesize_vqa.py", "tools/mix_data.py", "tools/preprocess_data.py",
         "tools/evaluate.py", "tools/compare_runs.py", "tools/checkpoint/convert.py", "megatron_vlm/train.py",
         "megatron_vlm/study/__main__.py"]

# dests whose option strings or defaults differ on purpose
ALLOWED = {
    "output": "each tool's own product (a pool folder, a JSONL, an eval folder, a hash list); required or not",
    "input": "the inputs of each stage (PDFs, task JSONL, mixture JSONL); required in mix_data only",
    "min_pages": "the pool rejects documents under 20 pages; synthesis picks its 32-50 page window from them",
    "max_pages": "as min_pages: the pool's acceptance limit vs synthesis' page window",
    "timeout": "teacher calls (8-15 pages) vs evaluation calls (up to 512K-token contexts)",
    "model": "synthesis: the teacher's name at its endpoint; evaluation: repeatable model specs to compare",
    "dtype": "convert's subcommands: the checkpoint's dtype for conversion, fp32 for verify",
    "token_budget": "mix_data: the largest mixture by default; a study: the paper's 5B per run (equal budgets)",
    "short_data": "mix_data takes several FILE[:WEIGHT]; a study one file (the paper's LLaVA-OneVision data)",
    "recipe": "the trainer requires one; a study defaults to the paper's 7B 128K recipe",
}


def _load(path: str):
    spec = importlib.util.spec_from_file_location("tool_" + os.path.basename(path)[:-3], os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _actions(parser: argparse.ArgumentParser, where: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{where} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield where, action


@pytest.fixture(scope="module")
def actions():
    return [(where, a) for path in TOOLS for where, a in _actions(_load(path).build_parser(), path)]


def test_every_option_has_help(actions):
    missing = [f"{where}: {'/'.join(a.option_strings) or a.dest}" for where, a in actions if not a.help]
    assert not missing, missing


def test_shared_dests_have_one_spelling_and_default(actions):
    seen = defaultdict(dict)
    for where, a in actions:
        if a.help == argparse.SUPPRESS or not a.option_strings:  # deprecated aliases
            continue
        seen[a.dest].setdefault((tuple(a.option_strings), repr(a.default)), []).append(where)
    bad = {dest: forms for dest, forms in seen.items() if len(forms) > 1 and dest not in ALLOWED}
    assert not bad, bad


def test_deprecated_aliases_still_work(capsys):
    synth = _load("tools/synthesize_vqa.py").build_parser()
    args = synth.parse_args(["--pool", "P", "--task", "reasoning", "--output", "o.jsonl", "--num-samples", "1",
                             "--max-seq-tokens", "64K"])
    assert args.max_seq_len == 65536 and "--max-seq-tokens is deprecated; use --max-seq-len" in capsys.readouterr().err
    mix = _load("tools/mix_data.py").build_parser()
    assert mix.parse_args(["--input", "a", "--output", "b", "--max-tokens", "1000"]).max_seq_len == 1000
    assert mix.parse_args(["--input", "a", "--output", "b"]).max_seq_len == 131072


def test_evaluate_options_before_or_after_the_subcommand():
    ev = _load("tools/evaluate.py")
    a = ev.parse_args(["--judge", "rules", "--no-progress", "score", "--predictions", "p.jsonl"])
    b = ev.parse_args(["score", "--predictions", "p.jsonl", "--judge", "rules", "--no-progress"])
    assert vars(a) == vars(b) and a.command == "score"
    c = ev.parse_args(["--output", "score", "--data", "niah:POOL", "--model", "hf:X"])  # a value named like one
    assert c.command == "run" and c.output == "score"


@pytest.mark.parametrize("tool", TOOLS)
def test_help_is_fast(tool):
    cmd = [sys.executable, "-m", "megatron_vlm.train"] if tool.endswith("train.py") else [sys.executable, tool]
    start = time.monotonic()
    done = subprocess.run(cmd + ["--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    seconds = time.monotonic() - start
    print(f"{tool} --help: {seconds:.2f} s")
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    assert seconds < 3.0, f"{tool} --help took {seconds:.2f} s (aim: < 1.5 s; heavy imports belong in main)"
