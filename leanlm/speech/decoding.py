"""Batched Whisper decoding of one 30 s window per request: greedy, beam search or sampling, with Whisper's
logit rules (suppressed tokens, blank suppression at the start, timestamp pairing and monotonicity).

This is a standalone decoder loop, not the engine's scheduler: the rows of one `DecoderCache` are the requests
(times the beam width), prompts are prefilled row by row, then every step runs all live rows together. A row
that finishes is dropped from the cache, so a batch computes for each request what it computes alone.
The search follows CTranslate2's (what faster-whisper runs): beam search keeps 2 x beam candidates per step,
registers a hypothesis when a top-`beam` candidate is end-of-text and refills its place from the rest, stops a
request once `round(beam * patience)` hypotheses are in, and ranks them by log-probability / length ** penalty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanlm.formats.whisper_tokenizer import TIME_PRECISION, WhisperTokenizer
from leanlm.kernels.threads import scoped_threads
from leanlm.models.whisper import WhisperModel

NEG_INF = float("-inf")


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 5  # 1: greedy (temperature 0) or sampling (temperature > 0)
    patience: float = 1.0
    length_penalty: float = 1.0
    temperature: float = 0.0
    suppress_blank: bool = True
    suppress_tokens: tuple[int, ...] = ()  # ids never generated
    timestamps: bool = True
    max_initial_timestamp: float = 1.0  # seconds: the first timestamp is at most this
    max_length: int = 448  # prompt plus generated tokens


@dataclass
class DecodeResult:
    tokens: list[int]  # generated tokens, end-of-text excluded
    sum_logprob: float  # of the tokens and the end-of-text token (when one was generated)
    score: float  # sum_logprob / len(tokens) ** length_penalty (beam search's ranking)
    no_speech_prob: float  # P(<|nospeech|>) at the start-of-transcript position


class LogitRules:
    """Masks applied to each row's logits before its next token is chosen (CTranslate2's order: all tokens
    disabled first, then the timestamp-probability test on what is left)."""

    def __init__(self, tokenizer: WhisperTokenizer, vocab_size: int, options: DecodeOptions):
        self.tok, self.options = tokenizer, options
        self.vocab_size = vocab_size
        self.suppress = torch.tensor(sorted(set(options.suppress_tokens)), dtype=torch.long)
        self.begin_suppress = torch.tensor([tokenizer.encode(" ")[0], tokenizer.eot], dtype=torch.long)
        self.max_initial = tokenizer.timestamp_begin + round(options.max_initial_timestamp / TIME_PRECISION)

    def apply(self, logits: torch.Tensor, generated: list[list[int]]) -> torch.Tensor:
        """logits (R, V) float32, modified in place; generated[r]: the tokens row r produced so far."""
        ts_begin, eot = self.tok.timestamp_begin, self.tok.eot
        if self.suppress.numel():
            logits[:, self.suppress] = NEG_INF
        check_rows = []
        for row, tokens in enumerate(generated):
            line = logits[row]
            if not tokens and self.options.suppress_blank:
                line[self.begin_suppress] = NEG_INF
            if not self.options.timestamps:
                continue
            line[self.tok.no_timestamps] = NEG_INF
            if not tokens:
                line[:ts_begin] = NEG_INF  # a window starts with a timestamp...
                line[self.max_initial + 1 :] = NEG_INF  # ...no later than max_initial_timestamp
                continue
            last_is_ts = tokens[-1] >= ts_begin
            penultimate_is_ts = len(tokens) < 2 or tokens[-2] >= ts_begin
            if last_is_ts and penultimate_is_ts:
                line[ts_begin:] = NEG_INF  # a pair is complete: text (or end) must follow
            elif last_is_ts:
                line[:eot] = NEG_INF  # an opening timestamp: another timestamp or the end
                line[ts_begin : tokens[-1]] = NEG_INF
                check_rows.append(row)
            else:
                check_rows.append(row)
                previous = [t for t in tokens if t >= ts_begin]
                if previous:
                    line[ts_begin : previous[-1] + 1] = NEG_INF  # timestamps never go back
        if check_rows:
            rows = torch.tensor(check_rows)
            logprobs = torch.log_softmax(logits[rows], dim=-1)
            # If all timestamps together are likelier than any single text token, a timestamp comes next.
            timestamp_mass = torch.logsumexp(logprobs[:, ts_begin:], dim=-1)
            best_text = logprobs[:, :ts_begin].max(dim=-1).values
            for row, wins in zip(check_rows, (timestamp_mass > best_text).tolist(), strict=True):
                if wins:
                    logits[row, :ts_begin] = NEG_INF
        return logits


def _no_speech_prob(logits_at_sot: torch.Tensor, tokenizer: WhisperTokenizer) -> float:
    return torch.softmax(logits_at_sot.float(), dim=-1)[tokenizer.no_speech].item()


@torch.inference_mode()
def decode_windows(
    model: WhisperModel,
    tokenizer: WhisperTokenizer,
    encoder_output: torch.Tensor,
    prompts: list[list[int]],
    options: DecodeOptions,
    generator: torch.Generator | None = None,
) -> list[DecodeResult]:
    """Decode one window per request: encoder_output (B, 1500, d), prompts[b] ends with the task tokens."""
    batch = len(prompts)
    cross = model.cross_kv(encoder_output)
    cache = model.new_cache(cross, batch)
    first_logits, no_speech = [], []
    for row, prompt in enumerate(prompts):
        logits = model.decode(torch.tensor([prompt]), cache, rows=torch.tensor([row]))[0]
        first_logits.append(logits[-1])
        no_speech.append(_no_speech_prob(logits[prompt.index(tokenizer.sot)], tokenizer))
    first = torch.stack(first_logits)  # (B, V)
    max_new = [min(options.max_length // 2, options.max_length - (len(p) - 1)) for p in prompts]
    rules = LogitRules(tokenizer, first.shape[-1], options)
    # The token loop's ops are small (a few rows): one thread, no OpenMP barrier per op. Measured on the shared
    # 2-core machine, even the vocabulary projection (5 rows) ran 2.6x faster on one thread than on two.
    with scoped_threads(1):
        step = model.decode
        if options.beam_size > 1 and options.temperature == 0:
            results = _beam_search(step, tokenizer, cache, first, rules, options, max_new)
        else:
            results = _greedy(step, tokenizer, cache, first, rules, options, max_new, generator)
    for result, prob in zip(results, no_speech, strict=True):
        result.no_speech_prob = prob
    return results


def _finish(tokens: list[int], sum_logprob: float, penalty: float) -> DecodeResult:
    length = max(len(tokens), 1)
    return DecodeResult(tokens, sum_logprob, sum_logprob / length**penalty if penalty else sum_logprob, 0.0)


def _greedy(step, tokenizer, cache, logits, rules, options, max_new, generator) -> list[DecodeResult]:
    batch = logits.shape[0]
    live = list(range(batch))  # request of each cache row
    generated: list[list[int]] = [[] for _ in range(batch)]
    sums = [0.0] * batch
    results: list[DecodeResult | None] = [None] * batch
    while True:
        rules.apply(logits, [generated[r] for r in live])
        logprobs = torch.log_softmax(logits, dim=-1)
        if options.temperature > 0:
            probs = torch.softmax(logits / options.temperature, dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            chosen = logprobs.argmax(dim=-1)
        keep = []
        for index, request in enumerate(live):
            token = int(chosen[index])
            sums[request] += float(logprobs[index, token])
            if token == tokenizer.eot or len(generated[request]) + 1 >= max_new[request]:
                if token != tokenizer.eot:
                    generated[request].append(token)
                results[request] = _finish(generated[request], sums[request], options.length_penalty)
            else:
                generated[request].append(token)
                keep.append(index)
        if not keep:
            return results
        if len(keep) < len(live):
            cache.reorder(torch.tensor(keep), requests=torch.tensor(keep))
            live = [live[i] for i in keep]
            chosen = chosen[keep]
        logits = step(chosen[:, None], cache)[:, -1]


def _beam_search(step_fn, tokenizer, cache, logits, rules, options, max_new) -> list[DecodeResult]:
    beam = options.beam_size
    candidates = 2 * beam
    wanted = round(beam * options.patience)
    batch = logits.shape[0]
    live = list(range(batch))  # live requests, in cache order; each owns `width` consecutive rows
    finished: list[list[tuple[float, list[int], float]]] = [[] for _ in range(batch)]
    results: list[DecodeResult | None] = [None] * batch
    sequences: dict[int, list[list[int]]] = {r: [[]] for r in live}
    scores: dict[int, torch.Tensor] = {r: torch.zeros(1) for r in live}
    step = 0
    while True:
        width = 1 if step == 0 else beam
        rules.apply(logits, [seq for r in live for seq in sequences[r]])
        logprobs = torch.log_softmax(logits, dim=-1)
        vocab = logprobs.shape[-1]
        next_rows, next_tokens, keep_requests = [], [], []
        for index, request in enumerate(live):
            block = logprobs[index * width : (index + 1) * width] + scores[request][:, None]  # (width, V)
            top_scores, top_ids = block.reshape(-1).topk(candidates)
            parents, tokens = (top_ids // vocab).tolist(), (top_ids % vocab).tolist()
            last_step = step + 1 >= max_new[request]
            new_seqs, new_scores, rows = [], [], []
            spare = beam
            for k in range(beam):
                pick = k
                if tokens[k] == tokenizer.eot or last_step:
                    hypothesis = sequences[request][parents[k]] + ([] if tokens[k] == tokenizer.eot else [tokens[k]])
                    finished[request].append((float(top_scores[k]), hypothesis))
                    pick = None
                    while spare < candidates:  # refill from the next candidate that is not end-of-text
                        spare += 1
                        if tokens[spare - 1] != tokenizer.eot:
                            pick = spare - 1
                            break
                    if pick is None:
                        pick = k  # as CTranslate2: keeps the finished beam's slot (it will not be read)
                new_seqs.append(sequences[request][parents[pick]] + [tokens[pick]])
                new_scores.append(float(top_scores[pick]))
                rows.append(index * width + parents[pick])
            if last_step or len(finished[request]) >= wanted:
                best = max(
                    finished[request],
                    key=lambda item: item[0] / max(len(item[1]), 1) ** options.length_penalty,
                )
                results[request] = _finish(best[1], best[0], options.length_penalty)
                continue
            sequences[request], scores[request] = new_seqs, torch.tensor(new_scores)
            next_rows += rows
            next_tokens += [seq[-1] for seq in new_seqs]
            keep_requests.append(request)
        if not keep_requests:
            return results
        kept = None if len(keep_requests) == len(live) else torch.tensor([live.index(r) for r in keep_requests])
        cache.reorder(torch.tensor(next_rows), requests=kept)
        live = keep_requests
        logits = step_fn(torch.tensor(next_tokens)[:, None], cache)[:, -1]
        step += 1


def compression_ratio(text: str) -> float:
    import zlib

    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def mean_logprob(result: DecodeResult) -> float:
    """faster-whisper's avg_logprob: the summed log-probability over (generated tokens + 1)."""
    return result.sum_logprob / (len(result.tokens) + 1)
