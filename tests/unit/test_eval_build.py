"""Length instantiation and the data readers: budgets hit and never exceeded (checked against a full
tokenization of the rendered prompt), evidence pages always kept, negatives whole and alternating
left/right, per-example seeding; MMLongBench files, held-out Samples, pools, needles."""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest
from PIL import Image

from megatron_vlm.data.image_processing import image_token_count
from megatron_vlm.data.tokenizer import load_tokenizer
from megatron_vlm.common.inputs import read_hash_list
from megatron_vlm.eval.build import Instance, format_length, instantiate, parse_length, parse_lengths
from megatron_vlm.eval.data import (ContextItem, DataConfig, DataError, DocPage, Document, Dropped, EvalExample,
                                    load_data, page_number_from_path, pick_heldout_documents, write_hash_list)
from megatron_vlm.eval.prompt import PromptConfig, TokenCounter, instance_messages, render_prompt
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def counter(tokenizer):
    return TokenCounter(tokenizer, PromptConfig())


def prompt_length(tokenizer, inst: Instance) -> int:
    """Independent count: tokenize the rendered prompt, expand each image to its pad tokens."""
    text = render_prompt(tokenizer, instance_messages(inst, PromptConfig()))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    images = [i for i in inst.items if i.image]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == len(images)
    return len(ids) - len(images) + sum(i.tokens for i in images)


def make_doc(doc_id: str, num_pages: int, rng: random.Random, lo: int = 150, hi: int = 900) -> Document:
    return Document(doc_id, [DocPage(p, f"/nowhere/{doc_id}/{p:04d}.jpg", rng.randrange(lo, hi))
                             for p in range(1, num_pages + 1)], sha256=(doc_id * 64)[:64])


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(7)
    gold = make_doc("goldgoldgold0001", 40, rng)
    negatives = [make_doc(f"neg{i:013d}", rng.randrange(3, 30), rng) for i in range(40)]
    return gold, negatives


def example(gold: Document, evidence, fmt="String", answer="x", ex_id="ex1") -> EvalExample:
    return EvalExample(ex_id, "set", "What is the value in the table?", answer, fmt, doc=gold, evidence_pages=evidence)


LENGTHS = [2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288]


# ------------------------------------------------------------------------- lengths
def test_parse_lengths():
    assert parse_length("8K") == 8192 and parse_length("512k") == 524288 and parse_length("1M") == 1048576
    assert parse_length("3000") == 3000 and parse_length("0.5K") == 512
    assert parse_lengths("16K, 8K,8K") == [8192, 16384]
    assert [format_length(n) for n in (8192, 524288, 1048576, 3000)] == ["8K", "512K", "1M", "3000"]
    for bad in ("8Q", "", "-1K", "0.3"):
        with pytest.raises(ValueError):
            parse_length(bad)


# ------------------------------------------------------------------------- budgets and evidence
@pytest.mark.parametrize("evidence", [[20], [5, 6], [3, 37], [], [1], [40]],
                         ids=["one", "adjacent", "far-apart", "unanswerable", "first", "last"])
def test_budget_respected_and_evidence_kept(tokenizer, counter, corpus, evidence):
    gold, negatives = corpus
    ex = example(gold, evidence, fmt="None" if not evidence else "String")
    for n in LENGTHS:
        inst = instantiate(ex, n, negatives, counter, seed=0)
        if isinstance(inst, Dropped):  # only when the evidence pages alone cannot fit
            assert inst.reason == "evidence_over_budget" and evidence == [3, 37] and n <= 4096, inst
            continue
        assert inst.num_tokens <= n, (n, inst.num_tokens)
        assert inst.num_tokens == prompt_length(tokenizer, inst)
        kept = set(inst.kept_pages)
        assert set(evidence) <= kept, (n, evidence, sorted(kept))
        gold_pages = [i.page for i in inst.items if i.role == "gold"]
        assert gold_pages == sorted(gold_pages)
        if inst.method == "trimmed":  # a window: adding the next page on either side would not fit
            assert gold_pages == list(range(gold_pages[0], gold_pages[-1] + 1)) or evidence == [3, 37]
            room = n - inst.num_tokens
            for neighbour in (gold_pages[0] - 1, gold_pages[-1] + 1):
                if 1 <= neighbour <= 40:
                    item = ContextItem.from_page(gold.doc_id, gold.pages[neighbour - 1], "gold")
                    assert counter.item(item) > room
        else:  # the whole gold document, then whole negatives until none fits
            assert gold_pages == list(range(1, 41))
            room = n - inst.num_tokens
            used = {a["doc_id"] for a in inst.added}
            left_over = [d for d in negatives if d.doc_id not in used]
            assert all(counter.items([ContextItem.from_page(d.doc_id, p, "negative") for p in d.pages]) > room
                       for d in left_over)
    if evidence == [3, 37]:  # the span does not fit at 8K: evidence pages and neighbours only
        inst = instantiate(ex, 8192, negatives, counter)
        assert {3, 37} <= set(inst.kept_pages) and any("evidence span" in note for note in inst.notes)


def test_negatives_whole_and_alternating(counter, corpus):
    gold, negatives = corpus
    inst = instantiate(example(gold, [12]), 524288, negatives, counter, seed=3)
    assert inst.method == "extended" and len(inst.added) >= 4
    assert [a["side"] for a in inst.added] == [("left", "right")[i % 2] for i in range(len(inst.added))]
    # order in the context: left documents in reverse order of addition, gold, then right ones
    blocks = []
    for item in inst.items:
        if not blocks or blocks[-1][0] != item.doc_id:
            blocks.append((item.doc_id, []))
        blocks[-1][1].append(item.page)
    order = [doc_id for doc_id, _ in blocks]
    lefts = [a["doc_id"] for a in inst.added if a["side"] == "left"]
    rights = [a["doc_id"] for a in inst.added if a["side"] == "right"]
    assert order == lefts[::-1] + [gold.doc_id] + rights
    by_id = {d.doc_id: d for d in negatives}
    for doc_id, pages in blocks:  # every document appears once, whole, in page order
        expected = gold if doc_id == gold.doc_id else by_id[doc_id]
        assert pages == [p.page for p in expected.pages]
    for a in inst.added:
        assert a["pages"] == len(by_id[a["doc_id"]].pages)
    assert len(set(order)) == len(order)


def test_seeded_per_example(counter, corpus):
    gold, negatives = corpus
    ex, other = example(gold, [12]), example(gold, [12], ex_id="ex2")
    a = instantiate(ex, 262144, negatives, counter, seed=0)
    b = instantiate(ex, 262144, list(reversed(negatives)), counter, seed=0)  # input order does not matter
    assert [i.to_dict() for i in a.items] == [i.to_dict() for i in b.items] and a.seed == b.seed
    assert [x["doc_id"] for x in instantiate(ex, 262144, negatives, counter, seed=1).added] != \
           [x["doc_id"] for x in a.added]
    assert [x["doc_id"] for x in instantiate(other, 262144, negatives, counter, seed=0).added] != \
           [x["doc_id"] for x in a.added]
    trimmed = [instantiate(example(gold, []), 4096, negatives, counter, seed=s).kept_pages for s in range(6)]
    assert len({tuple(t) for t in trimmed}) > 1  # unanswerable: the window's place is seeded
    assert trimmed[2] == instantiate(example(gold, []), 4096, negatives, counter, seed=2).kept_pages


def test_published_instances_and_extension(counter, corpus):
    gold, negatives = corpus
    published = [ContextItem.from_page(negatives[0].doc_id, p, "negative") for p in negatives[0].pages] + \
                [ContextItem.from_page(gold.doc_id, p, "gold") for p in gold.pages]
    ex = example(gold, [12])
    ex.published = {131072: published}
    same = instantiate(ex, 131072, negatives, counter)
    assert same.method == "published" and same.items == published
    longer = instantiate(ex, 262144, negatives, counter)
    assert longer.method == "published+extended" and longer.num_tokens <= 262144
    assert negatives[0].doc_id not in {a["doc_id"] for a in longer.added}  # not added twice
    start = longer.items.index(published[0])
    assert longer.items[start:start + len(published)] == published  # the published context kept intact
    assert instantiate(ex, 8192, negatives, counter).method == "trimmed"  # below every published length
    assert instantiate(ex, 131072, negatives, counter, use_published=False).method != "published"


def test_needle_depths(tokenizer, counter, corpus):
    _, negatives = corpus
    from megatron_vlm.eval.data import Needle

    for depth in (0.0, 0.5, 1.0):
        ex = EvalExample(f"n{depth}", "niah-text", "What is the code?", "4821", "Integer", task="niah",
                         needle=Needle("text", depth, text="The code of the blue safe is 4821."), meta={"depth": depth})
        inst = instantiate(ex, 65536, negatives, counter)
        assert inst.num_tokens <= 65536 and inst.num_tokens == prompt_length(tokenizer, inst)
        assert inst.num_tokens > 65536 - 1000  # pages are cut at a page, so the haystack fills the budget
        position = [i.kind for i in inst.items].index("text")
        share = inst.meta["needle_token_offset"] / inst.meta["haystack_tokens"]
        assert abs(share - depth) < 0.02, (depth, share)
        assert position == {0.0: 0, 1.0: len(inst.items) - 1}.get(depth, position)


# ------------------------------------------------------------------------- readers
def _image(path: str, size=(112, 140)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (255, 255, 255)).save(path)
    return path


def _pool(root, docs: dict[str, int]) -> str:
    """A pool folder in the manifest schema with tiny page images (records.read_manifest reads it)."""
    lines = []
    for doc_id, pages in docs.items():
        page_records = []
        for p in range(1, pages + 1):
            rel = f"images/{doc_id[:2]}/{doc_id}/{p:04d}.jpg"
            _image(os.path.join(root, rel))
            page_records.append({"page": p, "image": rel, "width": 112, "height": 140, "resized_width": 112,
                                 "resized_height": 140, "tokens": image_token_count(140, 112), "dpi": 144.0,
                                 "source": "text", "num_blocks": 1, "num_chars": 10})
        lines.append({"doc_id": doc_id, "source": f"/pdfs/{doc_id}.pdf", "sha256": (doc_id * 4)[:64],
                      "file_bytes": 1, "num_pages": pages, "language": "en", "title": doc_id,
                      "total_tokens": 20 * pages, "image_format": "jpeg", "dpi": 144.0, "section_source": "pages",
                      "sections": [], "blocks": f"blocks/{doc_id}.json.gz", "pages": page_records})
    with open(os.path.join(root, "manifest.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))
    return str(root)


def _sample(sid, doc_id, answer="7", fmt="Integer", evidence=(2,), question="How many rows?"):
    return {"id": sid, "task": "eval", "images": [],
            "messages": [{"role": "user", "content": [{"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}],
            "meta": {"doc_id": doc_id, "answer": answer, "answer_format": fmt, "evidence_pages": list(evidence)}}


def test_samples_reader_pool_and_holdout(tmp_path, counter):
    pool = _pool(tmp_path / "pool", {"aa00000000000001": 6, "bb00000000000002": 4, "cc00000000000003": 5,
                                     "dd00000000000004": 3})
    lines = [json.dumps(_sample("q1", "aa00000000000001")),
             json.dumps(_sample("q2", "bb00000000000002", "Not answerable", "None", ())),
             "{broken",
             json.dumps(_sample("q3", "zz00000000000009")),  # not in the pool
             json.dumps(_sample("q4", "aa00000000000001", evidence=(9,))),  # page 9 of a 6-page document
             json.dumps(_sample("q5", "aa00000000000001", fmt="Bool")),
             json.dumps(_sample("q1", "cc00000000000003"))]  # duplicate id
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(lines) + "\n")
    (s,) = load_data(f"samples:{path},pool={pool}", DataConfig())
    assert [e.id for e in s.examples] == ["q1", "q2"]
    assert [len(e.doc.pages) for e in s.examples] == [6, 4] and s.examples[0].evidence_pages == [2]
    reasons = {d.where.rsplit(":", 1)[1]: d.reason for d in s.dropped}
    assert reasons == {"3": "bad_record", "4": "doc_not_in_pool", "5": "evidence_not_in_document",
                       "6": "bad_answer_format", "7": "duplicate_id"}
    assert all(str(path) in d.where for d in s.dropped)
    assert len(s.negatives) == 4
    inst = instantiate(s.examples[0], 2048, s.negatives, counter)
    assert inst.kept_pages == list(range(1, 7)) and len(inst.added) == 3
    assert "aa00000000000001" not in {a["doc_id"] for a in inst.added}  # never its own gold document
    # a training pool that holds a gold document drops its questions
    (t,) = load_data(f"samples:{path},pool={pool}", DataConfig(exclude_hashes=frozenset({("aa00000000000001" * 4)[:64]})))
    assert [e.id for e in t.examples] == ["q2"] and any(d.reason == "in_training_pool" for d in t.dropped)
    # held-out documents: seeded choice, written as a hash list --exclude-hashes reads
    picked = pick_heldout_documents(pool, 2, seed=1, exclude_doc_ids={"aa00000000000001"})
    assert len(picked) == 2 and "aa00000000000001" not in {d.doc_id for d in picked}
    assert [d.doc_id for d in picked] == [d.doc_id for d in pick_heldout_documents(pool, 2, seed=1,
                                                                                   exclude_doc_ids={"aa00000000000001"})]
    write_hash_list(str(tmp_path / "hashes.txt"), picked)
    assert read_hash_list(str(tmp_path / "hashes.txt")) == {d.sha256 for d in picked}
    # the CLI form, excluding those already held out
    spec = importlib.util.spec_from_file_location("evaluate_cli_holdout", os.path.join(REPO, "tools", "evaluate.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["holdout", "--pool", pool, "--exclude-hashes", str(tmp_path / "hashes.txt"),
                     "--output", str(tmp_path / "more.txt")]) == 0
    more = read_hash_list(str(tmp_path / "more.txt"))
    assert len(more) == 2 and not more & {d.sha256 for d in picked}
    with pytest.raises(DataError, match="unknown option"):
        load_data(f"samples:{path},pol={pool}", DataConfig())
    # without a pool: a sample that carries all its pages (as the synthesis stage writes them)
    own = dict(_sample("own", "dd00000000000004", evidence=(3,)), image_root=pool,
               images=[f"images/dd/dd00000000000004/{p:04d}.jpg" for p in (1, 2, 3)])
    own["messages"][0]["content"] = [{"type": "image"}] * 3 + own["messages"][0]["content"]
    own["meta"]["question"] = "How many rows does the table on page 3 have?"
    (tmp_path / "own.jsonl").write_text(json.dumps(own) + "\n" + json.dumps(_sample("q9", "ee")) + "\n")
    (o,) = load_data(f"samples:{tmp_path / 'own.jsonl'}", DataConfig())
    assert [(p.page, p.tokens) for p in o.examples[0].doc.pages] == [(1, 20), (2, 20), (3, 20)]
    assert o.examples[0].question == "How many rows does the table on page 3 have?"
    assert [d.reason for d in o.dropped] == ["no_document"] and o.negatives == []


def test_mmlongbench_reader(tmp_path, counter):
    images = tmp_path / "mmlb_image"
    docs = {"reportA": 6, "reportB": 5, "slidesC": 4}
    for doc, pages in docs.items():
        for p in range(pages):  # MMLongBench-Doc's names are numbered from 0, like ans_page_list
            _image(str(images / "documentQA" / doc / f"{doc}_page{p}.png"), (280, 168 + 28 * p))
    def rel(doc, p):
        return f"documentQA/{doc}/{doc}_page{p}.png"
    data = tmp_path / "mmlb_data"
    data.mkdir()
    k8 = [{"id": "mmlongdoc_0", "doc_name": "reportA.pdf", "question": "Which year?", "answer": "2019",
           "answer_format": "Int", "ans_page_list": [0, 5], "page_list": [rel("reportA", p) for p in range(6)]},
          {"id": "mmlongdoc_1", "doc_name": "reportB.pdf", "question": "Who?", "answer": "Not answerable",
           "answer_format": "None", "ans_page_list": [], "page_list": [rel("reportB", p) for p in range(1, 4)]},
          {"id": "mmlongdoc_2", "doc_name": "reportB.pdf", "question": "Missing image?", "answer": "x",
           "answer_format": "Str", "ans_page_list": [0], "page_list": [rel("reportB", 9)]},
          {"id": "mmlongdoc_3", "question": "no doc"}]
    (data / "mmlongdoc_K8.jsonl").write_text("\n".join(json.dumps(r) for r in k8) + "\n{oops\n")
    k16 = [dict(k8[0], page_list=[rel("slidesC", p) for p in range(4)] + k8[0]["page_list"])]
    (data / "mmlongdoc_K16.jsonl").write_text(json.dumps(k16[0]) + "\n")
    (s,) = load_data(f"mmlb:{data},images={images}", DataConfig())
    assert s.name == "mmlongdoc" and s.info["evidence_offset"] == 0 and "evidence_offset_warning" not in s.info
    assert [e.id for e in s.examples] == ["mmlongdoc_0", "mmlongdoc_1"]
    first = s.examples[0]
    assert first.evidence_pages == [0, 5] and first.answer_format == "Integer" and first.doc.doc_id == "reportA"
    assert sorted(first.published) == [8192, 16384]
    assert [i.doc_id for i in first.published[16384]][:4] == ["slidesC"] * 4
    assert first.published[16384][0].tokens == image_token_count(140 + 28, 280)
    reasons = sorted(d.reason for d in s.dropped)
    assert reasons == ["bad_record", "bad_record", "missing_image"]
    assert any(d.where.endswith("mmlongdoc_K8.jsonl:5") for d in s.dropped)  # the broken JSON line
    assert {d.doc_id for d in s.negatives} == set(docs)
    at8 = instantiate(first, 8192, s.negatives, counter)
    assert at8.method == "published" and [i.page for i in at8.items] == list(range(6))
    big = instantiate(first, 65536, s.negatives, counter)
    assert big.method == "published+extended" and {a["doc_id"] for a in big.added} == {"reportB"}
    assert page_number_from_path("x/slide-deck-3-1024.jpg") == 3 and page_number_from_path("d/p_page12.png") == 12
    with pytest.raises(DataError, match="images="):
        load_data(f"mmlb:{data}", DataConfig())
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DataError, match="none of the page images"):
        load_data(f"mmlb:{data / 'mmlongdoc_K16.jsonl'},images={tmp_path / 'elsewhere'}", DataConfig())


def test_niah_sets(tmp_path, counter, tokenizer):
    pool = _pool(tmp_path / "pool", {f"{i:02d}00000000000000": 5 for i in range(6)})
    sets = load_data(f"niah:{pool},depths=0/0.5/1,repeats=2", DataConfig(work_dir=str(tmp_path / "needles")))
    assert [s.name for s in sets] == ["niah-text", "niah-image"]
    assert [len(s.examples) for s in sets] == [6, 6]
    card = sets[1].examples[0].needle
    assert os.path.isfile(card.image) and card.tokens == image_token_count(224, 448)
    for s in sets:
        for ex in s.examples[::3]:
            inst = instantiate(ex, 1024, s.negatives, counter)
            assert inst.num_tokens <= 1024 and inst.num_tokens == prompt_length(tokenizer, inst)
            assert sum(1 for i in inst.items if i.role == "needle") == 1
    again = load_data(f"niah:{pool},depths=0/0.5/1,repeats=2", DataConfig(work_dir=str(tmp_path / "needles")))
    assert [e.answer for e in again[0].examples] == [e.answer for e in sets[0].examples]  # seeded
