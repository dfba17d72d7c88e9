"""End to end: generated PDFs -> tools/build_doc_pool.py -> hand-written held-out questions ->
tools/evaluate.py with the tiny model twice (transformers "base" and its Megatron conversion
"ckpt") at two lengths, plus the needle suite -> report.md/json and the PNG; then a resumed run
that generates nothing, and the ``score`` subcommand on the saved predictions."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from megatron_vlm.checkpoint.convert import hf_to_megatron
from megatron_vlm.common.inputs import read_hash_list
from megatron_vlm.pool.records import read_manifest
from tests.conftest import REPO, random_hf_model

CLI = os.path.join(REPO, "tools", "evaluate.py")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
PIXELS = ["--max-pixels", "12544"]  # ~12 tokens per page: a CPU-sized run of the same code path


def _question(sid, doc, question, answer, fmt, evidence):
    return {"id": sid, "task": "eval", "images": [],
            "messages": [{"role": "user", "content": [{"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}],
            "meta": {"doc_id": doc.doc_id, "answer": answer, "answer_format": fmt, "evidence_pages": evidence}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, megatron_world):
    root = tmp_path_factory.mktemp("eval_e2e")
    for cmd in ([sys.executable, "-m", "megatron_vlm.pool.synthetic_pdfs", str(root / "pdfs")],
                [sys.executable, os.path.join(REPO, "tools", "build_doc_pool.py"), "--input", str(root / "pdfs"),
                 "--output", str(root / "pool"), "--min-pages", "1", "--workers", "0", "--no-progress"]):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV, cwd=REPO)
        assert run.returncode == 0, run.stderr[-2000:]
    docs = sorted(read_manifest(str(root / "pool")), key=lambda d: d.num_pages)
    questions = [_question("title", docs[-1], "What is the title of the report?", docs[-1].title, "String", [1]),
                 _question("ceo", docs[0], "Who is the chief executive?", "Not answerable", "None", []),
                 _question("pages", docs[1], "How many pages?", str(docs[1].num_pages), "Integer", [docs[1].num_pages])]
    (root / "heldout.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    random_hf_model(seed=11).save_pretrained(root / "hf")
    hf_to_megatron(str(root / "hf"), str(root / "meg"), log=lambda _: None)
    return root, docs


def _args(root) -> list[str]:
    return ["--data", f"samples:{root / 'heldout.jsonl'},pool={root / 'pool'}", "--data",
            f"niah:{root / 'pool'},depths=0/1", "--lengths", "256,1K", "--model", f"base=hf:{root / 'hf'}",
            "--model", f"ckpt=megatron:{root / 'meg'}", "--max-new-tokens", "3", "--limit", "2",
            "--output", str(root / "out"), "--no-progress", *PIXELS]


def _cli_module():
    spec = importlib.util.spec_from_file_location("evaluate_cli_e2e", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_end_to_end(workspace, capsys):
    root, docs = workspace
    run = subprocess.run([sys.executable, CLI, *_args(root)], capture_output=True, text=True, timeout=300, env=ENV,
                         cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = root / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["models"] == ["base", "ckpt"] and report["lengths"] == [256, 1024]
    assert report["length_labels"] == ["256", "1K"]
    docqa, niah = report["suites"]["docqa"], report["suites"]["niah"]
    assert docqa["datasets"] == ["heldout"] and niah["datasets"] == ["niah-image", "niah-text"]
    for suite in (docqa, niah):
        for model in ("base", "ckpt"):
            for label in ("256", "1K"):
                cell = suite["models"][model]["lengths"][label]
                assert cell["complete"] and 0 <= cell["AVG"] <= 100
                assert all(c["n"] == 2 for c in cell["datasets"].values())  # --limit 2
    md = (out / "report.md").read_text()
    assert "| Δ ckpt − base |" in md and "### 1K" in md and "By needle depth" in md
    png = out / "eval_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 400

    # the two backends are independent implementations of the same model: identical answers and scores
    preds = {m: {r["key"]: r for r in map(json.loads, open(out / "scored" / f"{m}.jsonl"))} for m in ("base", "ckpt")}
    assert preds["base"].keys() == preds["ckpt"].keys() and len(preds["base"]) == 12
    for key, record in preds["base"].items():
        other = preds["ckpt"][key]
        assert record["prediction"] == other["prediction"] and record["score"] == other["score"], key
        assert 0 <= record["score"] <= 1 and record["error"] is None and record["num_tokens"] <= record["length"]
    assert "+0.00" in md.split("| Δ ckpt − base |")[1].splitlines()[0]

    # contexts: trimmed around the evidence at 256, the gold document + whole negatives at 1K
    contexts = {r["key"]: r for r in map(json.loads, open(out / "instances" / "heldout.jsonl"))}
    short, long = contexts["heldout|256|title"], contexts["heldout|1024|title"]
    assert short["method"] == "trimmed" and 1 in short["kept_pages"] and short["num_tokens"] <= 256
    assert long["method"] == "extended" and long["added"] and long["kept_pages"] == list(range(1, docs[-1].num_pages + 1))
    assert [a["side"] for a in long["added"]][:2] == ["left", "right"][:len(long["added"])]
    assert all(r["gold_doc_id"] not in {a["doc_id"] for a in r["added"]} for r in contexts.values())
    hashes = read_hash_list(str(out / "eval_hashes.txt"))
    assert {docs[-1].sha256, docs[0].sha256} <= hashes

    # resume: nothing left to generate, the same report
    cli = _cli_module()
    assert cli.main(_args(root)) == 0
    printed = capsys.readouterr().out
    assert "[base] 12 predictions on disk, 0 to generate" in printed and "[ckpt] 12 predictions on disk" in printed
    assert json.loads((out / "report.json").read_text())["suites"] == report["suites"]

    # re-score the saved predictions (rules): the mean is the last line and matches the run's scores
    assert cli.main(["score", "--predictions", str(out / "predictions" / "ckpt.jsonl"), "--output",
                     str(root / "rescored"), "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    mean = sum(r["score"] for r in preds["ckpt"].values()) / len(preds["ckpt"])
    assert last == f"mean score: {mean:.6f} (12 records)"
    rescored = [json.loads(line) for line in open(root / "rescored" / "ckpt.scored.jsonl")]
    assert all("score" in r for r in rescored) and (root / "rescored" / "report.md").is_file()
