"""Small deterministic inputs and configs shared by the tests and ``convert.py verify``.

Nothing here downloads anything: models are tiny random configs, images are random patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_vlm.config import Qwen25VLConfig, tiny


@dataclass
class Sample:
    """One document: token ids with image placeholders, and the images' patches and grids."""

    input_ids: torch.Tensor  # [S] int64
    pixel_values: Optional[torch.Tensor]  # [num_patches, patch_dim]
    image_grid_thw: Optional[torch.Tensor]  # [num_images, 3] int64


def tiny_hf_config(preset: str = "tiny", **language_overrides) -> dict:
    """A tiny Qwen2.5-VL config.json dict (current key layout); ``preset`` names a ``config.PRESETS`` entry."""
    from megatron_vlm.config import PRESETS

    cfg = tiny() if preset == "tiny" else PRESETS[preset]()
    for key, value in language_overrides.items():
        setattr(cfg.language, key, value)
    return cfg.validate().to_hf_dict(torch_dtype="float32")


def random_hf_model(seed: int = 0, std: float = 0.05, preset: str = "tiny", **language_overrides):
    """A tiny HF Qwen2.5-VL with every weight random (norms too, so a wrong mapping shows)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(**tiny_hf_config(preset, **language_overrides))
    config._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def special_token_ids(cfg: Qwen25VLConfig) -> tuple[int, ...]:
    """The ids the model treats specially in its input (a random text must not contain them)."""
    return (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)


def make_sample(cfg: Qwen25VLConfig, pieces: Sequence, generator: torch.Generator) -> Sample:
    """Build a document from ``pieces``: an int is that many random text tokens, a (t, h, w) tuple
    is an image with that patch grid (h, w even), wrapped in vision start/end tokens.

    Text ids are ordinary tokens: below 151643 (Qwen's first added token) and never one of the
    config's special ids (image/video pad, vision start/end), which a small custom vocabulary may
    place among them."""
    ids, grids = [], []
    text_vocab = min(cfg.language.vocab_size, 151643)  # ordinary BPE tokens, no specials
    specials = sorted({i for i in special_token_ids(cfg) if 0 <= i < text_vocab})
    if len(specials) >= text_vocab:
        raise ValueError(f"vocab_size {cfg.language.vocab_size} leaves no ordinary text token besides "
                         f"the special ids {specials}")
    merge = cfg.vision.merge_unit
    for piece in pieces:
        if isinstance(piece, int):
            drawn = torch.randint(0, text_vocab - len(specials), (piece,), generator=generator)
            for special in specials:  # ascending: shift past each special id at or below the draw
                drawn = drawn + (drawn >= special).long()
            ids.append(drawn)
        else:
            t, h, w = piece
            n = t * h * w // merge
            ids.append(torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]))
            grids.append(list(piece))
    input_ids = torch.cat(ids).long()
    if not grids:
        return Sample(input_ids, None, None)
    grid = torch.tensor(grids, dtype=torch.long)
    patches = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    pixels = torch.randn(patches, cfg.vision.patch_dim, generator=generator)
    return Sample(input_ids, pixels, grid)


def pack(samples: Sequence[Sample]) -> tuple[Sample, torch.Tensor]:
    """Concatenate documents into one packed row; returns it and its ``cu_seqlens`` (int32)."""
    lengths = torch.tensor([len(s.input_ids) for s in samples])
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    pix = [s.pixel_values for s in samples if s.pixel_values is not None]
    grids = [s.image_grid_thw for s in samples if s.image_grid_thw is not None]
    row = Sample(torch.cat([s.input_ids for s in samples]),
                 torch.cat(pix) if pix else None, torch.cat(grids) if grids else None)
    return row, cu


# ------------------------------------------------------------------ a test double for NCCL
class WrongDeviceCollective(RuntimeError):
    """A collective was given a tensor that is not on the training device (NCCL would refuse it)."""


_TENSOR_COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_single",
                       "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced", "reduce_scatter",
                       "reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all",
                       "all_to_all_single",
                       "broadcast", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv")
_OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
                       "barrier", "monitored_barrier")


def _tensors_in(values) -> list:
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(_tensors_in(value))
    return found


class device_restricted_collectives:
    """Within this context, every ``torch.distributed`` tensor collective refuses tensors that are
    not on ``device_type``, as NCCL refuses CPU tensors ("No backend type associated with device
    type cpu"). Object collectives (which pick their own device) and barriers are exempt.

    Lets a gloo run (which carries CPU and CUDA tensors alike) fail where an NCCL run would:
    ``with device_restricted_collectives("cuda"): trainer.train()``. Records every call in
    ``self.calls`` as (name, device types)."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self._saved: dict = {}
        self._exempt_depth = 0

    def _checked(self, name, original):
        def wrapper(*args, **kwargs):
            tensors = _tensors_in(list(args) + list(kwargs.values()))
            if self._exempt_depth == 0:
                self.calls.append((name, tuple(t.device.type for t in tensors)))
                wrong = [t for t in tensors if t.device.type != self.device_type]
                if wrong:
                    raise WrongDeviceCollective(
                        f"torch.distributed.{name} got a tensor on {wrong[0].device} but the process group only "
                        f"carries {self.device_type} tensors (NCCL: 'No backend type associated with device "
                        f"type {wrong[0].device.type}'): create it on the training device")
            return original(*args, **kwargs)
        return wrapper

    def _exempt(self, original):
        def wrapper(*args, **kwargs):
            self._exempt_depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._exempt_depth -= 1
        return wrapper

    def __enter__(self) -> "device_restricted_collectives":
        import torch.distributed as dist

        for name in _TENSOR_COLLECTIVES + _OBJECT_COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original
            wrapped = self._checked(name, original) if name in _TENSOR_COLLECTIVES else self._exempt(original)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved.clear()
