"""The model-under-test prompt of MMLongBench document QA, read from a checkout's data.py: the built
messages follow the official structure (templates filled, pages in order, one image per <image>, no
system message, "Answer:" pre-filled). The fake checkout below has the official *shape* in our own
words; the real texts come from the user's clone at run time."""

from __future__ import annotations

import pytest

from megatron_vlm.eval.build import Instance
from megatron_vlm.eval.data import ContextItem
from megatron_vlm.eval.mmlb_judge import PromptFileError
from megatron_vlm.eval.mmlb_prompt import load_official_docqa_prompt, page_fields
from megatron_vlm.eval.prompt import PromptConfig, instance_messages

DATA = '''
def load_doc_qa(args, path, max_test_samples=None):
    user_template = "Read the pages and reply briefly.\\n" + "Answer: [answer]\\n\\n{context}\\n\\nQuestion: {question}"
    item_template = "Doc {doc_id:.15} (p {page_id}): <image>"
    system_template = "Answer:"
    def update(sample):
        doc_id = sample["doc_name"]
        question = "Regarding Doc {doc_id:.15}: ".format(doc_id=doc_id) + question
        return {}
'''


@pytest.fixture()
def checkout(tmp_path):
    root = tmp_path / "MMLongBench"
    root.mkdir()
    (root / "data.py").write_text(DATA)
    return str(root)


def instance(dataset="mmlongdoc", pages=(("annualreport2021", 3), ("otherdocument_xyz", 1)), task="docqa"):
    items = [ContextItem("page", doc, n, f"/img/documentQA/{doc}/{doc}_page{n}.png", 100, None, "gold")
             for doc, n in pages]
    return Instance(dataset=dataset, example_id="e0", length=8192, task=task, question="Which year?",
                    answer="2019", answer_format="Int", gold_doc_id="annualreport2021", evidence_pages=[3],
                    items=items, num_tokens=300, method="published", seed=0,
                    meta={"doc_name": "annualreport2021_final.pdf"})


def test_official_structure(checkout):
    official = load_official_docqa_prompt(checkout)
    cfg = PromptConfig(format="auto", official=official)
    user, assistant = instance_messages(instance(), cfg)
    assert assistant == {"role": "assistant", "content": "Answer:"} and user["role"] == "user"
    kinds = [c["type"] for c in user["content"]]
    assert kinds == ["text", "image", "text", "image", "text"]
    images = [c["image"] for c in user["content"] if c["type"] == "image"]
    assert images == ["/img/documentQA/annualreport2021/annualreport2021_page3.png",
                      "/img/documentQA/otherdocument_xyz/otherdocument_xyz_page1.png"]
    texts = [c["text"] for c in user["content"] if c["type"] == "text"]
    assert texts[0] == "Read the pages and reply briefly.\nAnswer: [answer]\n\nDoc annualreport202 (p 3): "
    assert texts[1] == "\n\nDoc otherdocument_x (p 1): "  # doc_id cut to 15 characters, as {:.15}
    assert texts[2] == "\n\nQuestion: Regarding Doc annualreport202: Which year?"


def test_format_choice(checkout):
    official = load_official_docqa_prompt(checkout)
    ours = instance_messages(instance(), PromptConfig(format="ours", official=official))
    assert ours[0]["content"][0]["text"].startswith("Below are pages")
    # auto: our own held-out data keeps our prompt; a named MMLongBench set gets the official one
    mine = instance(dataset="heldout")
    assert instance_messages(mine, PromptConfig(format="auto", official=official))[0]["content"][0]["text"] \
        .startswith("Below are pages")
    named = instance_messages(mine, PromptConfig(format="auto", official=official, mmlb_datasets=("heldout",)))
    assert named[1]["content"] == "Answer:" and named[0]["content"][0]["text"].startswith("Read the pages")
    with pytest.raises(ValueError, match="--mmlb-dir"):
        instance_messages(instance(), PromptConfig(format="mmlb"))


def test_page_fields_from_path():
    assert page_fields("documentQA/rep/rep_page12.png") == {"doc_id": "rep", "page_id": "12"}


def test_checkout_errors(tmp_path, checkout):
    with pytest.raises(PromptFileError, match="not a folder"):
        load_official_docqa_prompt(str(tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data.py").write_text(DATA.replace("{context}", "{pages}"))
    with pytest.raises(PromptFileError, match="user_template"):
        load_official_docqa_prompt(str(bad))
    (bad / "data.py").write_text("def load_doc_qa_with_llm_judge(args):\n    pass\n")
    with pytest.raises(PromptFileError, match="load_doc_qa"):
        load_official_docqa_prompt(str(bad))


def test_cli_official_prompt_end_to_end(tmp_path, checkout):
    """tools/evaluate.py: MMLongBench data without a checkout stops with one clear error; with
    --mmlb-dir the served model receives the official structure."""
    import json
    import subprocess
    import sys

    from tests.unit.test_eval_endpoint import FakeOpenAI
    from tests.unit.test_eval_rejected_model import CLI, ENV, REPO, _mmlb

    data = _mmlb(tmp_path)
    base = [sys.executable, CLI, "--data", data, "--lengths", "8K", "--no-progress", "--max-pixels", "12544",
            "--judge", "rules", "--parallel", "1"]
    with FakeOpenAI(lambda body: (200, " 2019")) as server:
        model = ["--model", f"served=openai:{server.url},model=x"]
        run = subprocess.run(base + model + ["--output", str(tmp_path / "a")], capture_output=True, text=True,
                             timeout=300, env=ENV, cwd=REPO)
        assert run.returncode == 1 and "--mmlb-dir" in run.stderr and "Traceback" not in run.stderr
        assert not server.requests
        run = subprocess.run(base + model + ["--output", str(tmp_path / "b"), "--mmlb-dir", checkout],
                             capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
        assert run.returncode == 0, run.stderr[-3000:]
        (request,) = server.requests
    messages = (request if isinstance(request, dict) else json.loads(request))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"] == "Answer:"
    parts = messages[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert parts[0]["text"].endswith("Doc rep (p 1): ") and parts[2]["text"] == "\n\nDoc rep (p 2): "
    assert parts[4]["text"] == "\n\nQuestion: Regarding Doc rep.pdf: Which year?"


# the official shape (user template with {context} and {question}, pages "Document {doc_id:.15}: <image>"
# joined by blank lines, a question prefix, "Answer:") in our own words
OFFICIAL_SHAPE = '''
def load_doc_qa(args, path, max_test_samples=None):
    user_template = "Look at the document pages, then answer in a few words or write 'Not answerable.'\\nAnswer: [answer]\\n\\n{context}\\n\\nQuestion: {question}"
    item_template = "Document {doc_id:.15}: <image>"
    system_template = "Answer:"
    def update(sample):
        doc_id = sample["doc_name"]
        question = "Using Document {doc_id:.15}, answer this. ".format(doc_id=doc_id) + question
        return {}
'''


@pytest.mark.parametrize("shape", ["official", "with-page-id"])
def test_budgets_count_the_official_prompt(tmp_path, shape):
    """Contexts built for MMLongBench data are counted in the tokens of the prompt really sent (the
    official one), checked against a full tokenization of that rendered prompt; our own prompt's
    count would be off."""
    import random

    from megatron_vlm.data.tokenizer import load_tokenizer
    from megatron_vlm.eval.build import instantiate
    from megatron_vlm.eval.data import DocPage, Document, EvalExample
    from megatron_vlm.eval.prompt import TokenCounter, render_prompt

    root = tmp_path / shape
    root.mkdir()
    (root / "data.py").write_text(OFFICIAL_SHAPE if shape == "official" else DATA)
    official = load_official_docqa_prompt(str(root))
    tokenizer = load_tokenizer()
    cfg = PromptConfig(format="auto", official=official)
    rng = random.Random(3)

    def doc(name, pages):
        return Document(name, [DocPage(p, f"/img/documentQA/{name}/{name}_page{p}.png", rng.randrange(40, 300))
                               for p in range(pages)])

    gold = doc("annual-report-2021-final", 30)
    negatives = [doc(f"deck{i}-quarterly-results", rng.randrange(2, 12)) for i in range(12)]
    example = EvalExample("mmlongdoc_7", "mmlongdoc", "How many offices opened in 2020?", "12", "Integer",
                          doc=gold, evidence_pages=[4, 9], meta={"doc_name": "annual-report-2021-final.pdf"})

    def sent(inst, prompt_cfg):
        ids = tokenizer(render_prompt(tokenizer, instance_messages(inst, prompt_cfg)), add_special_tokens=False)["input_ids"]
        images = [i for i in inst.items if i.image]
        return len(ids) - len(images) + sum(i.tokens for i in images)

    ours = TokenCounter(tokenizer, PromptConfig())
    counter = TokenCounter(tokenizer, cfg)
    methods = set()
    for length in (600, 1500, 4000, 9000, 20000):
        inst = instantiate(example, length, negatives, counter)
        methods.add(inst.method)
        assert inst.num_tokens == sent(inst, cfg) and inst.num_tokens <= length, (length, inst.method)
        assert {4, 9} <= set(inst.kept_pages)
        if length == 9000:  # counted with our prompt instead, the same context is off
            assert ours.fixed("docqa", example.question, gold.doc_id) + ours.items(inst.items) != sent(inst, cfg)
    assert methods == {"trimmed", "extended"}
    # examples of other data keep our prompt's count
    mine = EvalExample("q1", "heldout", "Which year?", "2019", "Integer", doc=gold, evidence_pages=[4])
    assert counter.for_example(mine) is counter
