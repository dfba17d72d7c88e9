"""Qwen2.5-VL image preprocessing with numpy and PIL only.

The output matches the slow ``transformers.Qwen2VLImageProcessor`` element for element, so that
data prepared here can be fed to a checkpoint trained or evaluated with the Hugging Face stack
without a distribution shift, and without pulling torchvision into the data loader workers.

Pipeline for one still image:

1. convert to RGB (PIL ``convert``, as HF does for PIL inputs);
2. pick the target size with :func:`smart_resize` (both sides multiples of 28, pixel count in
   ``[min_pixels, max_pixels]``) and resize with PIL bicubic;
3. rescale by 1/255 (in float64, then cast to float32) and normalize with the CLIP mean/std (in
   float32) -- done here with a 256-entry lookup table per channel, which gives the same float32
   values as the arithmetic but costs one gather;
4. repeat the still image to ``TEMPORAL_PATCH_SIZE`` frames and cut it into 14x14 patches ordered
   so that the 2x2 patches of one merge window are consecutive (the order the vision tower's
   patch merger expects).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
from PIL import Image

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: one LM token covers a 28x28 pixel square
MIN_PIXELS = 56 * 56  # 3136
# Pinned on purpose: the HF class default (28*28*1280 = 1,003,520) roughly halves the token count
# of a document page rendered at 144 DPI, which loses small print.
MAX_PIXELS = 16384 * 28 * 28  # 12,845,056
MAX_ASPECT_RATIO = 200

# OpenAI CLIP statistics, the defaults of Qwen2VLImageProcessor.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176 values per patch

ImageLike = Union[Image.Image, np.ndarray]


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Target (height, width) for an image: multiples of ``factor``, area within bounds, aspect kept.

    Same arithmetic as HF's ``smart_resize`` (Python ``round`` -- i.e. round-half-to-even -- to the
    nearest multiple first, then floor/ceil after scaling by sqrt of the area ratio), because any
    deviation changes the token count and breaks parity with the reference processor.
    """
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio}")
    new_h = round(height / factor) * factor
    new_w = round(width / factor) * factor
    if new_h * new_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)  # shrink factor
        new_h = max(factor, math.floor(height / scale / factor) * factor)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
    elif new_h * new_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))  # growth factor
        new_h = math.ceil(height * scale / factor) * factor
        new_w = math.ceil(width * scale / factor) * factor
    return new_h, new_w


def image_token_count(
    height: int,
    width: int,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    factor: int = FACTOR,
) -> int:
    """Number of ``<|image_pad|>`` tokens an image of this original size expands to.

    Lets the packer budget sequence length from image headers alone, without decoding pixels.
    """
    new_h, new_w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (new_h // factor) * (new_w // factor)


def _to_rgb_pil(image: ImageLike) -> Image.Image:
    """Bring the input to an RGB PIL image.

    numpy inputs must be uint8-valued ``HxW`` / ``HxWxC`` (C in 1, 3, 4) arrays; they are treated
    exactly like ``PIL.Image.fromarray(array)``.
    """
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"expected an HxW or HxWxC (C in 1, 3, 4) array, got shape {image.shape}")
        if array.dtype != np.uint8:
            if not np.array_equal(array, np.round(array)) or array.min() < 0 or array.max() > 255:
                raise ValueError("numpy images must hold integer pixel values in [0, 255]")
            array = array.astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(array))
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def _normalization_lut(
    mean: Sequence[float] = IMAGE_MEAN, std: Sequence[float] = IMAGE_STD
) -> np.ndarray:
    """[256, 3] float32 table: normalized value of every uint8 level per channel.

    Computed with the same dtypes as HF (float64 rescale, float32 cast, float32 normalize), so a
    lookup reproduces its output bit for bit.
    """
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (levels[:, None] - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)


_LUT = _normalization_lut()


def _patchify(pixels: np.ndarray) -> np.ndarray:
    """Cut a normalized [H, W, 3] image into [num_patches, 3*T*14*14] rows.

    Row order: merge windows in raster order, then the 2x2 patches inside a window. Column order:
    channel, frame, patch row, patch column. The still image is repeated over the T frames.
    """
    height, width, channels = pixels.shape
    p, m = PATCH_SIZE, MERGE_SIZE
    blocks_h, blocks_w = height // (p * m), width // (p * m)
    x = pixels.reshape(blocks_h, m, p, blocks_w, m, p, channels)
    # -> (block_h, block_w, merge_h, merge_w, channel, patch_row, patch_col)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)[..., None, :, :]
    x = np.broadcast_to(x, x.shape[:5] + (TEMPORAL_PATCH_SIZE, p, p))
    return x.reshape(blocks_h * blocks_w * m * m, channels * TEMPORAL_PATCH_SIZE * p * p)


def preprocess_image(
    image: ImageLike,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One still image -> (pixel_values float32 [num_patches, 1176], grid_thw (1, h/14, w/14))."""
    rgb = _to_rgb_pil(image)
    width, height = rgb.size
    new_h, new_w = smart_resize(height, width, factor=FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
    resized = rgb.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    levels = np.asarray(resized, dtype=np.uint8)  # [H, W, 3]
    pixels = _LUT[levels, np.arange(3)]  # per-channel lookup -> float32 [H, W, 3]
    patches = _patchify(pixels)
    return patches, (1, new_h // PATCH_SIZE, new_w // PATCH_SIZE)


def preprocess_images(
    images: Sequence[ImageLike],
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> (pixel_values concatenated over images, grid_thw int64 [n, 3])."""
    if len(images) == 0:
        return np.zeros((0, PATCH_DIM), dtype=np.float32), np.zeros((0, 3), dtype=np.int64)
    results = [preprocess_image(im, min_pixels=min_pixels, max_pixels=max_pixels) for im in images]
    pixel_values = np.concatenate([pv for pv, _ in results], axis=0)
    grid_thw = np.asarray([thw for _, thw in results], dtype=np.int64)
    return pixel_values, grid_thw


__all__ = [
    "FACTOR",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "MAX_PIXELS",
    "MERGE_SIZE",
    "MIN_PIXELS",
    "PATCH_DIM",
    "PATCH_SIZE",
    "TEMPORAL_PATCH_SIZE",
    "image_token_count",
    "preprocess_image",
    "preprocess_images",
    "smart_resize",
]
