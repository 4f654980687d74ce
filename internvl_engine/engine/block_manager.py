"""KV-cache blocks: a free list, reference counts and content hashes for prefix reuse (plain Python: no torch).

The cache holds `num_blocks` blocks of `block_size` token slots. A request's `block_ids` is its block table:
token i of the request keeps its K/V in slot `block_ids[i // block_size] * block_size + i % block_size`.

Prefix caching: once every token of a block has its K/V computed (`commit`), the block is registered under a
hash of its content chained with the hash of the block before it, so a hit on block i means the whole prefix
[0, (i + 1) * block_size) matches. A block whose last reference is freed keeps its hash and can be found
again until the free list hands it out for new tokens; cached blocks are handed out least recently freed
first, and blocks that hold nothing reusable are handed out before any cached one.

The hash is SHA-256, not Python's `hash()`: hits are shared across requests (and across users behind the
server), so a collision would silently give one prompt another prompt's K/V. 256 bits make that impossible
in practice even for crafted prompts; a 64-bit tuple hash does not. The cost, about 1 µs per block, is paid
once per full block per request (the hashes are kept on the request).
"""
from __future__ import annotations

from array import array
from collections import OrderedDict
import hashlib

from .request import Request

_ROOT_HASH = bytes(32)  # stands for "the block before the first block", so every hash input has the same layout


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[bytes | None] = [None] * num_blocks  # the hash a block is registered under
        self._hash_to_block: dict[bytes, int] = {}
        # Blocks with no references, in the order they are handed out: blocks holding no cached content first,
        # then cached blocks from the least to the most recently freed (LRU eviction).
        self._free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_hits_tokens = 0  # tokens found in the cache at admissions
        self.prefix_queries_tokens = 0  # tokens looked up at admissions

    # ----- state -----------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no request references (cached ones included: they are reclaimed on demand)."""
        return len(self._free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free_blocks) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def cached_hash(self, block_id: int) -> bytes | None:
        return self._block_hashes[block_id]

    def cached_block(self, block_hash: bytes) -> int | None:
        return self._hash_to_block.get(block_hash)

    def free_block_ids(self) -> list[int]:
        """Free blocks in the order `append` hands them out."""
        return list(self._free_blocks)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----- admission ---------------------------------------------------------------------------------------
    def check_fits(self, request: Request) -> None:
        """ValueError if the request could never fit, even alone in the cache.

        The last sampled token never gets its K/V computed, so at most prompt + max_tokens - 1 tokens are stored.
        """
        max_stored_tokens = request.num_prompt_tokens + request.max_tokens - 1
        needed = self.num_blocks_for(max_stored_tokens)
        if needed > self.num_blocks:
            raise ValueError(f"request {request.request_id!r} may need {needed} KV blocks ({max_stored_tokens} tokens)"
                             f" but the whole cache has {self.num_blocks}")

    def match_prefix(self, request: Request) -> int:
        """How many tokens `admit` would mark as computed (read-only)."""
        return self._num_matched_tokens(request, len(self._match(request)))

    def can_admit(self, request: Request, num_new_tokens: int) -> bool:
        """Whether `admit` followed by `append(request, num_new_tokens)` fits; num_new_tokens counts from the
        end of the matched prefix (`match_prefix`)."""
        matched = self._match(request)
        start = self._num_matched_tokens(request, len(matched))
        new_blocks = max(0, self.num_blocks_for(start + num_new_tokens) - len(matched))
        revived = sum(1 for block_id in matched if self._ref_counts[block_id] == 0)  # leave the free list
        return new_blocks + revived <= len(self._free_blocks)

    def admit(self, request: Request) -> None:
        """Give a request without blocks its cached prefix: block_ids, num_computed_tokens, num_cached_tokens.

        Covers prompt and outputs alike, so recompute after preemption reuses whatever is still cached.
        """
        if request.block_ids:
            raise ValueError(f"request {request.request_id!r} already holds {len(request.block_ids)} KV blocks")
        matched = self._match(request)
        for block_id in matched:
            if self._ref_counts[block_id] == 0:
                del self._free_blocks[block_id]
            self._ref_counts[block_id] += 1
        num_matched = self._num_matched_tokens(request, len(matched))
        request.block_ids = matched
        request.num_computed_tokens = request.num_cached_tokens = num_matched
        request.num_committed_blocks = len(matched)
        self.prefix_queries_tokens += request.num_tokens
        self.prefix_hits_tokens += num_matched

    # ----- growth ------------------------------------------------------------------------------------------
    def can_append(self, request: Request, num_new_tokens: int) -> bool:
        needed = self.num_blocks_for(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        return needed <= len(self._free_blocks)

    def append(self, request: Request, num_new_tokens: int) -> None:
        """Make block_ids cover num_computed_tokens + num_new_tokens tokens."""
        needed = self.num_blocks_for(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        if needed > len(self._free_blocks):
            raise RuntimeError(f"request {request.request_id!r} needs {needed} KV blocks, {len(self._free_blocks)}"
                               " are free (check can_append first)")
        for _ in range(needed):
            request.block_ids.append(self._allocate())

    def commit(self, request: Request) -> None:
        """Register the request's blocks that became full of computed tokens since the last commit."""
        num_full = request.num_computed_tokens // self.block_size
        if num_full <= request.num_committed_blocks:
            return
        if self.enable_prefix_caching:
            for index in range(request.num_committed_blocks, num_full):
                block_id = request.block_ids[index]
                block_hash = self._block_hash(request, index)
                # Identical content computed twice (two requests prefilled side by side) stays registered once:
                # the other copy is an ordinary block, so every registered hash maps back to its block.
                if self._block_hashes[block_id] is None and block_hash not in self._hash_to_block:
                    self._block_hashes[block_id] = block_hash
                    self._hash_to_block[block_hash] = block_id
        request.num_committed_blocks = num_full

    def free(self, request: Request) -> None:
        """Drop the request's references; blocks nobody references return to the free list with their hash.

        The tail goes first, so it is evicted first: a hit on a tail block needs every block before it anyway.
        """
        for block_id in reversed(request.block_ids):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free_blocks[block_id] = None
                if self._block_hashes[block_id] is None:  # nothing to reuse: hand it out before cached blocks
                    self._free_blocks.move_to_end(block_id, last=False)
        request.block_ids = []
        request.num_committed_blocks = 0

    # ----- internals ---------------------------------------------------------------------------------------
    def _allocate(self) -> int:
        block_id, _ = self._free_blocks.popitem(last=False)
        block_hash = self._block_hashes[block_id]
        if block_hash is not None:  # evict: the block is about to hold other tokens
            del self._hash_to_block[block_hash]
            self._block_hashes[block_id] = None
        self._ref_counts[block_id] = 1
        return block_id

    def _match(self, request: Request) -> list[int]:
        """Cached blocks for the longest run of leading full blocks of all_token_ids, never the block holding
        the last token: the step must compute that token for its logits, and its K/V must not be rewritten
        into a block other requests share (GPU numerics may differ by batch shape). A full hit recomputes at
        most one block, as vLLM does."""
        if not self.enable_prefix_caching:
            return []
        matched = []
        for index in range((request.num_tokens - 1) // self.block_size):
            block_id = self._hash_to_block.get(self._block_hash(request, index))
            if block_id is None:
                break
            matched.append(block_id)
        return matched

    def _num_matched_tokens(self, request: Request, num_matched_blocks: int) -> int:
        return num_matched_blocks * self.block_size  # < num_tokens: `_match` leaves the last token's block out

    def _block_hash(self, request: Request, index: int) -> bytes:
        """Chained hash of full block `index` of all_token_ids, computed once per request and block."""
        hashes = request.block_hashes
        while len(hashes) <= index:
            start = len(hashes) * self.block_size
            end = start + self.block_size
            hasher = hashlib.sha256(hashes[-1] if hashes else _ROOT_HASH)
            if not hashes and request.cache_salt is not None:
                hasher.update(request.cache_salt.encode())
            hasher.update(array("q", request.token_ids_in(start, end)).tobytes())
            # Every image placeholder has the same token id: the image content and where it sits in the block
            # must be part of the key, or two different images would share K/V.
            for image in request.images_in(start, end):
                hasher.update(repr((image.content_hash, image.offset - start)).encode())
            hashes.append(hasher.digest())
        return hashes[index]
