"""The scheduler without a model: exact token splits per step under a budget, chunked prefill, FCFS admission,
preemption when blocks run out, prefix-cache hits on resume."""

from leanlm.cache.block_manager import BlockManager
from leanlm.config import EngineConfig
from leanlm.engine.request import Request, RequestStatus
from leanlm.engine.scheduler import Scheduler
from leanlm.sampling_params import SamplingParams


def make_scheduler(num_blocks=100, block_size=4, prefix_caching=False, **limits):
    config = EngineConfig(block_size=block_size, enable_prefix_caching=prefix_caching, **limits)
    return Scheduler(config, BlockManager(num_blocks, block_size, prefix_caching))


def request(request_id, num_prompt_tokens, first_token=1, max_tokens=100):
    prompt = list(range(first_token, first_token + num_prompt_tokens))
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens), max_tokens)


def step(scheduler):
    """Schedule, 'run' (every request reaching its newest token samples token 0), and return {id: tokens}."""
    out = scheduler.schedule()
    scheduler.update(out)
    for entry in out.scheduled:
        if entry.completes:
            entry.request.append_token(0)
    return out.num_tokens_by_id(), [r.request_id for r in out.preempted]


def test_budget_splits_prefill_into_chunks_and_mixes_in_decodes():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    a, b = request("a", 10), request("b", 5)
    scheduler.add(a)
    scheduler.add(b)
    assert step(scheduler) == ({"a": 8}, [])  # a's prompt in two chunks; b waits for budget
    assert a.output_token_ids == []
    assert step(scheduler) == ({"a": 2, "b": 5}, [])
    assert a.num_computed_tokens == 10 and len(a.output_token_ids) == 1
    assert step(scheduler) == ({"a": 1, "b": 1}, [])
    c = request("c", 20)
    scheduler.add(c)
    assert step(scheduler) == ({"a": 1, "b": 1, "c": 6}, [])
    assert step(scheduler) == ({"a": 1, "b": 1, "c": 6}, [])
    assert step(scheduler) == ({"a": 1, "b": 1, "c": 6}, [])
    assert step(scheduler) == ({"a": 1, "b": 1, "c": 2}, [])
    assert step(scheduler) == ({"a": 1, "b": 1, "c": 1}, [])


def test_max_num_seqs_and_fcfs_admission():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100, num_blocks=5)
    for r in (request("a", 3), request("b", 3), request("c", 3), request("d", 1)):
        scheduler.add(r)
    assert step(scheduler) == ({"a": 3, "b": 3}, [])  # two sequences at most
    scheduler.finish(scheduler.running[0], "stop")
    assert step(scheduler) == ({"b": 1, "c": 3}, [])
    big = request("big", 30)
    scheduler.finish(scheduler.running[0], "stop")
    scheduler.waiting.appendleft(big)  # needs 8 blocks: never fits here, and d behind it waits (FCFS)
    assert step(scheduler) == ({"c": 1}, [])
    assert [r.request_id for r in scheduler.waiting] == ["big", "d"]


def test_preemption_frees_the_newest_and_recomputes_it_later():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a, b = request("a", 6), request("b", 6, first_token=50)
    scheduler.add(a)
    scheduler.add(b)
    assert step(scheduler) == ({"a": 6, "b": 6}, [])  # 2 blocks each: the cache is full
    assert step(scheduler) == ({"a": 1, "b": 1}, [])
    assert step(scheduler) == ({"a": 1, "b": 1}, [])  # 8 tokens each: 2 full blocks
    assert step(scheduler) == ({"a": 1}, ["b"])  # a needs a third block: b (newest) gives back its two
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert scheduler.waiting[0] is b and scheduler.num_preemptions == 1
    assert step(scheduler) == ({"a": 1}, [])  # b needs 3 blocks, 1 free
    scheduler.finish(a, "stop")
    assert scheduler.block_manager.num_used_blocks == 0
    assert step(scheduler) == ({"b": 9}, [])  # prompt and the 3 generated tokens, recomputed at once
    assert b.output_token_ids == [0, 0, 0, 0] and b.num_computed_tokens == 9
    assert step(scheduler) == ({"b": 1}, [])


def test_resumed_request_gets_its_full_blocks_back_from_the_prefix_cache():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64, prefix_caching=True)
    a, b = request("a", 6), request("b", 6, first_token=50)
    scheduler.add(a)
    scheduler.add(b)
    for _ in range(3):
        step(scheduler)
    assert step(scheduler) == ({"a": 1}, ["b"])  # a takes b's last block (evicted first), b's first stays cached
    scheduler.finish(a, "stop")
    assert step(scheduler) == ({"b": 5}, [])  # tokens 0-3 come from the cache, 4-8 are recomputed
    assert scheduler.prefix_cache_hits == 4


def test_shared_prompt_prefix_hits_after_the_first_request_computed_it():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=64, prefix_caching=True)
    first = request("first", 10)
    scheduler.add(first)
    assert step(scheduler) == ({"first": 10}, [])
    second = request("second", 11)  # same first 10 tokens, then one more
    scheduler.add(second)
    assert step(scheduler) == ({"first": 1, "second": 3}, [])  # 8 tokens (2 full blocks) shared
    assert second.num_cached_tokens == 8
    assert scheduler.block_manager.tables["first"].ids[:2] == scheduler.block_manager.tables["second"].ids[:2]
    assert (scheduler.prefix_cache_queries, scheduler.prefix_cache_hits) == (21, 8)


def test_finishing_and_aborting_free_every_block():
    scheduler = make_scheduler(num_blocks=10)
    a, b = request("a", 9), request("b", 3)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    scheduler.finish(a, "abort")
    scheduler.finish(b, "stop")
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_used_blocks == 0
    waiting = request("w", 3)
    scheduler.add(waiting)
    scheduler.finish(waiting, "abort")  # aborted before it ever ran
    assert not scheduler.has_unfinished() and waiting.finish_reason == "abort"


def test_long_prefill_leaves_room_for_decodes_and_new_short_prompts():
    """Regression: a running 8,000-token prefill took the whole budget, so a 2-token request waited for all of it."""
    scheduler = make_scheduler(num_blocks=3000, max_num_batched_tokens=512)
    long = request("long", 8000)
    scheduler.add(long)
    assert step(scheduler) == ({"long": 512}, [])  # alone: the whole budget
    assert step(scheduler) == ({"long": 512}, [])
    short = request("short", 2, first_token=9000)
    scheduler.add(short)
    assert step(scheduler) == ({"long": 128, "short": 2}, [])  # a quarter of the budget while someone waits
    assert short.output_token_ids == [0]  # its first token after one step
    assert step(scheduler) == ({"long": 128, "short": 1}, [])  # a running decode behind the prefill moves too
    scheduler.finish(short, "stop")
    assert step(scheduler) == ({"long": 512}, [])  # alone again: full chunks
    assert long.num_computed_tokens == 512 * 3 + 128 * 2


def test_prefill_keeps_full_chunks_when_waiting_requests_cannot_be_admitted():
    scheduler = make_scheduler(num_blocks=3000, max_num_batched_tokens=512, max_num_seqs=1)
    scheduler.add(request("long", 2000))
    scheduler.add(request("short", 2, first_token=9000))
    assert step(scheduler) == ({"long": 512}, [])
    assert step(scheduler) == ({"long": 512}, [])  # no free sequence slot for "short": nothing to leave room for
