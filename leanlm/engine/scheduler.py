"""Which requests run this step, and how many tokens each: FCFS under a token budget, with chunked prefill,
prefix caching and preemption by recompute. No torch: tests drive it without a model.

Each step the running requests come first (oldest first), each asking for all its pending tokens (one for a
decode, the rest of the prompt for a prefill) within what is left of the budget; a prompt longer than that runs
in chunks over several steps. When the KV cache has no block for a running request, the newest running request
is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed later (its full
blocks usually come back from the prefix cache). Waiting requests are admitted in arrival order while budget,
sequence slots and blocks last; the first one that does not fit blocks the ones behind it (FCFS). A running prefill
with others behind it is cut to a quarter of the budget, so that one long prompt cannot stall everyone.

Encoder-decoder requests (Whisper) carry an encoder input, named by its content hash. Admitting a request whose
input is not in the encoder cache schedules its encoder run; at most `max_encoder_inputs_per_step` new inputs are
encoded per step (an encoder pass costs as much as many decoder steps), and a request whose input does not fit
waits, with the ones behind it (FCFS). Requests over the same input share one encoder output (vLLM keys its encoder
cache by content hash too). The scheduler counts each output's users; the runner drops an output when its last user
finishes or is aborted (take_freed_encoder_inputs). A preempted request keeps its place among the users: it
recomputes its decoder tokens, never its encoder. Prefix-cache hashes start from the input's hash
(Request.cache_salt), so only requests over the same input share decoder blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from leanlm.cache.block_manager import BlockManager, BlockTable
from leanlm.config import EngineConfig
from leanlm.engine.request import Request, RequestStatus

# While other requests wait or run behind it, a running prefill takes at most 1/PREFILL_SHARE of the step's token
# budget, so decodes and new short prompts keep moving during a long prompt (vLLM's long_prefill_token_threshold).
PREFILL_SHARE = 4


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_tokens: int  # tokens to run this step
    start: int  # position of the first of them (= request.num_computed_tokens when scheduled)
    block_table: BlockTable
    num_draft_tokens: int = 0  # of num_tokens, speculative tokens after the newest one (request.draft_token_ids)

    @property
    def completes(self) -> bool:
        """The step reaches the request's newest token, so its logits give the next token."""
        return self.start + self.num_tokens - self.num_draft_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # running ones first, then new admissions
    preempted: list[Request] = field(default_factory=list)
    encoder_inputs: list[Request] = field(default_factory=list)  # admitted requests whose encoder runs this step

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def num_tokens_by_id(self) -> dict[str, int]:
        return {s.request.request_id: s.num_tokens for s in self.scheduled}


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of which found
        # content hash -> ids of the admitted requests reading that encoder output (which the runner holds)
        self.encoder_users: dict[str, set[str]] = {}
        self._freed_encoder_inputs: list[str] = []  # hashes whose last user finished, for the runner to drop

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            if i + 1 < len(self.running) or self._can_admit():  # others want tokens: a long prefill leaves room
                num_tokens = min(num_tokens, self._prefill_chunk_cap)
            num_draft = self._fit_drafts(request, budget - num_tokens)
            if not self._allocate_or_preempt(request, num_tokens, out):
                break  # the request preempted itself: no one after it is left
            out.scheduled.append(self._entry(request, num_tokens + num_draft, num_draft))
            budget -= num_tokens + num_draft
            i += 1
        if not out.preempted:  # memory is short: admitting more would only preempt again
            self._admit(budget, out)
        return out

    def _can_admit(self) -> bool:
        return bool(self.waiting) and len(self.running) < self.config.max_num_seqs

    @property
    def _prefill_chunk_cap(self) -> int:
        return max(1, self.config.max_num_batched_tokens // PREFILL_SHARE)

    def update(self, out: SchedulerOutput) -> None:
        """After the step ran: count the computed tokens, and name the blocks they filled for the prefix cache."""
        for entry in out.scheduled:
            request = entry.request
            if request.finished:  # aborted while the step ran
                continue
            # Draft tokens count once accepted (accept_drafts): only the request's own tokens are named here.
            request.num_computed_tokens = entry.start + entry.num_tokens - entry.num_draft_tokens
            self.block_manager.cache_full_blocks(request.request_id, request.all_token_ids, request.num_computed_tokens)

    def accept_drafts(self, request: Request, num_accepted: int) -> None:
        """After a verify step appended its tokens: the accepted drafts' keys and values are valid, the rejected
        ones' are not. Roll the computed count, the prefix-cache names and the block table back to match."""
        request.draft_token_ids = []
        if request.finished:  # its blocks are already freed
            return
        request.num_computed_tokens = min(request.num_computed_tokens + num_accepted, request.num_tokens - 1)
        self.block_manager.cache_full_blocks(request.request_id, request.all_token_ids, request.num_computed_tokens)
        self.block_manager.truncate(request.request_id, request.num_tokens)

    def finish(self, request: Request, reason: str) -> None:
        """Remove a request (finished or aborted) wherever it is and free its blocks."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.block_manager.free(request.request_id)
        if request.encoder_input is not None:
            key = request.encoder_input.content_hash
            users = self.encoder_users.get(key)
            if users is not None and request.request_id in users:
                users.discard(request.request_id)
                if not users:
                    del self.encoder_users[key]
                    self._freed_encoder_inputs.append(key)
        request.status, request.finish_reason = RequestStatus.FINISHED, reason

    def take_freed_encoder_inputs(self) -> list[str]:
        """Hashes of encoder outputs nobody reads any more (since the last call): the runner frees them."""
        freed, self._freed_encoder_inputs = self._freed_encoder_inputs, []
        return freed

    # ---- internals ------------------------------------------------------------------------------------------

    def _entry(self, request: Request, num_tokens: int, num_draft: int = 0) -> ScheduledRequest:
        table = self.block_manager.tables[request.request_id]
        return ScheduledRequest(request, num_tokens, request.num_computed_tokens, table, num_draft)

    def _fit_drafts(self, request: Request, budget: int) -> int:
        """How many of a decoding request's draft tokens run this step: what the budget and free blocks allow.
        Drafts never preempt anyone; those that do not fit are dropped."""
        drafts = request.draft_token_ids
        if not drafts:
            return 0
        count = min(len(drafts), max(budget, 0))
        if request.num_computed_tokens != request.num_tokens - 1:  # not decoding (prefill, or just resumed)
            count = 0
        if count and not self.block_manager.allocate(request.request_id, request.num_tokens + count):
            count = 0
        del drafts[count:]
        return count

    def _allocate_or_preempt(self, request: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        needed = request.num_computed_tokens + num_tokens
        while not self.block_manager.allocate(request.request_id, needed):
            victim = self.running.pop()  # the newest running request
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request.request_id)
        request.draft_token_ids = []
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)  # victims leave newest first, so the oldest ends up in front

    def _admit(self, budget: int, out: SchedulerOutput) -> None:
        manager = self.block_manager
        encoder_budget = self.config.max_encoder_inputs_per_step
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            key = None if request.encoder_input is None else request.encoder_input.content_hash
            needs_encoder = key is not None and key not in self.encoder_users
            if needs_encoder and encoder_budget == 0:
                break  # the step's encoder budget is spent: it waits for the next step
            # A request that scores its prompt must run all of it: cached blocks would skip their logits.
            scores_prompt = request.params.prompt_logprobs is not None
            salt = request.cache_salt
            cached = [] if scores_prompt else manager.find_cached_prefix(request.all_token_ids, salt)
            num_cached = len(cached) * manager.block_size
            num_tokens = min(request.num_tokens - num_cached, budget)
            if not manager.allocate(request.request_id, num_cached + num_tokens, cached, salt):
                break
            self.waiting.popleft()
            if key is not None:
                self.encoder_users.setdefault(key, set()).add(request.request_id)
            if needs_encoder:
                out.encoder_inputs.append(request)
                encoder_budget -= 1
            if manager.enable_prefix_caching:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += num_cached
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(self._entry(request, num_tokens))
            budget -= num_tokens
