"""Models under evaluation: an OpenAI-compatible endpoint, local transformers, or our Megatron model.

``--model [NAME=]KIND:TARGET[,key=value...]``:

* ``openai:URL[,model=SERVED_NAME][,images=data|path]`` (alias ``vllm``) -- e.g. vLLM serving an
  exported checkpoint. The assistant turn is sent pre-filled with "Answer:" and
  ``continue_final_message: true`` (``add_generation_prompt: false``), greedy (temperature 0).
  The API key comes from ``$OPENAI_API_KEY`` (or the variable named by ``--api-key-env``); it is
  never logged.
* ``hf:HF_DIR[,dtype=fp32|bf16][,device=cuda|cpu]`` (alias ``transformers``) -- ``Qwen2_5_VLForConditionalGeneration``
  with transformers' own image processor and ``generate`` (greedy, KV cache).
* ``megatron:MODEL_DIR[,dtype=...][,device=cuda|cpu]`` -- our model from ``checkpoint.convert.load_model_dir``
  (TP=1, one process), greedy with a KV cache: one prefill over the prompt (the vision tower runs
  once), then one token per decode step against the cached keys/values.

The two local backends share only the prompt text; images, positions and decoding are independent
implementations, so their agreement is a test of both.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch

from megatron_vlm.data.image_processing import MAX_PIXELS, MIN_PIXELS
from megatron_vlm.eval.build import Instance
from megatron_vlm.eval.prompt import PromptConfig, instance_messages, openai_messages, render_prompt


class BackendError(RuntimeError):
    """A generation that failed (server error after retries, context too long, ...)."""


class RequestRejected(BackendError):
    """The server refused the request itself (HTTP 401/403/404: bad API key, a model name it does
    not serve, a wrong URL). Every later request would fail the same way, so a run stops at the
    first one instead of scoring each answer 0."""


REJECTED_STATUS = (401, 403, 404)


def _server_message(detail: str) -> str:
    """The ``error.message`` of an OpenAI-style error body (or the body), on one line."""
    try:
        body = json.loads(detail)
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            detail = str(error.get("message") or error.get("detail") or error)
        elif error:
            detail = str(error)
        elif body.get("detail") or body.get("message"):
            detail = str(body.get("detail") or body.get("message"))
    return " ".join(detail.split())[:300]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    max_pixels: int = MAX_PIXELS
    min_pixels: int = MIN_PIXELS
    timeout: float = 600.0  # seconds per HTTP request
    retries: int = 3  # HTTP retries on connection errors, 429 and 5xx
    api_key_env: str = "OPENAI_API_KEY"
    prompt: PromptConfig = field(default_factory=PromptConfig)


@dataclass
class ModelSpec:
    name: str
    kind: str
    target: str
    options: dict[str, str]


BACKEND_KINDS = {"openai": "openai", "vllm": "openai", "hf": "hf", "transformers": "hf", "megatron": "megatron"}


def parse_model_spec(spec: str) -> ModelSpec:
    """``[NAME=]KIND:TARGET[,key=value...]``; the name defaults to the target's last path part."""
    name = None
    head, sep, _ = spec.partition(":")
    if "=" in head:
        name, _, spec = spec.partition("=")
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in BACKEND_KINDS:
        raise ValueError(f"--model {spec!r}: expected [NAME=]KIND:PATH_OR_URL with KIND one of "
                         f"{sorted(BACKEND_KINDS)} (e.g. megatron:ckpt/longpt, hf:Qwen2.5-VL-7B-Instruct, "
                         "openai:http://localhost:8000/v1)")
    pieces = rest.split(",")
    target, options = pieces[0], {}
    for piece in pieces[1:]:
        key, eq, value = piece.partition("=")
        if not eq:
            raise ValueError(f"--model {spec!r}: option {piece!r} is not key=value")
        options[key.strip()] = value.strip()
    if not target:
        raise ValueError(f"--model {spec!r}: no path or URL")
    if not name:
        name = os.path.basename(target.rstrip("/")) if kind not in ("openai", "vllm") else \
            options.get("model") or target.split("//")[-1].split("/")[0]
    return ModelSpec(name, BACKEND_KINDS[kind], target, options)


class Backend(Protocol):
    name: str
    parallel: int  # how many generations may run at once

    def generate(self, instance: Instance) -> str: ...

    def close(self) -> None: ...


def check_model_spec(spec: ModelSpec) -> None:
    """Errors a run should hit before it builds contexts, not after."""
    allowed = {"openai": ("model", "images"), "hf": ("dtype", "device"), "megatron": ("dtype", "device")}[spec.kind]
    unknown = sorted(set(spec.options) - set(allowed))
    if unknown:
        raise ValueError(f"--model {spec.name}: unknown option(s) {unknown}; allowed: {list(allowed)}")
    _dtype(spec.options.get("dtype"))
    if spec.kind == "hf" and not os.path.isfile(os.path.join(spec.target, "config.json")):
        raise ValueError(f"--model {spec.name}: {spec.target} is not a Hugging Face model folder (no config.json)")
    if spec.kind == "megatron" and not os.path.isfile(os.path.join(spec.target, "megatron_vlm.json")):
        raise ValueError(f"--model {spec.name}: {spec.target} is not a megatron-vlm model folder "
                         "(make one with tools/checkpoint/convert.py hf-to-megatron)")
    if spec.kind == "openai" and not spec.target.startswith(("http://", "https://")):
        raise ValueError(f"--model {spec.name}: {spec.target} is not an http(s) URL")


def make_backend(spec: ModelSpec, cfg: GenerationConfig, parallel: int = 1) -> Backend:
    check_model_spec(spec)
    if spec.kind == "openai":
        return OpenAIBackend(spec, cfg, parallel)
    if spec.kind == "hf":
        return TransformersBackend(spec, cfg)
    return MegatronBackend(spec, cfg)


# ------------------------------------------------------------------------- HTTP
def chat_completions_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


class OpenAIClient:
    """A minimal client for ``/v1/chat/completions`` (stdlib HTTP, bounded retries)."""

    def __init__(self, url: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 600.0, retries: int = 3,
                 model: Optional[str] = None):
        self.url = chat_completions_url(url)
        self.models_url = self.url[: -len("/chat/completions")] + "/models"
        self.timeout, self.retries = timeout, retries
        self._key = os.environ.get(api_key_env) or ""  # kept here only; never printed or logged
        self._key_env = api_key_env  # the variable's name, for messages
        self.model = model or self._first_model()

    def __repr__(self) -> str:  # no key in reprs or tracebacks of objects
        return f"OpenAIClient(url={self.url!r}, model={self.model!r})"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def _request(self, url: str, body: Optional[dict]) -> dict:
        data = None if body is None else json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, headers=self._headers(),
                                             method="GET" if body is None else "POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:2000]
                if err.code in REJECTED_STATUS:
                    raise RequestRejected(self._rejection(err.code, url, _server_message(detail))) from None
                last = f"HTTP {err.code} from {url}: {detail[:500]}"
                if err.code != 429 and err.code < 500:
                    raise BackendError(last) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as err:
                last = f"{type(err).__name__} talking to {url}: {getattr(err, 'reason', err)}"
            if attempt < self.retries:
                time.sleep(min(30.0, 0.5 * 2 ** attempt) * (1 + 0.1 * random.random()))
        raise BackendError(last + f" (after {self.retries + 1} attempts)")

    def _rejection(self, status: int, url: str, message: str) -> str:
        model = getattr(self, "model", None)
        what = f"model {model!r}" if model and url == self.url else "the request"
        key = f"the API key in ${self._key_env}" + ("" if self._key else " (not set)")
        hint = {401: f"check {key}", 403: f"check {key} and its access to this model",
                404: f"check the model name against {self.models_url} and the URL"}[status]
        return f"{url} rejected {what} (HTTP {status}: {message or 'no detail'}); {hint}"

    def _first_model(self) -> str:
        listing = self._request(self.models_url, None)
        try:
            return str(listing["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"{self.models_url} lists no model; give one with ,model=NAME") from None

    def chat(self, messages: list[dict], **params: Any) -> str:
        body = {"model": self.model, "messages": messages, **params}
        reply = self._request(self.url, body)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"{self.url} answered without choices[0].message.content: {str(reply)[:300]}") from None
        return content or ""


class OpenAIBackend:
    def __init__(self, spec: ModelSpec, cfg: GenerationConfig, parallel: int = 1):
        self.name, self.cfg, self.parallel = spec.name, cfg, max(1, parallel)
        self.images = spec.options.get("images", "data")
        if self.images not in ("data", "path"):
            raise ValueError(f"--model {spec.name}: images must be data or path")
        self.client = OpenAIClient(spec.target, cfg.api_key_env, cfg.timeout, cfg.retries, spec.options.get("model"))

    def generate(self, instance: Instance) -> str:
        messages = instance_messages(instance, self.cfg.prompt)
        params: dict[str, Any] = {"max_tokens": self.cfg.max_new_tokens, "temperature": 0.0,
                                  "continue_final_message": True, "add_generation_prompt": False}
        if (self.cfg.max_pixels, self.cfg.min_pixels) != (MAX_PIXELS, MIN_PIXELS):
            params["mm_processor_kwargs"] = {"max_pixels": self.cfg.max_pixels, "min_pixels": self.cfg.min_pixels}
        text = self.client.chat(openai_messages(messages, self.images), **params)
        prefix = messages[-1]["content"]  # the pre-filled assistant turn (ours or the official one)
        return text[len(prefix):] if text.startswith(prefix) else text  # servers that echo the prefix

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------- local models
_TOKENIZERS: dict[Optional[str], Any] = {}


def load_cached_tokenizer(directory: Optional[str] = None):
    """``data.tokenizer.load_tokenizer`` once per folder and process (a load takes seconds)."""
    from megatron_vlm.data.tokenizer import load_tokenizer

    if directory not in _TOKENIZERS:
        _TOKENIZERS[directory] = load_tokenizer(directory)
    return _TOKENIZERS[directory]


def _tokenizer_for(directory: str):
    for candidate in (directory, os.path.join(directory, "hf_assets")):
        if os.path.isfile(os.path.join(candidate, "tokenizer.json")) or os.path.isfile(
                os.path.join(candidate, "vocab.json")):
            return load_cached_tokenizer(candidate)
    return load_cached_tokenizer()  # the offline Qwen2.5-VL tokenizer (tiny test models ship none)


def _stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return {i for i in ids if isinstance(i, int) and i >= 0}


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """``dtype=`` of a model spec (None or auto: the checkpoint's own)."""
    if name in (None, "", "auto"):
        return None
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)} or auto")
    return _DTYPES[name]


class TransformersBackend:
    """Hugging Face transformers: its image processor, its rope index, ``generate`` with a KV cache."""

    parallel = 1

    def __init__(self, spec: ModelSpec, cfg: GenerationConfig):
        from transformers import Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        self.name, self.cfg = spec.name, cfg
        dtype = _dtype(spec.options.get("dtype")) or "auto"
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(spec.target, torch_dtype=dtype).eval()
        self.device = torch.device(spec.options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.tokenizer = _tokenizer_for(spec.target)
        self.processor = Qwen2VLImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        self.stop = sorted(_stop_ids(self.tokenizer))

    @torch.no_grad()
    def generate_ids(self, instance: Instance) -> list[int]:
        from PIL import Image

        messages = instance_messages(instance, self.cfg.prompt)
        text = render_prompt(self.tokenizer, messages)
        paths = [i.image for i in instance.items if i.image]
        pixel_values = grid = None
        if paths:
            images = []
            for p in paths:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            processed = self.processor(images=images, return_tensors="pt")
            pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
            merge = self.processor.merge_size ** 2
            pieces = text.split("<|image_pad|>")
            if len(pieces) - 1 != len(paths):
                raise BackendError(f"prompt has {len(pieces) - 1} image slots for {len(paths)} images")
            text = pieces[0] + "".join("<|image_pad|>" * (int(g.prod()) // merge) + piece
                                       for g, piece in zip(grid, pieces[1:]))
            pixel_values, grid = pixel_values.to(self.device, self.model.dtype), grid.to(self.device)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                                  image_grid_thw=grid, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                  temperature=None, top_p=None, top_k=None, eos_token_id=self.stop,
                                  pad_token_id=self.stop[0])
        new = out[0, ids.shape[1]:].cpu().tolist()
        while new and new[-1] in self.stop:
            new.pop()
        return new

    def generate(self, instance: Instance) -> str:
        return self.tokenizer.decode(self.generate_ids(instance), skip_special_tokens=True)

    def close(self) -> None:
        del self.model


class MegatronBackend:
    """Our model, greedy with a KV cache (``Qwen25VLModel.forward_cached``): one prefill runs the
    prompt with its images (the vision tower once per prompt) and caches every layer's keys/values;
    each decode step feeds one token at its mRoPE position (max prompt position + 1 + k on all three
    axes, as transformers' ``rope_deltas``) and projects only it to the vocabulary.

    TP=1 in one process: the model is loaded unsharded (``load_model_dir`` default); a checkpoint
    converted for TP>1 loads at TP=1 too. ``generate_ids_recompute`` keeps the old full-recompute
    loop (every step reruns the whole sequence, images included) as a reference for tests and
    ``tools/bench/generate.py``.
    """

    parallel = 1

    def __init__(self, spec: ModelSpec, cfg: GenerationConfig):
        from megatron_vlm.checkpoint.convert import load_model_dir

        self.name, self.cfg = spec.name, cfg
        self.model, self.model_config = load_model_dir(spec.target, _dtype(spec.options.get("dtype")))
        self.model.eval()
        self.dtype = next(self.model.parameters()).dtype
        # load_model_dir builds on the CPU; run where asked (a GPU when there is one)
        self.device = torch.device(spec.options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.tokenizer = _tokenizer_for(spec.target)
        self.stop = _stop_ids(self.tokenizer)

    def inputs(self, instance: Instance) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(input_ids [S] with expanded image pads, pixel_values, image_grid_thw)."""
        from PIL import Image

        from megatron_vlm.config import IMAGE_PAD_TOKEN_ID
        from megatron_vlm.data.image_processing import MERGE_SIZE, preprocess_images

        messages = instance_messages(instance, self.cfg.prompt)
        ids = self.tokenizer(render_prompt(self.tokenizer, messages), add_special_tokens=False)["input_ids"]
        paths = [i.image for i in instance.items if i.image]
        if not paths:
            return torch.tensor(ids, dtype=torch.long), None, None
        images = []
        for p in paths:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        pixels, grid = preprocess_images(images, min_pixels=self.cfg.min_pixels, max_pixels=self.cfg.max_pixels)
        counts = iter([int(t * h * w) // MERGE_SIZE ** 2 for t, h, w in grid])
        expanded: list[int] = []
        for token in ids:
            expanded.extend([IMAGE_PAD_TOKEN_ID] * next(counts) if token == IMAGE_PAD_TOKEN_ID else [token])
        return (torch.tensor(expanded, dtype=torch.long), torch.from_numpy(pixels).to(self.dtype),
                torch.from_numpy(grid))

    def _device_inputs(self, instance: Instance):
        ids, pixels, grid = self.inputs(instance)
        if pixels is not None:
            pixels, grid = pixels.to(self.device), grid.to(self.device)
        return ids.to(self.device), pixels, grid

    @torch.no_grad()
    def generate_ids(self, instance: Instance) -> list[int]:
        from megatron_vlm.data.rope_index import mrope_positions
        from megatron_vlm.models.qwen2_5_vl import gather_logits

        ids, pixels, grid = self._device_inputs(instance)
        if self.cfg.max_new_tokens <= 0:
            return []
        positions = mrope_positions(ids, grid).to(self.device)  # [3, S]
        cache = self.model.new_kv_cache(capacity=ids.numel() + self.cfg.max_new_tokens)
        logits = self.model.forward_cached(ids[None], positions[:, None, :], cache, pixels, grid)
        next_position = int(positions.max()) + 1  # text after the prompt: +1 on all three axes
        new: list[int] = []
        while True:
            token = int(gather_logits(logits)[0, -1].float().argmax())
            if token in self.stop:
                break
            new.append(token)
            if len(new) >= self.cfg.max_new_tokens:
                break
            step_ids = torch.tensor([[token]], device=self.device)
            step_positions = torch.full((3, 1, 1), next_position, dtype=torch.long, device=self.device)
            logits = self.model.forward_cached(step_ids, step_positions, cache)
            next_position += 1
        return new

    @torch.no_grad()
    def generate_ids_recompute(self, instance: Instance) -> list[int]:
        """Reference greedy loop without a cache: every step reruns the whole sequence (vision tower
        included) and projects the last position. Slow (quadratic); for tests and benchmarks."""
        from megatron_vlm.data.rope_index import mrope_positions
        from megatron_vlm.models.qwen2_5_vl import gather_logits

        ids, pixels, grid = self._device_inputs(instance)
        new: list[int] = []
        for _ in range(self.cfg.max_new_tokens):
            positions = mrope_positions(ids, grid)[:, None, :]
            last = torch.tensor([ids.numel() - 1], device=self.device)
            logits = gather_logits(self.model(ids[None], positions, pixels, grid, output_index=last))
            token = int(logits[0, -1].float().argmax())
            if token in self.stop:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([token], device=self.device)])
        return new

    def generate(self, instance: Instance) -> str:
        return self.tokenizer.decode(self.generate_ids(instance), skip_special_tokens=True)

    def close(self) -> None:
        del self.model


__all__ = [
    "Backend",
    "BackendError",
    "GenerationConfig",
    "MegatronBackend",
    "ModelSpec",
    "OpenAIBackend",
    "OpenAIClient",
    "RequestRejected",
    "TransformersBackend",
    "chat_completions_url",
    "check_model_spec",
    "load_cached_tokenizer",
    "make_backend",
    "parse_model_spec",
]
