"""Drafting with a model: a small model sharing the target's tokenizer (`draft:M`), or the target's own first layers
and head (`self`, layer skip).

The drafter runs greedy steps for all drafting requests together, one forward pass per drafted position, on the
engine's paged attention (so the C++ stack runs it too). A separate draft model keeps its own paged KV cache: per
request it remembers which tokens its cache holds, and after a verify step it keeps only the prefix the request
really has (rejected drafts roll back), then catches up on the accepted tokens in its next forward pass.
The layer-skip draft computes the same keys and values as the target's first layers, so it writes straight into
the target's cache, beyond the request's computed tokens: the verify pass overwrites them, and nothing needs to
catch up.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence

import torch
from torch import nn

from leanlm.cache.block_manager import BlockManager
from leanlm.cache.paged_kv import PagedKVCache
from leanlm.engine.paged_attention import SequenceSlice, build_paged_attention
from leanlm.engine.request import Request
from leanlm.models.stack import refresh_decoder_stack


class ModelDrafter:
    def __init__(self, name: str, model: nn.Module, cache: PagedKVCache, blocks: BlockManager, shares_cache: bool):
        """shares_cache: `cache` and `blocks` are the target's (layer skip); else the drafter's own."""
        self.name, self.model, self.cache, self.blocks, self.shares_cache = name, model, cache, blocks, shares_cache
        self.device = cache.keys.device
        self._fed: dict[str, list[int]] = {}  # own cache: the tokens whose keys and values it holds, in order
        # Seconds per drafted token, measured on passes of one token per request (a pass that catches up on a
        # prompt or on accepted tokens costs more, once, and would overstate the steady cost).
        self.seconds_per_token: float | None = None

    @torch.inference_mode()
    def propose(self, requests: Sequence[Request], lengths: Sequence[int]) -> dict[str, list[int]]:
        contexts = {r.request_id: list(r.all_token_ids) for r in requests}
        computed = {r.request_id: self._valid_prefix(r) for r in requests}
        wanted = {r.request_id: n for r, n in zip(requests, lengths, strict=True)}
        drafts: dict[str, list[int]] = {rid: [] for rid in wanted}
        active = list(wanted)
        while active:
            rows = []  # (request id, start, tokens) of this pass
            for rid in active:
                context = contexts[rid] + drafts[rid]
                start = computed[rid]
                if not self.blocks.allocate(rid, len(context)):
                    continue  # no room: stop drafting this request
                rows.append((rid, start, context[start:]))
            if not rows:
                break
            rows.sort(key=lambda row: len(row[2]) != 1)  # single-token rows first: the decode batch
            started = time.perf_counter()
            tokens = self._forward(rows)
            if all(len(fed) == 1 for _, _, fed in rows):
                per_token = (time.perf_counter() - started) / len(rows)
                old = self.seconds_per_token
                self.seconds_per_token = per_token if old is None else 0.8 * old + 0.2 * per_token
            for (rid, start, fed), token in zip(rows, tokens, strict=True):
                computed[rid] = start + len(fed)
                if not self.shares_cache:
                    self._fed[rid] = (contexts[rid] + drafts[rid])[: computed[rid]]
                drafts[rid].append(token)
            active = [rid for rid, _, _ in rows if len(drafts[rid]) < wanted[rid]]
        return {rid: tokens for rid, tokens in drafts.items() if tokens}

    def _valid_prefix(self, request: Request) -> int:
        """Tokens at the start of the request whose keys and values the draft's cache holds."""
        if self.shares_cache:
            return request.num_computed_tokens  # the target's own, for these layers
        fed = self._fed.get(request.request_id, [])
        tokens = request.all_token_ids
        n = 0
        limit = min(len(fed), len(tokens) - 1)  # the newest token always runs: its logits give the first draft
        while n < limit and fed[n] == tokens[n]:
            n += 1
        return n

    def _forward(self, rows: list[tuple[str, int, list[int]]]) -> list[int]:
        token_ids, positions, sequences, last = [], [], [], []
        for rid, start, fed in rows:
            table = self.blocks.tables[rid]
            token_ids.extend(fed)
            positions.extend(range(start, start + len(fed)))
            sequences.append(SequenceSlice(start, len(fed), table.ids, table.contiguous))
            last.append(len(token_ids) - 1)
        attend = build_paged_attention(self.cache, self.model.attention, sequences, self.device)
        logits = self.model(
            torch.tensor([token_ids], device=self.device),
            torch.tensor([positions], device=self.device),
            attend=attend,
            logits_indices=torch.tensor(last, dtype=torch.long, device=self.device),
        )[0]
        return logits.argmax(-1).tolist()

    def remove(self, request_id: str) -> None:
        self._fed.pop(request_id, None)
        if not self.shares_cache:
            self.blocks.free(request_id)


def first_layers(model: nn.Module, num_layers: int) -> nn.Module:
    """A view of the model that runs only its first num_layers layers, then its final norm and head: the same
    parameters (nothing copied), its own C++ stack over them."""
    total = len(model.layers)
    if not 0 < num_layers < total:
        raise ValueError(f"A layer-skip draft needs 1..{total - 1} of the model's {total} layers, got {num_layers}.")
    shallow = copy.copy(model)
    shallow._modules = dict(model._modules)  # nn.Module keeps children here: give the view its own dict
    shallow.layers = nn.ModuleList(list(model.layers)[:num_layers])
    shallow.config = model.config.replace(num_layers=num_layers)
    if hasattr(model, "spec"):
        shallow.spec = dataclasses.replace(model.spec, layers=model.spec.layers[:num_layers])
    shallow.decoder_stack = None
    refresh_decoder_stack(shallow)
    return shallow
