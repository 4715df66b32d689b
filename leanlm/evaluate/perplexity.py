"""Sliding-window perplexity and bits per byte.

The convention is Hugging Face's strided one ("Perplexity of fixed-length models"): windows of `context` tokens start
every `stride` tokens; each window scores only the tokens that no earlier window scored, and the tokens before them
serve as context. Every token but the first (which has nothing to be predicted from) is scored exactly once.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from leanlm.errors import InvalidRequestError

if TYPE_CHECKING:
    from tokenizers import Encoding

    from leanlm.formats.tokenizer import Tokenizer

# (1, T) token ids, (1, T) positions -> (1, T, V) logits; LlamaForCausalLM.forward without a cache is one.
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Window:
    begin: int  # first input token
    end: int  # one past the last input token
    scored_from: int  # first token this window scores; [begin, scored_from) is context only

    @property
    def num_scored(self) -> int:
        return self.end - self.scored_from


def check_window_options(context: int, stride: int, model_context: int | None = None) -> None:
    if stride < 1:
        raise InvalidRequestError(f"--stride must be >= 1, got {stride}.")
    if context <= stride:
        raise InvalidRequestError(
            f"--context ({context}) must be larger than --stride ({stride}): each window needs earlier tokens as "
            f"context for the ones it scores. Use e.g. --context {2 * stride} --stride {stride}."
        )
    if model_context is not None and context > model_context:
        raise InvalidRequestError(
            f"--context {context} exceeds the model's context length ({model_context}). Pass --context {model_context} "
            "or less."
        )


def plan_windows(num_tokens: int, context: int, stride: int) -> list[Window]:
    check_window_options(context, stride)
    if num_tokens < 2:
        raise InvalidRequestError(f"Perplexity needs at least 2 tokens, got {num_tokens}. Pass a longer text.")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        windows.append(Window(begin, end, max(prev_end, 1)))  # token 0 has no left context, so it is never scored
        prev_end = end
        if end == num_tokens:
            break
    return windows


@dataclass(frozen=True)
class EvalTokens:
    ids: list[int]
    num_bytes: int  # UTF-8 bytes of the text that the scored tokens (all but the first) cover


def tokenize_for_eval(tokenizer: Tokenizer, text: str, max_tokens: int = 0) -> EvalTokens:
    """Token ids of `text` (at most `max_tokens`, 0 = all) and the byte count behind the scored ones."""
    if max_tokens < 0 or max_tokens == 1:
        raise InvalidRequestError(f"--max-tokens must be 0 (the whole text) or >= 2, got {max_tokens}.")
    encoding = _encode_prefix(tokenizer, text, max_tokens)
    ids = encoding.ids[:max_tokens] if max_tokens else encoding.ids
    if len(ids) < 2:
        raise InvalidRequestError(f"The text gives {len(ids)} token(s); perplexity needs at least 2. Pass more text.")
    spans = [
        span
        for span, special in zip(
            encoding.offsets[1 : len(ids)], encoding.special_tokens_mask[1 : len(ids)], strict=True
        )
        if not special
    ]
    # A character split across tokens counts once, whole: the byte count can only be off at the ends of the span.
    num_bytes = len(text[min(s for s, _ in spans) : max(e for _, e in spans)].encode("utf-8")) if spans else 0
    return EvalTokens(ids=list(ids), num_bytes=num_bytes)


def _encode_prefix(tokenizer: Tokenizer, text: str, max_tokens: int) -> Encoding:
    # Tokenizing 2 MB takes seconds; a prefix that yields enough tokens gives the same leading tokens (the margin
    # keeps the cut, which may split a word, away from the tokens kept).
    margin = 16
    chars = 8 * (max_tokens + margin)
    while max_tokens and chars < len(text):
        encoding = tokenizer.backend.encode(text[:chars])
        if len(encoding.ids) >= max_tokens + margin:
            return encoding
        chars *= 2
    return tokenizer.backend.encode(text)


def sliding_log_probs(
    models: Sequence[LogitsFn],
    ids: Sequence[int],
    context: int,
    stride: int,
    progress: bool = False,
    desc: str = "eval",
) -> Iterator[tuple[Window, torch.Tensor, list[torch.Tensor]]]:
    """For each window: (window, targets (n,), [log-probs (n, V) of each model]) over the same n scored tokens.

    Every model sees the same windows, so a baseline comparison scores exactly the positions perplexity does.
    Results live on the first model's device.
    """
    windows = plan_windows(len(ids), context, stride)
    devices = [_device_of(model) for model in models]
    all_ids = torch.tensor(list(ids), dtype=torch.long)
    bar = _progress_bar(sum(w.num_scored for w in windows), desc, progress)
    try:
        for window in windows:
            targets = all_ids[window.scored_from : window.end].to(devices[0])
            log_probs = [
                _window_log_probs(m, all_ids, window, d).to(devices[0]) for m, d in zip(models, devices, strict=True)
            ]
            yield window, targets, log_probs
            bar.update(window.num_scored)
    finally:
        bar.close()


def _window_log_probs(model: LogitsFn, all_ids: torch.Tensor, window: Window, device: torch.device) -> torch.Tensor:
    inputs = all_ids[window.begin : window.end].to(device)[None]  # (1, T)
    positions = torch.arange(window.end - window.begin, device=device)[None]  # each window starts at position 0
    with torch.inference_mode():
        logits = model(inputs, positions)[0]  # (T, V)
        # Row t predicts token t + 1, so tokens [scored_from, end) come from rows [scored_from - 1, end - 1).
        rows = logits[window.scored_from - 1 - window.begin : window.end - 1 - window.begin]
        return rows.float().log_softmax(-1)


def _device_of(model: LogitsFn) -> torch.device:
    if isinstance(model, torch.nn.Module):
        first = next(model.parameters(), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


# ---- negative log-likelihood --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NLLStats:
    nll_sum: float  # nats, summed in float64
    num_tokens: int

    @property
    def nll_mean(self) -> float:
        return self.nll_sum / self.num_tokens if self.num_tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_mean)

    def bits_per_byte(self, num_bytes: int) -> float:
        return bits_per_byte(self.nll_sum, num_bytes)


def bits_per_byte(nll_sum: float, num_bytes: int) -> float:
    """Total NLL in bits over the UTF-8 bytes it covers: comparable across tokenizers, unlike perplexity."""
    return nll_sum / math.log(2) / num_bytes if num_bytes else math.nan


class NLLAccumulator:
    def __init__(self) -> None:
        self.nll_sum = 0.0
        self.num_tokens = 0

    def add(self, log_probs: torch.Tensor, targets: torch.Tensor) -> None:
        """log_probs (n, V), targets (n,)."""
        picked = log_probs.gather(-1, targets[:, None])[:, 0]
        self.nll_sum -= picked.double().sum().item()
        self.num_tokens += targets.numel()

    def stats(self) -> NLLStats:
        return NLLStats(self.nll_sum, self.num_tokens)


def perplexity(
    model: LogitsFn, ids: Sequence[int], context: int, stride: int, progress: bool = False, desc: str = "perplexity"
) -> NLLStats:
    totals = NLLAccumulator()
    for _, targets, (log_probs,) in sliding_log_probs([model], ids, context, stride, progress, desc):
        totals.add(log_probs, targets)
    return totals.stats()
