"""One step's schedule -> one forward pass over all its tokens -> one sampled token per request that needs one
(and the log-probabilities of the prompt tokens that ran, for requests that score their prompt).

The tokens of every scheduled request are laid out in one row (1, N): a 256-token prefill chunk and 15 decode
tokens make 271 rows for the linear layers, not 16 x 256. Decode requests go first so that their attention runs
as one padded batch (see paged_attention.py). Logits are computed only for the rows that are sampled, and all of
them are sampled together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanlm.cache.paged_kv import PagedKVCache
from leanlm.engine.paged_attention import SequenceSlice, build_paged_attention
from leanlm.engine.scheduler import ScheduledRequest, SchedulerOutput
from leanlm.sampling.batch import rows_logprobs, sample_batch
from leanlm.sampling.grammar import Constraint, MaskWorker
from leanlm.sampling.state import SamplingState
from leanlm.sampling_params import SamplingParams


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
    sampled: dict[str, SampledToken]  # by request id: the next token of each request whose newest token ran
    scored: dict[str, ScoredPrompt]  # by request id: prompt tokens scored this step (SamplingParams.prompt_logprobs)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, device: torch.device):
        self.model, self.cache, self.device = model, cache, device
        self._states: dict[str, SamplingState] = {}
        self._masks = MaskWorker()

    def add_request(
        self, request_id: str, params: SamplingParams, prompt_token_ids: list[int], constraint: Constraint | None = None
    ) -> None:
        self._states[request_id] = SamplingState(params, prompt_token_ids, self.device, constraint)

    def remove_request(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    @torch.inference_mode()
    def run(self, schedule: SchedulerOutput) -> RunnerOutput:
        """Run the scheduled tokens; sample the next token of each request whose newest token ran."""
        entries = sorted(schedule.scheduled, key=lambda e: e.num_tokens != 1)  # decodes first, order kept
        if not entries:
            return RunnerOutput({}, {})
        token_ids: list[int] = []
        positions: list[int] = []
        sequences: list[SequenceSlice] = []
        sample_rows: list[int] = []
        sampled: list[ScheduledRequest] = []
        scored: list[tuple[ScheduledRequest, int, int]] = []  # (entry, its first row, rows scored)
        for entry in entries:
            end = entry.start + entry.num_tokens
            if self._states[entry.request.request_id].params.prompt_logprobs is not None:
                # position p's logits score prompt token p + 1: positions start .. P - 2 of this chunk
                count = min(end, entry.request.num_prompt_tokens - 1) - entry.start
                if count > 0:
                    scored.append((entry, len(token_ids), count))
            token_ids.extend(entry.request.all_token_ids[entry.start : end])
            positions.extend(range(entry.start, end))
            sequences.append(
                SequenceSlice(entry.start, entry.num_tokens, entry.block_table.ids, entry.block_table.contiguous)
            )
            if entry.completes:
                sample_rows.append(len(token_ids) - 1)
                sampled.append(entry)
        request_ids = [e.request.request_id for e in sampled]
        masks = self._start_masks(request_ids)  # structured-output masks, computed while the forward pass runs
        attend = build_paged_attention(self.cache, self.model.attention, sequences, self.device)
        score_rows = [first + i for _, first, count in scored for i in range(count)]
        rows = score_rows + sample_rows
        last_only = rows == [len(token_ids) - 1]
        logits = self.model(
            torch.tensor([token_ids], device=self.device),
            torch.tensor([positions], device=self.device),
            attend=attend,
            last_only=last_only,
            logits_indices=None if last_only else torch.tensor(rows, dtype=torch.long, device=self.device),
        )[0]  # (R, V) float32: the scored prompt rows, then one row per sampled request
        sampled_tokens = self._sample(request_ids, logits[len(score_rows) :], None if masks is None else masks.result())
        return RunnerOutput(sampled_tokens, self._score(scored, logits[: len(score_rows)]))

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

    def _start_masks(self, request_ids: list[str]):
        states = [self._states[rid] for rid in request_ids]
        rows = [row for row, state in enumerate(states) if state.constraint is not None]
        return self._masks.start(rows, [states[row].constraint for row in rows])

    def _sample(self, request_ids: list[str], logits: torch.Tensor, masks=None) -> dict[str, SampledToken]:
        """All sampled rows at once (sampling/batch.py): one op per filter, not one per request."""
        rows = sample_batch(logits, [self._states[rid] for rid in request_ids], masks)
        return {rid: SampledToken(*row) for rid, row in zip(request_ids, rows, strict=True)}
