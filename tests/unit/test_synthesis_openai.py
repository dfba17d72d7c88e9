"""The openai teacher against a real HTTP server on 127.0.0.1 that speaks chat completions and
replays a script: good replies, malformed JSON then a good reply on re-ask, 429/500 then success,
a timeout, out-of-range evidence, no anchor, a fatal 401 mid-run and resume, the response cache,
token/cost accounting, bounded concurrency, and that the API key never leaves the request header."""

from __future__ import annotations

import asyncio
import base64
import glob
import importlib.util
import json
import logging
import os
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

if importlib.util.find_spec("pymupdf") is None or importlib.util.find_spec("openai") is None:
    pytest.skip("needs PyMuPDF and openai", allow_module_level=True)

from megatron_vlm.data.samples import read_samples  # noqa: E402
from megatron_vlm.pool import synthetic_pdfs as S  # noqa: E402
from megatron_vlm.pool.records import read_manifest  # noqa: E402
from megatron_vlm.synthesis.synthesize import SynthesisConfig, Synthesizer, TokenCounter, sidecar  # noqa: E402
from megatron_vlm.synthesis.teachers import (  # noqa: E402
    OpenAIConfig,
    OpenAITeacher,
    TeacherFatalError,
    TeacherRequest,
)
from tests.unit.synthesis_fixtures import build_pool  # noqa: E402

KEY_ENV = "MVLM_TEST_TEACHER_KEY"
SECRET = "sk-test-DO-NOT-LEAK-4b1d9e"
PROMPT_TOKENS, COMPLETION_TOKENS = 1000, 50
MAX_REQUESTS = 60  # per server: a runaway client fails the test instead of spinning
MAX_SLEEP = 3.0


class FakeChatServer:
    """Chat-completions endpoint on 127.0.0.1 replaying scripted actions, one per request."""

    def __init__(self):
        self.script: deque = deque()
        self.requests: list[dict] = []
        self.delay = 0.0
        self.inflight = self.max_inflight = 0
        self.overflow = False
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with server._lock:
                    server.requests.append({"path": self.path, "auth": self.headers.get("authorization"),
                                            "body": body})
                    n = len(server.requests)
                    action = server.script.popleft() if server.script else "valid"
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    if n > MAX_REQUESTS:
                        server.overflow = True
                        return self._send(503, {"error": {"message": "too many requests in this test"}})
                    if server.delay:
                        time.sleep(min(server.delay, MAX_SLEEP))
                    if isinstance(action, tuple) and action[0] == "sleep":
                        time.sleep(min(action[1], MAX_SLEEP))
                        action = "valid"
                    if isinstance(action, tuple) and action[0] == "status":
                        _, code, headers = (action + ({},))[:3]
                        return self._send(code, {"error": {"message": f"scripted {code}"}}, headers)
                    if action == "echo_key_500":
                        echo = f"backend failed for {self.headers.get('authorization')}"
                        return self._send(500, {"error": {"message": echo}})
                    return self._send(200, completion(body, action, n))
                finally:
                    with server._lock:
                        server.inflight -= 1

            def _send(self, code, payload, headers=None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def segment_pages(body: dict) -> list[int]:
    user = body["messages"][1]["content"]
    return [int(m.group(1)) for item in user if item.get("type") == "text"
            for m in [re.fullmatch(r"Page (\d+):", item["text"])] if m]


def completion(body: dict, action: str, n: int) -> dict:
    pages = segment_pages(body)
    page = pages[1] if len(pages) > 1 else pages[0]
    reply = {"question": f"What is the first word of the second paragraph on Page {page}? (variant {n})",
             "answer": "Quality", "answer_format": "String", "evidence_pages": [page], "evidence_sources": ["Text"]}
    if action == "out_of_range":
        reply["evidence_pages"] = [pages[-1] + 3]
    elif action == "no_anchor":
        reply["question"] = f"What is the first word of the second paragraph? (variant {n})"
    content = f"[Evidence Description]: The paragraph on Page {page} (Text).\n[JSON]: {json.dumps(reply)}"
    if action == "invalid":
        content = "[Evidence Description]: see page\n[JSON]: {\"question\": \"What is on Page 3?\", \"answer\": "
    return {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": body.get("model", "?"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                      "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}}


@pytest.fixture
def server():
    srv = FakeChatServer()
    yield srv
    srv.close()
    assert not srv.overflow, "the client sent more requests than the test allows"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("oa")
    pdf = S.write_report_pdf(str(root / "report.pdf"), S.ReportSpec(seed=11, sections=[
        S.SectionSpec("Introduction", 3), S.SectionSpec("Methods", 4, table=True), S.SectionSpec("Results", 4),
        S.SectionSpec("Discussion", 3)]))
    return build_pool([pdf], str(root / "pool"))


@pytest.fixture(scope="module")
def counter():
    return TokenCounter()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def make_teacher(server, **kw) -> OpenAITeacher:
    values = dict(base_url=server.url, model="fake-vlm", api_key_env=KEY_ENV, concurrency=1, timeout_s=0.5,
                  max_retries=3, backoff_s=0.01, backoff_max_s=0.05, cache_dir=None, price_input_per_mtok=2.0,
                  price_output_per_mtok=8.0)
    values.update(kw)
    return OpenAITeacher(OpenAIConfig(**values))


def request_for(pool, job=0, first=2, last=9, seed=1) -> TeacherRequest:
    (record,) = list(read_manifest(pool))
    return TeacherRequest(job=job, task="extract-single", pool_dir=pool, record=record, first_page=first,
                          last_page=last, section_titles=["2 Methods"], seed=seed)


def test_retries_reask_timeout_failures_and_accounting(server, pool):
    async def run():
        teacher = make_teacher(server)
        out = {}
        server.script.extend([("status", 429, {"Retry-After": "0"}), ("status", 500), "valid"])
        out["retried"] = await teacher.generate(request_for(pool))
        out["after_retry"] = (teacher.usage.requests, teacher.usage.retries, dict(teacher.usage.errors))
        server.script.extend(["invalid", "valid"])
        out["reasked"] = await teacher.generate(request_for(pool, seed=2))
        out["reask_request"] = server.requests[-1]["body"]["messages"]
        server.script.extend([("sleep", 1.5), "valid"])
        out["timed_out"] = await teacher.generate(request_for(pool, seed=3))
        server.script.extend(["invalid", "invalid"])
        out["invalid"] = await teacher.generate(request_for(pool, seed=4))
        server.script.append(("status", 400))
        out["bad_request"] = await teacher.generate(request_for(pool, seed=5))
        server.script.extend([("status", 503)] * 4)
        out["unavailable"] = await teacher.generate(request_for(pool, seed=6))
        out["usage"] = teacher.usage.to_dict()
        server.script.append(("status", 401))
        with pytest.raises(TeacherFatalError, match="HTTP 401"):
            await teacher.generate(request_for(pool, seed=7))
        await teacher.aclose()
        return out

    out = asyncio.run(run())
    assert out["retried"].pair is not None and out["retried"].pair.evidence_pages == [3]
    assert out["after_retry"] == (3, 2, {"http_429": 1, "http_500": 1})
    assert out["reasked"].pair is not None
    roles = [m["role"] for m in out["reask_request"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert "could not be used" in out["reask_request"][3]["content"]
    assert out["timed_out"].pair is not None
    assert out["invalid"].pair is None and out["invalid"].drop_reason == "invalid_json"
    assert out["bad_request"].drop_reason == "teacher_rejected_request"
    assert out["unavailable"].drop_reason == "teacher_unavailable"
    assert "http_503 after 4 tries" in out["unavailable"].detail
    usage = out["usage"]
    # replies: 1 (retried) + 2 (invalid, valid) + 1 (after timeout) + 2 (invalid twice) = 6
    assert usage["replies"] == 6 and usage["reasks"] == 2
    assert usage["requests"] == 3 + 2 + 2 + 2 + 1 + 4
    assert usage["errors"] == {"http_429": 1, "http_500": 1, "timeout": 1, "http_400": 1, "http_503": 4}
    assert usage["prompt_tokens"] == 6 * PROMPT_TOKENS and usage["completion_tokens"] == 6 * COMPLETION_TOKENS
    assert usage["cost_usd"] == pytest.approx(6 * (PROMPT_TOKENS * 2.0 + COMPLETION_TOKENS * 8.0) / 1e6)
    # the request itself: the segment's pages as images, each after its label, and the key in the header only
    body = server.requests[0]["body"]
    assert server.requests[0]["auth"] == f"Bearer {SECRET}" and server.requests[0]["path"] == "/v1/chat/completions"
    assert segment_pages(body) == list(range(2, 10))
    urls = [i["image_url"]["url"] for i in body["messages"][1]["content"] if i["type"] == "image_url"]
    (record,) = list(read_manifest(pool))
    for page, url in zip(range(2, 10), urls):
        with open(os.path.join(pool, record.pages[page - 1].image), "rb") as f:
            assert base64.b64decode(url.split(",", 1)[1]) == f.read()
    system = body["messages"][0]["content"]
    for needle in ("Page 14", "evidence_pages", "String", "Integer", "Float", "List", "Text", "Layout", "Figure",
                   "Table", "across the document"):
        assert needle in system


def test_response_cache(server, pool, tmp_path):
    async def run():
        cache = str(tmp_path / "cache")
        first = make_teacher(server, cache_dir=cache)
        a = await first.generate(request_for(pool))
        b = await first.generate(request_for(pool))  # same request: served from the cache
        second = make_teacher(server, cache_dir=cache)  # a new process, same cache
        c = await second.generate(request_for(pool))
        hot = make_teacher(server, cache_dir=cache, temperature=0.1)  # another request body: another key
        d = await hot.generate(request_for(pool))
        for t in (first, second, hot):
            await t.aclose()
        return a, b, c, d, first.usage, second.usage, hot.usage

    a, b, c, d, u1, u2, u3 = asyncio.run(run())
    assert a.pair == b.pair == c.pair and not a.cached and b.cached and c.cached
    assert (u1.requests, u1.cache_hits, u2.requests, u2.cache_hits, u3.requests) == (1, 1, 0, 1, 1)
    assert u2.prompt_tokens == 0 and u2.cost_usd == 0.0  # cached replies cost nothing
    assert len(server.requests) == 2
    files = glob.glob(str(tmp_path / "cache" / "*" / "*.json"))
    assert len(files) == 2
    for path in files:
        assert SECRET not in open(path).read()


def run_synth(pool, out, teacher, counter, n, **kw):
    cfg = SynthesisConfig(pool=pool, task="extract-single", output=out, num_samples=n, seed=0, min_pages=1,
                          progress=False, **kw)

    async def go():
        try:
            return await Synthesizer(cfg, teacher, counter).run()
        finally:
            await teacher.aclose()

    return asyncio.run(go())


def test_pipeline_rejects_bad_pairs_and_writes_samples(server, pool, counter, tmp_path):
    out = str(tmp_path / "s.jsonl")
    server.script.extend(["out_of_range", "no_anchor", "valid", ("status", 429, {"Retry-After": "0"}), "valid"])
    report = run_synth(pool, out, make_teacher(server), counter, 2, concurrency=1)
    samples = [s for _, s in read_samples(out)]
    assert len(samples) == 2 and all(not isinstance(s, Exception) for s in samples)
    dropped = [json.loads(line) for line in open(sidecar(out, "dropped.jsonl"))]
    assert [d["reason"] for d in dropped] == ["evidence_outside_segment", "no_segment_anchor"]
    assert report["counts"]["dropped_by_reason"] == {"evidence_outside_segment": 1, "no_segment_anchor": 1}
    usage = report["runs"][-1]["teacher_usage"]
    assert usage["requests"] == 5 and usage["retries"] == 1 and usage["replies"] == 4
    cost = 4 * (PROMPT_TOKENS * 2 + COMPLETION_TOKENS * 8) / 1e6
    assert report["teacher_usage_total"]["cost_usd"] == pytest.approx(cost)
    (record,) = list(read_manifest(pool))
    for sample in samples:
        m = sample.meta
        assert m["teacher"] == {"kind": "openai", "model": "fake-vlm"} and m["prompt_version"]
        assert len(sample.images) == record.num_pages
        assert m["segment"]["first_page"] <= m["evidence_pages"][0] <= m["segment"]["last_page"]
        assert 8 <= m["segment"]["last_page"] - m["segment"]["first_page"] + 1 <= 15
        assert sample.messages[1]["content"] == "Quality"


def test_resume_after_interruption(server, pool, counter, tmp_path):
    out = str(tmp_path / "r.jsonl")
    cache = str(tmp_path / "cache")
    server.script.extend(["valid", "valid", ("status", 401)])
    with pytest.raises(TeacherFatalError):
        run_synth(pool, out, make_teacher(server, cache_dir=cache), counter, 5, concurrency=1)
    report = json.load(open(sidecar(out, "report.json")))
    assert report["status"].startswith("aborted") and report["counts"]["accepted"] == 2
    before = open(out).read()
    with open(out, "a") as f:
        f.write('{"id": "half a line')
    seen = len(server.requests)
    report = run_synth(pool, out, make_teacher(server, cache_dir=cache), counter, 5, concurrency=1)
    assert report["status"] == "complete"
    assert open(out).read().startswith(before)
    samples = [s for _, s in read_samples(out)]
    assert len(samples) == 5 and len({s.id for s in samples}) == 5
    assert len({s.meta["question"] for s in samples}) == 5
    assert len(server.requests) - seen == 3  # only the unfinished jobs were asked again
    assert [r["status"].split(":")[0] for r in report["runs"]] == ["aborted", "complete"]


def test_concurrency_is_bounded(server, pool, counter, tmp_path):
    server.delay = 0.3
    out = str(tmp_path / "c.jsonl")
    report = run_synth(pool, out, make_teacher(server, concurrency=2, timeout_s=5), counter, 5, concurrency=8)
    assert report["counts"]["accepted"] == 5
    assert server.max_inflight == 2


def test_api_key_never_logged_or_written(server, pool, tmp_path, caplog, capsys):
    spec = importlib.util.spec_from_file_location("synthesize_vqa_cli", os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools", "synthesize_vqa.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    caplog.set_level(logging.DEBUG)  # every library's debug log, openai's and the HTTP client's included
    server.script.extend(["echo_key_500", ("status", 500), "invalid", "valid"])
    out = str(tmp_path / "k" / "out.jsonl")
    code = cli.main(["--pool", pool, "--task", "extract-single", "--output", out, "--num-samples", "2",
                     "--teacher", "openai", "--base-url", server.url, "--model", "fake-vlm", "--api-key-env", KEY_ENV,
                     "--concurrency", "1", "--max-retries", "0", "--backoff", "0.01", "--timeout", "5",
                     "--min-pages", "1", "--no-progress", "--verbose", "--price-input", "1", "--price-output", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "samples: 2 of 2 requested" in captured.out and "teacher:" in captured.out
    assert all(r["auth"] == f"Bearer {SECRET}" for r in server.requests)
    assert any(r.name.startswith("openai") for r in caplog.records)  # the client's debug log was captured
    assert any("retry" in r.getMessage() or "re-asking" in r.getMessage() for r in caplog.records)
    assert SECRET not in caplog.text and SECRET not in captured.out and SECRET not in captured.err
    files = [p for p in glob.glob(str(tmp_path / "k" / "**" / "*"), recursive=True) if os.path.isfile(p)]
    assert len(files) >= 5  # samples, dropped, report, settings, cache entries
    for path in files:
        assert SECRET not in open(path, encoding="utf-8").read(), path
    dropped = [json.loads(line) for line in open(sidecar(out, "dropped.jsonl"))]
    assert dropped[0]["reason"] == "teacher_unavailable" and "[redacted]" in dropped[0]["detail"]


def test_prompt_and_reply_parsing():
    import random

    from megatron_vlm.synthesis.prompts import (
        TASK_PROMPTS,
        ReplyFormatError,
        build_messages,
        choose_exemplars,
        parse_reply,
        system_prompt,
    )

    for task, spec in TASK_PROMPTS.items():
        text = system_prompt(task)
        assert spec.definition in text and spec.restriction in text
    exemplars = choose_exemplars("reasoning", 2, random.Random(0))
    assert [e.task for e in exemplars] == ["reasoning", "reasoning"]
    messages = build_messages("reasoning", 5, 7, ["3 Results"], ["u5", "u6", "u7"], exemplars)
    user = messages[1]["content"]
    assert "<example 1>" in user[0]["text"] and "Pages 5 to 7" in user[1]["text"] and "3 Results" in user[1]["text"]
    shown = [i.get("text") or i["image_url"]["url"] for i in user[2:]]
    assert shown == ["Page 5:", "u5", "Page 6:", "u6", "Page 7:", "u7"]

    reply = parse_reply('[Evidence Description]: Table on Page 6 (Table).\n[JSON]:\n```json\n{"question": "On Page 6, '
                        'what is the total?", "answer": "12.5", "answer_format": "float", "evidence_pages": ["Page 6"],'
                        ' "evidence_sources": ["Table"]}\n```')
    assert (reply.answer_format, reply.evidence_pages, reply.answer) == ("Float", [6], "12.5")
    assert reply.evidence_description.startswith("Table on Page 6")
    for bad, why in [("", "empty"), ("no json here", "no JSON"), ('[JSON]: {"question": "q"}', "lacks"),
                     ('[JSON]: {"question": "q", "answer": "a", "answer_format": "Number", "evidence_pages": [1]}',
                      "answer_format"),
                     ('[JSON]: {"question": "q", "answer": "a", "answer_format": "String", "evidence_pages": ["x"]}',
                      "page numbers")]:
        with pytest.raises(ReplyFormatError, match=why):
            parse_reply(bad)
