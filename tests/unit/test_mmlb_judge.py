"""MMLongBench v1.1's LLM judge (``--judge mmlb:URL,model=NAME,prompts=DIR``) against a local fake
OpenAI server: the prompts come from a checkout written here (our own texts under the official
constant names, never executed), placeholders filled as the official code fills them, the
question prefixed as the official loader does, the official decoding settings, both reply forms,
unparseable replies scoring 0, the list F1 from counts, one request per unique prompt, resume."""

from __future__ import annotations

import json
import threading
import time

import pytest

from megatron_vlm.eval.judge import JudgeCache, LLMJudge, MMLBRuleScorer, make_scorer, parse_judge_spec, score_records
from megatron_vlm.eval.mmlb_judge import (MAX_TOKENS, MMLBJudge, OfficialCodeWouldFail, PromptFileError,
                                          extract_json, judge_prediction, list_f1_from_counts, list_score,
                                          load_official_prompts, single_score)

from tests.unit.test_eval_endpoint import FakeOpenAI

# our own wording under the official names; the braces in the rubrics must stay as written
PROMPTS = '''
import this_module_does_not_exist  # the file is parsed, never imported
raise SystemExit("executed")

DOC_QA_JUDGE_PROMPT = """SINGLE RUBRIC. End with {"answer_score": <0 or 1>}.
"""
CURRENT_CASE_PROMPT = """[Q] {question}
[R] {reference}
[P] {prediction}
"""
DOC_QA_LIST_F1_JUDGE_PROMPT = "LIST RUBRIC. " "End with {\\"student_answer_count\\": n, \\"covered_count\\": m}.\\n"
CURRENT_LIST_CASE_PROMPT = "[LQ] {question}\\n[LR] {reference}\\n[LP] {prediction}\\n"
UNUSED = 3
'''
DATA = '''
import datasets_that_do_not_exist

def load_doc_qa_with_llm_judge(args, path, max_test_samples=None):
    def update(sample):
        question = sample["question"]
        doc_id = sample["doc_name"]
        question = "On file {doc_id:.6}: ".format(doc_id=doc_id) + question
        return {"question": question}
    return update
'''


@pytest.fixture
def checkout(tmp_path):
    root = tmp_path / "MMLongBench"
    root.mkdir()
    (root / "utils_prompt.py").write_text(PROMPTS)
    (root / "data.py").write_text(DATA)
    return str(root)


def record(question="What is the total?", answer="42", fmt="Int", prediction="42", doc_name="report2021final.pdf",
           **extra):
    return {"question": question, "answer": answer, "answer_format": fmt, "prediction": prediction,
            "doc_name": doc_name, "task": "docqa", **extra}


def test_prompts_read_and_filled(checkout):
    prompts = load_official_prompts(checkout)
    assert prompts.question_prefix == "On file {doc_id:.6}: " and prompts.doc_field == "doc_name"
    judge = MMLBJudge.__new__(MMLBJudge)
    judge.prompts = prompts
    kind, content, note = judge.request(record(prediction="The answer: 42 units"))
    assert kind == "single" and note is None
    # rubric as written (braces kept), then the case: prefixed question (doc_name cut to 6 by the
    # template), the gold as is, the prediction after the prepended "Answer:"
    assert content == ('SINGLE RUBRIC. End with {"answer_score": <0 or 1>}.\n'
                       "[Q] On file report: What is the total?\n[R] 42\n[P] The answer: 42 units\n")
    kind, content, _ = judge.request(record(answer='["red", "blue"]', fmt="List", prediction="Answer: red"))
    assert kind == "list" and content == ('LIST RUBRIC. End with {"student_answer_count": n, "covered_count": m}.\n'
                                          '[LQ] On file report: What is the total?\n[LR] ["red", "blue"]\n[LP] red\n')
    _, content, note = judge.request(record(doc_name=None, gold_doc_id="golddoc99"))
    assert "[Q] On file golddo: What" in content and "gold_doc_id" in note
    assert judge_prediction("Answer: Answer: x") == "Answer: x" and judge_prediction(" Paris ") == "Paris"


def test_prompt_file_errors(tmp_path, checkout):
    with pytest.raises(PromptFileError, match="not a folder"):
        load_official_prompts(str(tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "utils_prompt.py").write_text(PROMPTS.replace("CURRENT_LIST_CASE_PROMPT", "OTHER"))
    (bad / "data.py").write_text(DATA)
    with pytest.raises(PromptFileError, match="CURRENT_LIST_CASE_PROMPT"):
        load_official_prompts(str(bad))
    (bad / "utils_prompt.py").write_text(PROMPTS.replace("[R] {reference}", "[R] {gold}"))
    with pytest.raises(PromptFileError, match="placeholders"):
        load_official_prompts(str(bad))
    (bad / "utils_prompt.py").write_text(PROMPTS)
    (bad / "data.py").write_text("def load_doc_qa(args):\n    pass\n")
    with pytest.raises(PromptFileError, match="load_doc_qa_with_llm_judge"):
        load_official_prompts(str(bad))


@pytest.mark.parametrize("reply, score, how", [
    ("[Scoring Rationale]: same.\n[Score]: 1 point\n[JSON]:\n{\"answer_score\": 1}", 1.0, "score line"),
    ("[Score]: 0 points\n[JSON]:\n{\"answer_score\": 1}", 0.0, "score line"),  # the score line wins
    ("Rationale.\n[JSON]:\n```json\n{\n  \"answer_score\": 1\n}\n```", 1.0, "json"),  # the JSON form alone
    ("[JSON]: {broken, \"answer_score\": 1", 1.0, "json"),  # undecodable: the key found by pattern
    ("[JSON]: {\"other\": 1} and later \"answer_score\": 1", 0.0, "unparsed"),  # decoded, key absent: 0
    ("I think it deserves one point.", 0.0, "unparsed"),
    ("[score]: 1 point", 0.0, "unparsed"),  # case-sensitive, as officially
])
def test_single_reply_forms(reply, score, how):
    assert single_score(reply)[:2] == (score, how)


def test_list_f1_from_counts():
    assert list_f1_from_counts(3, 4, 2) == pytest.approx(4 / 7)  # R 2/3, P 1/2: 2RP/(R+P) = (2/3)/(7/6)
    assert list_f1_from_counts(2, 2, 2) == 1.0
    assert list_f1_from_counts(2, 1, 2) == 1.0  # P = 2 > 1: F1 4/3 clipped to 1
    assert list_f1_from_counts(3, 5, 0) == 0.0 and list_f1_from_counts(3, 5, -1) == 0.0
    with pytest.raises(OfficialCodeWouldFail):
        list_f1_from_counts(3, 0, 1)
    assert list_score('[JSON]: {"student_answer_count": 4, "covered_count": 2}', '["a", "b", "c"]')[0] \
        == pytest.approx(4 / 7)
    assert list_score('"student_answer_count": 3, "covered_count": 3', ["a", "b", "c"])[0] == 1.0
    assert list_score('[JSON]: {"covered_count": 2}', '["a"]')[:2] == (0.0, "unparsed")
    score, how, note, _ = list_score('[JSON]: {"student_answer_count": 0, "covered_count": 1}', '["a"]')
    assert (score, how) == (0.0, "json") and "would fail" in note
    score, _, note, _ = list_score('[JSON]: {"student_answer_count": 2, "covered_count": 1}', "['a', 'b']")
    assert score == pytest.approx(0.5) and "Python list" in note
    assert extract_json("no json here", ("x",)) == {}


def slow_judge(body):
    """Grades from the case text; slow enough that parallel duplicates overlap."""
    time.sleep(0.3)
    content = body["messages"][0]["content"]
    if "[LQ]" in content:
        return 200, '[Rationale]: three given, two right.\n[JSON]:\n{"student_answer_count": 3, "covered_count": 2}'
    if "[P] 42" in content:
        return 200, "[Scoring Rationale]: equal.\n[Score]: 1 point\n[JSON]:\n{\"answer_score\": 1}"
    if "[P] Berlin" in content:
        return 200, '[JSON]:\n{"answer_score": 0}'
    return 200, "I refuse to use the format."


def test_judge_requests_dedup_and_resume(tmp_path, checkout):
    cache = str(tmp_path / "judge_cache.jsonl")
    records = ([record()] * 4  # one unique prompt four times, judged in parallel
               + [record(question="Capital?", answer="Paris", fmt="Str", prediction="Berlin")]
               + [record(question="Colours?", answer='["red", "blue", "green"]', fmt="List",
                         prediction="red, blue, pink")]
               + [record(question="Odd?", answer="x", fmt="Str", prediction="y")]
               + [record(prediction="", error="HTTP 500")]  # a failed generation: no request
               + [dict(record(question="Needle?", answer="7", fmt="Int", prediction="7"), task="niah")])
    with FakeOpenAI(slow_judge) as server:
        scorer = make_scorer(f"mmlb:{server.url},model=judge-m,prompts={checkout}", cache, parallel=8)
        assert isinstance(scorer, MMLBJudge) and scorer.name == "mmlb-judge:judge-m"
        scored = score_records(records, scorer, progress=False)
        scorer.close()
        assert len(server.requests) == 4  # 4 unique prompts, not 7
        for body in server.requests:
            assert set(body) == {"model", "messages", "max_tokens"}  # no temperature: the server's default
            assert body["model"] == "judge-m" and body["max_tokens"] == MAX_TOKENS == 256
            assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
        # the list: 3 answer items, 2 covered, 3 gold items: R = P = 2/3, F1 = 2/3
        assert [r["score"] for r in scored] == pytest.approx([1, 1, 1, 1, 0, 2 / 3, 0, 0, 1])
        assert scored[5]["judge"]["answer_items"] == 3 and scored[5]["judge"]["reference_items"] == 3
        assert sum(1 for r in scored[:4] if not r["judge"]["cached"]) == 1
        assert scored[6]["scored_by"] == "mmlb-judge:judge-m (reply unparsed: 0)" and scored[6]["score"] == 0
        assert scored[7]["scored_by"] == "error" and scored[8]["scored_by"] == "rules"
        # resume: everything judged is on disk; a new scorer sends nothing
        again = make_scorer(f"mmlb:{server.url},model=judge-m,prompts={checkout}", cache, parallel=8)
        rescored = score_records(records, again, progress=False)
        again.close()
        assert len(server.requests) == 4 and [r["score"] for r in rescored] == [r["score"] for r in scored]
    lines = [json.loads(x) for x in open(cache)]
    assert len(lines) == 4 and all(x["protocol"] == "mmlb-v1.1" and x["judge"] == "judge-m" for x in lines)


def test_our_judge_dedups_too(tmp_path):
    def reply(body):
        time.sleep(0.3)
        return 200, '{"correct": 1}'

    with FakeOpenAI(reply) as server:
        judge = LLMJudge(server.url, model="m", cache_path=str(tmp_path / "c.jsonl"), timeout=10, retries=0,
                         parallel=6)
        scored = score_records([record(fmt="Integer")] * 6, judge, progress=False)
        judge.close()
    assert len(server.requests) == 1 and [r["score"] for r in scored] == [1.0] * 6


def test_cache_once_shares_errors(tmp_path):
    cache = JudgeCache(None)
    started, calls = threading.Event(), []

    def fail():
        calls.append(1)
        started.set()
        time.sleep(0.2)
        raise RuntimeError("judge down")

    errors = []

    def worker():
        try:
            cache.once("k", fail)
        except RuntimeError as err:
            errors.append(str(err))

    first = threading.Thread(target=worker)
    first.start()
    started.wait(5)
    second = threading.Thread(target=worker)
    second.start()
    first.join(5)
    second.join(5)
    assert calls == [1] and errors == ["judge down", "judge down"]
    assert cache.once("k", lambda: {"raw": "ok"}) == ({"raw": "ok", "key": "k"}, "new")  # a later try runs again


def test_judge_spec():
    assert parse_judge_spec("mmlb:http://h:1/v1,model=m,prompts=/x") == ("mmlb", "http://h:1/v1",
                                                                         {"model": "m", "prompts": "/x"})
    with pytest.raises(ValueError, match="prompts=DIR"):
        parse_judge_spec("mmlb:http://h:1/v1,model=m")
    with pytest.raises(ValueError, match="not one of"):
        parse_judge_spec("mmlb:http://h:1/v1,prompts=/x,temperature=0")
    with pytest.raises(ValueError, match="not one of"):
        parse_judge_spec("openai:http://h:1/v1,prompts=/x")


def test_rule_scorer_reads_the_output_as_the_official_run():
    """eval.py prepends "Answer:" to every output before parse_output: the first "Answer:" is that
    one, so a later "answer:" in the model's text does not cut the prediction."""
    rules = MMLBRuleScorer()
    assert rules.score("q", "7", "Integer", "The document lists 7 tables.\nAnswer: 12").score == 1.0
    assert rules.score("q", "5", "Integer", "My answer: 5").score == 1.0
    assert rules.score("q", "42", "Integer", "Answer: 42").score == 1.0  # an echoed prefix is dropped
    assert rules.score("q", "x", "String", "  ").scored_by == "empty"
