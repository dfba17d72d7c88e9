"""megatron_vlm.study: every ablation claims the paper's settings, the data checker rejects data that
does not match its claim, and --dry-run prints the right commands (Slurm launcher) for all six."""

from __future__ import annotations

import json
import os
import shlex
import shutil

import pytest

from megatron_vlm.eval.published import published_table
from megatron_vlm.study.ablations import ABLATIONS
from megatron_vlm.study.checks import StudyCheckError, check_data, check_rope

K = 1024
ES, EM, RE = "extract-single", "extract-multi", "reasoning"

# The paper's settings, written out by hand from the paper (not derived from ablations.py):
# Table 1 tasks; Figure 2 tasks x distributions; Table 2 ratios (extraction split evenly between
# extract-single and extract-multi, Section 5.2); Table 3 short shares over the 8:2 mixture;
# Table 16 bases per task (+ 1e6 asked by the issue); final = Appendix A.
PAPER = {
    "table1_tasks": {"extract-single": ({ES: 1.0}, "pool-native", 4e6),
                     "extract-multi": ({EM: 1.0}, "pool-native", 4e6),
                     "reasoning": ({RE: 1.0}, "pool-native", 4e6), "OCR-full": ({"ocr-full": 1.0}, "pool-native", 4e6),
                     "OCR-needle": ({"ocr-needle": 1.0}, "pool-native", 4e6)},
    "fig2_length": {f"{t}_{d}": ({t: 1.0}, dist, 4e6) for t in (ES, EM, RE)
                    for d, dist in (("native", "pool-native"), ("long", "long-biased"))},
    "table2_ratio": {"ratio_0_10": ({RE: 1.0}, "pool-native", 4e6),
                     "ratio_2_8": ({ES: 0.1, EM: 0.1, RE: 0.8}, "pool-native", 4e6),
                     "ratio_4_6": ({ES: 0.2, EM: 0.2, RE: 0.6}, "pool-native", 4e6),
                     "ratio_6_4": ({ES: 0.3, EM: 0.3, RE: 0.4}, "pool-native", 4e6),
                     "ratio_8_2": ({ES: 0.4, EM: 0.4, RE: 0.2}, "pool-native", 4e6),
                     "ratio_10_0": ({ES: 0.5, EM: 0.5}, "pool-native", 4e6)},
    "table3_short": {"short_0": ({ES: 0.4, EM: 0.4, RE: 0.2}, "pool-native", 4e6),
                     "short_20": ({ES: 0.32, EM: 0.32, RE: 0.16, "short": 0.2}, "pool-native", 4e6),
                     "short_40": ({ES: 0.24, EM: 0.24, RE: 0.12, "short": 0.4}, "pool-native", 4e6)},
    "table16_rope": {f"{t}_rope{b}e6": ({t: 1.0}, "pool-native", b * 1e6) for t in (ES, EM, RE) for b in (1, 2, 4, 8)},
    "final": {"final": ({ES: 0.4, EM: 0.4, RE: 0.2}, "pool-native", 4e6)},
}


def test_every_ablation_claims_the_papers_settings():
    assert set(ABLATIONS) == set(PAPER)
    for name, expected in PAPER.items():
        variants = {v.name: v for v in ABLATIONS[name].variants}
        assert list(variants) == list(expected), name
        for vname, (shares, dist, rope) in expected.items():
            claims = variants[vname].claims()
            assert claims["task_shares"] == pytest.approx(shares), (name, vname)
            assert claims["distribution"] == dist and claims["rope_theta"] == rope, (name, vname)
            assert claims["short_ratio"] == pytest.approx(shares.get("short", 0.0))
        # every variant the paper ran is named after its published row, so compare_runs shows it
        table = published_table(ABLATIONS[name].paper_table)
        for vname in variants:
            if "rope1e6" not in vname:
                assert table.row(vname) is not None, (name, vname)


def _stats(per_task: dict, distribution="pool-native", short_ratio=0.0, long_fraction=0.839, pool_long=None) -> dict:
    """A MIX.stats.json like tools/mix_data.py writes: per_task = {task: (tokens, samples, long share, longest)}."""
    total = sum(t for t, *_ in per_task.values())
    rows = {task: {"samples": n, "total_tokens": tokens, "share_at_least_threshold": long,
                   "token_range_k": [0.5, longest / K]} for task, (tokens, n, long, longest) in per_task.items()}
    available = {task: {"samples": 4 * n, "share_at_least_threshold": (pool_long or {}).get(task, long)}
                 for task, (tokens, n, long, longest) in per_task.items()}
    return {"config": {"distribution": distribution, "short_ratio": short_ratio, "long_threshold": 100 * K,
                       "long_fraction": long_fraction},
            "budget_tokens": total, "mixture": {"per_task": rows, "total": {"total_tokens": total, "samples": 1}},
            "available": {"per_task": available}}


def _variant(study: str, name: str):
    return next(v for v in ABLATIONS[study].variants if v.name == name)


def test_data_check_accepts_the_claim_and_rejects_a_wrong_variant():
    mix_82 = _stats({ES: (40_000 * K, 470, 0.236, 120 * K), EM: (40_500 * K, 475, 0.236, 120 * K),
                     RE: (20_100 * K, 236, 0.235, 120 * K)})
    summary = check_data(_variant("table2_ratio", "ratio_8_2"), mix_82, "mix.stats.json")
    assert summary["per_task"][ES]["token_share"] == pytest.approx(40_000 / 100_600)
    with pytest.raises(StudyCheckError, match=r"ratio_6_4.*extract-single.*39\.76% of the tokens, claimed 30\.00%"):
        check_data(_variant("table2_ratio", "ratio_6_4"), mix_82, "mix.stats.json")
    # a task the variant does not claim
    with pytest.raises(StudyCheckError, match="'reasoning' holds"):
        check_data(_variant("table2_ratio", "ratio_10_0"), mix_82, "mix.stats.json")
    # short share: the same long data without short data is not the 20% variant, and vice versa
    with pytest.raises(StudyCheckError, match="short-ratio 0.0, claimed 0.2"):
        check_data(_variant("table3_short", "short_20"), mix_82, "mix.stats.json")
    mix_short = _stats({ES: (32 * K * K, 400, 0.236, 120 * K), EM: (32 * K * K, 400, 0.236, 120 * K),
                        RE: (16 * K * K, 200, 0.236, 120 * K), "short": (20 * K * K, 9000, 0.0, 4 * K)},
                       short_ratio=0.2)
    check_data(_variant("table3_short", "short_20"), mix_short, "mix.stats.json")
    short_low = _stats({ES: (36 * K * K, 400, 0.236, 120 * K), EM: (36 * K * K, 400, 0.236, 120 * K),
                        RE: (18 * K * K, 200, 0.236, 120 * K), "short": (10 * K * K, 9000, 0.0, 4 * K)},
                       short_ratio=0.2)
    with pytest.raises(StudyCheckError, match="'short': 10.00% of the tokens, claimed 20.00%"):
        check_data(_variant("table3_short", "short_20"), short_low, "mix.stats.json")


def test_data_check_length_distribution():
    long_ok = _stats({ES: (100 * K * K, 900, 0.84, 127 * K)}, distribution="long-biased", pool_long={ES: 0.236})
    check_data(_variant("fig2_length", "extract-single_long"), long_ok, "x")
    # long-biased data without long samples (the pool lacks them)
    long_bad = _stats({ES: (100 * K * K, 900, 0.40, 127 * K)}, distribution="long-biased", pool_long={ES: 0.236})
    with pytest.raises(StudyCheckError, match=r"40.0% of the samples.*claims >= 75.2% \(asked 83.9%\).*--long-vqa"):
        check_data(_variant("fig2_length", "extract-single_long"), long_bad, "x")
    # the long-biased data claimed as pool-native (distribution recorded) ...
    with pytest.raises(StudyCheckError, match="distribution 'long-biased', claimed 'pool-native'"):
        check_data(_variant("fig2_length", "extract-single_native"), long_ok, "x")
    # ... and pool-native data whose long share is not the pool's (reweighted)
    skewed = _stats({ES: (100 * K * K, 900, 0.50, 127 * K)}, pool_long={ES: 0.236})
    with pytest.raises(StudyCheckError, match="the pool has 23.6%"):
        check_data(_variant("fig2_length", "extract-single_native"), skewed, "x")


def test_rope_check_reads_the_saved_configs(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "iter_0000002"
    ckpt.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"rope_theta": 2e6}}))
    (ckpt / "config.json").write_text(json.dumps({"text_config": {"rope_theta": 2e6}}))
    found = check_rope(_variant("table16_rope", "reasoning_rope2e6"), str(run), str(ckpt))
    assert set(found["found"].values()) == {2e6}
    with pytest.raises(StudyCheckError, match=r"config.json has rope_theta 2000000.0, the variant claims 4e\+06"):
        check_rope(_variant("table16_rope", "reasoning_rope4e6"), str(run), str(ckpt))


def _dry_run(capsys, study: str, work: str) -> list[list[str]]:
    from megatron_vlm.study.__main__ import main

    assert main([study, "--work", work, "--vqa", "/p", "--short-data", "/s/llava.jsonl", "--base-checkpoint", "/c",
                 "--eval-data", "mmlb:/m,images=/i", "--launcher", "slurm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith(("#", "["))]


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("study", list(PAPER))
def test_dry_run_prints_every_command_slurm(capsys, tmp_path, study):
    commands = _dry_run(capsys, study, str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing written
    expected = PAPER[study]
    mixes = [c for c in commands if c[1].endswith("tools/mix_data.py")]
    preprocess = [c for c in commands if c[1].endswith("tools/preprocess_data.py")]
    sbatch = [c for c in commands if c[0] == "sbatch"]
    evals = [c for c in commands if c[1].endswith("tools/evaluate.py")]
    compare = [c for c in commands if c[1].endswith("tools/compare_runs.py")]
    settings = {(tuple(sorted((t, round(s, 6)) for t, s in shares.items() if t != "short")), dist,
                 shares.get("short", 0)) for shares, dist, _ in expected.values()}
    assert len(mixes) == len(preprocess) == len(settings)  # each distinct data variant built once
    for mix in mixes:
        shares = dict((t, float(s)) for t, s in (item.split(":") for item in _flag(mix, "--task-mix").split(",")))
        dist = _flag(mix, "--distribution")
        short = float(_flag(mix, "--short-ratio")) if "--short-ratio" in mix else 0
        long_total = 1 - short
        key = (tuple(sorted((t, round(s * long_total, 6)) for t, s in shares.items())), dist, short)
        assert key in settings, (study, key)
        assert [os.path.basename(p) for p in mix[mix.index("--input") + 1: mix.index("--output")]] == \
               [f"{t}.jsonl" for t in shares]
        assert _flag(mix, "--token-budget") == "5B"
        if short:
            assert _flag(mix, "--short-data") == "/s/llava.jsonl"
    for p in preprocess:
        assert _flag(p, "--max-seq-len") == "131072" and _flag(p, "--cp-size") == "2" and "--pack" in p
    assert [_flag_eq(c, "--job-name") for c in sbatch] == list(expected)
    for c, (name, (_, _, rope)) in zip(sbatch, expected.items()):
        assert c[-2 * 3 - 1].endswith("examples/longpt_128k.sh")
        sets = [c[i + 1] for i, a in enumerate(c) if a == "--set"]
        assert f"model.rope_theta={rope!r}" in sets and "schedule.train_tokens=5368709120" in sets
        env = dict(kv.split("=", 1) for kv in _flag_eq(c, "--export").split(",")[1:])
        assert env["MODEL_DIR"] == "/c" and env["RECIPE"] == "qwen25vl_7b_longpt_128k"
        assert env["DATA_PREFIX"].endswith("/mix") and env["RUN_DIR"].startswith(str(tmp_path / "runs"))
    # every run evaluated at 64K and 128K with MMLongBench, from its final checkpoint (1280 = 5B / 4M steps)
    run_evals = [c for c in evals if not _flag(c, "--model").startswith("base=")]
    assert [_flag(c, "--model").split("=")[0] for c in run_evals] == list(expected)
    for c in evals:
        assert _flag(c, "--lengths") == "64K,128K" and _flag(c, "--data") == "mmlb:/m,images=/i"
    assert all(_flag(c, "--model").endswith("/checkpoints/iter_0001280") for c in run_evals)
    assert len(evals) == len(expected) + 1  # + the base model
    assert len(compare) == 1
    runs = [compare[0][i + 1].split("=")[0] for i, a in enumerate(compare[0]) if a == "--run"]
    assert runs == ["base", *expected]
    assert _flag(compare[0], "--paper-table") == ABLATIONS[study].paper_table
    exports = [c for c in commands if "megatron-to-hf" in c]
    assert len(exports) == (len(expected) if study == "table3_short" else 0)


def _flag_eq(argv: list[str], flag: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(flag + "="))


def test_runs_and_data_are_shared_between_studies(capsys, tmp_path):
    """Table 1's extract-single is Table 16's extract-single at 4e6 and Figure 2's pool-native one:
    one run folder, so a shared --work trains it once."""
    def run_dirs(study):
        return {_flag_eq(c, "--job-name"): dict(kv.split("=", 1) for kv in _flag_eq(c, "--export").split(",")[1:])[
            "RUN_DIR"] for c in _dry_run(capsys, study, str(tmp_path)) if c[0] == "sbatch"}
    t1, t16, f2 = run_dirs("table1_tasks"), run_dirs("table16_rope"), run_dirs("fig2_length")
    assert t1["extract-single"] == t16["extract-single_rope4e6"] == f2["extract-single_native"]
    assert t16["extract-single_rope2e6"] != t16["extract-single_rope4e6"]
    assert run_dirs("table2_ratio")["ratio_8_2"] == run_dirs("final")["final"] == run_dirs("table3_short")["short_0"]


def test_missing_inputs_are_named(tmp_path):
    from megatron_vlm.study.commands import StudyConfig
    from megatron_vlm.study.runner import StudyError, StudyRunner

    cfg = StudyConfig("table3_short", str(tmp_path), vqa=str(tmp_path), launcher="local")
    with pytest.raises(StudyError, match=r"extract-single.jsonl.*--short-data.*--base-checkpoint.*--eval-data"):
        StudyRunner(cfg).run()
    with pytest.raises(StudyError, match="unknown variant"):
        StudyRunner(StudyConfig("table2_ratio", str(tmp_path), variants=["ratio_5_5"]))


class FakeTools:
    """Stands in for the tools (no subprocess): mix writes MIX.stats.json with the given per-task
    tokens, train writes the run's and the final checkpoint's configs, eval writes report.json."""

    def __init__(self, tokens_by_task: dict, rope_saved=None):
        self.tokens_by_task, self.rope_saved, self.calls = tokens_by_task, rope_saved, []

    def __call__(self, runner, label, argv, env=None):
        self.calls.append(label)
        if label.endswith("-mix"):
            out = os.path.dirname(_flag(argv, "--output"))
            os.makedirs(out, exist_ok=True)
            per_task = {t: (n, 10, 0.2, 2000) for t, n in self.tokens_by_task.items()}
            stats = _stats(per_task, short_ratio=float(_flag(argv, "--short-ratio")) if "--short-ratio" in argv else 0)
            stats["budget_tokens"] = 24 * K
            with open(os.path.join(out, "mix.stats.json"), "w") as f:
                json.dump(stats, f)
        elif label.endswith("-train"):
            sets = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
            rope = self.rope_saved or float(sets["model.rope_theta"])
            ckpt = os.path.join(sets["log.run_dir"], "checkpoints", "iter_0000002")
            os.makedirs(ckpt, exist_ok=True)
            for path, body in ((os.path.join(sets["log.run_dir"], "config.json"), {"model": {"rope_theta": rope}}),
                               (os.path.join(ckpt, "config.json"), {"rope_theta": rope})):
                with open(path, "w") as f:
                    json.dump(body, f)
        elif label.startswith("eval-"):
            os.makedirs(_flag(argv, "--output"), exist_ok=True)
            open(os.path.join(_flag(argv, "--output"), "report.json"), "w").write("{}")
        return ""


def _patch(monkeypatch, R, fake: FakeTools) -> None:
    monkeypatch.setattr(R.StudyRunner, "execute", lambda runner, label, argv, env=None: fake(runner, label, argv, env))


def _local_config(tmp_path, study: str, variants: list[str]):
    from megatron_vlm.study.commands import StudyConfig

    pool = tmp_path / "pool"
    pool.mkdir(exist_ok=True)
    for task in ("extract-single", "extract-multi", "reasoning"):
        (pool / f"{task}.jsonl").write_text("{}\n")
    return StudyConfig(study, str(tmp_path / "work"), vqa=str(pool), launcher="local", recipe="tiny_cpu",
                       token_budget="24K", max_seq_len=2048, eval_data=["samples:x"], smoke=True, variants=variants,
                       train_sets=["schedule.global_batch_tokens=2048", "schedule.train_steps=2"])


def test_runner_stops_on_data_that_does_not_match_and_resumes(tmp_path, monkeypatch):
    from megatron_vlm.study import runner as R

    cfg = _local_config(tmp_path, "table16_rope", ["extract-single_rope2e6", "extract-single_rope8e6"])
    # the data holds reasoning samples too: a wrong mixture is stopped before preprocessing and training
    fake = FakeTools({ES: 20 * K, RE: 4 * K})
    _patch(monkeypatch, R, fake)
    with pytest.raises(R.StudyError, match=r"extract-single_rope2e6.*mix.stats.json.*'reasoning' holds"):
        R.StudyRunner(cfg, log=lambda line: None).run()
    assert fake.calls == [next(c for c in fake.calls if c.endswith("-mix"))]
    assert not list((tmp_path / "work" / "data").glob("*/DONE.json"))

    # right data, but a run whose saved config has another mRoPE base
    fake = FakeTools({ES: 24 * K}, rope_saved=1e6)
    _patch(monkeypatch, R, fake)
    with pytest.raises(R.StudyError, match="config.json has rope_theta 1000000.0, the variant claims 2e\\+06"):
        R.StudyRunner(cfg, log=lambda line: None).run()

    # everything right, but no tools/compare_runs.py: a clear error after the evaluations
    for run in (tmp_path / "work" / "runs").iterdir():
        shutil.rmtree(run)
    fake = FakeTools({ES: 24 * K})
    _patch(monkeypatch, R, fake)
    monkeypatch.setattr(R.C, "REPO", str(tmp_path))
    with pytest.raises(R.StudyError, match="tools/compare_runs.py not found"):
        R.StudyRunner(cfg, log=lambda line: None).run()
    assert sorted(c.split("-")[0] for c in fake.calls) == ["eval", "eval", "run", "run"]  # data was kept (DONE.json)
    # a rerun skips data, runs and evals; only the comparison is left
    fake = FakeTools({ES: 24 * K})
    monkeypatch.undo()
    _patch(monkeypatch, R, fake)
    summary = R.StudyRunner(cfg, log=lambda line: None).run()
    assert fake.calls == ["compare-table16_rope"]
    assert [v["rope"]["claimed"] for v in summary["variants"].values()] == [2e6, 8e6]


def test_example_wrappers_pass_their_study_and_inputs(tmp_path):
    """examples/ablations/<study>.sh: one per study, each the one command with VQA/SHORT_DATA/
    BASE_CHECKPOINT/WORK from the environment (checked on one by running it under --dry-run)."""
    import subprocess
    import sys

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "examples", "ablations")
    assert sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".sh")) == sorted(ABLATIONS)
    for study in ABLATIONS:
        text = open(os.path.join(folder, f"{study}.sh")).read()
        assert f"-m megatron_vlm.study {study} " in text and '"$@"' in text
    env = {**os.environ, "VQA": "/p", "BASE_CHECKPOINT": "/c", "WORK": str(tmp_path), "PYTHON": sys.executable}
    out = subprocess.run(["bash", os.path.join(folder, "final.sh"), "--eval-data", "mmlb:/m,images=/i", "--dry-run"],
                         env=env, capture_output=True, text=True, check=True).stdout
    sbatch = [shlex.split(line) for line in out.splitlines() if line.startswith("sbatch ")]
    assert len(sbatch) == 1 and "MODEL_DIR=/c" in _flag_eq(sbatch[0], "--export")
    assert "/p/extract-single.jsonl" in out and str(tmp_path / "runs") in out
