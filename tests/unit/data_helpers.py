"""Small inputs for the data-pipeline tests: a tokenizer the tests build themselves, tiny page images,
and sample records in the shared JSONL format. Nothing here downloads anything."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image


def make_small_tokenizer_dir(path: str) -> str:
    """A byte-level tokenizer without merges (every byte one token) whose special tokens sit at
    Qwen2.5-VL's ids (151643...), so the pipeline and the tiny model accept its output. Loading it
    goes through ``load_tokenizer``, which adds the built-in Qwen2.5-VL chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from megatron_vlm.data.tokenizer import NUM_BASE_TOKENS, PLAIN_ADDED_TOKENS, SPECIAL_TOKENS

    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return path
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"<unused{i}>": i for i in range(len(alphabet), NUM_BASE_TOKENS)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    os.makedirs(path, exist_ok=True)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>"}, f)
    return path


def make_image(path: str, height: int = 56, width: int = 84, seed: int = 0, fmt: Optional[str] = None) -> str:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def sample_record(sample_id: str, images: Sequence[str], question: str = "What is on page 1?",
                  answer: str = "Forty-two.", task: str = "extract-single", image_root: Optional[str] = None,
                  image_tokens: Optional[Sequence[int]] = None, system: Optional[str] = None,
                  meta: Optional[dict] = None) -> dict:
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": [{"type": "image"} for _ in images]
                     + [{"type": "text", "text": question}]})
    messages.append({"role": "assistant", "content": answer})
    record = {"id": sample_id, "task": task, "images": list(images), "messages": messages, "meta": meta or {}}
    if image_root:
        record["image_root"] = image_root
    if image_tokens is not None:
        record["image_tokens"] = list(image_tokens)
    return record


def write_jsonl(path: str, records: Sequence, raw_lines: Sequence[tuple[int, str]] = ()) -> str:
    """Records as JSON lines; ``raw_lines`` (index, text) are inserted verbatim (broken lines)."""
    lines = [json.dumps(r) for r in records]
    for index, text in sorted(raw_lines):
        lines.insert(index, text)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def make_documents(folder: str, count: int, pages: Sequence[int], seed: int = 0,
                   sizes: Sequence[tuple[int, int]] = ((56, 84), (84, 56), (56, 56))) -> list[dict]:
    """``count`` samples with ``pages[i % len(pages)]`` tiny page images each (shared between
    consecutive samples, like the VQA tasks drawn from one document)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        doc = i // 2  # two samples per document share its pages
        n = pages[i % len(pages)]
        names = []
        for p in range(n):
            h, w = sizes[(doc + p) % len(sizes)]
            name = f"doc{doc:03d}/p{p:02d}.png"
            if not os.path.exists(os.path.join(folder, name)):
                make_image(os.path.join(folder, name), h, w, seed=seed * 7919 + doc * 101 + p)
            names.append(name)
        words = " ".join(str(x) for x in rng.integers(0, 1000, int(rng.integers(3, 12))))
        records.append(sample_record(f"s{i}", names, question=f"Q{i}: {words}?",
                                     answer=f"A{i} " + "x" * int(rng.integers(1, 9)),
                                     task=("extract-single", "extract-multi", "reasoning")[i % 3],
                                     image_root=folder))
    return records


def build_small_dataset(folder: str, max_seq_len: int = 512) -> str:
    """A preprocessed dataset (16 small documents with 0-3 pages, small tokenizer); returns its prefix."""
    from megatron_vlm.data.preprocess import PreprocessConfig, preprocess
    from megatron_vlm.data.tokenization import SampleTokenizer

    tok_dir = make_small_tokenizer_dir(os.path.join(folder, "tok"))
    records = make_documents(os.path.join(folder, "pool"), 16, pages=[1, 2, 0, 3])
    path = write_jsonl(os.path.join(folder, "mix.jsonl"), records)
    config = PreprocessConfig(inputs=[path], output_prefix=os.path.join(folder, "ds"), tokenizer_dir=tok_dir,
                              max_seq_len=max_seq_len, workers=0, progress=False)
    preprocess(config, log=lambda *a: None, tokenizer=SampleTokenizer(tok_dir))
    return config.output_prefix
