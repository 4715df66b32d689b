"""One step's schedule -> one forward pass over all its tokens -> one sampled token per request that needs one.

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
from leanlm.sampling.batch import sample_batch
from leanlm.sampling.grammar import Constraint, MaskWorker
from leanlm.sampling.state import SamplingState
from leanlm.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None  # with SamplingParams.logprobs
    top: list[tuple[int, float]] | None = None


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
    def run(self, schedule: SchedulerOutput) -> dict[str, SampledToken]:
        """Run the scheduled tokens; return the sampled token of each request whose newest token ran."""
        entries = sorted(schedule.scheduled, key=lambda e: e.num_tokens != 1)  # decodes first, order kept
        if not entries:
            return {}
        token_ids: list[int] = []
        positions: list[int] = []
        sequences: list[SequenceSlice] = []
        sample_rows: list[int] = []
        sampled: list[ScheduledRequest] = []
        for entry in entries:
            end = entry.start + entry.num_tokens
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
        last_only = sample_rows == [len(token_ids) - 1]
        logits = self.model(
            torch.tensor([token_ids], device=self.device),
            torch.tensor([positions], device=self.device),
            attend=attend,
            last_only=last_only,
            logits_indices=None if last_only else torch.tensor(sample_rows, dtype=torch.long, device=self.device),
        )[0]  # (R, V) float32, one row per sampled request
        return self._sample(request_ids, logits, None if masks is None else masks.result())

    def _start_masks(self, request_ids: list[str]):
        states = [self._states[rid] for rid in request_ids]
        rows = [row for row, state in enumerate(states) if state.constraint is not None]
        return self._masks.start(rows, [states[row].constraint for row in rows])

    def _sample(self, request_ids: list[str], logits: torch.Tensor, masks=None) -> dict[str, SampledToken]:
        """All sampled rows at once (sampling/batch.py): one op per filter, not one per request."""
        rows = sample_batch(logits, [self._states[rid] for rid in request_ids], masks)
        return {rid: SampledToken(*row) for rid, row in zip(request_ids, rows, strict=True)}
