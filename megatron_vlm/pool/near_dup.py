"""Near-duplicate documents by content: the same document saved twice (re-compressed, other
metadata, another producer) has another SHA-256 but the same text layer.

Each document's text layer (all pages, NFKC + case-folded words of two or more letters, line-end
hyphenation undone) is cut into overlapping
``SHINGLE``-word shingles, summarised by a ``NUM_PERM``-permutation MinHash (``datasketch``,
fixed seed: the same text always gives the same signature), stored in the record as
``text_minhash``. At merge time documents are visited in path order; MinHashLSH finds earlier kept
documents whose estimated Jaccard similarity may reach ``THRESHOLD``, and a document whose best
such match reaches it is rejected as ``near_duplicate`` of that (earlier, kept) document. Documents
with fewer than ``MIN_WORDS`` words (scans without OCR, image-only PDFs) get no signature and are
not compared.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Optional, Sequence

NUM_PERM = 128
SHINGLE = 5  # words per shingle
THRESHOLD = 0.8  # estimated Jaccard similarity of the shingle sets
MIN_WORDS = 100  # below this the text says too little to compare
SEED = 1

_WORD = re.compile(r"\w+")
_LINE_END_HYPHEN = re.compile(r"(\w)[-\u00ad\u2010]\s*\n\s*(\w)")


def _words(texts: Iterable[str]) -> list[str]:
    """Case-folded words of two or more characters, hyphenation at line ends undone: two builds of one
    document break lines in other places ('мик-\\nрокалькуляторах' vs 'микрокалькуляторах') and keep or
    lose stray one-letter glyphs (initials, accents); neither should make them different documents."""
    words = []
    for text in texts:
        text = _LINE_END_HYPHEN.sub(r"\1\2", unicodedata.normalize("NFKC", text))
        words.extend(w for w in _WORD.findall(text.casefold()) if len(w) > 1)
    return words


def text_minhash(texts: Iterable[str]) -> list[int]:
    """The MinHash signature of the texts' word shingles; [] when they have < MIN_WORDS words."""
    words = _words(texts)
    if len(words) < MIN_WORDS:
        return []
    from datasketch import MinHash

    shingles = {" ".join(words[i:i + SHINGLE]).encode("utf-8") for i in range(len(words) - SHINGLE + 1)}
    mh = MinHash(num_perm=NUM_PERM, seed=SEED)
    mh.update_batch(sorted(shingles))
    return [int(v) for v in mh.hashvalues]


class NearDuplicateFinder:
    """Feed documents in a deterministic order; each is either kept or named a near duplicate of
    an earlier kept one."""

    def __init__(self, threshold: float = THRESHOLD):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self._lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self._kept: dict[str, object] = {}
        self.compared = 0
        self.not_compared = 0

    def add(self, key: str, signature: Sequence[int]) -> Optional[tuple[str, float]]:
        """(keeper key, estimated similarity) when ``key`` near-duplicates a kept document, else
        None (and ``key`` is kept). An empty signature is kept without comparison."""
        import numpy as np
        from datasketch import MinHash

        if len(signature) != NUM_PERM:  # [] / (): too little text
            self.not_compared += 1
            return None
        self.compared += 1
        mh = MinHash(num_perm=NUM_PERM, seed=SEED, hashvalues=np.asarray(signature, dtype=np.uint64))
        best: Optional[tuple[str, float]] = None
        for other in sorted(self._lsh.query(mh)):
            similarity = mh.jaccard(self._kept[other])
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (other, similarity)
        if best is None:
            self._lsh.insert(key, mh)
            self._kept[key] = mh
        return best

    def stats(self) -> dict:
        return {"method": f"MinHash ({NUM_PERM} permutations) over {SHINGLE}-word shingles (words of 2+ letters, "
                          "line-end hyphens joined), LSH",
                "threshold": self.threshold, "compared": self.compared,
                f"not_compared_under_{MIN_WORDS}_words": self.not_compared}


__all__ = ["MIN_WORDS", "NUM_PERM", "NearDuplicateFinder", "SHINGLE", "THRESHOLD", "text_minhash"]
