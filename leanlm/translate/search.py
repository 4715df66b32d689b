"""Greedy and beam search for text encoder-decoders (Marian, T5), with transformers' `generate` semantics.

The loop is the speech decoder's shape (rows of one `DecoderCache` are requests times the beam; finished
requests leave the cache), but the search rules are Hugging Face's, so tokens match `model.generate`:
- log-softmax first, then the logit rules (single-token bad words, the forced end token at the last step);
- beam search keeps 2 x beams candidates per step; a candidate among the top `beams` that ends (end token or
  length limit) is scored sum_logprob / generated_length ** length_penalty (its end token counted) and joins the
  request's best `beams` finished hypotheses; the running beams are the best candidates that did not end;
- a request stops when all its continuations hit the length limit, when `early_stopping=True` and `beams`
  hypotheses are finished, or (default) when they are and the best running score over its current length can no
  longer beat the worst finished one ("never": over the longest possible length, when length_penalty > 0).
Whisper keeps its own rules (speech/decoding.py: CTranslate2's search and Whisper's timestamp logic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanlm.models.seq2seq import EncoderDecoderLM

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SearchOptions:
    max_new_tokens: int
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as transformers
    decoder_start_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 0
    forced_eos_token_id: int | None = None  # forced as the last token when the length limit is reached
    suppress_token_ids: tuple[int, ...] = ()  # never generated (single-token bad_words_ids)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


class LogitRules:
    def __init__(self, options: SearchOptions):
        self.options = options
        self.suppress = torch.tensor(sorted(set(options.suppress_token_ids)), dtype=torch.long)

    def apply(self, scores: torch.Tensor, generated: int) -> torch.Tensor:
        """scores (R, V) (logits or log-probabilities), in place; generated: tokens each row already has."""
        if self.suppress.numel():
            scores[:, self.suppress] = NEG_INF
        forced = self.options.forced_eos_token_id
        if forced is not None and generated + 1 == self.options.max_new_tokens:
            scores.fill_(NEG_INF)
            scores[:, forced] = 0.0
        return scores


@torch.inference_mode()
def generate(
    model: EncoderDecoderLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    options: SearchOptions,
) -> list[list[int]]:
    """input_ids (B, S) source tokens (padded, with attention_mask) -> per request the generated tokens, the end
    token included when one was generated (transformers' sequences without the start token and the padding)."""
    encoder_output = model.encode(input_ids, attention_mask)
    batch = input_ids.shape[0]
    padded = attention_mask is not None and not bool(attention_mask.all())  # else SDPA's faster unmasked path
    cache = model.new_cache(
        model.cross_kv(encoder_output),
        batch,
        capacity=options.max_new_tokens + 1,
        cross_mask=attention_mask if padded else None,
    )
    start = torch.full((batch, 1), options.decoder_start_token_id, dtype=torch.long)
    logits = model.decode(start, cache)[:, -1]
    if options.num_beams == 1:
        return _greedy(model, cache, logits, options)
    return _beam_search(model, cache, logits, options)


def _greedy(model, cache, logits, options: SearchOptions) -> list[list[int]]:
    rules = LogitRules(options)
    live = list(range(logits.shape[0]))
    generated: list[list[int]] = [[] for _ in live]
    while True:
        chosen = rules.apply(logits, len(generated[live[0]])).argmax(dim=-1)
        keep = []
        for index, request in enumerate(live):
            token = int(chosen[index])
            generated[request].append(token)
            if token != options.eos_token_id and len(generated[request]) < options.max_new_tokens:
                keep.append(index)
        if not keep:
            return generated
        if len(keep) < len(live):
            cache.reorder(torch.tensor(keep), requests=torch.tensor(keep))
            live, chosen = [live[i] for i in keep], chosen[keep]
        logits = model.decode(chosen[:, None], cache)[:, -1]


@dataclass
class _Request:
    sequences: list[list[int]]  # running beams, best first
    scores: torch.Tensor  # their summed log-probabilities
    finished: list[tuple[float, list[int]]]  # at most `beams` (score, tokens), best first
    improvable: bool = True  # transformers' early-stop heuristic: can a running beam still beat a finished one?


def _beam_search(model, cache, logits, options: SearchOptions) -> list[list[int]]:
    beams, eos = options.num_beams, options.eos_token_id
    rules = LogitRules(options)
    states = {r: _Request([[]], torch.zeros(1), []) for r in range(logits.shape[0])}
    live = list(states)  # requests in cache order; each owns `width` consecutive rows
    results: dict[int, list[int]] = {}
    step = 0  # tokens generated so far by every running beam
    while True:
        width = 1 if step == 0 else beams
        logprobs = rules.apply(torch.log_softmax(logits, dim=-1), step)
        vocab = logprobs.shape[-1]
        last = step + 1 == options.max_new_tokens
        next_rows, next_tokens, kept = [], [], []
        for index, request in enumerate(live):
            state = states[request]
            block = logprobs[index * width : (index + 1) * width] + state.scores[:, None]
            top_scores, top_ids = block.reshape(-1).topk(2 * beams)
            parents, tokens = (top_ids // vocab).tolist(), (top_ids % vocab).tolist()
            ends = [last or token == eos for token in tokens]
            full = options.early_stopping is True and len(state.finished) == beams
            if state.improvable and not full:
                new = [
                    (
                        float(top_scores[k]) / (step + 1) ** options.length_penalty,
                        state.sequences[parents[k]] + [tokens[k]],
                    )
                    for k in range(beams)
                    if ends[k]
                ]
                state.finished = sorted(state.finished + new, key=lambda item: -item[0])[:beams]
            running = [k for k in range(2 * beams) if not ends[k]][:beams]
            if len(running) < beams or _done(state, top_scores, running, step, options):
                results[request] = state.finished[0][1]
                continue
            state.sequences = [state.sequences[parents[k]] + [tokens[k]] for k in running]
            state.scores = top_scores[running]
            next_rows += [index * width + parents[k] for k in running]
            next_tokens += [tokens[k] for k in running]
            kept.append(request)
        if not kept:
            return [results[r] for r in sorted(results)]
        requests = None if len(kept) == len(live) else torch.tensor([live.index(r) for r in kept])
        cache.reorder(torch.tensor(next_rows), requests=requests)
        live = kept
        logits = model.decode(torch.tensor(next_tokens)[:, None], cache)[:, -1]
        step += 1


def _done(state: _Request, top_scores: torch.Tensor, running: list[int], step: int, options: SearchOptions) -> bool:
    """After this step: can the request's finished hypotheses still change?"""
    if len(state.finished) < options.num_beams:
        return False
    if options.early_stopping is True:
        return True
    if options.early_stopping == "never" and options.length_penalty > 0:
        length = options.max_new_tokens
    else:
        length = step + 1
    best_running = float(top_scores[running[0]]) / length**options.length_penalty
    state.improvable = state.improvable and best_running > state.finished[-1][0]
    return not state.improvable
