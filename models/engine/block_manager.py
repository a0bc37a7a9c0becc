"""KV block accounting: reference counts, a free list, and the prefix cache. No torch.

A sequence's keys and values live in fixed-size blocks (its *block table*); the memory
itself is :class:`models.engine.kv_cache.KVCache`, indexed by the block ids handed out
here. Blocks carry reference counts so that the ``n`` samples of one prompt, and
requests that share a prompt prefix, share blocks.

**Prefix caching.** A *full* block whose keys and values are computed is identified by a
chained hash: ``hash((parent block's hash, this block's token ids))``, the chain
starting from a ``salt`` that names everything else the KV depends on (the model, the
KV dtype). A new request looks its prompt up block by block and reuses every leading
block found, prefilling only the rest. When the last owner frees a cached block it is
not wiped: it goes on an LRU list, still findable, and is handed out again (its hash
dropped) only when no never-used block is left. A hit is checked token for token
against what the block holds, so a hash collision can never serve another prefix's KV.

Cached blocks are full, so nobody ever writes into them again: sequences append into a
fresh block past them, and copy-on-write only concerns a shared *partial* last block
(n > 1), which is never cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

# Block 0 is never handed out: padded rows of a CUDA-graph decode batch write their
# (discarded) keys there and read it, so they can never touch a live sequence's memory.
NULL_BLOCK = 0


def chain_hash(parent: int, tokens: Sequence[int]) -> int:
    """The prefix-cache key of a full block holding ``tokens`` after the chain ``parent``."""
    return hash((parent, tuple(tokens)))


class BlockManager:
    """Reference counts and free blocks among ids ``lo..num_blocks-1``, with a prefix cache.

    ``lo`` > 1 gives one micro-batch of a pipeline its own share of the stages' caches
    (block 0 stays the shared null block). ``enable_prefix_caching=False`` frees blocks
    straight to the free list and never finds a prefix.
    """

    def __init__(self, num_blocks: int, block_size: int, *, lo: int = NULL_BLOCK + 1,
                 enable_prefix_caching: bool = True, salt: int = 0) -> None:
        if lo < NULL_BLOCK + 1 or num_blocks - lo < 1:
            raise ValueError(f"num_blocks: need at least one usable block in {lo}.."
                             f"{num_blocks - 1} (block {NULL_BLOCK} is reserved)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.lo = lo
        self.enable_prefix_caching = enable_prefix_caching
        self.salt = salt
        # Popping from the end hands out low ids first, which keeps tests readable.
        self._free = list(range(num_blocks - 1, lo - 1, -1))
        self._refs = [0] * num_blocks
        # hash -> block; block -> (hash, parent hash, its tokens) while cached
        self._cached: dict[int, int] = {}
        self._key: dict[int, tuple[int, int, tuple[int, ...]]] = {}
        # Cached blocks nobody holds, least recently freed first (evicted first).
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.hit_tokens = 0  # prompt tokens served from the cache
        self.query_tokens = 0  # prompt tokens looked up

    # -- counts ----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Blocks sequences can use (all but the reserved ones)."""
        return self.num_blocks - self.lo

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now: never-used ones and unheld cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Full blocks findable by their hash (held or not)."""
        return len(self._cached)

    def refs(self, block: int) -> int:
        return self._refs[block]

    # -- allocation ------------------------------------------------------------------------

    def allocate(self) -> int:
        if self._free:
            b = self._free.pop()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)
            self._uncache(b)
        else:
            raise RuntimeError("KV cache: no free block (the scheduler should have preempted)")
        self._refs[b] = 1
        return b

    def fork(self, blocks: Sequence[int]) -> list[int]:
        """Share ``blocks`` with one more owner; returns a new table (same ids)."""
        for b in blocks:
            self._refs[b] += 1
        return list(blocks)

    def free(self, block: int) -> None:
        r = self._refs[block] - 1
        if r < 0:
            raise RuntimeError(f"KV cache: block {block} freed more often than allocated")
        self._refs[block] = r
        if r == 0:
            if block in self._key:
                self._evictable[block] = None  # most recently freed: evicted last
            else:
                self._free.append(block)

    def free_all(self, blocks: Sequence[int]) -> None:
        # Last block first: a sequence's tail is the least likely to be shared, so it
        # should be evicted before its prefix.
        for b in reversed(blocks):
            self.free(b)

    # -- prefix cache ----------------------------------------------------------------------

    def lookup(self, tokens: Sequence[int], max_blocks: int) -> tuple[list[int], list[int]]:
        """The longest run of cached leading full blocks of ``tokens`` (at most
        ``max_blocks``): (block ids, their hashes). Nothing is acquired."""
        blocks: list[int] = []
        hashes: list[int] = []
        if not self.enable_prefix_caching:
            return blocks, hashes
        bs = self.block_size
        parent = self.salt
        for i in range(max_blocks):
            chunk = tuple(tokens[i * bs: (i + 1) * bs])
            h = hash((parent, chunk))
            b = self._cached.get(h)
            if b is None or self._key[b][1:] != (parent, chunk):
                break
            blocks.append(b)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks found by :meth:`lookup`."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1

    def reusable(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` (a lookup's) nobody holds: taking them uses free blocks."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def count_query(self, tokens: int, hit: int) -> None:
        self.query_tokens += tokens
        self.hit_tokens += hit

    def register(self, tokens: Sequence[int], blocks: Sequence[int], hashes: list[int],
                 num_computed: int) -> None:
        """Make a sequence's full, computed blocks findable. ``hashes`` is the sequence's
        chain so far (extended in place) for ``blocks[:len(hashes)]``."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(num_computed // bs, len(blocks))
        parent = hashes[-1] if hashes else self.salt
        for i in range(len(hashes), full):
            chunk = tuple(tokens[i * bs: (i + 1) * bs])
            h = hash((parent, chunk))
            hashes.append(h)
            b = blocks[i]
            if h not in self._cached and b not in self._key:
                # First copy of this prefix block: findable from now on. (A second copy,
                # computed at the same time by another sequence, stays private.)
                self._cached[h] = b
                self._key[b] = (h, parent, chunk)
            parent = h

    def _uncache(self, block: int) -> None:
        h = self._key.pop(block)[0]
        del self._cached[h]

    def reset_prefix_cache(self) -> int:
        """Forget every unheld cached block (they become plain free blocks). Returns how
        many were dropped."""
        n = len(self._evictable)
        for b in self._evictable:
            self._uncache(b)
            self._free.append(b)
        self._evictable.clear()
        return n

    def set_enabled(self, enabled: bool) -> None:
        """Turn prefix caching on or off (off also forgets the unheld cached blocks)."""
        self.enable_prefix_caching = enabled
        if not enabled:
            self.reset_prefix_cache()

    def check(self, held: Sequence[Sequence[int]]) -> None:
        """Raise if the counts disagree with the block tables ``held`` (tests)."""
        refs = [0] * self.num_blocks
        for table in held:
            for b in table:
                refs[b] += 1
        if refs != self._refs:
            bad = [b for b in range(self.num_blocks) if refs[b] != self._refs[b]]
            raise AssertionError(f"block refs disagree with the tables at {bad[:10]}")
        free = set(self._free) | set(self._evictable)
        if len(free) != self.num_free or any(self._refs[b] for b in free):
            raise AssertionError("a free block is held, or listed twice")
        if len(free) + sum(1 for r in self._refs if r) != self.capacity:
            raise AssertionError("blocks leaked: free + held != capacity")
        if set(self._evictable) - set(self._key):
            raise AssertionError("an evictable block is not cached")
