"""PyMuPDF 2.0's own layout model (pymupdf_layout: a graph network over the page's text boxes and
image features, run with onnxruntime), mapped to the pool's block labels.

It is the reference our text-layer heuristics (:mod:`megatron_vlm.pool.layout`) are measured
against (tools/bench/layout.py) and a named alternative (``--layout-method model``). It is
imported only on request: loading it costs ~1 s and hundreds of MB per process, and a page ~0.3 s
on one CPU core.
"""

from __future__ import annotations

import threading
from typing import Optional

from megatron_vlm.pool.layout import Block

# the model's classes -> ours ("footnote" and "formula" have no label of their own: body text)
MODEL_LABELS = {
    "text": "paragraph",
    "title": "title",
    "section-header": "section",
    "list-item": "list",
    "table": "table",
    "caption": "caption",
    "page-header": "header",
    "page-footer": "footer",
    "footnote": "paragraph",
    "formula": "paragraph",
    "picture": "figure",
}

_LOCK = threading.Lock()
_ACTIVE = False


def activate() -> None:
    """Load the ONNX model once per process (``import pymupdf.layout`` registers it with PyMuPDF)."""
    global _ACTIVE
    with _LOCK:
        if _ACTIVE:
            return
        try:
            import pymupdf.layout  # noqa: F401  (activates pymupdf._get_layout)
        except ImportError as exc:
            raise RuntimeError("the layout model needs the pymupdf-layout package (pip install pymupdf-layout); "
                               f"import failed: {exc}") from exc
        _ACTIVE = True


def model_regions(page) -> list[tuple[str, tuple[float, float, float, float]]]:
    """(our label, bbox in points) of every region the model finds on a PyMuPDF page."""
    activate()
    page.get_layout()
    regions = []
    for item in page.layout_information or ():
        label = MODEL_LABELS.get(str(item[4]))
        if label is None:
            continue
        regions.append((label, tuple(round(float(v), 2) for v in item[:4])))
    return _join_margin_lines(regions)


def _join_margin_lines(regions: list) -> list:
    """One header (footer) block per line: the model returns a running head's left text and its
    page number as two regions; the pool (and its heuristics) keep one block per line."""
    out: list = []
    for label, bbox in regions:
        if label in ("header", "footer"):
            for i, (other_label, other) in enumerate(out):
                if other_label == label and min(bbox[3], other[3]) - max(bbox[1], other[1]) > 0.5 * min(
                        bbox[3] - bbox[1], other[3] - other[1]):
                    out[i] = (label, (min(bbox[0], other[0]), min(bbox[1], other[1]),
                                      max(bbox[2], other[2]), max(bbox[3], other[3])))
                    break
            else:
                out.append((label, bbox))
        else:
            out.append((label, bbox))
    return out


def model_blocks(page, regions: Optional[list] = None) -> list[Block]:
    """The model's regions as pool blocks, with the text inside each (reading order as returned)."""
    regions = model_regions(page) if regions is None else regions
    blocks = []
    for label, bbox in regions:
        text = "" if label == "figure" else " ".join(page.get_textbox(bbox).split())
        blocks.append(Block(label=label, bbox=bbox, text=text))
    return blocks


__all__ = ["MODEL_LABELS", "activate", "model_blocks", "model_regions"]
