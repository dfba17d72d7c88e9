"""The OpenAI-compatible paths against a local HTTP server speaking the protocol (127.0.0.1 only,
a bounded number of requests, short timeouts): the endpoint backend's request (labelled pages,
images as data URLs or file paths, "Answer:" pre-filled with continue_final_message), retries,
the LLM judge (binary, list F1 from counts, bad replies, cache, resume after a failure, the API
key), and ``tools/evaluate.py score``."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest
from PIL import Image

from megatron_vlm.eval.backends import (BackendError, GenerationConfig, OpenAIClient, make_backend, parse_model_spec)
from megatron_vlm.eval.build import Instance
from megatron_vlm.eval.data import ContextItem
from megatron_vlm.eval.judge import (JudgeError, LLMJudge, RuleScorer, parse_list_reply, parse_single_reply,
                                     score_records)

from tests.conftest import REPO

KEY = "sk-test-do-not-log-0123456789"


class FakeOpenAI:
    """``/v1/models`` and ``/v1/chat/completions``; ``reply(body) -> (status, text)`` decides."""

    def __init__(self, reply: Callable[[dict], tuple[int, str]], max_requests: int = 60):
        self.reply, self.max_requests = reply, max_requests
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _count(self) -> bool:
                fake.headers.append(dict(self.headers))
                return len(fake.headers) <= fake.max_requests

            def do_GET(self):
                if not self._count():
                    return self._send(503, {"error": "request budget of the fake server used up"})
                if self.path.rstrip("/") == "/v1/models":
                    return self._send(200, {"data": [{"id": "fake-model"}]})
                self._send(404, {"error": "no such path"})

            def do_POST(self):
                if not self._count():
                    return self._send(503, {"error": "request budget of the fake server used up"})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                status, text = fake.reply(body)
                if status != 200:
                    return self._send(status, {"error": text})
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 5
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _pages(tmp_path) -> list[ContextItem]:
    items = []
    for i, (doc, page) in enumerate([("negativedoc0000001", 4), ("golddocument000002", 1), ("golddocument000002", 2)]):
        path = tmp_path / f"p{i}.png"
        Image.new("RGB", (56, 56), (i * 60, 0, 0)).save(path)
        items.append(ContextItem("page", doc, page, str(path), 4, None, "gold" if doc.startswith("gold") else "negative"))
    return items


def _instance(items) -> Instance:
    return Instance("set", "q1", 8192, "docqa", "What is the total?", "42", "Integer", "golddocument000002", [2],
                    items, 100, "whole", 0)


# ------------------------------------------------------------------------- endpoint backend
def test_endpoint_backend_request(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY)
    items = _pages(tmp_path)
    with FakeOpenAI(lambda body: (200, " 42")) as server:
        cfg = GenerationConfig(max_new_tokens=16, api_key_env="MY_KEY", timeout=10, retries=0)
        backend = make_backend(parse_model_spec(f"openai:{server.url}"), cfg, parallel=2)
        port = server.server.server_address[1]
        assert backend.client.model == "fake-model" and backend.name == f"127.0.0.1:{port}"  # host:port by default
        assert backend.generate(_instance(items)) == " 42"
        by_path = make_backend(parse_model_spec(f"mine=openai:{server.url},model=served,images=path"), cfg)
        assert by_path.name == "mine" and by_path.generate(_instance(items)) == " 42"
    assert KEY not in repr(backend.client)
    assert all(h.get("Authorization") == f"Bearer {KEY}" for h in server.headers)
    data_req, path_req = server.requests
    assert data_req["model"] == "fake-model" and path_req["model"] == "served"
    for req in (data_req, path_req):
        assert req["continue_final_message"] is True and req["add_generation_prompt"] is False
        assert req["temperature"] == 0 and req["max_tokens"] == 16
        user, assistant = req["messages"]
        assert assistant == {"role": "assistant", "content": "Answer:"}
        texts = "".join(p["text"] for p in user["content"] if p["type"] == "text")
        assert texts.count("Document ") == 3 and "Document negativedoc0000, page 4:" in texts
        assert "Document golddocument000, page 2:" in texts  # labels cut to 15 characters
        assert texts.rstrip().endswith("Question about document golddocument000: What is the total?")
        kinds = [p["type"] for p in user["content"]]
        assert kinds.count("image_url") == 3
        # each image directly follows its page's label
        for index, part in enumerate(user["content"]):
            if part["type"] == "image_url":
                assert re.search(r"page \d+:$", user["content"][index - 1]["text"])
    urls = [p["image_url"]["url"] for p in data_req["messages"][0]["content"] if p["type"] == "image_url"]
    for url, item in zip(urls, items):
        head, b64 = url.split(",", 1)
        assert head == "data:image/png;base64" and base64.b64decode(b64) == open(item.image, "rb").read()
    paths = [p["image_url"]["url"] for p in path_req["messages"][0]["content"] if p["type"] == "image_url"]
    assert paths == ["file://" + os.path.abspath(i.image) for i in items]


def test_endpoint_retries_and_errors(tmp_path):
    calls = {"n": 0}

    def flaky(body):
        calls["n"] += 1
        if body["messages"][0]["content"] == "bad":
            return 400, "context too long"
        return (500, "busy") if calls["n"] == 1 else (200, "Answer: fine")

    with FakeOpenAI(flaky, max_requests=10) as server:
        client = OpenAIClient(server.url, model="m", timeout=10, retries=2)
        assert client.chat([{"role": "user", "content": "ok"}]) == "Answer: fine" and calls["n"] == 2
        with pytest.raises(BackendError, match="HTTP 400"):
            client.chat([{"role": "user", "content": "bad"}])
        assert calls["n"] == 3  # a 4xx is not retried
        backend = make_backend(parse_model_spec(f"openai:{server.url},model=m"), GenerationConfig(timeout=10))
        assert backend.generate(_instance(_pages(tmp_path))) == " fine"  # an echoed "Answer:" is removed
    dead = OpenAIClient(server.url, model="m", timeout=2, retries=1)  # the server is gone
    with pytest.raises(BackendError, match="after 2 attempts"):
        dead.chat([{"role": "user", "content": "x"}])


# ------------------------------------------------------------------------- judge
RECORDS = [
    {"question": "Total revenue?", "answer": "42", "answer_format": "Integer", "prediction": "42 million"},
    {"question": "Who signed?", "answer": "Not answerable", "answer_format": "None", "prediction": "Alice"},
    {"question": "Which colours?", "answer": "['red', 'blue']", "answer_format": "List",
     "prediction": "red, blue and green"},
    {"question": "Empty?", "answer": "x", "answer_format": "String", "prediction": ""},
    {"question": "Garbled judge?", "answer": "Paris", "answer_format": "String", "prediction": "Paris"},
]


def judge_reply(body) -> tuple[int, str]:
    """Grades like a careful judge would; never valid JSON for the 'Garbled judge?' question."""
    last = body["messages"][-1]["content"]
    if "did not end with the JSON object" in last:
        last = body["messages"][-3]["content"]
    if "Garbled judge?" in last:
        return 200, "I think it is right but I will not say so in JSON. {correct: yes}"
    if "Reference list" in last:
        return 200, 'The answer gives red, blue, green: 3 items; red and blue are covered.\n' \
                    '```json\n{"answer_items": 3, "covered_items": 2}\n```'
    if "Total revenue?" in last:
        return 200, 'Same number.\n{"correct": 1}'
    return 200, 'The document does not give this.\n{"correct": 0}'


def test_judge_scores_cache_and_bad_replies(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    cache = str(tmp_path / "judge_cache.jsonl")
    with FakeOpenAI(judge_reply) as server:
        judge = LLMJudge(server.url, cache_path=cache, api_key_env="JUDGE_KEY", timeout=10, retries=0,
                         bad_reply_retries=1, parallel=2)
        scored = score_records(RECORDS, judge, progress=False)
        judge.close()
        assert judge.name == "judge:fake-model"
        assert [r["score"] for r in scored] == pytest.approx([1.0, 0.0, 0.8, 0.0, 1.0])
        assert [r["scored_by"] for r in scored] == ["judge:fake-model", "judge:fake-model", "judge:fake-model",
                                                    "empty", "rules (judge reply unusable)"]
        assert scored[2]["judge"] == {"kind": "list", "cached": False, "answer_items": 3, "covered_items": 2,
                                      "reference_items": 2}
        assert judge.calls == 3 + 2  # empty answers cost nothing; the garbled one was asked twice
        requests_before = len(server.requests)
        list_request = [r for r in server.requests if "Reference list" in r["messages"][-1]["content"]][0]
        assert list_request["messages"][0]["role"] == "system" and "list of required items" in \
            list_request["messages"][0]["content"]
        # a second run (resume) asks nothing: every reply is cached, garbled ones included
        again = LLMJudge(server.url, cache_path=cache, timeout=10, retries=0)
        rescored = score_records(RECORDS, again, progress=False)
        again.close()
        assert again.calls == 0 and len(server.requests) == requests_before
        assert [r["score"] for r in rescored] == [r["score"] for r in scored]
        assert all(r["judge"]["cached"] for r in rescored if r["scored_by"].startswith("judge"))
    text = open(cache).read()
    assert KEY not in text and len(text.splitlines()) == 4


def test_judge_resumes_after_a_failure(tmp_path):
    cache = str(tmp_path / "cache.jsonl")
    state = {"fail": True}

    def reply(body):
        if state["fail"] and "Which colours?" in body["messages"][-1]["content"]:
            return 400, "judge model overloaded"
        return judge_reply(body)

    records = RECORDS[:3]
    with FakeOpenAI(reply) as server:
        first = LLMJudge(server.url, cache_path=cache, timeout=10, retries=0, parallel=1)
        with pytest.raises(JudgeError, match="HTTP 400"):
            score_records(records, first, progress=False)
        first.close()
        assert len(open(cache).read().splitlines()) == 2  # judged before the failure: kept
        state["fail"] = False
        second = LLMJudge(server.url, cache_path=cache, timeout=10, retries=0)
        scored = score_records(records, second, progress=False)
        second.close()
        assert second.calls == 1 and [r["score"] for r in scored] == pytest.approx([1.0, 0.0, 0.8])


@pytest.mark.parametrize("text,single,counts", [
    ('reasoning...\n{"correct": 1}', 1, None),
    ('```json\n{"correct": "0"}\n```', 0, None),
    ('{"correct": 1} then changed my mind {"correct": 0}', 0, None),  # the last object counts
    ('{"correct": 2}', None, None),
    ('no json at all', None, None),
    ('{"answer_items": 4, "covered_items": 3}', None, (4, 3)),
    ('{"answer_items": -1, "covered_items": 3}', None, None),
    ('{"answer_items": "2", "covered_items": 2.0}', None, (2, 2)),
    ('{"answer_items": 2}', None, None),
])
def test_reply_parsing(text, single, counts):
    assert parse_single_reply(text) == single
    assert parse_list_reply(text) == counts


# ------------------------------------------------------------------------- the score subcommand
def _evaluate_module():
    spec = importlib.util.spec_from_file_location("evaluate_cli", os.path.join(REPO, "tools", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_subcommand(tmp_path, capsys):
    predictions = tmp_path / "old_run.jsonl"
    lines = [json.dumps(r) for r in RECORDS[:3]] + ['{"question": "no prediction", "answer": "1", "answer_format": "Integer"}',
                                                     "not json", json.dumps(dict(RECORDS[0], answer_format="Bool"))]
    predictions.write_text("\n".join(lines) + "\n")
    cli = _evaluate_module()
    out = tmp_path / "rescored"
    with FakeOpenAI(judge_reply) as server:
        assert cli.main(["score", "--predictions", str(predictions), "--judge", f"openai:{server.url}",
                         "--output", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1]
    assert last == "mean score: 0.600000 (3 records)"  # (1 + 0 + 0.8) / 3
    assert "old_run.jsonl:4: missing field(s) ['prediction']" in captured.err
    assert "old_run.jsonl:5: not valid JSON" in captured.err and "unknown answer_format" in captured.err
    scored = [json.loads(line) for line in open(out / "old_run.scored.jsonl")]
    assert [r["score"] for r in scored] == pytest.approx([1.0, 0.0, 0.8])
    assert all(0 <= r["score"] <= 1 and r["question"] == q["question"] for r, q in zip(scored, RECORDS))
    # rules when no judge is given; the records are kept as they were, plus the score
    assert cli.main(["score", "--predictions", str(predictions), "--output", str(out), "--no-progress"]) == 0
    rules = [json.loads(line) for line in open(out / "old_run.scored.jsonl")]
    expected = [RuleScorer().score(r["question"], r["answer"], r["answer_format"], r["prediction"]).score
                for r in RECORDS[:3]]
    assert [r["score"] for r in rules] == expected and rules[0]["prediction"] == "42 million"
