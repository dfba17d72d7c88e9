"""MMLongBench document-QA: ``ans_page_list`` is 0-based in every dataset, while the page numbers in
the published image names start at 1 for SlideVQA and at 0 for MMLongBench-Doc and LongDocURL
(EdinburghNLP/MMLongBench README.md, "DocVQA page indices"). One record per dataset in the published
layout: its evidence must land on the image the README names, also after trimming to a small budget."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from megatron_vlm.data.tokenizer import load_tokenizer
from megatron_vlm.eval.build import instantiate
from megatron_vlm.eval.data import DataConfig, DataError, load_data, official_evidence_offset
from megatron_vlm.eval.prompt import PromptConfig, TokenCounter

# (file stem, document folder, image name of page n, the pages' numbers in the names, ans_page_list,
#  the image the README says holds the answer)
PUBLISHED = {
    "slidevqa": ("private-banking-wealth-management-what-clients-want",
                 "private-banking-wealth-management-what-clients-want-{n}-1024.jpg", range(1, 9), [3],
                 "private-banking-wealth-management-what-clients-want-4-1024.jpg"),
    "longdocurl": ("4190345", "4190345_page{n}.jpg", range(0, 9), [5], "4190345_page5.jpg"),
    "mmlongdoc": ("PH_2016.06.08_Economy-Final", "PH_2016.06.08_Economy-Final_page{n}.jpg", range(0, 9), [4],
                  "PH_2016.06.08_Economy-Final_page4.jpg"),
}


@pytest.fixture(scope="module")
def counter():
    return TokenCounter(load_tokenizer(), PromptConfig())


def _published(root, dataset):
    folder, pattern, numbers, answer_pages, _ = PUBLISHED[dataset]
    images = root / "mmlb_image"
    rel = [f"documentQA/{folder}/{pattern.format(n=n)}" for n in numbers]
    for k, path in enumerate(rel):
        (images / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (448, 560), (20 * k, 60, 90)).save(images / path)
    data = root / "documentQA"
    data.mkdir()
    record = {"id": f"{dataset}_0", "doc_name": folder, "question": "Which value?", "answer": "7",
              "answer_format": "Int", "ans_page_list": answer_pages, "page_list": rel}
    (data / f"{dataset}_K8.jsonl").write_text(json.dumps(record) + "\n")
    return data, images


@pytest.mark.parametrize("dataset", sorted(PUBLISHED))
def test_evidence_lands_on_the_named_image(tmp_path, counter, dataset):
    data, images = _published(tmp_path, dataset)
    (s,) = load_data(f"mmlb:{data},images={images}", DataConfig())
    assert s.info["evidence_offset"] == official_evidence_offset(dataset) == (1 if dataset == "slidevqa" else 0)
    (example,) = s.examples
    by_page = {p.page: p.image for p in example.doc.pages}
    (page,) = example.evidence_pages
    assert by_page[page].endswith("/" + PUBLISHED[dataset][4])
    # the evidence stays when the context is built by trimming the document to a small budget
    small = instantiate(example, 1024, s.negatives, counter, use_published=False)
    assert small.method == "trimmed" and len(small.items) < len(example.doc.pages)
    assert PUBLISHED[dataset][4] in {i.image.rsplit("/", 1)[-1] for i in small.items}


def test_offset_options(tmp_path):
    data, images = _published(tmp_path, "slidevqa")
    (s,) = load_data(f"mmlb:{data},images={images},evidence_offset=0", DataConfig())
    assert s.examples[0].evidence_pages == [3] and "evidence_offset_warning" not in s.info  # 3 exists too
    (data / "slidevqa_K8.jsonl").rename(data / "mydocs_K8.jsonl")
    with pytest.raises(DataError, match="evidence_offset=0"):
        load_data(f"mmlb:{data},images={images}", DataConfig())  # not one of the three: say which offset
    (s,) = load_data(f"mmlb:{data},images={images},evidence_offset=1", DataConfig())
    assert s.examples[0].evidence_pages == [4]
