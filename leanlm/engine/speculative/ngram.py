"""Prompt lookup (n-gram) drafting: no model. When the last n tokens occurred earlier in the prompt or the output,
propose the tokens that followed them there. Strong when the output copies its input: code edits, summaries, RAG."""

from __future__ import annotations

from collections.abc import Sequence

from leanlm.engine.request import Request


class _NgramIndex:
    """For each n, the latest position that followed each n-gram; grows by the tokens added since the last call."""

    def __init__(self, sizes: range):
        self.sizes = sizes
        self.tables: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in sizes}
        self.indexed = 0  # tokens[:indexed] have had their preceding n-grams registered

    def extend(self, tokens: Sequence[int]) -> None:
        for i in range(max(self.indexed, 1), len(tokens)):
            for n in self.sizes:  # the n-gram ending just before token i is followed by position i
                if i >= n:
                    self.tables[n][tuple(tokens[i - n : i])] = i
        self.indexed = max(self.indexed, len(tokens))


class NgramDrafter:
    """Proposes the continuation of the longest n-gram (max_ngram down to min_ngram) that ends the sequence and
    occurred before."""

    name = "ngram"

    def __init__(self, min_ngram: int = 2, max_ngram: int = 4):
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self._indexes: dict[str, _NgramIndex] = {}

    def propose(self, requests: Sequence[Request], lengths: Sequence[int]) -> dict[str, list[int]]:
        drafts = {}
        for request, length in zip(requests, lengths, strict=True):
            index = self._indexes.setdefault(request.request_id, _NgramIndex(self.sizes))
            tokens = request.all_token_ids
            index.extend(tokens)
            for n in self.sizes:
                start = index.tables[n].get(tuple(tokens[-n:])) if len(tokens) > n else None
                if start is not None:
                    drafts[request.request_id] = tokens[start : start + length]
                    break
        return drafts

    def remove(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)
