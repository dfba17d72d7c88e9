"""The offline Qwen2.5-VL tokenizer: byte-identical to the published files, right special ids,
and the chat template renders what Qwen2.5-VL's processor expects."""

from __future__ import annotations

import hashlib
import os

import pytest

from megatron_vlm.data import tokenizer as tok


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tok.build_tokenizer_dir(str(tmp_path_factory.mktemp("tok") / "qwen"))


def test_rebuilt_files_match_published_hashes(tokenizer_dir):
    for name, expected in tok.PUBLISHED_SHA256.items():
        with open(os.path.join(tokenizer_dir, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == expected, name


def test_special_tokens_and_vocabulary(tokenizer_dir):
    t = tok.load_tokenizer(tokenizer_dir)
    assert len(t) == 151665  # 151,643 BPE tokens + 22 added; Qwen3's extra four are gone
    assert t.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert t.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert t.convert_tokens_to_ids("<|endoftext|>") == tok.ENDOFTEXT_ID
    assert t.convert_tokens_to_ids("<think>") != 151667  # not a Qwen2.5 token
    text = "Page 12: revenue grew 4.5% to $1,234 — naïve café 東京"
    ids = t(text)["input_ids"]
    assert t.decode(ids) == text and max(ids) < 151643
    assert t("Hello world")["input_ids"] == [9707, 1879]  # Qwen BPE ids, stable across Qwen2/2.5/3


def test_chat_template_renders_the_qwen25vl_prompt(tokenizer_dir):
    t = tok.load_tokenizer(tokenizer_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q?"}]},
                {"role": "assistant", "content": "A."}]
    text = t.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>Q?"
                    "<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n")
    ids = t(text)["input_ids"]
    assert ids.count(151655) == 2 and ids[0] == tok.IM_START_ID


def test_wrong_source_is_a_clear_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (src / name).write_text("{}")
    (src / "tokenizer.json").write_text('{"added_tokens": [], "model": {"merges": []}}')
    with pytest.raises(tok.TokenizerError, match="SHA-256"):
        tok.build_tokenizer_dir(str(tmp_path / "out"), source_dir=str(src))
