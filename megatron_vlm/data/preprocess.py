"""Mixture JSONL -> indexed prefix: tokenize in worker processes, store, resume, shard, merge, pack.

The input lines are cut into fixed *chunks* (``chunk_size`` lines, counted over all input files in
order). Each chunk becomes a part prefix under ``PREFIX.parts/`` whose ``meta.json`` marks it
finished, so a killed run redoes at most one chunk per shard. ``--shard I/N`` takes a contiguous
range of chunks; when every chunk is done the parts are merged, in order, into ``PREFIX``. Because
chunking does not depend on the number of shards or workers, and the merge de-duplicates images by
content in order of first use, any split of the work gives the same files as one worker.

Workers (``common.workers.run_tasks``: separate processes with a time limit per sample) parse,
tokenize and hash the images of one line each; the main process writes results in input order.
Every line that does not make it is reported with its file:line and reason: bad JSON or record,
missing or unreadable image, image token count that disagrees with the file, no answer, longer
than ``max_seq_len`` (dropped, or truncated with ``overlong="truncate"``), worker crash or timeout.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_vlm.data.indexed import (IndexedWriter, SampleRecord, is_complete, merge_prefixes, read_meta,
                                       remove_prefix, summarize_report)
from megatron_vlm.cli import step as cli_step
from megatron_vlm.data.samples import Sample, SampleError, inside_root
from megatron_vlm.data.tokenization import SampleTokenizer, TokenizationError, sample_image_sizes, truncate
from megatron_vlm.common.storage import atomic_write_json
from megatron_vlm.common.inputs import sha256_file

OVERLONG_POLICIES = ("drop", "truncate")


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer_dir: Optional[str] = None
    max_seq_len: int = 131072
    overlong: str = "drop"  # or "truncate"
    workers: int = 1  # 0: in this process (no time limit)
    chunk_size: int = 1024  # lines per part: the unit of resume and of sharding
    verify_images: bool = False  # decode every image fully (slow), not just its header
    sample_timeout: float = 600.0
    keep_parts: bool = False
    progress: bool = True
    force: bool = False  # discard outputs (and parts) written with other settings instead of refusing
    # Folders that images of samples WITHOUT an image_root may come from, besides the input file's own
    # folder (against which their relative paths resolve). A sample with an image_root is confined to it.
    image_roots: list[str] = field(default_factory=list)

    def validate(self) -> "PreprocessConfig":
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {self.overlong!r}")
        if self.max_seq_len <= 0 or self.chunk_size <= 0:
            raise ValueError("max_seq_len and chunk_size must be positive")
        missing = [p for p in self.inputs if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"input file(s) not found: {missing}")
        absent = [p for p in self.image_roots if not os.path.isdir(p)]
        if absent:
            raise FileNotFoundError(f"--image-root folder(s) not found: {absent}")
        return self


@dataclass
class LineIndex:
    """Byte offset and 1-based line number of every non-empty input line, in order."""

    files: list[str]
    file_index: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)

    @classmethod
    def scan(cls, files: list[str]) -> "LineIndex":
        index = cls(list(files))
        for f_i, path in enumerate(files):
            offset = 0
            with open(path, "rb") as f:
                for number, raw in enumerate(f, 1):
                    if raw.strip():
                        index.file_index.append(f_i)
                        index.offsets.append(offset)
                        index.line_numbers.append(number)
                    offset += len(raw)
        return index

    def __len__(self) -> int:
        return len(self.offsets)

    def num_chunks(self, chunk_size: int) -> int:
        return max(1, -(-len(self) // chunk_size))


def shard_chunks(num_chunks: int, shard: int, num_shards: int) -> range:
    """The contiguous chunks of shard ``shard`` of ``num_shards``."""
    return range(shard * num_chunks // num_shards, (shard + 1) * num_chunks // num_shards)


# ---------------------------------------------------------------------------- fingerprint


def run_fingerprint(config: PreprocessConfig, tokenizer: SampleTokenizer) -> dict:
    """What a resumed or merged run must agree on (inputs by size and mtime, tokenizer by hash)."""
    tok_dir = tokenizer.tokenizer_dir
    tok_json = os.path.join(tok_dir, "tokenizer.json") if tok_dir else None
    return {
        "inputs": [{"name": os.path.basename(p), "bytes": os.path.getsize(p)} for p in config.inputs],
        "input_mtimes": [os.stat(p).st_mtime_ns for p in config.inputs],
        "tokenizer_json_sha256": sha256_file(tok_json) if tok_json and os.path.isfile(tok_json) else "built-in",
        "chat_template_sha256": hashlib.sha256(tokenizer.template.encode()).hexdigest(),
        "chat_template_source": tokenizer.template_source,
        "max_seq_len": config.max_seq_len, "overlong": config.overlong, "chunk_size": config.chunk_size,
        "verify_images": config.verify_images,
        "image_roots": sorted(os.path.realpath(r) for r in config.image_roots),
    }


# ---------------------------------------------------------------------------- worker side
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_dir: Optional[str], files: list[str], settings: dict) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER.update(tokenizer=SampleTokenizer(tokenizer_dir), files=files, settings=settings)


def _dropped(line: int, reason: str, detail: str, sample_id: Optional[str] = None) -> dict:
    return {"status": "dropped", "line": line, "reason": reason, "detail": detail, "id": sample_id}


def confine_rootless_images(sample: Sample, where: str, source: Optional[str], roots: list[str]) -> Sample:
    """A sample without an ``image_root`` reads its images from the input file's folder (relative paths
    resolve there) or a declared ``--image-root``; any other path is refused before it is opened, so a
    mixture line cannot make preprocessing read and store an arbitrary file."""
    if sample.image_root or not sample.images:
        return sample
    base = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
    allowed = [base] + list(roots)
    resolved = []
    for path in sample.images:
        full = path if os.path.isabs(path) else os.path.join(base, path)
        if not any(inside_root(root, full) for root in allowed):
            raise SampleError(f"{where}: image {path!r:.200} lies outside the input's folder {base} and every "
                              "--image-root (after resolving '..' and links); not read. Give the sample an "
                              "image_root or pass --image-root FOLDER", "image_outside_root")
        resolved.append(full)
    sample.images = resolved
    return sample


def process_record(raw: bytes, where: str, line: int, tokenizer: SampleTokenizer, settings: dict,
                   source: Optional[str] = None) -> dict:
    """One input line -> a result dict (``status`` ok or dropped). Never raises for bad input.
    ``source`` is the input file (rootless samples' images are confined to its folder)."""
    try:
        record = json.loads(raw)
    except ValueError as err:
        return _dropped(line, "bad_json", f"{where}: not valid JSON ({err})")
    try:
        sample = confine_rootless_images(Sample.from_dict(record, where), where, source,
                                         settings.get("image_roots", []))
    except SampleError as err:
        sample_id = record.get("id") if isinstance(record, dict) else None
        return _dropped(line, err.reason, str(err), sample_id if isinstance(sample_id, str) else None)
    try:
        sizes = sample_image_sizes(sample, where)
        if settings["verify_images"]:
            _decode_fully(sample, where)
        tokenized = tokenizer.tokenize(sample, sizes, where)
    except TokenizationError as err:
        return _dropped(line, err.reason, str(err), sample.id)
    except SampleError as err:
        return _dropped(line, err.reason, str(err), sample.id)
    original = tokenized.num_tokens
    max_len = settings["max_seq_len"]
    if original > max_len:
        if settings["overlong"] == "drop":
            return _dropped(line, "too_long", f"{where}: {original} tokens > max_seq_len {max_len} "
                            "(--overlong truncate keeps the first max_seq_len tokens)", sample.id)
        tokenized = truncate(tokenized, max_len)
        if tokenized is None:
            return _dropped(line, "no_answer_after_truncation", f"{where}: {original} tokens > max_seq_len "
                            f"{max_len} and the answer lies beyond the cut", sample.id)
    paths = sample.image_paths()[:len(tokenized.image_grids)]
    shas = []
    for path in paths:
        with open(path, "rb") as f:
            shas.append(hashlib.sha256(f.read()).digest())
    info = [(t, h, w, size[0], size[1]) for (t, h, w), size in zip(tokenized.image_grids, tokenized.image_sizes)]
    return {"status": "ok", "line": line, "id": sample.id, "task": sample.task, "input_ids": tokenized.input_ids,
            "loss_mask": tokenized.loss_mask, "paths": paths, "shas": shas, "info": info,
            "truncated": tokenized.truncated, "original_tokens": original,
            "dropped_images": tokenized.dropped_images}


def _decode_fully(sample: Sample, where: str) -> None:
    from PIL import Image

    for path in sample.image_paths():
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as err:
            raise TokenizationError(f"{where}: image {path} does not decode ({type(err).__name__}: {err})",
                                    "bad_image") from None


def _process_line(payload: tuple[int, int, int]) -> dict:
    file_index, offset, line = payload
    path = _WORKER["files"][file_index]
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.readline()
    return process_record(raw, f"{path}:{line}", line, _WORKER["tokenizer"], _WORKER["settings"], source=path)


# ---------------------------------------------------------------------------- main side
def parts_dir(prefix: str) -> str:
    return prefix + ".parts"


def part_prefix(prefix: str, chunk: int) -> str:
    return os.path.join(parts_dir(prefix), f"part-{chunk:06d}")


def _check_fingerprint(prefix: str, fingerprint: dict, force: bool = False) -> None:
    from megatron_vlm.cli import settings_diff

    path = os.path.join(parts_dir(prefix), "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != fingerprint and force:
            shutil.rmtree(parts_dir(prefix))
        elif saved != fingerprint:
            raise RuntimeError(f"{parts_dir(prefix)} was started with other settings or inputs "
                               f"({settings_diff(saved, fingerprint)}); use the same settings, another "
                               "--output-prefix, or --force to discard it")
    if not os.path.isfile(path):
        os.makedirs(parts_dir(prefix), exist_ok=True)
        atomic_write_json(path, fingerprint)


class _PartWriter:
    """Writes one chunk's results, in line order, into its part prefix."""

    def __init__(self, prefix: str, chunk: int, files: list[str]):
        self.prefix, self.chunk, self.files = prefix, chunk, files
        self.writer = IndexedWriter(part_prefix(prefix, chunk))
        self.report: dict[str, list] = {"dropped": [], "truncated": []}

    def add(self, file_index: int, line: int, outcome_status: str, result: Any, detail: str) -> None:
        source = f"{self.files[file_index]}:{line}"
        if outcome_status != "ok":  # the worker crashed, timed out or raised
            reason = {"timeout": "worker_timeout", "crash": "worker_crash"}.get(outcome_status, "error")
            self.report["dropped"].append({"source": source, "id": None, "reason": reason, "detail": detail})
            return
        if result["status"] != "ok":
            self.report["dropped"].append({"source": source, "id": result["id"], "reason": result["reason"],
                                           "detail": result["detail"]})
            return
        images = [self.writer.add_image_file(p, info, sha)
                  for p, sha, info in zip(result["paths"], result["shas"], result["info"])]
        record = SampleRecord(result["id"], result["task"], source, int(len(result["input_ids"])),
                              int(result["loss_mask"].sum()), len(images), result["truncated"])
        self.writer.add_sample(result["input_ids"], result["loss_mask"], images, record)
        if result["truncated"]:
            self.report["truncated"].append({"source": source, "id": result["id"],
                                             "tokens_before": result["original_tokens"],
                                             "tokens_after": int(len(result["input_ids"])),
                                             "images_dropped": result["dropped_images"]})

    def finish(self, fingerprint: dict) -> dict:
        return self.writer.finalize({"config": fingerprint, "part": self.chunk,
                                     **summarize_report(self.report)}, self.report)


def run_shard(config: PreprocessConfig, shard: int = 0, num_shards: int = 1,
              tokenizer: Optional[SampleTokenizer] = None, log=print) -> dict:
    """Process this shard's unfinished chunks. Returns counts and throughput of this call."""
    from megatron_vlm.common.workers import run_tasks

    config.validate()
    tokenizer = tokenizer or SampleTokenizer(config.tokenizer_dir)
    fingerprint = run_fingerprint(config, tokenizer)
    _check_fingerprint(config.output_prefix, fingerprint, config.force)
    lines = LineIndex.scan(config.inputs)
    num_chunks = lines.num_chunks(config.chunk_size)
    chunks = [c for c in shard_chunks(num_chunks, shard, num_shards)
              if not is_complete(part_prefix(config.output_prefix, c))]
    todo = [(c, i) for c in chunks for i in range(c * config.chunk_size, min((c + 1) * config.chunk_size, len(lines)))]
    settings = {"max_seq_len": config.max_seq_len, "overlong": config.overlong,
                "verify_images": config.verify_images, "image_roots": list(config.image_roots)}
    log(f"shard {shard}/{num_shards}: {len(lines)} lines in {num_chunks} chunks; {len(chunks)} chunks "
        f"({len(todo)} lines) to do")
    progress = _progress(len(todo), config.progress)
    start = time.perf_counter()
    done_samples = done_tokens = 0
    pending: dict[int, tuple] = {}  # position in todo -> outcome, until every earlier one is written
    next_position = 0
    writer: Optional[_PartWriter] = None
    payload = lambda task: (lines.file_index[task[1]], lines.offsets[task[1]], lines.line_numbers[task[1]])
    if not todo:
        outcomes = iter(())
    elif config.workers > 0:
        outcomes = run_tasks(list(enumerate(todo)), _process_line, config.workers, config.sample_timeout,
                             payload=lambda item: payload(item[1]), initializer=_init_worker,
                             initargs=(config.tokenizer_dir, lines.files, settings))
    else:  # in this process, with the tokenizer already loaded (debugging, tests)
        _WORKER.update(tokenizer=tokenizer, files=lines.files, settings=settings)
        outcomes = ((item, _run_inline(item, payload)) for item in enumerate(todo))
    first_result = None
    for (position, (chunk, i)), outcome in outcomes:
        cli_step()  # tests only: MVLM_TEST_SLOW_STEP
        if first_result is None:
            first_result = time.perf_counter()  # workers are up: what follows is the steady rate
        pending[position] = (chunk, i, outcome)
        while next_position in pending:
            chunk, i, outcome = pending.pop(next_position)
            if writer is None or writer.chunk != chunk:
                writer = _PartWriter(config.output_prefix, chunk, lines.files)
            writer.add(lines.file_index[i], lines.line_numbers[i], outcome.status, outcome.value, outcome.detail)
            if outcome.status == "ok" and outcome.value["status"] == "ok":
                done_samples += 1
                done_tokens += len(outcome.value["input_ids"])
            next_position += 1
            last_of_chunk = next_position == len(todo) or todo[next_position][0] != chunk
            if last_of_chunk:
                writer.finish(fingerprint)
                writer = None
            progress.update(1)
    for chunk in chunks:  # chunks without any non-empty line
        if not is_complete(part_prefix(config.output_prefix, chunk)):
            _PartWriter(config.output_prefix, chunk, lines.files).finish(fingerprint)
    progress.close()
    seconds = time.perf_counter() - start
    steady = time.perf_counter() - first_result if first_result is not None else 0.0
    stats = {"shard": shard, "num_shards": num_shards, "lines": len(todo), "samples": done_samples,
             "tokens": done_tokens, "seconds": seconds, "samples_per_s": done_samples / seconds if seconds else 0.0,
             "tokens_per_s": done_tokens / seconds if seconds else 0.0, "num_chunks": num_chunks,
             "startup_seconds": seconds - steady,
             "steady_samples_per_s": (done_samples - 1) / steady if steady > 0 and done_samples > 1 else 0.0,
             "steady_tokens_per_s": done_tokens * (done_samples - 1) / done_samples / steady
             if steady > 0 and done_samples > 1 else 0.0}
    log(f"shard {shard}/{num_shards}: wrote {done_samples} samples, {done_tokens} tokens in {seconds:.1f} s "
        f"({stats['samples_per_s']:.1f} samples/s, {stats['tokens_per_s']:.0f} tokens/s; after "
        f"{stats['startup_seconds']:.1f} s of worker start-up: {stats['steady_samples_per_s']:.1f} samples/s)")
    return stats


def _run_inline(item, payload):
    from megatron_vlm.common.workers import Outcome

    start = time.monotonic()
    try:
        outcome = Outcome("ok", _process_line(payload(item[1])))
    except Exception as exc:  # a bug, not bad input: report it for this line and go on
        outcome = Outcome("error", detail=f"{type(exc).__name__}: {exc}")
    outcome.seconds = time.monotonic() - start
    return outcome


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="preprocess", disable=not enabled, mininterval=2.0)


def merge_parts(config: PreprocessConfig, tokenizer: Optional[SampleTokenizer] = None, log=print) -> Optional[dict]:
    """Merge every part into the output prefix, once all exist; None if some are missing. Safe when
    several shards finish together (a file lock lets one merge)."""
    prefix = config.output_prefix
    tokenizer = tokenizer or SampleTokenizer(config.tokenizer_dir)
    fingerprint = run_fingerprint(config, tokenizer)
    if is_complete(prefix) and read_meta(prefix).get("config") == fingerprint:
        return read_meta(prefix)  # another shard merged already
    num_chunks = LineIndex.scan(config.inputs).num_chunks(config.chunk_size)
    parts = [part_prefix(prefix, c) for c in range(num_chunks)]
    missing = [c for c, p in enumerate(parts) if not is_complete(p)]
    if missing:
        log(f"{len(missing)} of {num_chunks} chunks are not finished yet (e.g. {missing[:5]}): not merging")
        return None
    os.makedirs(parts_dir(prefix), exist_ok=True)
    with open(os.path.join(parts_dir(prefix), "merge.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(prefix) and read_meta(prefix).get("config") == fingerprint:
            return read_meta(prefix)
        for p in parts:
            if read_meta(p).get("config") != fingerprint:
                raise RuntimeError(f"{p} was written with other settings; delete {parts_dir(prefix)} and rerun")
        meta = merge_prefixes(parts, prefix, {"config": fingerprint, "max_seq_len": config.max_seq_len})
    log(f"merged {num_chunks} parts into {prefix}: {meta['num_samples']} samples, {meta['num_tokens']} tokens, "
        f"{meta['num_images']} distinct images; dropped {meta['dropped']['total']} "
        f"{meta['dropped']['by_reason']}, truncated {meta['truncated']} (details: {prefix}.report.json)")
    if not config.keep_parts:
        shutil.rmtree(parts_dir(prefix), ignore_errors=True)
    return meta


def preprocess(config: PreprocessConfig, shard: int = 0, num_shards: int = 1, merge: bool = True,
               log=print, tokenizer: Optional[SampleTokenizer] = None) -> dict:
    """Run one shard; merge when every chunk is done (and ``merge``). Returns the shard stats, with
    the merged meta under ``"merged"`` when this call merged. ``tokenizer``: an already loaded
    ``SampleTokenizer`` of ``config.tokenizer_dir`` (workers load their own)."""
    tokenizer = tokenizer or SampleTokenizer(config.tokenizer_dir)
    if is_complete(config.output_prefix):
        meta = read_meta(config.output_prefix)
        wanted = run_fingerprint(config, tokenizer)
        if meta.get("config") == wanted:
            log(f"{config.output_prefix} is already complete ({meta['num_samples']} samples)")
            return {"samples": 0, "tokens": 0, "merged": meta}
        if not config.force:
            from megatron_vlm.cli import settings_diff

            raise RuntimeError(f"{config.output_prefix} exists from a run with other settings or inputs "
                               f"({settings_diff(meta.get('config') or {}, wanted)}); use the same settings, "
                               "another --output-prefix, or --force to replace it")
        remove_prefix(config.output_prefix)
    stats = run_shard(config, shard, num_shards, tokenizer, log)
    if merge:
        merged = merge_parts(config, tokenizer, log)
        if merged is not None:
            stats["merged"] = merged
    return stats


__all__ = ["LineIndex", "OVERLONG_POLICIES", "PreprocessConfig", "merge_parts", "part_prefix", "parts_dir",
           "preprocess", "process_record", "remove_prefix", "run_shard", "shard_chunks"]

