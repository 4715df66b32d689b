"""Prompt lookup (n-gram) drafting: no model. When the last n tokens occurred earlier in the prompt or the output,
propose the tokens that followed them there. Strong when the output copies its input: code edits, summaries, RAG.

The longest n-gram that matches wins (its latest occurrence), and the draft grows with the match: n + 2 tokens after
an n-token match (as llama.cpp's lookup decoding does, a long match is a copy in progress, a short one a guess), so
rows the target would reject are not verified for nothing."""

from __future__ import annotations

from collections.abc import Sequence

from leanlm.engine.request import Request

MIN_NGRAM, MAX_NGRAM = 2, 8
EXTRA_TOKENS = 2  # a match of n tokens drafts up to n + EXTRA_TOKENS


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
    occurred before: up to n + extra_tokens of it."""

    name = "ngram"
    default_max_tokens = MAX_NGRAM + EXTRA_TOKENS  # the longest draft the match rule gives
    sizes_its_drafts = True  # the match length sets the draft length: the tuner only says whether to draft

    def __init__(self, min_ngram: int = MIN_NGRAM, max_ngram: int = MAX_NGRAM, extra_tokens: int = EXTRA_TOKENS):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"Need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}.")
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self.extra_tokens = extra_tokens
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
                    drafts[request.request_id] = tokens[start : start + min(length, n + self.extra_tokens)]
                    break
        return drafts

    def remove(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)
