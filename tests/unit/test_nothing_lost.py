"""Nothing lost, nothing run: a teacher outage is retried on rerun, one writer per output (a second
run is refused), sample images stay inside their image_root, records are validated by type before
any stage trusts them, empty results are failures, and synthesis decides up front which documents
can fit --max-seq-len."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

if importlib.util.find_spec("pymupdf") is None or importlib.util.find_spec("openai") is None:
    pytest.skip("needs PyMuPDF and openai", allow_module_level=True)

from megatron_vlm import cli  # noqa: E402
from megatron_vlm.data.samples import Sample, SampleError, read_samples  # noqa: E402
from megatron_vlm.pool import synthetic_pdfs as S  # noqa: E402
from megatron_vlm.synthesis.offline_teacher import OfflineTeacher  # noqa: E402
from megatron_vlm.pool.records import read_manifest  # noqa: E402
from megatron_vlm.synthesis.synthesize import SynthesisConfig, Synthesizer, TokenCounter, sidecar  # noqa: E402
from megatron_vlm.common.locks import lock_path_for, output_lock  # noqa: E402
from tests.unit.data_helpers import make_documents, make_image, make_small_tokenizer_dir, write_jsonl  # noqa: E402
from tests.unit.synthesis_fixtures import build_pool  # noqa: E402
from tests.unit.test_synthesis_openai import FakeChatServer, make_teacher  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(REPO, "tools")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli_nl", os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def server():
    srv = FakeChatServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Three reports of 4, 6 and 12 pages in one pool."""
    root = tmp_path_factory.mktemp("nl")
    pdfs = []
    for k, pages in enumerate((2, 3, 6)):
        spec = S.ReportSpec(seed=50 + k, title=f"Report {k}",
                            sections=[S.SectionSpec("Introduction", pages), S.SectionSpec("Results", pages)])
        pdfs.append(S.write_report_pdf(str(root / f"r{k}.pdf"), spec))
    return build_pool(pdfs, str(root / "pool"))


@pytest.fixture(scope="module")
def counter():
    return TokenCounter()


@pytest.fixture(scope="module")
def small_tok_dir(tmp_path_factory):
    return make_small_tokenizer_dir(str(tmp_path_factory.mktemp("tok") / "small"))


def _synth(pool, out, teacher, counter, n, **kw):
    cfg = SynthesisConfig(pool=pool, task="extract-single", output=out, num_samples=n, seed=0, min_pages=1,
                          progress=False, **kw)

    async def go():
        try:
            return await Synthesizer(cfg, teacher, counter).run()
        finally:
            await teacher.aclose()

    return asyncio.run(go())


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------ 1. a teacher outage is retried


def test_jobs_lost_to_a_503_outage_are_retried_on_rerun(server, pool, counter, tmp_path):
    out = str(tmp_path / "o.jsonl")
    server.script.extend([("status", 503)] * 2)
    report = _synth(pool, out, make_teacher(server, max_retries=0), counter, 2, max_jobs=2, concurrency=1)
    assert report["counts"]["accepted"] == 0 and report["status"] != "complete"
    drops = _lines(sidecar(out, "dropped.jsonl"))
    assert [d["reason"] for d in drops] == ["teacher_unavailable"] * 2 and all(d["transient"] for d in drops)
    assert report["counts"]["transient_failures"] == 2
    asked = len(server.requests)
    report = _synth(pool, out, make_teacher(server, max_retries=0), counter, 2, max_jobs=2, concurrency=1)
    assert len(server.requests) - asked == 2  # the server was asked again for both jobs
    assert report["status"] == "complete" and report["counts"]["accepted"] == 2
    assert sorted(s["meta"]["job"] for s in _lines(out)) == [0, 1]
    assert report["counts"]["dropped"] == 0 and report["counts"]["transient_failures"] == 0


def test_jobs_lost_to_a_server_that_is_down_are_retried_on_rerun(server, pool, counter, tmp_path):
    down = FakeChatServer()
    down.close()  # connection refused at this port from now on
    out = str(tmp_path / "d.jsonl")
    report = _synth(pool, out, make_teacher(down, max_retries=0), counter, 2, max_jobs=2, concurrency=1)
    assert report["counts"]["accepted"] == 0
    assert {d["reason"] for d in _lines(sidecar(out, "dropped.jsonl"))} == {"teacher_unavailable"}
    report = _synth(pool, out, make_teacher(server, max_retries=0), counter, 2, max_jobs=2, concurrency=1)
    assert len(server.requests) == 2 and report["counts"]["accepted"] == 2 and len(_lines(out)) == 2


def test_definitive_drops_are_kept_on_rerun(server, pool, counter, tmp_path):
    out = str(tmp_path / "k.jsonl")
    server.script.extend([("status", 400), "no_anchor"])
    report = _synth(pool, out, make_teacher(server, max_retries=0), counter, 2, max_jobs=2, concurrency=1)
    assert report["counts"]["dropped_by_reason"] == {"no_segment_anchor": 1, "teacher_rejected_request": 1}
    asked = len(server.requests)
    _synth(pool, out, make_teacher(server, max_retries=0), counter, 2, max_jobs=2, concurrency=1)
    assert len(server.requests) == asked  # nothing to retry


# ------------------------------------------------------------------ 2. one writer per output


def test_a_second_synthesis_on_the_same_output_is_refused(pool, tmp_path):
    out = str(tmp_path / "two.jsonl")
    cmd = [sys.executable, os.path.join(TOOLS, "synthesize_vqa.py"), "--pool", pool, "--task", "ocr-needle",
           "--output", out, "--num-samples", "5", "--min-pages", "1", "--concurrency", "1", "--no-progress"]
    env = {**os.environ, "MVLM_TEST_SLOW_STEP": "1.0", "MVLM_DEBUG": ""}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lock = lock_path_for(out)
    try:
        deadline = time.monotonic() + 60
        while not (os.path.exists(out) and os.path.getsize(out) > 0):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        env2 = {k: v for k, v in env.items() if k != "MVLM_TEST_SLOW_STEP"}
        start = time.monotonic()
        second = subprocess.run(cmd, capture_output=True, text=True, env=env2, cwd=REPO, timeout=120)
        refused_in = time.monotonic() - start
        assert first.poll() is None, "the first run finished before the second one started"
        out1, err1 = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode != 0
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), second.stderr
    assert lock in lines[0] and f"PID {first.pid}" in lines[0]
    assert refused_in < 30
    assert first.returncode == 0, err1
    assert len(_lines(out)) == 5 and "samples: 5 of 5" in out1


def test_mix_preprocess_and_pool_refuse_a_locked_output(tmp_path, small_tok_dir):
    folder = str(tmp_path / "data")
    mixture = write_jsonl(os.path.join(folder, "mix.jsonl"), make_documents(os.path.join(folder, "pool"), 4, [1, 2]))
    prefix = os.path.join(folder, "ds")
    cases = [
        ("mix_data", os.path.join(folder, "m.jsonl"),
         ["--input", mixture, "--output", os.path.join(folder, "m.jsonl"), "--task-mix", "none",
          "--tokenizer", small_tok_dir, "--no-progress"]),
        ("preprocess_data", prefix,
         ["--input", mixture, "--output-prefix", prefix, "--tokenizer", small_tok_dir, "--workers", "0",
          "--no-progress"]),
        ("build_doc_pool", os.path.join(folder, "pool_out"),
         ["--input", folder, "--output", os.path.join(folder, "pool_out"), "--workers", "1", "--no-progress"]),
    ]
    for name, output, argv in cases:
        lock = lock_path_for(output)
        with output_lock(lock, output):
            with pytest.raises(cli.UserError) as caught:
                _load(name).main(argv)
        message = str(caught.value)
        assert lock in message and f"PID {os.getpid()}" in message and "\n" not in message, (name, message)
    # shards of one array lock separately: shard 0/2 is not blocked by a run of shard 1/2
    assert lock_path_for(prefix, (0, 2)) != lock_path_for(prefix, (1, 2)) != lock_path_for(prefix)


def test_the_lock_is_released_when_its_process_dies(tmp_path):
    lock = str(tmp_path / "out.lock")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from megatron_vlm.common.locks import output_lock\n"
                               "with output_lock(sys.argv[2]):\n    print('held', flush=True); time.sleep(60)",
                               REPO, lock], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(cli.UserError, match=f"PID {holder.pid}"):
            with output_lock(lock):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(lock):  # killed (SIGKILL): the kernel let go of its lock
        pass


# ------------------------------------------------------------------ 3. images stay inside image_root


def _escaping_samples(tmp_path):
    root = tmp_path / "root"
    records = make_documents(str(root), 4, [1, 2])
    secret = make_image(str(tmp_path / "secret.png"), seed=5)
    escape = dict(records[0], id="dotdot", images=["../secret.png"])
    absolute = dict(records[0], id="absolute", images=[secret])
    os.symlink(secret, str(root / "link.png"))
    linked = dict(records[0], id="symlink", images=["link.png"])
    lines = records[:2] + [escape, absolute, linked] + records[2:]
    return write_jsonl(str(tmp_path / "in.jsonl"), lines), {"dotdot": 3, "absolute": 4, "symlink": 5}


def test_sample_images_must_stay_inside_image_root(tmp_path):
    good = {"id": "a", "task": "short", "image_root": str(tmp_path), "images": ["x/1.png", str(tmp_path / "2.png")],
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
                         {"role": "assistant", "content": "ok"}]}
    assert Sample.from_dict(good).image_paths() == [str(tmp_path / "x/1.png"), str(tmp_path / "2.png")]
    for images in (["../secret.png"], ["x/../../secret.png"], ["/etc/passwd"]):
        with pytest.raises(SampleError, match="outside its image_root") as caught:
            Sample.from_dict(dict(good, images=images + ["x/1.png"]), "f.jsonl:7")
        assert caught.value.reason == "image_outside_root" and "f.jsonl:7" in str(caught.value)


def test_preprocess_drops_images_outside_the_root_with_line_and_reason(tmp_path, small_tok_dir):
    from megatron_vlm.data.preprocess import PreprocessConfig, preprocess

    path, bad = _escaping_samples(tmp_path)
    prefix = str(tmp_path / "ds")
    config = PreprocessConfig(inputs=[path], output_prefix=prefix, tokenizer_dir=small_tok_dir, max_seq_len=4096,
                              workers=0, progress=False)
    meta = preprocess(config, log=lambda *a: None)["merged"]
    assert meta["num_samples"] == 4
    with open(prefix + ".report.json") as f:
        dropped = json.load(f)["dropped"]
    assert {d["source"]: d["reason"] for d in dropped} == {f"{path}:{n}": "image_outside_root" for n in bad.values()}


def test_preprocess_confines_samples_without_image_root(tmp_path, small_tok_dir):
    """A sample that names no image_root reads images only from its input file's folder (relative paths
    resolve there, not against the working directory) or a declared --image-root."""
    from megatron_vlm.data.preprocess import PreprocessConfig, preprocess

    data = tmp_path / "data"
    records = [dict(r) for r in make_documents(str(data), 3, [1])]
    for r in records:
        r.pop("image_root")
    elsewhere = make_image(str(tmp_path / "other" / "p.png"), seed=3)
    secret = make_image(str(tmp_path / "secret.png"), seed=5)
    lines = records + [dict(records[0], id="declared", images=[elsewhere]),
                       dict(records[0], id="absolute", images=[secret]),
                       dict(records[0], id="dotdot", images=["../secret.png"])]
    path = write_jsonl(str(data / "in.jsonl"), lines)

    def run(prefix, roots):
        config = PreprocessConfig(inputs=[path], output_prefix=str(tmp_path / prefix), tokenizer_dir=small_tok_dir,
                                  max_seq_len=4096, workers=0, progress=False, image_roots=roots)
        meta = preprocess(config, log=lambda *a: None)["merged"]
        with open(str(tmp_path / prefix) + ".report.json") as f:
            return meta, {d["source"]: d["reason"] for d in json.load(f)["dropped"]}

    meta, dropped = run("a", [])
    assert meta["num_samples"] == 3
    assert dropped == {f"{path}:{n}": "image_outside_root" for n in (4, 5, 6)}
    meta, dropped = run("b", [str(tmp_path / "other")])
    assert meta["num_samples"] == 4
    assert dropped == {f"{path}:{n}": "image_outside_root" for n in (5, 6)}


def test_mixing_drops_images_outside_the_root_with_line_and_reason(tmp_path, small_tok_dir):
    from megatron_vlm.data.tokenization import SampleTokenizer
    from megatron_vlm.mixing.mixer import InputSpec, MixConfig, mix

    path, bad = _escaping_samples(tmp_path)
    out = str(tmp_path / "mix.jsonl")
    mix(MixConfig(inputs=[InputSpec(path)], output=out, task_mix=None), tokenizer=SampleTokenizer(small_tok_dir),
        progress=False, log=lambda *a: None)
    with open(str(tmp_path / "mix.report.json")) as f:
        dropped = json.load(f)["dropped"]
    assert {d["source"]: d["reason"] for d in dropped} == {f"{path}:{n}": "image_outside_root" for n in bad.values()}
    assert len(_lines(out)) == 4


# ------------------------------------------------------------------ 4. records validated by type


def test_records_are_validated_by_type(tmp_path):
    good = {"id": "a", "task": "short", "images": ["1.png"], "image_tokens": [4],
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                         {"role": "assistant", "content": "ok"}], "meta": {}}
    Sample.from_dict(good)
    for change, what in [({"image_tokens": ["4"]}, "image_tokens"), ({"image_tokens": [4.0]}, "image_tokens"),
                         ({"image_tokens": [True]}, "image_tokens"), ({"image_tokens": [-1]}, "image_tokens"),
                         ({"id": 7}, "'id'"), ({"id": ""}, "'id'"), ({"image_root": 3}, "image_root"),
                         ({"meta": [1]}, "meta"), ({"task": ["short"]}, "task"), ({"images": [""]}, "images")]:
        with pytest.raises(SampleError, match=what):
            Sample.from_dict({**good, **change}, "f:3")


def test_mix_drops_a_record_with_string_image_tokens_and_mixes_the_rest(tmp_path, small_tok_dir):
    records = make_documents(str(tmp_path / "pool"), 6, [1, 2])
    records[2]["image_tokens"] = ["12"] * len(records[2]["images"])
    records[4]["id"] = 12345
    path = write_jsonl(str(tmp_path / "in.jsonl"), records)
    out = str(tmp_path / "m.jsonl")
    code = _load("mix_data").main(["--input", path, "--output", out, "--task-mix", "none",
                                   "--tokenizer", small_tok_dir, "--no-progress"])
    assert code == 0
    with open(str(tmp_path / "m.report.json")) as f:
        dropped = {d["source"]: d for d in json.load(f)["dropped"]}
    assert set(dropped) == {f"{path}:3", f"{path}:5"}
    assert "image_tokens" in dropped[f"{path}:3"]["detail"] and "'id'" in dropped[f"{path}:5"]["detail"]
    assert {r["id"] for r in _lines(out)} == {"s0", "s1", "s3", "s5"}


# ------------------------------------------------------------------ 5. empty results are failures


def _run_tool(name, *argv, timeout=300):
    env = {**os.environ, "MVLM_DEBUG": ""}
    env.pop("MVLM_TEST_SLOW_STEP", None)
    done = subprocess.run([sys.executable, os.path.join(TOOLS, f"{name}.py"), *argv], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    return done, errors


def test_a_pool_without_documents_is_a_failure(tmp_path):
    (tmp_path / "empty").mkdir()
    for source in (str(tmp_path / "empty"), str(tmp_path / "nowhere")):
        done, errors = _run_tool("build_doc_pool", "--input", source, "--output", str(tmp_path / "pool"),
                                 "--workers", "1", "--no-progress")
        assert done.returncode != 0 and len(errors) == 1 and f"no PDF found under {source}" in errors[0], done.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    S.write_not_a_pdf(str(broken / "a.pdf"))
    S.write_zero_page_pdf(str(broken / "b.pdf"))
    done, errors = _run_tool("build_doc_pool", "--input", str(broken), "--output", str(tmp_path / "pool2"),
                             "--workers", "1", "--no-progress")
    assert done.returncode != 0 and len(errors) == 1, done.stderr
    assert "every one of the 2 documents was rejected" in errors[0] and "report.json" in errors[0]


def test_synthesis_short_of_its_count_is_a_failure(pool, tmp_path, capsys):
    tool = _load("synthesize_vqa")
    out = str(tmp_path / "few.jsonl")
    code = tool.main(["--pool", pool, "--task", "ocr-full", "--output", out, "--num-samples", "5",
                      "--min-pages", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and len(_lines(out)) == 3
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "3 of 5 samples" in line and "exhausted" in line and sidecar(out, "report.json") in line
    code = tool.main(["--pool", pool, "--task", "ocr-full", "--output", str(tmp_path / "none.jsonl"),
                      "--num-samples", "2", "--no-progress"])  # the default 32-50 page window: no document
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert code != 0 and "0 of 2 samples" in line and "page window [32, 50]" in line


def test_mix_with_nothing_left_is_a_failure(tmp_path, small_tok_dir):
    folder = str(tmp_path)
    path = write_jsonl(os.path.join(folder, "in.jsonl"), make_documents(os.path.join(folder, "pool"), 4, [1, 2]))
    out = os.path.join(folder, "m.jsonl")
    base = ["--input", path, "--output", out, "--task-mix", "none", "--tokenizer", small_tok_dir, "--no-progress"]
    done, errors = _run_tool("mix_data", *base, "--max-seq-len", "16")
    assert done.returncode != 0 and len(errors) == 1, done.stderr
    assert "every sample was dropped (4 too_long over --max-seq-len 16)" in errors[0]
    assert os.path.join(folder, "m.report.json") in errors[0] and os.path.isfile(os.path.join(folder, "m.report.json"))
    done, errors = _run_tool("mix_data", *base, "--token-budget", "0", "--force")
    assert done.returncode != 0 and len(errors) == 1 and "empty" in errors[0], done.stderr


def test_preprocess_that_drops_everything_is_a_failure(tmp_path, small_tok_dir):
    folder = str(tmp_path)
    path = write_jsonl(os.path.join(folder, "in.jsonl"), make_documents(os.path.join(folder, "pool"), 4, [1, 2]))
    prefix = os.path.join(folder, "ds")
    done, errors = _run_tool("preprocess_data", "--input", path, "--output-prefix", prefix, "--tokenizer",
                             small_tok_dir, "--max-seq-len", "16", "--workers", "0", "--no-progress")
    assert done.returncode != 0 and len(errors) == 1, done.stderr + done.stdout
    assert "every sample was dropped (4 too_long over --max-seq-len 16)" in errors[0]
    assert prefix + ".report.json" in errors[0]
    empty = write_jsonl(os.path.join(folder, "empty.jsonl"), [])
    done, errors = _run_tool("preprocess_data", "--input", empty, "--output-prefix", prefix + "2", "--tokenizer",
                             small_tok_dir, "--workers", "0", "--no-progress")
    assert done.returncode != 0 and len(errors) == 1 and "no sample" in errors[0], done.stderr


# ------------------------------------------------------------------ 6. eligibility decided up front


def test_documents_that_cannot_fit_are_counted_before_any_job(pool, counter, tmp_path):
    records = sorted(read_manifest(pool), key=lambda r: r.num_pages)
    small, big = records[0], records[-1]
    limit = big.total_tokens + 2 * big.num_pages - 1  # the biggest document's pages alone do not fit
    teacher = OfflineTeacher()
    cfg = SynthesisConfig(pool=pool, task="extract-single", output=str(tmp_path / "e.jsonl"), num_samples=4,
                          min_pages=1, max_seq_tokens=limit, max_jobs=12, progress=False)
    report = asyncio.run(Synthesizer(cfg, teacher, counter).run())
    docs = report["documents"]
    assert docs["in_pool"] == 3 and docs["eligible"] == 2 and docs["filtered_by_length"] == {"too_long": 1}
    assert docs["max_seq_len"] == limit
    used = {s["meta"]["doc_id"] for s in _lines(str(tmp_path / "e.jsonl"))} | {d["doc_id"] for d in report["dropped"]}
    assert big.doc_id not in used and small.doc_id in used
    assert "too_long" not in report["counts"]["dropped_by_reason"]


def test_default_page_windows_follow_the_paper():
    """Table 10a: pool-native synthesis uses 32-50-page documents; the pool keeps 20-200 pages (§5.1),
    which holds that window and the long-biased 50-100 one."""
    from megatron_vlm.pool.build import PoolConfig

    synth = _load("synthesize_vqa").build_parser().parse_args(["--pool", "p", "--task", "ocr-full", "--output", "o",
                                                               "--num-samples", "1"])
    pool_args = _load("build_doc_pool").build_parser().parse_args(["--input", "x", "--output", "p"])
    assert (synth.min_pages, synth.max_pages) == (32, 50)
    assert (SynthesisConfig.min_pages, SynthesisConfig.max_pages) == (32, 50)
    assert (pool_args.min_pages, pool_args.max_pages) == (PoolConfig.min_pages, PoolConfig.max_pages) == (20, 200)
    assert pool_args.min_pages <= synth.min_pages <= synth.max_pages <= pool_args.max_pages
