"""Samples -> token ids with the Qwen2.5-VL chat template, image placeholders expanded, and the
mask of tokens the model learns to produce.

What the ids must equal: the Hugging Face Qwen2.5-VL processor's output for the same
conversation and images (render the chat template with one ``<|image_pad|>`` per image, expand
each to ``(h/28)*(w/28)`` copies for the image's resized size, tokenize). Here the text is
tokenized once with the single placeholders and the placeholder ids are repeated afterwards:
``<|image_pad|>`` is a special token, so the byte-level BPE never merges across it and both
orders give the same ids, while ours never builds a 100K-character string.

Which tokens are supervised: the assistant answers and each answer's ``<|im_end|>``, nothing
else (not the system prompt, the user turn with its pages, the ``<|im_start|>assistant\\n``
header, nor the newline the template writes after ``<|im_end|>``). The answer's character span
comes from rendering the conversation up to the answer (with the generation prompt) and through
it; a token is supervised when it starts inside that span. This works for any template that
renders conversations prefix-stably, which Qwen's does; others are refused with a clear error.

The chat template is the tokenizer directory's own (the processor's ``chat_template.jinja`` /
``chat_template.json``, else the one in ``tokenizer_config.json``) and otherwise the Qwen2.5-VL one
built into ``data/tokenizer.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from megatron_vlm.config import IMAGE_PAD_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID
from megatron_vlm.data.image_processing import PATCH_SIZE, image_token_count, smart_resize
from megatron_vlm.data.samples import Sample, SampleError
from megatron_vlm.data.tokenizer import IM_END_ID, QWEN25VL_CHAT_TEMPLATE, load_tokenizer

IMAGE_PAD = "<|image_pad|>"
IM_END = "<|im_end|>"


class TokenizationError(SampleError):
    """A sample that cannot be tokenized; ``reason`` is a short code for reports (missing_image,
    bad_image, image_tokens_mismatch, template, image_slots, no_answer)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class TokenizedSample:
    """One sample as the model sees it (before packing). ``loss_mask`` is on *input* positions:
    1 where the token is part of an answer the model must produce (the packer shifts it onto the
    next-token targets)."""

    input_ids: np.ndarray  # int32 [S], image placeholders expanded
    loss_mask: np.ndarray  # uint8 [S]
    image_sizes: list[tuple[int, int]]  # original (height, width) of each image, in token order
    image_grids: list[tuple[int, int, int]]  # (t, h/14, w/14) of each resized image
    truncated: bool = False
    dropped_images: int = 0  # images cut off by truncation

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def image_token_counts(self) -> list[int]:
        return [t * h * w // 4 for t, h, w in self.image_grids]


def image_grid(height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of a still image of this original size (the reference resize)."""
    new_h, new_w = smart_resize(height, width)
    return (1, new_h // PATCH_SIZE, new_w // PATCH_SIZE)


def read_image_size(path: str, where: str = "") -> tuple[int, int]:
    """(height, width) from the file header only (PIL decodes lazily)."""
    prefix = f"{where}: " if where else ""
    if not os.path.isfile(path):
        raise TokenizationError(f"{prefix}image {path} does not exist (fix the path or 'image_root', or drop the "
                                "sample)", "missing_image")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as err:  # PIL raises many types for broken files
        raise TokenizationError(f"{prefix}image {path} cannot be read ({type(err).__name__}: {err})",
                                "bad_image") from None
    return height, width


def sample_image_sizes(sample: Sample, where: str = "", verify: bool = True) -> list[tuple[int, int]]:
    """Original sizes of the sample's images, read from the files. ``Sample.image_tokens``, when
    given, must agree with the files (a mismatch means the pool and the images diverged)."""
    where = where or sample.id
    sizes = [read_image_size(path, where) for path in sample.image_paths()]
    if verify and sample.image_tokens is not None:
        for i, ((h, w), claimed) in enumerate(zip(sizes, sample.image_tokens)):
            actual = image_token_count(h, w)
            if actual != claimed:
                raise TokenizationError(
                    f"{where}: image {i} ({sample.image_paths()[i]}, {w}x{h} px) expands to {actual} tokens but "
                    f"'image_tokens' says {claimed}: regenerate the record from the pool", "image_tokens_mismatch")
    return sizes


def resolve_chat_template(tokenizer: Any, directory: Optional[str]) -> tuple[str, str]:
    """(template, where it came from). The processor's template files win (``chat_template.jinja``,
    then ``chat_template.json``: what the Qwen2.5-VL processor renders with), then the tokenizer's
    own, then the built-in Qwen2.5-VL one (``load_tokenizer`` installs it on tokenizers without a
    template, so "own" means different from it)."""
    if directory:
        jinja_path = os.path.join(directory, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                return f.read(), "chat_template.jinja"
        json_path = os.path.join(directory, "chat_template.json")
        if os.path.isfile(json_path):
            with open(json_path, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
            if template:
                return template, "chat_template.json"
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if own and own != QWEN25VL_CHAT_TEMPLATE:
        return own, "tokenizer_config"
    return QWEN25VL_CHAT_TEMPLATE, "built-in"


class SampleTokenizer:
    """Turns ``Sample``s into ``TokenizedSample``s. Picklable by directory (workers rebuild it)."""

    def __init__(self, tokenizer_dir: Optional[str] = None, tokenizer: Any = None):
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_dir)
        self.template, self.template_source = resolve_chat_template(self._tokenizer, tokenizer_dir)
        pad = self._tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if pad != IMAGE_PAD_TOKEN_ID:
            raise ValueError(f"tokenizer maps {IMAGE_PAD} to {pad}, not {IMAGE_PAD_TOKEN_ID}")

    def __getstate__(self) -> dict:
        return {"tokenizer_dir": self.tokenizer_dir}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tokenizer_dir"])

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    # ------------------------------------------------------------------ rendering
    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return self._tokenizer.apply_chat_template(list(messages), chat_template=self.template, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)

    def answer_spans(self, messages: Sequence[dict], text: str, where: str) -> list[tuple[int, int]]:
        """Character spans of the assistant answers (each through its ``<|im_end|>``) in ``text``."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise TokenizationError(f"{where}: the conversation starts with an assistant turn; nothing prompts it",
                                        "template")
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[:i + 1])
            if not (text.startswith(through) and through.startswith(before)):
                raise TokenizationError(f"{where}: the chat template does not render the conversation prefix-stably, "
                                        "so the answer tokens cannot be located; use a Qwen2.5-VL template", "template")
            start, end = len(before), len(through)
            close = text.rfind(IM_END, start, end)
            if close >= 0:  # supervise through <|im_end|>, not the newline after it
                end = close + len(IM_END)
            spans.append((start, end))
        return spans

    # ------------------------------------------------------------------ tokenizing
    def tokenize(self, sample: Sample, image_sizes: Optional[Sequence[tuple[int, int]]] = None,
                 where: str = "") -> TokenizedSample:
        """Token ids and answer mask of one sample. ``image_sizes`` (original (h, w) per image)
        are read from the files when not given."""
        where = where or sample.id
        if image_sizes is None:
            image_sizes = sample_image_sizes(sample, where)
        if len(image_sizes) != len(sample.images):
            raise TokenizationError(f"{where}: {len(image_sizes)} image sizes for {len(sample.images)} images",
                                    "image_slots")
        text = self.render(sample.messages)
        spans = self.answer_spans(sample.messages, text, where)
        encoded = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        starts = np.asarray([s for s, _ in encoded["offset_mapping"]], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=np.uint8)
        for a, b in spans:
            mask[(starts >= a) & (starts < b)] = 1
        grids = [image_grid(h, w) for h, w in image_sizes]
        slots = np.flatnonzero(ids == IMAGE_PAD_TOKEN_ID)
        if len(slots) != len(grids):
            raise TokenizationError(f"{where}: the rendered conversation has {len(slots)} {IMAGE_PAD} tokens for "
                                    f"{len(grids)} images (does a message text contain image special tokens?)",
                                    "image_slots")
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[slots] = [t * h * w // 4 for t, h, w in grids]
        ids, mask = np.repeat(ids, repeats), np.repeat(mask, repeats)
        if not mask.any():
            raise TokenizationError(f"{where}: no supervised token (empty assistant answers)", "no_answer")
        return TokenizedSample(ids.astype(np.int32), mask, [tuple(s) for s in image_sizes], grids)

    def count_tokens(self, sample: Sample, image_tokens: Optional[Sequence[int]] = None, where: str = "") -> int:
        """Length of the tokenized sample; ``image_tokens`` (per image) skips reading the files."""
        where = where or sample.id
        if image_tokens is None:
            image_tokens = [image_token_count(h, w) for h, w in sample_image_sizes(sample, where)]
        text = self.render(sample.messages)
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        slots = sum(1 for i in ids if i == IMAGE_PAD_TOKEN_ID)
        if slots != len(image_tokens):
            raise TokenizationError(f"{where}: the rendered conversation has {slots} {IMAGE_PAD} tokens for "
                                    f"{len(image_tokens)} images", "image_slots")
        return len(ids) - slots + int(sum(image_tokens))


def truncate(sample: TokenizedSample, max_len: int) -> Optional[TokenizedSample]:
    """The first ``max_len`` tokens, never cutting an image: a cut inside an image block moves to
    before its ``<|vision_start|>`` and the images after the cut are dropped. None when nothing
    supervised is left (the answer sits at the end of these samples, so long ones usually lose it)."""
    if sample.num_tokens <= max_len:
        return sample
    ids = sample.input_ids
    cut = max_len
    starts = np.flatnonzero(ids[:max_len] == VISION_START_TOKEN_ID)
    ends = np.flatnonzero(ids[:max_len] == VISION_END_TOKEN_ID)
    if len(starts) and (not len(ends) or starts[-1] > ends[-1]):
        cut = int(starts[-1])  # the last image block is open at the cut
    kept_images = int((ids[:cut] == VISION_START_TOKEN_ID).sum())
    mask = sample.loss_mask[:cut]
    if not mask.any():
        return None
    return TokenizedSample(ids[:cut].copy(), mask.copy(), sample.image_sizes[:kept_images],
                           sample.image_grids[:kept_images], truncated=True,
                           dropped_images=len(sample.image_grids) - kept_images)


__all__ = ["IM_END_ID", "SampleTokenizer", "TokenizationError", "TokenizedSample", "image_grid", "read_image_size",
           "resolve_chat_template", "sample_image_sizes", "truncate"]
