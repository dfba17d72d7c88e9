"""Plots a person can read: the mixture histogram's axis follows the data (no fixed 0-100K range),
the 100K line only where it falls inside; the eval curve gives every model its own marker, line
style and offset (equal curves stay visible) and a one-dataset suite one panel."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from megatron_vlm.mixing.mixer import Candidate, histogram_axis, plot_histogram
from megatron_vlm.eval.report import model_styles, plot_panels, summarize, write_report


def _candidates(tokens, task="docqa"):
    return [Candidate(0, i, 0, task, t, 1, False) for i, t in enumerate(tokens)]


def test_histogram_axis_follows_short_data(tmp_path):
    tokens_k = [0.5, 1.0, 2.0, 3.5]  # all far below 100K
    layout = histogram_axis(tokens_k, bins=32)
    assert layout["scale"] == "linear" and not layout["threshold"]
    lo, hi = layout["xlim"]
    assert lo <= 0.5 and 3.5 <= hi < 4.0  # not 0-100K: the bars fill the axis
    assert layout["edges"][0] <= 0.5 and layout["edges"][-1] >= 3.5 and len(layout["edges"]) == 33
    drawn = plot_histogram(_candidates([512, 1024, 2048, 3584]), str(tmp_path / "h.png"), bins=32)
    assert drawn["xlim"] == layout["xlim"]
    with Image.open(tmp_path / "h.png") as png:
        assert png.size[0] > 600


def test_histogram_axis_goes_log_when_lengths_span_decades(tmp_path):
    tokens_k = [0.3, 0.9, 4.0, 60.0, 120.0]
    layout = histogram_axis(tokens_k, bins=16)
    assert layout["scale"] == "log" and layout["threshold"]  # 100K lies inside: the line is drawn
    edges = layout["edges"]
    assert np.allclose(edges[1:] / edges[:-1], edges[1] / edges[0])  # log-spaced bins
    assert layout["xlim"][0] < 0.3 and layout["xlim"][1] > 120.0
    assert histogram_axis([], 8)["xlim"] == (0.0, 1.0)


def _records(models_scores, datasets=("heldout",), task="docqa"):
    out = []
    for model, scores in models_scores.items():
        for ds in datasets:
            for n, v in scores.items():
                out.append({"model": model, "dataset": ds, "length": n, "task": task, "score": v})
    return out


def test_one_dataset_suite_draws_one_panel(tmp_path):
    report = summarize(_records({"base": {256: 1.0, 1024: 0.5}}))
    panels = plot_panels(report)
    assert len(panels) == 1 and panels[0][2] == "heldout" and "heldout" in panels[0][0]
    two = summarize(_records({"base": {256: 1.0, 1024: 0.5}}, datasets=("a", "b")))
    assert [ds for _, _, ds in plot_panels(two)] == [None, "a", "b"]  # AVG, then each dataset
    mixed = summarize(_records({"m": {256: 1.0}}) + _records({"m": {256: 0.0}}, datasets=("needles",), task="niah"))
    assert len(plot_panels(mixed)) == 2  # one per one-dataset suite


def test_equal_curves_get_distinct_styles(tmp_path):
    models = ["base", "ckpt", "third"]
    styles = model_styles(models)
    assert len({s["marker"] for s in styles.values()}) == 3
    assert len({s["linestyle"] for s in styles.values()}) == 3
    assert len({s["x_factor"] for s in styles.values()}) == 3  # side by side, not on top of each other
    assert all(0.9 < s["x_factor"] < 1.1 for s in styles.values())  # still at their length
    assert styles["base"]["markersize"] > styles["ckpt"]["markersize"]  # the first one shows around the next
    assert model_styles(["only"])["only"]["x_factor"] == 1.0
    same = {256: 1.0, 1024: 0.5}
    write_report(_records({"base": same, "ckpt": same}), str(tmp_path))
    with Image.open(os.path.join(tmp_path, "eval_curve.png")) as png:
        width, height = png.size
    assert width < 1.5 * height  # one panel, not two side by side
