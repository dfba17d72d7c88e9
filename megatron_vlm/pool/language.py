"""Document language, for the pool statistics (paper Table 9: English / Chinese / other) and for
filtering. A light detector is enough at document level: py3langid (a numpy port of langid.py,
97 languages, its model ships inside the wheel, deterministic) on a sample of body text.
"""

from __future__ import annotations

from typing import Iterable

UNKNOWN = "unknown"
MIN_LETTERS = 40  # below this, any guess is noise (a title page, a scan without OCR)
SAMPLE_CHARS = 6_000


def sample_text(texts: Iterable[str], max_chars: int = SAMPLE_CHARS) -> str:
    """Up to ``max_chars`` characters taken evenly from the given texts (start, middle and end of
    a document all count, so a foreign-language abstract does not decide alone)."""
    texts = [t for t in texts if t and t.strip()]
    if sum(len(t) for t in texts) <= max_chars:
        return "\n".join(texts)
    count = min(len(texts), max(1, max_chars // 200))
    picks = sorted({round(i * (len(texts) - 1) / max(count - 1, 1)) for i in range(count)})
    share = max_chars // len(picks)
    return "\n".join(texts[i][:share] for i in picks)


def detect_language(text: str) -> str:
    """ISO 639-1 code of the text's language, or ``"unknown"`` when there is too little text."""
    if sum(1 for ch in text if ch.isalpha()) < MIN_LETTERS:
        return UNKNOWN
    import py3langid

    language, _score = py3langid.classify(text)
    return str(language)


_IDENTIFIER = None


def identify_language(text: str) -> tuple[str, float]:
    """(language, normalised probability in [0, 1]) of ``text``: the confidence the text-layer check
    needs (py3langid's plain ``classify`` gives an unnormalised score)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    language, confidence = _IDENTIFIER.classify(text)
    return str(language), round(float(confidence), 4)


__all__ = ["UNKNOWN", "detect_language", "identify_language", "sample_text"]
