"""Word error rate: word-level edit distance / reference words, after lower-casing and dropping punctuation."""

from __future__ import annotations

import re
import unicodedata


def normalize(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower().replace("'", " ")
    return re.sub(r"[^\w\s]", " ", text).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        raise ValueError("the reference text has no words")
    previous = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, other in enumerate(hyp, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other))
        previous = current
    return previous[-1] / len(ref)
