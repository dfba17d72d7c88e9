"""Every tool stops cleanly on Ctrl-C (SIGINT to the process group, as a terminal sends it) and on
SIGTERM: non-zero exit (130 / 143), ONE "stopped: ..." line saying what was kept, no traceback from
the tool or its worker processes; a rerun of the same command resumes and completes.

The tools run as subprocesses on small real inputs. ``MVLM_TEST_SLOW_STEP`` (megatron_vlm/cli.py)
makes them sleep after each unit of work so the signal lands while they are working."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

if importlib.util.find_spec("pymupdf") is None:
    pytest.skip("needs PyMuPDF", allow_module_level=True)

from megatron_vlm.pool import synthetic_pdfs as S  # noqa: E402
from tests.unit.data_helpers import make_documents, make_small_tokenizer_dir, write_jsonl  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(REPO, "tools")


def _start(args: list[str], slow: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MVLM_DEBUG": ""}
    env.pop("MVLM_TEST_SLOW_STEP", None)
    if slow:
        env["MVLM_TEST_SLOW_STEP"] = str(slow)
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO, start_new_session=True)


def _wait_until(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"finished before it could be stopped: {proc.communicate()}"
        if ready():
            return
        time.sleep(0.05)
    raise AssertionError("the tool never got to work")


def _stop(proc: subprocess.Popen, sig: int, group: bool = True, limit: float = 20.0) -> tuple[str, float]:
    """Send ``sig`` (to the whole group: Ctrl-C reaches the workers too); returns (output, seconds)."""
    start = time.monotonic()
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=limit)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - start
    text = out + err
    code = 128 + sig
    assert proc.returncode == code, (proc.returncode, text)
    assert "Traceback" not in text, text
    stops = [line for line in text.splitlines() if line.startswith("stopped")]
    assert len(stops) == 1, text
    print(f"{os.path.basename(proc.args[1])}: {signal.Signals(sig).name} -> exit {code} in {seconds:.2f} s: "
          f"{stops[0]}")
    return stops[0], seconds


def _lines(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.endswith(b"\n"))


@pytest.fixture(scope="module")
def pdfs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pdfs")
    spec = [S.SectionSpec("One", 2, table=True), S.SectionSpec("Two", 2)]
    for k in range(4):
        S.write_report_pdf(str(folder / f"doc{k}.pdf"), S.ReportSpec(sections=spec, seed=40 + k))
    return str(folder)


@pytest.fixture(scope="module")
def pool(pdfs, tmp_path_factory):
    """Ctrl-C while building a pool (one worker process), then the rerun finishes it."""
    out = str(tmp_path_factory.mktemp("pool") / "pool")
    cmd = [os.path.join(TOOLS, "build_doc_pool.py"), "--input", pdfs, "--output", out, "--workers", "1",
           "--min-pages", "1", "--no-progress"]
    proc = _start(cmd, slow=1.0)
    manifest = os.path.join(out, "shards", "manifest-0-of-1.jsonl")
    _wait_until(proc, lambda: _lines(manifest) >= 1)
    line, _ = _stop(proc, signal.SIGINT)
    assert "of 4 documents" in line and "rerun the same command" in line
    rerun = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert rerun.returncode == 0, rerun.stderr
    assert "already done" in rerun.stderr and os.path.exists(os.path.join(out, "manifest.jsonl"))
    return out


def test_build_doc_pool_sigint_then_resume(pool):
    assert _lines(os.path.join(pool, "manifest.jsonl")) == 4


def test_synthesize_sigterm_writes_report_then_resume(pool, tmp_path):
    out = str(tmp_path / "syn.jsonl")
    cmd = [os.path.join(TOOLS, "synthesize_vqa.py"), "--pool", pool, "--task", "reasoning", "--output", out,
           "--num-samples", "4", "--min-pages", "1", "--concurrency", "1", "--no-progress"]
    proc = _start(cmd, slow=1.0)
    _wait_until(proc, lambda: _lines(out) >= 1)
    line, _ = _stop(proc, signal.SIGTERM, group=False)
    assert "of 4 samples written" in line
    with open(out.replace(".jsonl", ".report.json")) as f:
        assert json.load(f)["status"].startswith("interrupted")
    rerun = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert rerun.returncode == 0, rerun.stderr
    assert _lines(out) == 4 and "samples: 4 of 4" in rerun.stdout


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    records = make_documents(str(folder / "pool"), 12, pages=[1, 2])
    path = write_jsonl(str(folder / "mix_in.jsonl"), records)
    return str(folder), path, make_small_tokenizer_dir(str(folder / "tok"))


def test_mix_sigint_then_rerun(samples):
    folder, path, tok = samples
    out = os.path.join(folder, "mixed", "mix.jsonl")
    cmd = [os.path.join(TOOLS, "mix_data.py"), "--input", path, "--output", out, "--task-mix", "none",
           "--tokenizer", tok, "--no-progress"]
    proc = _start(cmd, slow=0.5)
    time.sleep(2.0)  # imports, then counting lines (0.5 s each)
    line, _ = _stop(proc, signal.SIGINT)
    assert "nothing written" in line and not os.path.exists(out)
    rerun = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert rerun.returncode == 0, rerun.stderr
    assert _lines(out) == 12


def test_preprocess_sigint_with_workers_then_resume(samples):
    folder, path, tok = samples
    prefix = os.path.join(folder, "pre", "ds")
    cmd = [os.path.join(TOOLS, "preprocess_data.py"), "--input", path, "--output-prefix", prefix, "--tokenizer", tok,
           "--workers", "2", "--chunk-size", "2", "--max-seq-len", "4K", "--no-progress"]
    proc = _start(cmd, slow=0.4)
    parts = os.path.join(folder, "pre", "ds.parts")
    _wait_until(proc, lambda: os.path.isdir(parts) and any(n.endswith(".meta.json") for n in os.listdir(parts)))
    line, _ = _stop(proc, signal.SIGINT)
    assert "finished chunk(s)" in line
    rerun = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout
    assert os.path.isfile(prefix + ".meta.json")


class _SlowJudge:
    """An OpenAI-compatible judge that answers after 30 s: calls are in flight when Ctrl-C comes."""

    def __init__(self):
        self.requests = 0

        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send({"data": [{"id": "judge"}]})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                judge.requests += 1
                time.sleep(30)
                self._send({"choices": [{"message": {"content": '{"score": 1}'}}]})

            def _send(self, body):
                data = json.dumps(body).encode()
                try:
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_evaluate_score_ctrl_c_is_prompt_with_requests_in_flight(tmp_path):
    predictions = tmp_path / "pred.jsonl"
    predictions.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": str(i), "answer_format": "Str",
                                               "prediction": f"p{i}"}) + "\n" for i in range(8)))
    judge = _SlowJudge()
    try:
        # options before the subcommand work too
        proc = _start([os.path.join(TOOLS, "evaluate.py"), "--judge", f"openai:{judge.url},model=judge",
                       "--judge-parallel", "4", "score", "--predictions", str(predictions), "--output",
                       str(tmp_path / "out"), "--no-progress"])
        _wait_until(proc, lambda: judge.requests >= 2, timeout=60)
        line, seconds = _stop(proc, signal.SIGINT, limit=15)
    finally:
        judge.close()
    assert "judged answers kept" in line
    assert seconds < 6, f"Ctrl-C took {seconds:.1f} s with judge calls in flight"
