"""Block bookkeeping without a model: reference counts, prefix-cache hits through hash chains, LRU eviction."""

from leanlm.cache.block_manager import BlockManager


def filled(manager, request_id, tokens, cached=()):
    assert manager.allocate(request_id, len(tokens), cached)
    manager.cache_full_blocks(request_id, tokens, len(tokens))
    return manager.tables[request_id].ids


def test_allocation_grows_tables_and_free_returns_every_block():
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    assert manager.allocate("a", 5)  # 2 blocks
    assert manager.allocate("a", 8)  # still 2
    assert manager.allocate("a", 9)  # 3
    assert manager.tables["a"].ids == [0, 1, 2] and manager.tables["a"].contiguous
    assert manager.allocate("b", 16)
    assert manager.num_used_blocks == 7 and manager.num_free_blocks == 1
    assert not manager.allocate("c", 5)  # needs 2, one free: nothing changes
    assert "c" not in manager.tables and manager.num_free_blocks == 1
    manager.free("a")
    manager.free("b")
    manager.free("b")  # twice is harmless
    assert manager.num_used_blocks == 0 and manager.num_cached_blocks == 0


def test_shared_prefix_shares_blocks_with_reference_counts():
    manager = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    first = filled(manager, "a", prompt)
    hits = manager.find_cached_prefix(prompt + [7, 7])
    assert hits == first[:2]
    second = filled(manager, "b", prompt + [7, 7], hits)
    assert second[:2] == first[:2] and second[2] != first[2]
    assert [manager.blocks[b].ref_count for b in first] == [2, 2, 1]
    manager.free("a")
    assert [manager.blocks[b].ref_count for b in first] == [1, 1, 0]
    manager.free("b")
    assert manager.num_used_blocks == 0
    assert manager.num_cached_blocks == 3  # a's two shared blocks and b's third (full: 12 tokens)


def test_lookup_never_covers_the_last_token_and_needs_the_whole_chain():
    manager = BlockManager(num_blocks=8, block_size=4)
    filled(manager, "a", [1, 2, 3, 4, 5, 6, 7, 8])
    manager.free("a")
    assert len(manager.find_cached_prefix([1, 2, 3, 4, 5, 6, 7, 8])) == 1  # the last token must be computed
    assert len(manager.find_cached_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9])) == 2
    assert manager.find_cached_prefix([0, 2, 3, 4, 5, 6, 7, 8, 9]) == []  # same second block, other parent
    assert BlockManager(8, 4, enable_prefix_caching=False).find_cached_prefix([1, 2, 3, 4, 5]) == []


def test_eviction_takes_least_recently_freed_blocks_tail_first():
    manager = BlockManager(num_blocks=6, block_size=2)
    old = filled(manager, "old", [1, 2, 3, 4, 5, 6])  # blocks 0, 1, 2
    new = filled(manager, "new", [9, 8, 7, 6, 5, 4])  # blocks 3, 4, 5
    manager.free("old")
    manager.free("new")
    assert manager.num_cached_blocks == 6
    assert manager.allocate("x", 2)  # one block: the tail of the older request goes first
    assert manager.tables["x"].ids == [old[2]]
    assert len(manager.find_cached_prefix([1, 2, 3, 4, 5, 6, 0])) == 2
    assert manager.allocate("y", 4)
    assert manager.tables["y"].ids == [old[1], old[0]]
    assert manager.find_cached_prefix([1, 2, 3, 4, 5, 6, 0]) == []
    assert manager.find_cached_prefix([9, 8, 7, 6, 5, 4, 0]) == new  # the newer request is intact
    assert manager.num_cached_blocks == 3


def test_reviving_a_cached_block_counts_against_the_free_blocks():
    manager = BlockManager(num_blocks=3, block_size=2)
    filled(manager, "a", [1, 2, 3, 4])
    manager.free("a")
    hits = manager.find_cached_prefix([1, 2, 3, 4, 5])
    assert len(hits) == 2
    assert not manager.allocate("b", 8, hits)  # 2 revived + 2 new > 3 blocks
    assert manager.allocate("b", 6, hits)
    assert manager.num_free_blocks == 0 and manager.tables["b"].ids[:2] == hits


def test_unreusable_blocks_are_reused_before_cached_ones():
    manager = BlockManager(num_blocks=4, block_size=2)
    filled(manager, "a", [1, 2, 3])  # block 0 full (cached), block 1 half (not)
    manager.free("a")
    assert manager.allocate("b", 2)
    assert manager.tables["b"].ids == [1]
    assert len(manager.find_cached_prefix([1, 2, 3])) == 1


def test_contiguous_flag_follows_the_block_ids():
    manager = BlockManager(num_blocks=6, block_size=1, enable_prefix_caching=False)
    manager.allocate("a", 1)
    manager.allocate("b", 1)
    manager.allocate("a", 2)
    assert manager.tables["a"].ids == [0, 2] and not manager.tables["a"].contiguous
    assert manager.tables["b"].contiguous


def test_cached_block_count_is_kept_without_scanning():
    """num_cached_blocks is a counter (stats read it every step): it must equal a scan of the free queue through
    allocations, prefix hits, frees and evictions."""
    import random

    rng = random.Random(0)
    manager = BlockManager(num_blocks=12, block_size=2)
    prompts = [[rng.randrange(3) for _ in range(rng.randrange(1, 9))] for _ in range(40)]
    live: list[str] = []
    for step, prompt in enumerate(prompts):
        if live and (rng.random() < 0.5 or len(live) > 3):
            manager.free(live.pop(rng.randrange(len(live))))
        request_id = f"r{step}"
        hits = manager.find_cached_prefix(prompt)
        if manager.allocate(request_id, len(prompt), hits):
            manager.cache_full_blocks(request_id, prompt, len(prompt))
            live.append(request_id)
        scanned = sum(1 for b in manager._free if manager.blocks[b].hash is not None)
        assert manager.num_cached_blocks == scanned
