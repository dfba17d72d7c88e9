"""Parity of megatron_vlm.data.image_processing with transformers' slow Qwen2VLImageProcessor."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from megatron_vlm.data import image_processing as ip

hf_qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
hf_smart_resize = hf_qwen2_vl.smart_resize
Qwen2VLImageProcessor = hf_qwen2_vl.Qwen2VLImageProcessor


def _call_both(fn_a, fn_b, *args, **kwargs):
    """Run both; they must agree on the result or both raise ValueError."""
    try:
        expected = fn_b(*args, **kwargs)
    except ValueError:
        with pytest.raises(ValueError):
            fn_a(*args, **kwargs)
        return None
    got = fn_a(*args, **kwargs)
    assert got == expected, (args, kwargs, got, expected)
    return got


def _size_cases() -> list[tuple[int, int]]:
    rng = np.random.default_rng(1234)
    edge = [
        (1, 1), (1, 2), (2, 1), (27, 27), (28, 28), (29, 29), (14, 14), (55, 57), (56, 56),
        (1, 200), (200, 1), (1, 201), (201, 1), (3, 600), (600, 3), (10, 2000), (2000, 10),
        (42, 42), (70, 98), (126, 154),  # x.5 multiples of 28: Python's round-half-to-even
        (1224, 1584), (1584, 1224), (2480, 3508), (4000, 6000), (20000, 30000), (50000, 250),
        (12000, 60), (3584, 3584), (3585, 3584), (100000, 100000),
    ]
    log_sizes = np.exp(rng.uniform(0.0, math.log(20000), size=(170, 2))).astype(int) + 1
    return edge + [tuple(map(int, hw)) for hw in log_sizes]


@pytest.mark.parametrize(
    "min_pixels,max_pixels",
    [(ip.MIN_PIXELS, ip.MAX_PIXELS), (56 * 56, 28 * 28 * 1280), (28 * 28 * 4, 28 * 28 * 16)],
)
def test_smart_resize_matches_transformers(min_pixels: int, max_pixels: int) -> None:
    cases = _size_cases()
    assert len(cases) >= 200
    raised = 0
    for height, width in cases:
        result = _call_both(
            ip.smart_resize, hf_smart_resize, height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels
        )
        if result is None:
            raised += 1
            continue
        h, w = result
        assert h % 28 == 0 and w % 28 == 0 and h >= 28 and w >= 28
    assert raised >= 2  # the aspect ratio > 200 cases are covered


def test_smart_resize_aspect_error() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        ip.smart_resize(10, 2010)
    assert ip.smart_resize(10, 2000) == hf_smart_resize(10, 2000, min_pixels=ip.MIN_PIXELS, max_pixels=ip.MAX_PIXELS)


def test_constants() -> None:
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert (ip.PATCH_SIZE, ip.TEMPORAL_PATCH_SIZE, ip.MERGE_SIZE, ip.FACTOR) == (14, 2, 2, 28)
    assert (ip.MIN_PIXELS, ip.MAX_PIXELS) == (3136, 12845056)
    assert tuple(ip.IMAGE_MEAN) == tuple(OPENAI_CLIP_MEAN)
    assert tuple(ip.IMAGE_STD) == tuple(OPENAI_CLIP_STD)


def test_letter_page_at_144_dpi() -> None:
    # 8.5 x 11 in at 144 DPI: 1224 px wide, 1584 px tall.
    assert ip.smart_resize(1584, 1224) == (1596, 1232)
    assert ip.image_token_count(1584, 1224) == 2508
    assert ip.image_token_count(1224, 1584) == 2508  # landscape
    # The HF class default max_pixels would cut the page to far fewer tokens.
    assert ip.image_token_count(1584, 1224, max_pixels=28 * 28 * 1280) < 1300


def test_image_token_count_matches_grid() -> None:
    rng = np.random.default_rng(0)
    for height, width in rng.integers(1, 3000, size=(50, 2)):
        if max(height, width) / min(height, width) > 200:
            continue
        h, w = ip.smart_resize(int(height), int(width))
        assert ip.image_token_count(int(height), int(width)) == (h // 14) * (w // 14) // 4


def _reference(images: list, min_pixels: int, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    out = processor(images=images)
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def _random_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    # Smooth-ish content plus noise, so bicubic overshoot/clipping is exercised as well.
    yy, xx = np.mgrid[0:height, 0:width]
    base = (np.sin(yy / 7.0)[..., None] * 100 + np.cos(xx / 5.0)[..., None] * 100 + 128).repeat(3, axis=-1)
    noise = rng.integers(-60, 61, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "height,width,max_pixels",
    [
        (300, 400, ip.MAX_PIXELS),  # kept near size (rounded to 28 multiples)
        (123, 77, ip.MAX_PIXELS),
        (20, 30, ip.MAX_PIXELS),  # upscaled to reach min_pixels
        (300, 400, 28 * 28 * 20),  # downscaled
        (257, 131, 28 * 28 * 9),  # downscaled, odd sizes
        (29, 280, ip.MAX_PIXELS),  # wide strip
    ],
)
def test_preprocess_image_matches_transformers(height: int, width: int, max_pixels: int) -> None:
    rng = np.random.default_rng(height * 1000 + width)
    image = Image.fromarray(_random_rgb(rng, height, width))
    pixel_values, grid_thw = ip.preprocess_image(image, min_pixels=ip.MIN_PIXELS, max_pixels=max_pixels)
    ref_values, ref_grid = _reference([image], ip.MIN_PIXELS, max_pixels)
    assert grid_thw == tuple(int(v) for v in ref_grid[0])
    assert pixel_values.dtype == np.float32
    assert pixel_values.shape == ref_values.shape == (np.prod(grid_thw), ip.PATCH_DIM)
    assert np.abs(pixel_values - ref_values).max() <= 1e-5


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "numpy"])
def test_preprocess_other_modes_match_transformers(mode: str) -> None:
    rng = np.random.default_rng(7)
    rgb = _random_rgb(rng, 150, 190)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, size=rgb.shape[:2], dtype=np.uint8)
        image = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
    elif mode == "numpy":
        image = rgb  # HF treats a uint8 HxWx3 array like the PIL image made from it
    else:
        image = Image.fromarray(rgb).convert(mode)
    max_pixels = 28 * 28 * 30
    pixel_values, grid_thw = ip.preprocess_image(image, max_pixels=max_pixels)
    ref_values, ref_grid = _reference([image], ip.MIN_PIXELS, max_pixels)
    assert grid_thw == tuple(int(v) for v in ref_grid[0])
    assert np.abs(pixel_values - ref_values).max() <= 1e-5


def test_numpy_grayscale_equals_pil() -> None:
    gray = np.random.default_rng(3).integers(0, 256, size=(64, 90), dtype=np.uint8)
    a, ga = ip.preprocess_image(gray)
    b, gb = ip.preprocess_image(Image.fromarray(gray))
    assert ga == gb
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        ip.preprocess_image(np.zeros((4, 5, 2), dtype=np.uint8))


def test_preprocess_images_batch_matches_transformers() -> None:
    rng = np.random.default_rng(11)
    images = [Image.fromarray(_random_rgb(rng, h, w)) for h, w in [(60, 80), (200, 120), (33, 47)]]
    max_pixels = 28 * 28 * 40
    pixel_values, grid_thw = ip.preprocess_images(images, max_pixels=max_pixels)
    ref_values, ref_grid = _reference(images, ip.MIN_PIXELS, max_pixels)
    assert grid_thw.dtype == np.int64 and grid_thw.shape == (3, 3)
    np.testing.assert_array_equal(grid_thw, ref_grid)
    assert pixel_values.shape == ref_values.shape
    assert np.abs(pixel_values - ref_values).max() <= 1e-5

    empty_values, empty_grid = ip.preprocess_images([])
    assert empty_values.shape == (0, ip.PATCH_DIM) and empty_grid.shape == (0, 3)


def test_patch_layout() -> None:
    """Each row is one 14x14 patch, channel-major, the still frame repeated; merge windows are contiguous."""
    image = Image.fromarray(_random_rgb(np.random.default_rng(5), 56, 84))  # kept at 56x84: 4x6 patches
    pixel_values, grid_thw = ip.preprocess_image(image)
    assert grid_thw == (1, 4, 6)
    rows = pixel_values.reshape(-1, 3, 2, 14, 14)
    np.testing.assert_array_equal(rows[:, :, 0], rows[:, :, 1])
    lut = ip._normalization_lut()
    pixels = lut[np.asarray(image), np.arange(3)]
    # Row 1 is the right neighbour in the first 2x2 window; row 2 the patch below the first.
    np.testing.assert_array_equal(rows[1, :, 0], pixels[0:14, 14:28].transpose(2, 0, 1))
    np.testing.assert_array_equal(rows[2, :, 0], pixels[14:28, 0:14].transpose(2, 0, 1))
    # Row 4 opens the second window (patch column 2 of the top two patch rows).
    np.testing.assert_array_equal(rows[4, :, 0], pixels[0:14, 28:42].transpose(2, 0, 1))
