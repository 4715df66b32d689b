"""KV cache blocks: reference counts, one block table per request, and the prefix cache. No torch here.

A block holds the keys and values of `block_size` consecutive tokens. Once full, a block is named by a hash
chained over every token from the start of the sequence to its end, so requests whose prompts share a prefix
find, and share, the same blocks. Blocks that nobody references wait in a free queue in LRU order; those that
still hold prefix data stay findable until they are taken for new data (eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


def chain_hash(parent: int | str | None, tokens: tuple[int, ...]) -> int:
    """Name of a full block: its tokens and, through `parent`, every token before them.

    A 64-bit collision between different prefixes is negligible; the block's own tokens are compared as well."""
    return hash((parent, tokens))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its keys and values are computed
    token_ids: tuple[int, ...] = ()  # the tokens it holds, when hashed


@dataclass
class BlockTable:
    """The blocks of one request, in position order: token at position p lives in ids[p // block_size]."""

    ids: list[int] = field(default_factory=list)
    contiguous: bool = True  # ids are consecutive (id, id + 1, ...): attention can read the cache without a gather
    hashes: list[int] = field(default_factory=list)  # chain hashes of its leading full blocks
    # The parent of its first block's hash: None for text; an encoder-decoder request's input hash (audio), so that
    # equal decoder tokens over different audio never share blocks.
    salt: str | None = None

    def append(self, block_id: int) -> None:
        self.contiguous = self.contiguous and (not self.ids or block_id == self.ids[-1] + 1)
        self.ids.append(block_id)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks; allocation takes from the front, so the front is the next to be evicted.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # chain hash -> block id
        self._num_cached_free = 0  # blocks in _free that hold prefix data (stats read it every step: no scan)
        self.tables: dict[str, BlockTable] = {}

    # ---- counts ---------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (cached ones included: they are evicted on demand)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one request."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks that still hold prefix data."""
        return self._num_cached_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ---------------------------------------------------------------------------------------

    def find_cached_prefix(self, token_ids: Sequence[int], salt: str | None = None) -> list[int]:
        """Blocks holding the longest cached prefix of token_ids (after `salt`, see BlockTable), in order.

        Stops before the last token: its logits are needed, so at least that token must be computed."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent: int | str | None = salt
        size = self.block_size
        for i in range((len(token_ids) - 1) // size):
            tokens = tuple(token_ids[i * size : (i + 1) * size])
            parent = chain_hash(parent, tokens)
            block_id = self._cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Name the request's blocks that are now full of computed tokens, so later requests can share them."""
        table = self.tables[request_id]
        size = self.block_size
        while len(table.hashes) < num_computed_tokens // size:
            i = len(table.hashes)
            tokens = tuple(token_ids[i * size : (i + 1) * size])
            block_hash = chain_hash(table.hashes[-1] if table.hashes else table.salt, tokens)
            table.hashes.append(block_hash)
            block = self.blocks[table.ids[i]]
            # A block computed twice in the same step (two equal prompts) stays private: the first one is named.
            if self.enable_prefix_caching and block.hash is None and block_hash not in self._cached:
                block.hash, block.token_ids = block_hash, tokens
                self._cached[block_hash] = block.block_id

    # ---- allocation -----------------------------------------------------------------------------------------

    def allocate(
        self, request_id: str, num_tokens: int, cached_blocks: Sequence[int] = (), salt: str | None = None
    ) -> bool:
        """Grow the request's table to cover num_tokens tokens, starting with `cached_blocks` (a prefix-cache hit,
        for a request without blocks). `salt` names a new table's hash chain (BlockTable.salt). Returns False,
        changing nothing, when too few blocks are free."""
        table = self.tables.get(request_id)
        have = len(table.ids) if table else 0
        new = self.blocks_needed(num_tokens) - have - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)  # they leave the free queue
        if new > len(self._free) - revived:
            return False
        if table is None:
            table = self.tables[request_id] = BlockTable(salt=salt)
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
                self._num_cached_free -= 1  # a prefix hit: it holds data
            block.ref_count += 1
            table.append(block_id)
        for _ in range(new):
            table.append(self._take_free_block())
        return True

    def truncate(self, request_id: str, num_tokens: int) -> None:
        """Give back the request's trailing blocks beyond the first num_tokens tokens (speculative tokens that
        were rejected). Only private, unnamed blocks can be beyond them: a named block is full of computed tokens."""
        table = self.tables.get(request_id)
        if table is None:
            return
        keep = max(self.blocks_needed(num_tokens), len(table.hashes))
        while len(table.ids) > keep:
            block = self.blocks[table.ids.pop()]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = None
                self._free.move_to_end(block.block_id, last=False)  # holds nothing reusable: reuse it first
        table.contiguous = all(b == a + 1 for a, b in zip(table.ids, table.ids[1:], strict=False))

    def free(self, request_id: str) -> None:
        """Drop the request's references. Its last blocks become the first evicted: a shared prefix lives longer."""
        table = self.tables.pop(request_id, None)
        if table is None:
            return
        for block_id in reversed(table.ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:  # holds nothing reusable: reuse it first
                    self._free.move_to_end(block_id, last=False)
                else:
                    self._num_cached_free += 1

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its prefix data
            self._num_cached_free -= 1
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id
