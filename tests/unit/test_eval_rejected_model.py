"""An OpenAI-compatible server that rejects the model name or the key (401/403/404) stops
``tools/evaluate.py`` with one ``error:`` line and a non-zero exit, instead of scoring every answer
0.00 and exiting 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from megatron_vlm.eval.backends import BackendError, OpenAIClient, RequestRejected
from tests.conftest import REPO
from tests.unit.test_eval_endpoint import FakeOpenAI

CLI = os.path.join(REPO, "tools", "evaluate.py")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _no_such_model(body):
    return 404, {"message": f"The model `{body['model']}` does not exist.", "type": "NotFoundError",
                 "param": None, "code": 404}


def _mmlb(root) -> str:
    """The smallest MMLongBench-layout dataset: one two-page document, one question at 8K."""
    for p in (1, 2):
        path = root / "mmlb_image" / "documentQA" / "rep" / f"rep_page{p}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (280, 196), (40 * p, 90, 90)).save(path)
    data = root / "mmlb_data"
    data.mkdir()
    record = {"id": "mmlongdoc_0", "doc_name": "rep.pdf", "question": "Which year?", "answer": "2019",
              "answer_format": "Int", "ans_page_list": [0],
              "page_list": [f"documentQA/rep/rep_page{p}.png" for p in (1, 2)]}
    (data / "mmlongdoc_K8.jsonl").write_text(json.dumps(record) + "\n")
    return f"mmlb:{data},images={root / 'mmlb_image'}"


@pytest.mark.parametrize("status", [401, 403, 404])
def test_client_raises_request_rejected_without_retrying(status):
    with FakeOpenAI(lambda body: (status, {"message": "nope"})) as server:
        client = OpenAIClient(server.url, model="x", timeout=10, retries=3)
        with pytest.raises(RequestRejected) as info:
            client.chat([{"role": "user", "content": "hi"}])
    assert isinstance(info.value, BackendError)
    message = str(info.value)
    assert "\n" not in message and f"HTTP {status}" in message and "'x'" in message and "nope" in message
    assert len(server.requests) == 1  # not retried


def test_evaluate_stops_on_a_rejected_model_name(tmp_path):
    data = _mmlb(tmp_path)
    out = tmp_path / "out"
    with FakeOpenAI(_no_such_model, max_requests=20) as server:
        run = subprocess.run([sys.executable, CLI, "--data", data, "--lengths", "8K", "--model",
                              f"served=openai:{server.url},model=x", "--output", str(out), "--no-progress",
                              "--parallel", "2", "--max-pixels", "12544", "--judge", "rules", "--prompt-format", "ours"],
                             capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert run.returncode != 0, run.stdout[-2000:] + run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr[-3000:]
    assert "The model `x` does not exist." in errors[0] and "HTTP 404" in errors[0] and "'x'" in errors[0]
    assert "Traceback" not in run.stderr
    assert "0.00" not in run.stdout and not (out / "report.json").exists()
    assert len(server.requests) == 1  # the first rejection stops the run
