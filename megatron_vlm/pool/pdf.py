"""One PDF, read defensively with PyMuPDF: open with limits, render pages, read the text layer,
tables, outline and images, and OCR pages that have no usable text.

Real PDFs are hostile (DESIGN.md §6): a plot page with ~41k characters makes table detection run
for minutes, some text layers are mojibake or only non-breaking spaces, some pages are pictures.
Every per-page step here is bounded, by input size first (characters, vector paths, pixels) and by
a wall-clock budget for the Python-side analysis; the pool adds a per-document time limit on top,
enforced by killing the worker process.

Coordinates returned here are PDF points in PyMuPDF's page space (origin top-left, y down); the
pool scales them to rendered-image pixels.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import unicodedata
from dataclasses import dataclass, field
from typing import Iterator, Optional

from megatron_vlm.data.image_processing import MAX_PIXELS

# PyMuPDF 2.0 imports two optional add-ons on ``import pymupdf``: ``pymupdf.layout`` (an ONNX layout
# model that ``find_tables`` then runs on every page) and ``pymupdf4llm`` (which imports
# onnxruntime). Together they cost ~1.4 s per process start, hundreds of MB, and a neural network
# per page; the pool uses the text layer instead. They are hidden while PyMuPDF is first imported,
# then un-hidden so other code can still import them on purpose.
_ADDONS = ("pymupdf.layout", "pymupdf4llm")


def import_pymupdf():
    """``import pymupdf`` without its ONNX add-ons (set ``MEGATRON_VLM_PYMUPDF_ADDONS=1`` to keep them)."""
    if "pymupdf" in sys.modules or os.environ.get("MEGATRON_VLM_PYMUPDF_ADDONS", "0") not in ("", "0"):
        import pymupdf
    else:
        hidden = [name for name in _ADDONS if name not in sys.modules]
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` fail fast
        try:
            import pymupdf
        finally:
            for name in hidden:
                if sys.modules.get(name, 0) is None:
                    del sys.modules[name]
    pymupdf.no_recommend_layout()
    pymupdf.TOOLS.mupdf_display_errors(False)  # MuPDF's own stderr chatter; errors still raise
    pymupdf.TOOLS.mupdf_display_warnings(False)
    return pymupdf


class PdfRejected(Exception):
    """The document cannot enter the pool; ``reason`` is one of the report's reason codes."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class AnalysisTimeout(Exception):
    """A bounded per-page analysis step ran out of its wall-clock budget."""


@dataclass
class PdfLimits:
    """Caps that keep one hostile PDF from exhausting memory or time."""

    max_file_bytes: int = 512 * 2**20
    # Render cap per page. Qwen2.5-VL's smart_resize never keeps more than MAX_PIXELS, so rendering
    # more only costs memory and disk; larger pages are rendered at a lower DPI (recorded per page).
    max_page_pixels: int = MAX_PIXELS
    max_page_chars: int = 20_000  # text kept per page; the rest is dropped and the page flagged
    max_blocks_per_page: int = 500
    table_max_chars: int = 8_000  # no table detection above this many characters on a page ...
    table_max_paths: int = 5_000  # ... or this many vector path items (plots, maps)
    analysis_seconds: float = 10.0  # wall-clock budget of the Python-side analysis of one page
    toc_max_entries: int = 5_000
    max_images_per_page: int = 200


@dataclass
class OcrSettings:
    """OCR through PyMuPDF's built-in Tesseract (only the language data files are needed)."""

    languages: str = "eng"
    dpi: int = 200
    max_pages: int = 50  # per document; ~4 s per page on these CPUs
    tessdata: Optional[str] = None


@dataclass
class TextBlock:
    """A block of the text layer (or of OCR output) with the font facts layout labelling needs."""

    bbox: tuple[float, float, float, float]
    lines: list[str]
    size: float  # dominant font size (by characters), points
    bold: float  # fraction of characters in a bold face

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def num_chars(self) -> int:
        return sum(len(line) for line in self.lines)


@dataclass
class TableRegion:
    """A table found by PyMuPDF's ruling-line detector: its box and cell text (rows x columns)."""

    bbox: tuple[float, float, float, float]
    rows: list[list[str]]


@dataclass
class PageContent:
    """Everything read from one page's content (not its pixels)."""

    number: int  # 1-based
    width: float  # points
    height: float
    blocks: list[TextBlock] = field(default_factory=list)
    tables: list[TableRegion] = field(default_factory=list)
    images: list[tuple[float, float, float, float]] = field(default_factory=list)
    # thin horizontal rules (x0, y, x1): booktabs-style tables (top/mid/bottom rules, no grid) are
    # found from them and a caption in layout
    rules: list[tuple[float, float, float]] = field(default_factory=list)
    source: str = "none"  # "text" | "ocr" | "none"
    num_chars: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class RenderedPage:
    """Raw RGB pixels of one page and the DPI actually used (lower than asked for huge pages)."""

    width: int
    height: int
    dpi: float
    samples: bytes
    stride: int


@dataclass
class TocEntry:
    """One PDF outline entry pointing into the document."""

    level: int
    title: str
    page: int  # 1-based


# ------------------------------------------------------------------------------------------- open


def open_pdf(path: str, limits: PdfLimits):
    """Open a PDF or raise :class:`PdfRejected` (too_large, corrupt, encrypted).

    A file MuPDF had to repair is accepted only if its pages then load and render; those
    failures surface later as ``render_failure`` (or ``corrupt`` for a page that cannot load).
    Owner-password-only files (no password needed to read) open normally.
    """
    pymupdf = import_pymupdf()
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as exc:
        raise PdfRejected("unreadable", f"{type(exc).__name__}: {exc}") from exc
    if size > limits.max_file_bytes:
        raise PdfRejected("too_large", f"{size} bytes > {limits.max_file_bytes}")
    if b"%PDF-" not in head:
        raise PdfRejected("corrupt", "no %PDF- header in the first 1 KiB")
    try:
        doc = pymupdf.open(path, filetype="pdf")
    except Exception as exc:  # MuPDF raises FileDataError, RuntimeError, ValueError...
        raise PdfRejected("corrupt", f"open failed: {_short(exc)}") from exc
    if doc.needs_pass and not doc.authenticate(""):
        doc.close()
        raise PdfRejected("encrypted", "a password is needed to open the document")
    return doc


def page_count(doc) -> int:
    """Pages in the document; a broken page tree counts as corrupt."""
    try:
        return int(doc.page_count)
    except Exception as exc:
        raise PdfRejected("corrupt", f"page tree: {_short(exc)}") from exc


def load_page(doc, index: int):
    """Load page ``index`` (0-based) or raise ``corrupt``."""
    try:
        page = doc.load_page(index)
        rect = page.rect
    except Exception as exc:
        raise PdfRejected("corrupt", f"page {index + 1} does not load: {_short(exc)}") from exc
    if not all(math.isfinite(v) for v in rect) or rect.width < 1 or rect.height < 1:
        raise PdfRejected("render_failure", f"page {index + 1} has a degenerate size {tuple(rect)}")
    return page


def metadata_title(doc) -> str:
    """The document information title, whitespace-normalized and bounded."""
    try:
        title = (doc.metadata or {}).get("title") or ""
    except Exception:
        return ""
    return " ".join(title.split())[:300]


# ----------------------------------------------------------------------------------------- render


def render_zoom(width_pt: float, height_pt: float, dpi: float, max_pixels: int) -> float:
    """Zoom (pixels per point) for rendering: ``dpi / 72``, reduced so the image fits ``max_pixels``."""
    zoom = dpi / 72.0
    w, h = width_pt * zoom, height_pt * zoom
    if w * h > max_pixels:
        zoom *= math.sqrt(max_pixels / (w * h))
    return zoom


def render_page(page, dpi: float, limits: PdfLimits) -> RenderedPage:
    """Render one page to RGB at ``dpi``, within the pixel cap."""
    pymupdf = import_pymupdf()
    rect = page.rect
    zoom = render_zoom(rect.width, rect.height, dpi, limits.max_page_pixels)
    for _ in range(8):  # MuPDF rounds the pixel box outwards; shrink until it fits the cap
        irect = (rect * pymupdf.Matrix(zoom, zoom)).irect
        if irect.width * irect.height <= limits.max_page_pixels:
            break
        zoom *= 0.999
    try:
        pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
    except Exception as exc:
        raise PdfRejected("render_failure", f"page {page.number + 1}: {_short(exc)}") from exc
    if pix.width * pix.height > limits.max_page_pixels or pix.width < 1 or pix.height < 1:
        raise PdfRejected("render_failure", f"page {page.number + 1}: {pix.width}x{pix.height} pixels")
    return RenderedPage(width=pix.width, height=pix.height, dpi=zoom * 72.0,
                        samples=bytes(pix.samples_mv), stride=pix.stride)


def encode_image(rendered: RenderedPage, image_format: str, quality: int = 85) -> bytes:
    """Encode rendered pixels: jpeg (Pillow, quality ``quality``; DESIGN §6: ~100 pages/s), png
    (MuPDF-speed zlib, lossless) or webp (Pillow; ~40% smaller than JPEG but ~10x slower)."""
    import io

    from PIL import Image

    image = Image.frombuffer("RGB", (rendered.width, rendered.height), rendered.samples, "raw", "RGB",
                             rendered.stride, 1)
    out = io.BytesIO()
    if image_format == "jpeg":
        image.save(out, format="JPEG", quality=quality)
    elif image_format == "png":
        image.save(out, format="PNG", compress_level=3)
    elif image_format == "webp":
        image.save(out, format="WEBP", quality=quality, method=2)
    else:
        raise ValueError(f"unknown image format {image_format!r} (jpeg, png or webp)")
    return out.getvalue()


IMAGE_SUFFIX = {"jpeg": "jpg", "png": "png", "webp": "webp"}


# ---------------------------------------------------------------------------------------- bounding


@contextlib.contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Raise :class:`AnalysisTimeout` inside the block after ``seconds`` of wall-clock time.

    Uses SIGALRM, so it interrupts Python code (PyMuPDF's table finder is Python) but not a single
    long C call; the pool's per-document limit covers those. No-op off the main thread or when
    ``seconds <= 0``.
    """
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):
        raise AnalysisTimeout(f"over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------- text

_BOLD_NAME_HINTS = ("bold", "black", "heavy", "semibold", "demi", "cmbx", "sfbx", "-bd", "bd-", "extrab")


def _span_is_bold(span: dict) -> bool:
    if span.get("flags", 0) & 16:  # TEXT_FONT_BOLD
        return True
    name = str(span.get("font", "")).lower()
    return any(hint in name for hint in _BOLD_NAME_HINTS)


def _clean(text: str) -> str:
    """Normalize whitespace (NBSP and friends included), drop control and format characters.

    Private-use and unassigned code points are kept: :func:`text_is_usable` counts them.
    """
    if text.isascii() and text.isprintable():
        return " ".join(text.split())
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if category == "Cc":
            kept.append(" ")
        elif category != "Cf":  # soft hyphens, zero-width joiners, bidi marks
            kept.append(ch)
    return " ".join("".join(kept).split())


def _block_lines(raw: dict) -> list[tuple[str, list[dict]]]:
    """A block's lines as (text, spans), with lines that share a baseline joined by a space.

    MuPDF starts a new line at a large horizontal gap, so "2.1<gap>Overview" or a table-of-contents
    row arrives as several lines; readers (and heading detection) want them as one.
    """
    merged: list[tuple[str, list[dict], tuple[float, float, float, float]]] = []
    for line in raw.get("lines", ()):
        spans = list(line.get("spans", ()))
        text = _clean("".join(s.get("text", "") for s in spans))
        if not text:
            continue
        bbox = tuple(float(v) for v in line.get("bbox", (0, 0, 0, 0)))
        if merged:
            prev_text, prev_spans, prev_bbox = merged[-1]
            height = max(bbox[3] - bbox[1], 1.0)
            if abs(bbox[3] - prev_bbox[3]) < 0.3 * height and bbox[0] >= prev_bbox[2] - 1.0:
                joined = (prev_bbox[0], min(prev_bbox[1], bbox[1]), bbox[2], max(prev_bbox[3], bbox[3]))
                merged[-1] = (prev_text + " " + text, prev_spans + spans, joined)
                continue
        merged.append((text, spans, bbox))
    return [(text, spans) for text, spans, _ in merged]


def blocks_from_dict(page_dict: dict, max_chars: int, max_blocks: int) -> tuple[list[TextBlock], bool]:
    """Text blocks from ``page.get_text("dict")`` output; returns (blocks, truncated).

    At most ``max_chars`` characters are kept (the block that crosses the limit is cut at a line).
    """
    blocks: list[TextBlock] = []
    total = 0
    truncated = False
    for raw in page_dict.get("blocks", ()):
        if raw.get("type", 0) != 0:
            continue
        if len(blocks) >= max_blocks:
            return blocks, True
        lines: list[str] = []
        sizes: dict[float, int] = {}
        bold_chars = chars = 0
        for text, spans in _block_lines(raw):
            if total + len(text) > max_chars:
                truncated = True
                break
            total += len(text)
            lines.append(text)
            for span in spans:
                n = len(span.get("text", "").strip())
                if n == 0:
                    continue
                size = round(float(span.get("size", 0.0)) * 2) / 2  # 0.5 pt bins
                sizes[size] = sizes.get(size, 0) + n
                chars += n
                bold_chars += n if _span_is_bold(span) else 0
        if lines:
            size = max(sizes.items(), key=lambda kv: (kv[1], kv[0]))[0] if sizes else 0.0
            bbox = tuple(round(float(v), 2) for v in raw["bbox"])
            blocks.append(TextBlock(bbox=bbox, lines=lines, size=size, bold=round(bold_chars / max(chars, 1), 3)))
        if truncated:
            break
    return blocks, truncated


def text_is_usable(blocks: list[TextBlock]) -> bool:
    """False for an empty, whitespace-only or mojibake text layer (then OCR, if enabled, is tried).

    Mojibake shows as replacement characters, private-use code points or text where few characters
    are letters or digits; real text, in any script, is mostly letters.
    """
    text = "".join("".join(b.lines) for b in blocks)
    visible = [ch for ch in text if not ch.isspace()]
    if len(visible) < 3:
        return False
    bad = sum(1 for ch in visible if ch == "\ufffd" or unicodedata.category(ch) in ("Co", "Cn", "Cs"))
    alnum = sum(1 for ch in visible if ch.isalnum())
    return bad / len(visible) < 0.2 and alnum / len(visible) >= 0.4


def _text_flags() -> int:
    """Text extraction flags: no image bytes; glyphs without Unicode come out as U+FFFD (not as raw
    character codes, PyMuPDF's dict default) so that :func:`text_is_usable` can see mojibake."""
    pymupdf = import_pymupdf()
    flags = pymupdf.TEXTFLAGS_DICT & ~pymupdf.TEXT_PRESERVE_IMAGES & ~pymupdf.TEXT_CID_FOR_UNKNOWN_UNICODE
    return flags | pymupdf.TEXT_DEHYPHENATE


def page_text(page) -> str:
    """The page's raw text layer (control characters kept) for ``text_quality.check_page_text``."""
    return page.get_text("text", flags=_text_flags())


def read_text_blocks(page, limits: PdfLimits) -> tuple[list[TextBlock], bool]:
    """The page's text layer as blocks (images excluded: their bytes are not wanted here)."""
    page_dict = page.get_text("dict", flags=_text_flags())
    return blocks_from_dict(page_dict, limits.max_page_chars, limits.max_blocks_per_page)


def image_boxes(page, limits: PdfLimits) -> list[tuple[float, float, float, float]]:
    """Boxes of raster images on the page large enough to be figures (>= 1/2 inch each side)."""
    boxes = []
    try:
        infos = page.get_image_info()
    except Exception:
        return boxes
    for info in infos[: limits.max_images_per_page]:
        x0, y0, x1, y1 = (float(v) for v in info.get("bbox", (0, 0, 0, 0)))
        x0, y0 = max(x0, 0.0), max(y0, 0.0)
        x1, y1 = min(x1, page.rect.width), min(y1, page.rect.height)
        if (x1 - x0) * (y1 - y0) >= 0.9 * page.rect.width * page.rect.height:
            continue  # a scan or a page background, not a figure on the page
        if x1 - x0 >= 36 and y1 - y0 >= 36:
            boxes.append((round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)))
    return boxes


# ----------------------------------------------------------------------------------------- tables


def horizontal_rules(page, cap: int, min_width: float = 30.0) -> list[tuple[float, float, float]]:
    """Thin horizontal rules on the page as (x0, y, x1), at least ``min_width`` long: drawn lines and
    filled bars under 1.5 pt high (not the edges of boxes). At most ``cap`` path items are read."""
    try:
        paths = page.get_cdrawings()
    except Exception:
        return []
    rules: list[tuple[float, float, float]] = []
    total = 0
    for path in paths:
        for item in path.get("items", ()):
            total += 1
            if total > cap:
                return rules
            if item[0] == "l":
                (x0, y0), (x1, y1) = item[1], item[2]
                if abs(y1 - y0) < 1.0 and abs(x1 - x0) >= min_width:
                    rules.append((round(min(x0, x1), 1), round((y0 + y1) / 2, 1), round(max(x0, x1), 1)))
            elif item[0] == "re":
                x0, y0, x1, y1 = item[1]
                if abs(y1 - y0) < 1.5 and abs(x1 - x0) >= min_width:
                    rules.append((round(min(x0, x1), 1), round((y0 + y1) / 2, 1), round(max(x0, x1), 1)))
    return rules


def ruling_positions(page, cap: int) -> tuple[int, int, int]:
    """(distinct y of horizontal rules, distinct x of vertical rules, path items) on the page,
    from the cheap ``get_cdrawings``; positions are rounded to 2 pt, counting stops past ``cap``.

    A ruled table of >= 2 x 2 cells needs >= 3 of each; code frames and underlines (the common
    case in reports and manuals) have two x positions at most, so they never reach the table finder.
    """
    try:
        paths = page.get_cdrawings()
    except Exception:
        return 0, 0, cap + 1
    ys: set[int] = set()
    xs: set[int] = set()
    total = 0
    for path in paths:
        for item in path.get("items", ()):
            total += 1
            if total > cap:
                return len(ys), len(xs), total
            kind = item[0]
            if kind == "l":
                (x0, y0), (x1, y1) = item[1], item[2]
                if abs(y1 - y0) < 1.0 and abs(x1 - x0) >= 3.0:
                    ys.add(round(y0 / 2))
                elif abs(x1 - x0) < 1.0 and abs(y1 - y0) >= 3.0:
                    xs.add(round(x0 / 2))
            elif kind in ("re", "qu"):
                pts = item[1] if kind == "qu" else ((item[1][0], item[1][1]), (item[1][2], item[1][3]))
                left, right = min(p[0] for p in pts), max(p[0] for p in pts)
                top, bottom = min(p[1] for p in pts), max(p[1] for p in pts)
                if right - left >= 3.0:  # a thin filled bar is a rule; a box has two of each
                    ys.update({round(top / 2), round(bottom / 2)})
                if bottom - top >= 3.0:
                    xs.update({round(left / 2), round(right / 2)})
    return len(ys), len(xs), total


def is_table_grid(rows: list[list[str]], bbox, page_width: float, page_height: float) -> bool:
    """Whether the ruling-line finder's cells are a table: >= 2 rows with text in >= 2 cells each,
    and not a frame around the page. A beamer block (a title bar over a body box) and a slide's
    or page's border are ruled boxes too, but their text sits in one cell per row."""
    area = max(0.0, bbox[2] - bbox[0]) * max(0.0, bbox[3] - bbox[1])
    if page_width > 0 and page_height > 0 and area >= 0.85 * page_width * page_height:
        return False
    multi = sum(1 for row in rows if sum(1 for cell in row if len(cell.strip()) >= 1) >= 2)
    single_letter_split = sum(1 for row in rows if len(row) >= 2 and len(row[0].strip()) == 1 and row[1][:1].islower())
    return multi - single_letter_split >= 2


def find_tables(page, limits: PdfLimits, num_chars: int) -> tuple[list[TableRegion], Optional[str]]:
    """Ruled tables on the page, or ([], why skipped). Never runs PyMuPDF's ONNX layout gate."""
    if num_chars > limits.table_max_chars:
        return [], f"table detection skipped: {num_chars} characters > {limits.table_max_chars}"
    rows, cols, total = ruling_positions(page, limits.table_max_paths)
    if total > limits.table_max_paths:
        return [], f"table detection skipped: over {limits.table_max_paths} vector paths"
    if rows < 3:
        return [], None  # no ruled table of >= 2 rows is possible (tables ruled only across pass)
    regions = []
    try:
        with time_budget(limits.analysis_seconds):
            found = page.find_tables(use_layout=False)
            for table in found.tables:
                rows = [[_clean(cell or "") for cell in row] for row in table.extract()]
                rows = [row for row in rows if any(row)]
                bbox = tuple(round(float(v), 2) for v in table.bbox)
                if is_table_grid(rows, bbox, page.rect.width, page.rect.height):
                    regions.append(TableRegion(bbox=bbox, rows=rows))
    except AnalysisTimeout as exc:
        return [], f"table detection stopped: {exc}"
    except Exception as exc:  # a table-finder bug must not cost the document
        return [], f"table detection failed: {_short(exc)}"
    return regions, None


# -------------------------------------------------------------------------------------------- toc


def read_toc(doc, num_pages: int, limits: PdfLimits) -> list[TocEntry]:
    """The outline, pointing into the document only, levels made consecutive from 1."""
    try:
        raw = doc.get_toc(simple=True)
    except Exception:
        return []
    entries = []
    for item in raw[: limits.toc_max_entries]:
        level, title, page = int(item[0]), " ".join(str(item[1]).split())[:300], int(item[2])
        if 1 <= page <= num_pages and title:
            entries.append(TocEntry(level=max(1, level), title=title, page=page))
    return entries


# -------------------------------------------------------------------------------------------- ocr


def ocr_tessdata(languages: str, tessdata: Optional[str] = None) -> Optional[str]:
    """The Tesseract data folder holding every requested language, or None (then no OCR)."""
    pymupdf = import_pymupdf()
    try:
        folder = pymupdf.get_tessdata(tessdata)
    except Exception:
        return None
    if not folder:
        return None
    for lang in languages.split("+"):
        if not os.path.isfile(os.path.join(folder, f"{lang}.traineddata")):
            return None
    return folder


def ocr_blocks(page, settings: OcrSettings, limits: PdfLimits) -> tuple[list[TextBlock], bool]:
    """Blocks from a full-page OCR (Tesseract inside MuPDF)."""
    flags = _text_flags()
    textpage = page.get_textpage_ocr(flags=flags, language=settings.languages, dpi=settings.dpi, full=True,
                                     tessdata=settings.tessdata)
    page_dict = page.get_text("dict", textpage=textpage, flags=flags)
    return blocks_from_dict(page_dict, limits.max_page_chars, limits.max_blocks_per_page)


# ------------------------------------------------------------------------------------------- page


def read_page(page, limits: PdfLimits, ocr: Optional[OcrSettings] = None, ocr_budget: Optional[list[int]] = None,
              tables: bool = True, text_broken: bool = False, broken_ocr: Optional[OcrSettings] = None) -> PageContent:
    """Read one page's content: text layer (or OCR), tables, image boxes; every step bounded.

    ``ocr_budget`` is a one-element list shared by a document's pages: OCR runs while it is > 0.
    ``text_broken``: the text layer failed ``text_quality.check_page_text``; it is never used, the
    page is OCR'd with ``broken_ocr`` (the pool planned and budgeted it) or keeps no blocks.
    """
    rect = page.rect
    content = PageContent(number=page.number + 1, width=round(rect.width, 2), height=round(rect.height, 2))
    blocks, truncated = read_text_blocks(page, limits)
    if text_broken:
        blocks, truncated = [], False
        if broken_ocr is not None:
            try:
                blocks, truncated = ocr_blocks(page, broken_ocr, limits)
                content.source = "ocr" if blocks else "none"
            except Exception as exc:
                content.warnings.append(f"ocr failed: {_short(exc)}")
    elif text_is_usable(blocks):
        content.source = "text"
    else:
        if blocks:
            content.warnings.append("text layer unusable (empty, whitespace or mojibake)")
        blocks, truncated = [], False
        if ocr is not None and (ocr_budget is None or ocr_budget[0] > 0):
            if ocr_budget is not None:
                ocr_budget[0] -= 1
            try:
                blocks, truncated = ocr_blocks(page, ocr, limits)
                content.source = "ocr" if blocks else "none"
            except Exception as exc:
                content.warnings.append(f"ocr failed: {_short(exc)}")
        elif ocr is not None:
            content.warnings.append("ocr page budget spent")
    if truncated:
        content.warnings.append(f"text truncated at {limits.max_page_chars} characters")
    content.blocks = blocks
    content.num_chars = sum(b.num_chars for b in blocks)
    content.images = image_boxes(page, limits)
    if tables and content.source == "text":
        content.rules = horizontal_rules(page, limits.table_max_paths)
        content.tables, skipped = find_tables(page, limits, content.num_chars)
        if skipped:
            content.warnings.append(skipped)
    return content


def _short(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "IMAGE_SUFFIX",
    "AnalysisTimeout",
    "OcrSettings",
    "PageContent",
    "PdfLimits",
    "PdfRejected",
    "RenderedPage",
    "TableRegion",
    "TextBlock",
    "TocEntry",
    "blocks_from_dict",
    "is_table_grid",
    "ruling_positions",
    "encode_image",
    "find_tables",
    "horizontal_rules",
    "import_pymupdf",
    "load_page",
    "metadata_title",
    "ocr_blocks",
    "ocr_tessdata",
    "open_pdf",
    "page_count",
    "page_text",
    "read_page",
    "read_text_blocks",
    "read_toc",
    "render_page",
    "render_zoom",
    "text_is_usable",
    "time_budget",
]
