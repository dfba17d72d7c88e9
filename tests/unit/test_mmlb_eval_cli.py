"""End to end: tools/evaluate.py run on MMLongBench-Doc's original release (tiny PDFs) and on a
documentQA file in the published layout, with the official prompt shape read from a checkout, the
tiny model through both local backends (transformers and its Megatron conversion): contexts counted
in the official prompt's tokens, scored by MMLongBench's rules (``--judge auto``), the report's
paper table named as Table 4, the bad record named in dropped.json."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from PIL import Image

from megatron_vlm.checkpoint.convert import hf_to_megatron
from megatron_vlm.data.tokenizer import load_tokenizer
from megatron_vlm.eval.build import Instance
from megatron_vlm.eval.data import ContextItem
from megatron_vlm.eval.mmlb_prompt import load_official_docqa_prompt
from megatron_vlm.eval.prompt import PromptConfig, instance_messages, render_prompt
from megatron_vlm.pool.synthetic_pdfs import write_page_sizes_pdf
from megatron_vlm.testing import random_hf_model
from tests.conftest import REPO
from tests.unit.test_mmlb_prompt import OFFICIAL_SHAPE

DECK = "quarterly-results-deck"


def _cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli_mmlb_e2e", os.path.join(REPO, "tools", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, megatron_world):
    root = tmp_path_factory.mktemp("mmlb_e2e")
    # the original release: samples.json (as released: evidence pages a string, 1-based) + PDFs
    docs = root / "release" / "documents"
    docs.mkdir(parents=True)
    write_page_sizes_pdf(str(docs / "annual-report.pdf"), [(300, 400)] * 4)
    write_page_sizes_pdf(str(docs / "survey.pdf"), [(300, 400)] * 3)
    release = [{"doc_id": "annual-report.pdf", "doc_type": "Financial report", "question": "How many offices?",
                "answer": "12", "evidence_pages": "[2, 4]", "evidence_sources": "['Table']", "answer_format": "Int"},
               {"doc_id": "survey.pdf", "doc_type": "Research report / Introduction", "question": "Who is the CEO?",
                "answer": "Not answerable", "evidence_pages": "[]", "evidence_sources": "[]", "answer_format": "None"},
               {"doc_id": "survey.pdf", "doc_type": "Research report / Introduction", "question": "Which year?",
                "answer": "2019", "evidence_pages": "[0]", "evidence_sources": "[]", "answer_format": "Int"}]
    (root / "release" / "samples.json").write_text(json.dumps(release, indent=4))
    # a documentQA file as published (SlideVQA: image names from 1, ans_page_list from 0)
    images = root / "mmlb_image"
    rel = [f"documentQA/{DECK}/{DECK}-{n}-1024.jpg" for n in range(1, 6)]
    for k, path in enumerate(rel):
        (images / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (560, 420), (40 * k, 90, 120)).save(images / path)
    (root / "documentQA").mkdir()
    records = [{"id": "slideVQA_0", "doc_name": DECK, "question": "What is the margin?", "answer": "21%",
                "answer_format": "Float", "ans_page_list": [3], "page_list": rel},
               {"id": "slideVQA_1", "doc_name": DECK, "question": "Which region grew?", "answer": "Europe",
                "answer_format": "Str", "ans_page_list": [0], "page_list": rel[:3]}]
    (root / "documentQA" / "slidevqa_K64.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "MMLongBench").mkdir()
    (root / "MMLongBench" / "data.py").write_text(OFFICIAL_SHAPE)
    random_hf_model(seed=5).save_pretrained(root / "hf")
    hf_to_megatron(str(root / "hf"), str(root / "meg"), log=lambda _: None)
    return root


def test_release_and_documentqa_end_to_end(inputs):
    root = inputs
    out = root / "out"
    assert _cli().main(["run", "--data", f"mmlb-doc:{root / 'release'}", "--data",
                        f"mmlb:{root / 'documentQA'},images={root / 'mmlb_image'}", "--lengths", "1K,64K",
                        "--model", f"base=hf:{root / 'hf'}", "--model", f"ckpt=megatron:{root / 'meg'}",
                        "--mmlb-dir", str(root / "MMLongBench"), "--max-new-tokens", "3", "--max-pixels", "12544",
                        "--output", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    docqa = report["suites"]["docqa"]
    assert docqa["datasets"] == ["mmlongdoc", "slidevqa"]
    (table4,) = docqa["paper_tables"]
    assert table4["table"] == "Table 4" and table4["columns"] == ["64K MMLB-D", "64K SLIDE", "64K AVG.", "AVG."]
    assert "| Model | 64K MMLB-D | 64K SLIDE | 64K AVG. | AVG. |" in (out / "report.md").read_text()
    dropped = json.loads((out / "dropped.json").read_text())
    assert dropped["counts"] == {"mmlongdoc": {"evidence_page_out_of_range": 1}}
    assert "samples.json:20 (doc_id survey.pdf)" in dropped["items"][0]["where"]
    # both backends, the same answers; every record scored by MMLongBench's rules
    scored = {m: {r["key"]: r for r in map(json.loads, open(out / "scored" / f"{m}.jsonl"))} for m in ("base", "ckpt")}
    assert len(scored["base"]) == 8 and scored["base"].keys() == scored["ckpt"].keys()
    for key, record in scored["base"].items():
        assert record["error"] is None and record["prediction"] == scored["ckpt"][key]["prediction"]
        assert record["scored_by"].startswith("mmlb-rules"), record["scored_by"]
    # contexts: counted in the tokens of the official prompt really sent; evidence on the right pages
    official = PromptConfig(format="auto", official=load_official_docqa_prompt(str(root / "MMLongBench")))
    tokenizer = load_tokenizer()
    rows = [json.loads(line) for name in ("mmlongdoc", "slidevqa") for line in open(out / "instances" / f"{name}.jsonl")]
    assert len(rows) == 8
    for row in rows:
        items = [ContextItem(**i) for i in row["items"]]
        inst = Instance(row["dataset"], row["id"], row["length"], row["task"], row["question"], row["answer"],
                        row["answer_format"], row["gold_doc_id"], row["evidence_pages"], items, row["num_tokens"],
                        row["method"], row["seed"], meta=row["meta"])
        ids = tokenizer(render_prompt(tokenizer, instance_messages(inst, official)), add_special_tokens=False)["input_ids"]
        sent = len(ids) - len(items) + sum(i.tokens for i in items)
        assert row["num_tokens"] == sent <= row["length"], row["key"]
        gold_images = {i.page: i.image for i in items if i.role == "gold"}
        for page in row["evidence_pages"]:
            assert page in gold_images, row["key"]
        if row["id"] == "slideVQA_0":
            assert row["evidence_pages"] == [4] and gold_images[4].endswith(f"{DECK}-4-1024.jpg")
        if row["id"] == "mmlongdoc_0":
            assert row["evidence_pages"] == [2, 4] and gold_images[2].endswith("annual-report_page2.png")
            assert Image.open(gold_images[2]).size == (600, 800)  # 144 DPI
    assert (out / "page_cache").is_dir()
