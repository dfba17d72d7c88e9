"""Mixtures: token budgets in binary prefixes, 40/40/20 token shares, file weights, short LLaVA data,
pool-native vs long-biased lengths, Table 10/11 statistics, histogram, and a report of every drop."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from megatron_vlm.data.samples import Sample, SampleError, read_samples
from megatron_vlm.data.tokenization import SampleTokenizer
from megatron_vlm.mixing.mixer import (Candidate, InputSpec, MixConfig, MixError, build_groups, llava_to_sample,
                                         mix, parse_input_spec, parse_task_mix, parse_token_count, select,
                                         table_stats)
from tests.unit.data_helpers import make_image, make_small_tokenizer_dir, sample_record, write_jsonl


def test_token_counts_use_binary_prefixes():
    assert parse_token_count("5B") == 5 * 2**30
    assert parse_token_count("100K") == 102_400
    assert parse_token_count("1.5m") == 3 * 2**19
    assert parse_token_count("131072") == 131072
    with pytest.raises(MixError, match="K/M/B"):
        parse_token_count("5GB")


def test_input_and_task_mix_parsing():
    assert parse_input_spec("a/b.jsonl:2.5") == InputSpec("a/b.jsonl", 2.5)
    assert parse_input_spec("a/b.jsonl") == InputSpec("a/b.jsonl", 1.0)
    assert parse_input_spec("c:/x.jsonl") == InputSpec("c:/x.jsonl", 1.0)  # not a number: part of the path
    assert parse_task_mix(None) == {"extract-single": 0.4, "extract-multi": 0.4, "reasoning": 0.2}
    assert parse_task_mix("reasoning:1,extract-single:3") == {"reasoning": 0.25, "extract-single": 0.75}
    assert parse_task_mix("none") is None
    with pytest.raises(MixError, match="TASK:SHARE"):
        parse_task_mix("chat:1")


def test_llava_records_become_short_samples():
    record = {"id": "L1", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."}]}
    sample = llava_to_sample(record, "f:1", "/data/llava", "f:1")
    assert sample.task == "short" and sample.image_paths() == ["/data/llava/coco/1.jpg"]
    assert sample.messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Grey."}]
    unmarked = llava_to_sample({"image": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Same."}]}, "f:2", None, "f:2")
    assert unmarked.id == "f:2" and unmarked.num_image_slots() == 2
    assert unmarked.messages[0]["content"][-1] == {"type": "text", "text": "Compare."}
    text_only = llava_to_sample({"conversations": [{"from": "human", "value": "Hi"},
                                                   {"from": "gpt", "value": "Hello"}]}, "f:3", None, "x")
    assert text_only.images == []
    with pytest.raises(SampleError, match="2 <image> markers for 1 images"):
        llava_to_sample({"image": "a.jpg", "conversations": [{"from": "human", "value": "<image><image>"},
                                                             {"from": "gpt", "value": "x"}]}, "f:4", None, "x")


def _candidates(lengths_by_task):
    out = []
    for task, lengths in lengths_by_task.items():
        out += [Candidate(0, i + 1, 0, task, int(n), max(1, int(n) // 2500), False) for i, n in enumerate(lengths)]
    return out


def test_long_biased_reaches_the_papers_share_of_100k_samples():
    rng = np.random.default_rng(0)
    K = 1024
    pool = (32.8 * K + 94 * K * rng.beta(3.1326, 2.4762, 6000)).astype(int)  # pool-native-like, 23.6% >= 100K
    cands = _candidates({"extract-single": pool})
    results = {}
    for distribution in ("pool-native", "long-biased"):
        config = MixConfig(inputs=[InputSpec("x")], output="o", distribution=distribution,
                           task_mix={"extract-single": 1.0}, token_budget=100 * 2**20, seed=1)
        groups = build_groups(config, cands)
        order, budget = select(config, cands, groups)
        chosen = [cands[i] for i in order]
        total = sum(c.tokens for c in chosen)
        assert budget <= total < budget + max(pool)  # overshoots by less than one sample
        assert len(set(order)) == len(order)  # no repeats without --allow-repeat
        results[distribution] = np.mean([c.tokens >= 100 * K for c in chosen])
    assert abs(results["pool-native"] - 0.236) < 0.04
    assert abs(results["long-biased"] - 0.839) < 0.04


def test_budget_shortfall_is_reported_or_filled_by_repeats():
    cands = _candidates({"reasoning": [1000] * 10})
    config = MixConfig(inputs=[InputSpec("x")], output="o", task_mix={"reasoning": 1.0}, token_budget=25_000)
    groups = build_groups(config, cands)
    order, _ = select(config, cands, groups)
    assert len(order) == 10 and groups[0].tokens == 10_000 < groups[0].target
    config.allow_repeat = True
    groups = build_groups(config, cands)
    order, _ = select(config, cands, groups)
    assert len(order) == 25 and groups[0].passes == 3


def test_table_stats_match_a_direct_computation():
    cands = _candidates({"extract-single": [40_000, 110_000, 102_400], "reasoning": [50_000]})
    s = table_stats(cands[:3])
    assert s["samples"] == 3 and s["total_tokens"] == 252_400
    assert s["tokens_mean_k"] == pytest.approx(252_400 / 3 / 1024)
    assert s["total_tokens_b"] == pytest.approx(252_400 / 2**30)
    assert s["token_range_k"] == [pytest.approx(40_000 / 1024), pytest.approx(110_000 / 1024)]
    assert s["page_range"] == [16, 44] and s["share_at_least_threshold"] == pytest.approx(2 / 3)  # 102,400 counts


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return SampleTokenizer(make_small_tokenizer_dir(str(tmp_path_factory.mktemp("tok") / "small")))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("mixing"))
    rng = np.random.default_rng(0)
    pages = [make_image(os.path.join(folder, "pool", f"p{i}.png"), 56 + 28 * (i % 3), 84, i) for i in range(6)]
    files = {}
    for task in ("extract-single", "extract-multi", "reasoning", "ocr-full"):
        records = []
        for i in range(30):
            n = int(rng.integers(1, 6))
            records.append(sample_record(f"{task}:{i}", pages[:n], question="Q" * int(rng.integers(5, 200)),
                                         answer="A" * int(rng.integers(1, 40)), task=task))
        raw = [(3, "{oops")] if task == "reasoning" else []
        if task == "extract-multi":
            records[7]["images"][0] = os.path.join(folder, "pool", "gone.png")
        files[task] = write_jsonl(os.path.join(folder, f"{task}.jsonl"), records, raw)
    make_image(os.path.join(folder, "llava", "img", "1.jpg"), 60, 80, 9, fmt="JPEG")
    short = [{"id": f"L{i}", "image": "img/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe " + "x" * i}, {"from": "gpt", "value": "A photo " + "y" * i}]}
        for i in range(40)]
    files["short"] = write_jsonl(os.path.join(folder, "llava", "short.jsonl"), short)
    return folder, files


def _exact_lengths(path, tokenizer):
    return {s.id: tokenizer.tokenize(s).num_tokens for _, s in read_samples(path) if isinstance(s, Sample)}


def test_recipe_mixture_shares_stats_histogram_and_report(inputs, tokenizer):
    folder, files = inputs
    out = os.path.join(folder, "out", "mix.jsonl")
    budget = 8000
    config = MixConfig(inputs=[InputSpec(files[t]) for t in ("extract-single", "extract-multi", "reasoning",
                                                             "ocr-full")],
                       output=out, token_budget=budget, seed=3)
    stats = mix(config, tokenizer=tokenizer, progress=False, log=lambda *a: None)
    lengths = _exact_lengths(out, tokenizer)  # independent: the real tokenization of the written mixture
    tokens = {}
    for _, s in read_samples(out):
        tokens[s.task] = tokens.get(s.task, 0) + lengths[s.id]
    assert set(tokens) == {"extract-single", "extract-multi", "reasoning"}
    longest = max(lengths.values())
    for task, share in (("extract-single", 0.4), ("extract-multi", 0.4), ("reasoning", 0.2)):
        assert share * budget <= tokens[task] < share * budget + longest
        assert stats["mixture"]["per_task"][task]["total_tokens"] == tokens[task]
    assert stats["mixture"]["total"]["samples"] == len(lengths)
    with open(out.replace(".jsonl", ".report.json")) as f:
        report = json.load(f)
    assert report["dropped_by_reason"] == {"bad_record": 1, "missing_image": 1, "task_not_in_mix": 30}
    sources = {d["reason"]: d["source"] for d in report["dropped"] if d["reason"] != "task_not_in_mix"}
    assert sources == {"bad_record": f"{files['reasoning']}:4", "missing_image": f"{files['extract-multi']}:8"}
    assert sum(g["unused_samples"] for g in report["groups"].values()) == 30 + 29 + 30 - len(lengths)
    with Image.open(out.replace(".jsonl", ".hist.png")) as png:
        assert png.format == "PNG" and png.width > 100
    table = open(out.replace(".jsonl", ".stats.md")).read()
    assert "| extract-single |" in table and ">= 100K" in table
    # deterministic for a seed; a rerun with the same settings leaves the files alone
    first = open(out).read()
    stamp = os.stat(out).st_mtime_ns
    mix(config, tokenizer=tokenizer, progress=False, log=lambda *a: None)
    assert os.stat(out).st_mtime_ns == stamp
    mix(config, tokenizer=tokenizer, progress=False, force=True, log=lambda *a: None)
    assert open(out).read() == first
    config.seed = 4
    mix(config, tokenizer=tokenizer, progress=False, log=lambda *a: None)
    assert open(out).read() != first


def test_short_data_share_and_file_weights(inputs, tokenizer):
    folder, files = inputs
    out = os.path.join(folder, "out2", "mix.jsonl")
    config = MixConfig(inputs=[InputSpec(files["extract-single"], 3), InputSpec(files["reasoning"], 1)],
                       output=out, task_mix=None, token_budget=6000,
                       short_data=[InputSpec(files["short"])], short_ratio=0.2, seed=0)
    mix(config, tokenizer=tokenizer, progress=False, log=lambda *a: None)
    samples = [s for _, s in read_samples(out)]
    assert all(isinstance(s, Sample) for s in samples)
    lengths = {s.id: tokenizer.tokenize(s).num_tokens for s in samples}
    by_task = {}
    for s in samples:
        by_task[s.task] = by_task.get(s.task, 0) + lengths[s.id]
    longest = max(lengths.values())
    assert 0.2 * 6000 <= by_task["short"] < 0.2 * 6000 + longest
    assert 0.6 * 6000 <= by_task["extract-single"] < 0.6 * 6000 + longest  # weight 3 of 4 of the long 80%
    assert 0.2 * 6000 <= by_task["reasoning"] < 0.2 * 6000 + longest
    short = next(s for s in samples if s.task == "short")
    assert short.image_paths()[0] == os.path.join(folder, "llava", "img/1.jpg")


def test_cli_without_budget_takes_the_largest_mixture(inputs, tokenizer):
    from tools.mix_data import main

    folder, files = inputs
    out = os.path.join(folder, "out3", "mix.jsonl")
    assert main(["--input", files["extract-single"], files["extract-multi"], files["reasoning"],
                 "--output", out, "--no-progress", "--task-mix", "extract-single:1,reasoning:1",
                 "--tokenizer", tokenizer.tokenizer_dir]) == 0
    with open(out.replace(".jsonl", ".stats.json")) as f:
        stats = json.load(f)
    per_task = stats["mixture"]["per_task"]
    assert set(per_task) == {"extract-single", "reasoning"}
    available = stats["available"]["per_task"]
    # the smaller pool is used whole; the other is cut to the same number of tokens
    limiting = min(available, key=lambda t: available[t]["total_tokens"])
    assert per_task[limiting]["samples"] == available[limiting]["samples"]
    assert main(["--input", files["reasoning"], "--output", out, "--token-budget", "5B!"]) == 2



def test_a_task_left_out_of_the_mix_is_named_with_the_flag(inputs, tokenizer):
    folder, files = inputs
    logged = []
    config = MixConfig(inputs=[parse_input_spec(files[t]) for t in ("extract-single", "extract-multi", "reasoning",
                                                                    "ocr-full")],
                       output=os.path.join(folder, "out_ocr", "mix.jsonl"), task_mix=parse_task_mix(None))
    mix(config, tokenizer, progress=False, log=logged.append)
    note = [line for line in logged if "ocr-full" in line and "left out" in line]
    assert len(note) == 1 and "--task-mix" in note[0] and "ocr-full:0.1" in note[0], logged
