"""Parity of megatron_vlm.data.rope_index with transformers' Qwen2_5_VLModel.get_rope_index."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np
import pytest
import torch

from megatron_vlm.data.rope_index import (
    IMAGE_PAD_TOKEN_ID as IMG,
    VIDEO_PAD_TOKEN_ID as VID,
    VISION_START_TOKEN_ID as VS,
    mrope_positions,
    packed_mrope_positions,
)

qwen_modeling = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
from transformers import Qwen2_5_VLConfig  # noqa: E402

VE = 151653  # <|vision_end|>


def _config(tokens_per_second: int = 2) -> Qwen2_5_VLConfig:
    cfg = Qwen2_5_VLConfig(
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
            "tokens_per_second": tokens_per_second,
        },
        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1},
    )
    assert cfg.vision_config.spatial_merge_size == 2
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id) == (IMG, VID, VS)
    return cfg


CFG = _config()


def reference(
    ids: torch.Tensor,
    image_grid_thw: Optional[torch.Tensor] = None,
    video_grid_thw: Optional[torch.Tensor] = None,
    second_per_grid_ts: Optional[torch.Tensor] = None,
    cfg: Qwen2_5_VLConfig = CFG,
) -> torch.Tensor:
    """The transformers positions [3, S] for one sample, without building a model."""
    pos, _ = qwen_modeling.Qwen2_5_VLModel.get_rope_index(
        SimpleNamespace(config=cfg),
        ids[None],
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
    )
    return pos[:, 0]


class Builder:
    """Builds input_ids the way the chat template lays them out."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.ids: list[int] = []
        self.images: list[tuple[int, int, int]] = []
        self.videos: list[tuple[int, int, int]] = []

    def text(self, n: int) -> "Builder":
        self.ids += self.rng.integers(0, 150000, size=n).tolist()
        return self

    def image(self, t: int, h: int, w: int, end: bool = True) -> "Builder":
        self.ids += [VS] + [IMG] * (t * h * w // 4) + ([VE] if end else [])
        self.images.append((t, h, w))
        return self

    def video(self, t: int, h: int, w: int) -> "Builder":
        self.ids += [VS] + [VID] * (t * h * w // 4) + [VE]
        self.videos.append((t, h, w))
        return self

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.tensor(self.ids, dtype=torch.long)

    @property
    def image_grid(self) -> Optional[torch.Tensor]:
        return torch.tensor(self.images, dtype=torch.long).reshape(-1, 3) if self.images else None

    @property
    def video_grid(self) -> Optional[torch.Tensor]:
        return torch.tensor(self.videos, dtype=torch.long).reshape(-1, 3) if self.videos else None


def _check(b: Builder, second_per_grid_ts: Optional[Sequence[float]] = None) -> torch.Tensor:
    spg = torch.tensor(second_per_grid_ts) if second_per_grid_ts is not None else None
    expected = reference(b.input_ids, b.image_grid, b.video_grid, spg)
    got = mrope_positions(b.input_ids, b.image_grid, b.video_grid, spg)
    assert got.dtype == torch.long and got.shape == (3, len(b.ids))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    return got


def test_text_only() -> None:
    b = Builder().text(37)
    got = mrope_positions(b.input_ids)
    torch.testing.assert_close(got, torch.arange(37).expand(3, -1), rtol=0, atol=0)
    # The reference only takes its vision path when a grid is given; with none it is arange too.
    torch.testing.assert_close(got, reference(b.input_ids), rtol=0, atol=0)


def test_one_image() -> None:
    got = _check(Builder().text(5).image(1, 4, 6).text(7))
    # 5 text + <vs> at 0..5; the 2x3 merged grid at 6 + (0, h, w); text resumes at 6 + 3.
    assert got[:, 6].tolist() == [6, 6, 6]
    assert got[:, 11].tolist() == [6, 7, 8]
    assert got[:, 12].tolist() == [9, 9, 9]


def test_several_images_of_different_sizes() -> None:
    b = Builder(1).text(3).image(1, 4, 4).text(10).image(1, 2, 8).text(1).image(1, 12, 2)
    b.text(4).image(1, 6, 10).text(2)
    _check(b)


def test_image_with_two_temporal_grids() -> None:
    # Images never get a temporal offset in the reference (second_per_grid_t = 0), even with t > 1.
    _check(Builder(2).text(2).image(2, 4, 4).text(3))


def test_image_at_start_and_end() -> None:
    _check(Builder(3).image(1, 4, 6).text(9).image(1, 6, 4))
    _check(Builder(4).image(1, 2, 2).text(3).image(1, 4, 2, end=False))  # pads are the last tokens
    _check(Builder(5).image(1, 8, 6))  # nothing but the image


def test_back_to_back_images() -> None:
    _check(Builder(6).text(4).image(1, 4, 4).image(1, 2, 6).image(1, 6, 2).text(5))


@pytest.mark.parametrize("seconds", [None, [1.0], [2.0], [0.5], [1.5]])
def test_video(seconds: Optional[list[float]]) -> None:
    got = _check(Builder(7).text(6).video(3, 4, 4).text(4), seconds)
    if seconds is None or seconds == [1.0]:
        # t step = 1 s * 2 tokens/s: frames at +0, +2, +4.
        assert got[0, 7:19:4].tolist() == [7, 9, 11]


def test_video_fractional_seconds_untruncated() -> None:
    b = Builder(8).text(2).video(4, 2, 2).text(1)
    got = mrope_positions(
        b.input_ids, video_grid_thw=b.video_grid, second_per_grid_ts=[0.75], truncate_second_per_grid=False
    )
    frames = got[0, 3:7]
    assert frames.tolist() == [3 + int(t * 0.75 * 2) for t in range(4)]  # 0, 1, 3, 4
    assert got[:, 7].tolist() == [3 + 4 + 1] * 3  # text resumes after the largest position (4) + 1
    # The default follows transformers 4.57.3, which truncates 0.75 to 0 before multiplying.
    truncated = mrope_positions(b.input_ids, video_grid_thw=b.video_grid, second_per_grid_ts=[0.75])
    assert truncated[0, 3:7].tolist() == [3] * 4


def test_images_and_videos_mixed() -> None:
    b = Builder(9).text(3).image(1, 4, 4).text(2).video(2, 4, 6).text(1).image(1, 2, 2).video(5, 2, 2).text(3)
    _check(b, [1.0, 2.0])
    _check(b)


def test_tokens_per_second_parameter() -> None:
    b = Builder(10).text(2).video(3, 2, 2).text(2)
    expected = reference(b.input_ids, video_grid_thw=b.video_grid, cfg=_config(tokens_per_second=5))
    got = mrope_positions(b.input_ids, video_grid_thw=b.video_grid, tokens_per_second=5)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_numpy_input() -> None:
    b = Builder(11).text(3).image(1, 4, 2).text(3)
    got = mrope_positions(b.input_ids.numpy(), np.asarray(b.images))
    torch.testing.assert_close(got, reference(b.input_ids, b.image_grid), rtol=0, atol=0)


def _pack(docs: list[Builder]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    ids = torch.cat([d.input_ids for d in docs])
    cu = torch.tensor([0] + np.cumsum([len(d.ids) for d in docs]).tolist())
    images = [g for d in docs for g in d.images]
    videos = [g for d in docs for g in d.videos]
    image_grid = torch.tensor(images).reshape(-1, 3) if images else None
    video_grid = torch.tensor(videos).reshape(-1, 3) if videos else None
    return ids, cu, image_grid, video_grid


def test_packed_row_equals_per_document_reference() -> None:
    docs = [
        Builder(12).text(5).image(1, 4, 6).text(3).image(1, 2, 2).text(2),
        Builder(13).text(11),  # no images
        Builder(14).image(1, 6, 4).text(4).video(2, 2, 4).text(1),
    ]
    ids, cu, image_grid, video_grid = _pack(docs)
    got = packed_mrope_positions(ids, cu, image_grid, video_grid)
    expected = torch.cat([reference(d.input_ids, d.image_grid, d.video_grid) for d in docs], dim=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for start in cu[:-1].tolist():
        assert got[:, start].tolist() == [0, 0, 0]  # every document restarts at 0


def test_packed_row_text_only_and_empty_documents() -> None:
    docs = [Builder(15).text(4), Builder(16).text(0), Builder(17).text(6)]
    ids, cu, _, _ = _pack(docs)
    got = packed_mrope_positions(ids, cu)
    assert got[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("seed", range(4))
def test_packed_random_rows(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    docs = []
    for d in range(int(rng.integers(1, 6))):
        b = Builder(1000 * seed + d)
        for _ in range(int(rng.integers(0, 5))):
            b.text(int(rng.integers(0, 6)))
            if rng.random() < 0.8:
                b.image(1, 2 * int(rng.integers(1, 6)), 2 * int(rng.integers(1, 6)), end=bool(rng.random() < 0.9))
            else:
                b.video(int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4)))
        b.text(int(rng.integers(0, 4)))
        docs.append(b)
    ids, cu, image_grid, video_grid = _pack(docs)
    got = packed_mrope_positions(ids, cu, image_grid, video_grid)
    expected = torch.cat(
        [
            reference(d.input_ids, d.image_grid, d.video_grid) if d.ids else torch.zeros(3, 0, dtype=torch.long)
            for d in docs
        ],
        dim=1,
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_long_row_with_many_page_images() -> None:
    """A 128K-token row of 50 Letter pages (grid 1x114x88): correctness only, no timing."""
    b = Builder(18)
    for _ in range(50):
        b.text(60).image(1, 114, 88)
    b.text(131072 - len(b.ids))
    assert len(b.ids) == 131072
    _check(b)
    # Split the same tokens into 3 documents at text positions: each restarts at 0.
    cut1, cut2 = 30 * 2570 + 10, 41 * 2570 + 20  # a page is 60 + 1 + 2508 + 1 tokens
    assert all(b.ids[c] not in (IMG, VS) for c in (cut1, cut2))
    cu = torch.tensor([0, cut1, cut2, len(b.ids)])
    got = packed_mrope_positions(b.input_ids, cu, b.image_grid)
    for lo, hi, grid in [(0, cut1, b.images[:30]), (cut1, cut2, b.images[30:41]), (cut2, len(b.ids), b.images[41:])]:
        expected = reference(b.input_ids[lo:hi], torch.tensor(grid))
        torch.testing.assert_close(got[:, lo:hi], expected, rtol=0, atol=0)


def test_count_mismatch_raises() -> None:
    b = Builder(19).text(2).image(1, 4, 4).text(2)
    with pytest.raises(ValueError, match=r"found 4 image pad tokens .* = 6"):
        mrope_positions(b.input_ids, torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match=r"found 4 image pad tokens .* = 0"):
        mrope_positions(b.input_ids)
    with pytest.raises(ValueError, match="video"):
        mrope_positions(b.input_ids, b.image_grid, video_grid_thw=torch.tensor([[1, 2, 2]]))


def test_malformed_blocks_raise() -> None:
    split = Builder(20).text(2).image(1, 2, 2).text(2).image(1, 2, 2)
    with pytest.raises(ValueError, match="not contiguous"):
        mrope_positions(split.input_ids, torch.tensor([[1, 2, 4]]))  # one grid for two separate runs
    bare = torch.tensor([5, 6] + [IMG] * 4 + [7])
    with pytest.raises(ValueError, match="vision_start"):
        mrope_positions(bare, torch.tensor([[1, 4, 4]]))
    relaxed = mrope_positions(bare, torch.tensor([[1, 4, 4]]), vision_start_token_id=None)  # check switched off
    assert relaxed[1].tolist() == [0, 1, 2, 2, 3, 3, 4]
    b = Builder(21).text(3).image(1, 4, 4).text(3)
    with pytest.raises(ValueError, match="document boundary"):
        packed_mrope_positions(b.input_ids, torch.tensor([0, 6, len(b.ids)]), b.image_grid)
    with pytest.raises(ValueError, match="vision_start"):  # <vs> left in the previous document
        packed_mrope_positions(b.input_ids, torch.tensor([0, 4, len(b.ids)]), b.image_grid)
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_mrope_positions(b.input_ids, torch.tensor([0, 5]), b.image_grid)
    with pytest.raises(ValueError, match="multiples"):
        mrope_positions(b.input_ids, torch.tensor([[1, 4, 3]]))
