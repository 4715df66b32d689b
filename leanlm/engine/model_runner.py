"""One step's schedule -> one forward pass over all its tokens -> the sampled tokens of each request that needs any
(and the log-probabilities of the prompt tokens that ran, for requests that score their prompt).

The tokens of every scheduled request are laid out in one row (1, N): a 256-token prefill chunk and 15 decode
tokens make 271 rows for the linear layers, not 16 x 256. Decode requests go first so that their attention runs
as one padded batch (see paged_attention.py). Logits are computed only for the rows that are sampled, and all of
them are sampled together. A request with draft tokens (speculative decoding) runs its newest token and its drafts
as extra rows; every one of those rows gives logits, and sampling/speculative.py keeps the drafts the target agrees
with plus one token of its own.

An encoder-decoder model (Whisper; `model.is_encoder_decoder`) also gets, per sequence, its request's encoder
state: the runner encodes the inputs the scheduler names (SchedulerOutput.encoder_inputs) in one batch, keeps each
result in `encoder_cache` under the input's content hash, read-only, and drops it when the scheduler says its last
user is gone (free_encoder_outputs: finish or abort).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from leanlm.cache.paged_kv import PagedKVCache
from leanlm.engine.paged_attention import SequenceSlice, build_paged_attention
from leanlm.engine.scheduler import ScheduledRequest, SchedulerOutput
from leanlm.sampling.batch import rows_logprobs, sample_batch
from leanlm.sampling.grammar import Constraint, MaskWorker
from leanlm.sampling.speculative import accept_greedy, accept_sampled
from leanlm.sampling.state import SamplingState
from leanlm.sampling_params import SamplingParams

# vLLM's per-request logits processor: (the request's output tokens so far, its logits row (V,)) -> the row to sample.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None  # with SamplingParams.logprobs
    top: list[tuple[int, float]] | None = None


@dataclass(frozen=True)
class ScoredPrompt:
    """Log-probabilities of prompt tokens first_position, first_position + 1, ... each given the ones before it."""

    first_position: int
    tokens: list[SampledToken]


@dataclass
class RunnerOutput:
    # by request id: the tokens of each request whose newest token ran (one, or accepted drafts and one more)
    sampled: dict[str, list[SampledToken]]
    scored: dict[str, ScoredPrompt]  # by request id: prompt tokens scored this step (SamplingParams.prompt_logprobs)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, device: torch.device):
        self.model, self.cache, self.device = model, cache, device
        self._states: dict[str, SamplingState] = {}
        self._masks = MaskWorker()
        self.is_encoder_decoder = bool(getattr(model, "is_encoder_decoder", False))
        self.encoder_cache: dict[str, object] = {}  # input content hash -> its encoder state, while a request reads it
        self._processors: dict[str, Sequence[LogitsProcessor]] = {}

    def add_request(
        self,
        request_id: str,
        params: SamplingParams,
        prompt_token_ids: list[int],
        constraint: Constraint | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
    ) -> None:
        self._states[request_id] = SamplingState(params, prompt_token_ids, self.device, constraint)
        if logits_processors:
            self._processors[request_id] = tuple(logits_processors)

    def remove_request(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        self._processors.pop(request_id, None)

    def free_encoder_outputs(self, content_hashes: list[str]) -> None:
        for key in content_hashes:
            self.encoder_cache.pop(key, None)

    def _encode(self, requests) -> None:
        states = self.model.encode_inputs([r.encoder_input.data for r in requests])
        for request, state in zip(requests, states, strict=True):
            self.encoder_cache[request.encoder_input.content_hash] = state

    @torch.inference_mode()
    def run(self, schedule: SchedulerOutput) -> RunnerOutput:
        """Run the scheduled tokens; sample the tokens of each request whose newest token ran: one, or for a
        request with drafts, the accepted drafts and one more."""
        if schedule.encoder_inputs:
            self._encode(schedule.encoder_inputs)
        entries = sorted(schedule.scheduled, key=lambda e: e.num_tokens != 1)  # decodes first, order kept
        if not entries:
            return RunnerOutput({}, {})
        token_ids: list[int] = []
        positions: list[int] = []
        sequences: list[SequenceSlice] = []
        sample_rows: list[int] = []
        sampled: list[ScheduledRequest] = []
        verified: list[tuple[ScheduledRequest, int]] = []  # (entry, its first logits row) for entries with drafts
        scored: list[tuple[ScheduledRequest, int, int]] = []  # (entry, its first row, rows scored)
        for entry in entries:
            end = entry.start + entry.num_tokens
            drafts = entry.num_draft_tokens
            if self._states[entry.request.request_id].params.prompt_logprobs is not None:
                # position p's logits score prompt token p + 1: positions start .. P - 2 of this chunk
                count = min(end, entry.request.num_prompt_tokens - 1) - entry.start
                if count > 0:
                    scored.append((entry, len(token_ids), count))
            token_ids.extend(entry.request.all_token_ids[entry.start : end - drafts])
            token_ids.extend(entry.request.draft_token_ids[:drafts])
            positions.extend(range(entry.start, end))
            sequences.append(
                SequenceSlice(entry.start, entry.num_tokens, entry.block_table.ids, entry.block_table.contiguous)
            )
            if entry.completes and drafts:
                verified.append((entry, len(sample_rows)))
                sample_rows.extend(range(len(token_ids) - 1 - drafts, len(token_ids)))
            elif entry.completes:
                sample_rows.append(len(token_ids) - 1)
                sampled.append(entry)
        request_ids = [e.request.request_id for e in sampled]
        masks = self._start_masks(request_ids) if request_ids else None  # computed while the forward pass runs
        attend = build_paged_attention(self.cache, self.model.attention, sequences, self.device)
        score_rows = [first + i for _, first, count in scored for i in range(count)]
        rows = score_rows + sample_rows
        last_only = rows == [len(token_ids) - 1]
        extra = {}
        if self.is_encoder_decoder:
            extra["encoder_states"] = [
                (self.encoder_cache[e.request.encoder_input.content_hash], e.num_tokens) for e in entries
            ]
        logits = self.model(
            torch.tensor([token_ids], device=self.device),
            torch.tensor([positions], device=self.device),
            attend=attend,
            last_only=last_only,
            logits_indices=None if last_only else torch.tensor(rows, dtype=torch.long, device=self.device),
            **extra,
        )[0]  # (R, V) float32: the scored prompt rows, then one row per sampled row
        scores = self._score(scored, logits[: len(score_rows)])
        logits = logits[len(score_rows) :]
        if not verified:
            logits = self._process(sampled, logits)
            return RunnerOutput(self._sample(request_ids, logits, None if masks is None else masks.result()), scores)
        plain_rows = [row for row in range(len(sample_rows)) if not _in_verified(row, verified)]
        out = {}
        if request_ids:
            plain = self._process(sampled, logits[torch.tensor(plain_rows, device=logits.device)])
            out = self._sample(request_ids, plain, None if masks is None else masks.result())
        out.update(self._verify(verified, logits))
        return RunnerOutput(out, scores)

    def _process(self, sampled: list[ScheduledRequest], logits: torch.Tensor) -> torch.Tensor:
        """Apply the requests' logits processors, row by row (row i is sampled[i]'s)."""
        if not self._processors:
            return logits
        for row, entry in enumerate(sampled):
            for processor in self._processors.get(entry.request.request_id, ()):
                logits[row] = processor(entry.request.output_token_ids, logits[row])
        return logits

    def _score(self, scored: list[tuple[ScheduledRequest, int, int]], logits: torch.Tensor) -> dict[str, ScoredPrompt]:
        if not scored:
            return {}
        targets, tops = [], []
        for entry, _, count in scored:
            targets += entry.request.all_token_ids[entry.start + 1 : entry.start + 1 + count]
            tops += [self._states[entry.request.request_id].params.prompt_logprobs] * count
        rows = iter(rows_logprobs(logits, targets, tops))
        return {
            entry.request.request_id: ScoredPrompt(entry.start + 1, [SampledToken(*next(rows)) for _ in range(count)])
            for entry, _, count in scored
        }

    def _verify(
        self, verified: list[tuple[ScheduledRequest, int]], logits: torch.Tensor
    ) -> dict[str, list[SampledToken]]:
        """Accept or reject each request's drafts (sampling/speculative.py); greedy rows share one argmax."""
        states = [self._states[entry.request.request_id] for entry, _ in verified]
        greedy = [i for i, state in enumerate(states) if state.params.greedy]
        argmaxes: dict[int, list[int]] = {}
        if greedy:
            spans = [range(verified[i][1], verified[i][1] + verified[i][0].num_draft_tokens + 1) for i in greedy]
            flat = logits[torch.tensor([row for span in spans for row in span], device=logits.device)].argmax(-1)
            at = 0
            for i, span in zip(greedy, spans, strict=True):
                argmaxes[i], at = flat[at : at + len(span)].tolist(), at + len(span)
        out = {}
        for i, ((entry, first), state) in enumerate(zip(verified, states, strict=True)):
            drafts = entry.request.draft_token_ids[: entry.num_draft_tokens]
            if i in argmaxes:
                tokens = accept_greedy(drafts, argmaxes[i])
            else:
                rows = logits[first : first + len(drafts) + 1]
                tokens = accept_sampled(drafts, rows, state.params, state.generator)
            for token in tokens:
                state.append(token)
            out[entry.request.request_id] = [SampledToken(token) for token in tokens]
        return out

    def _start_masks(self, request_ids: list[str]):
        states = [self._states[rid] for rid in request_ids]
        rows = [row for row, state in enumerate(states) if state.constraint is not None]
        return self._masks.start(rows, [states[row].constraint for row in rows])

    def _sample(self, request_ids: list[str], logits: torch.Tensor, masks=None) -> dict[str, list[SampledToken]]:
        """All sampled rows at once (sampling/batch.py): one op per filter, not one per request."""
        rows = sample_batch(logits, [self._states[rid] for rid in request_ids], masks)
        return {rid: [SampledToken(*row)] for rid, row in zip(request_ids, rows, strict=True)}


def _in_verified(row: int, verified: list[tuple[ScheduledRequest, int]]) -> bool:
    return any(first <= row <= first + entry.num_draft_tokens for entry, first in verified)
