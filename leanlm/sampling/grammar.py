"""Constrained decoding: a JSON schema, a regular expression or a Lark grammar, compiled by llguidance into one
token mask per request and step, so that the output always matches (up to max_tokens).

llguidance (Microsoft's Rust engine behind Guidance, also used by vLLM and SGLang) builds each mask lazily from
the tokenizer's token trie in microseconds, so constrained requests share steps with free ones: the masks of a
step are computed on a worker thread while the forward pass runs, and applied row by row before sampling.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from leanlm.errors import InvalidRequestError
from leanlm.sampling_params import SamplingParams


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise InvalidRequestError(
            "Structured output (json_schema, regex, grammar) needs the llguidance package: "
            "pip install 'leanlm[structured]'."
        ) from None
    return llguidance


def compile_grammar(
    json_schema: str | dict[str, Any] | None = None, regex: str | None = None, grammar: str | None = None
) -> str:
    """The llguidance grammar of exactly one constraint; InvalidRequestError naming it when it is invalid."""
    given = [n for n, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)) if v is not None]
    if len(given) != 1:
        raise InvalidRequestError(f"Give exactly one of json_schema, regex or grammar, got {given or 'none'}.")
    llg = _llguidance()
    kind = given[0]
    try:
        if kind == "json_schema":
            schema = json.loads(json_schema) if isinstance(json_schema, str) else json_schema
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be a JSON object")
            # compact separators: no runs of whitespace for a small model to wander into
            compiled = llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        elif kind == "regex":
            compiled = llg.LLMatcher.grammar_from_regex(regex)
        else:
            compiled = llg.LLMatcher.grammar_from_lark(grammar)
        error = llg.LLMatcher.validate_grammar(compiled)
    except (ValueError, TypeError, RecursionError) as exc:  # not JSON, not an object
        error = str(exc)
    if error:
        first = error.strip().splitlines()[0] if error.strip() else "invalid"
        raise InvalidRequestError(f"Invalid {kind}: {first[:300]}")
    return compiled


def grammar_of(params: SamplingParams) -> str | None:
    if not params.constrained:
        return None
    return compile_grammar(params.json_schema, params.regex, params.grammar)


class Constraint:
    """One request's grammar state: which tokens may come next; advanced by every sampled token."""

    def __init__(self, compiler: GrammarCompiler, matcher, eos_token_ids: Sequence[int]):
        self.compiler = compiler
        self.matcher = matcher
        self.eos_token_ids = list(eos_token_ids)

    def consume(self, token_id: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token_id)


class GrammarCompiler:
    """Makes Constraints for one tokenizer (its llguidance view costs about half a second: built once, lazily)."""

    def __init__(self, tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self._llg_tokenizer = None
        self._executor = None

    def constraint(self, params: SamplingParams) -> Constraint | None:
        grammar = grammar_of(params)
        if grammar is None:
            return None
        llg = _llguidance()
        if self._llg_tokenizer is None:
            eos = sorted(self._tokenizer.eos_token_ids)
            self._llg_tokenizer = llg.LLTokenizer(
                self._tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=eos
            )
            self._executor = llg.LLExecutor()
        matcher = llg.LLMatcher(self._llg_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"Invalid grammar: {matcher.get_error()[:300]}")
        return Constraint(self, matcher, sorted(self._tokenizer.eos_token_ids))

    def masks(self, constraints: Sequence[Constraint]) -> torch.Tensor:
        """(n, vocab) bool: the tokens each constraint allows next."""
        words = (self.vocab_size + 31) // 32
        bits = torch.zeros((len(constraints), words), dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(c.matcher, row) for row, c in enumerate(constraints)], bits.data_ptr(), words * 4, len(constraints)
        )
        allowed = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")[:, : self.vocab_size]
        allowed = torch.from_numpy(allowed.view(np.bool_))
        for row in (~allowed.any(-1)).nonzero().flatten().tolist():  # a finished or broken grammar: end the output
            allowed[row, constraints[row].eos_token_ids] = True
        return allowed


class MaskWorker:
    """Computes a step's masks on one worker thread while the forward pass runs (llguidance releases the GIL)."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None

    def start(self, rows: list[int], constraints: list[Constraint]) -> Future | None:
        if not rows:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leanlm-grammar")
        compiler = constraints[0].compiler
        return self._pool.submit(lambda: (rows, compiler.masks(constraints)))


def apply_masks(logits: torch.Tensor, masks: tuple[list[int], torch.Tensor] | None) -> torch.Tensor:
    """logits (R, V) with the disallowed tokens of the masked rows at -inf, in place (the runner's logits are
    used once)."""
    if masks is None or not masks[0]:
        return logits
    rows, allowed = masks
    excluded = ~allowed[:, : logits.shape[-1]].to(logits.device)
    if rows == list(range(logits.shape[0])):  # every row constrained: one op, no gather
        return logits.masked_fill_(excluded, float("-inf"))
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logits[index] = logits[index].masked_fill_(excluded, float("-inf"))
    return logits
