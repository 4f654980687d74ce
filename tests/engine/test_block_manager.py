"""BlockManager: prefix hits, image-aware hashes, reference counts, LRU eviction, and invariants under random use."""
from __future__ import annotations

import random

import pytest

from internvl_engine.engine.block_manager import BlockManager
from internvl_engine.engine.request import ImageSpan, Request

IMAGE_TOKEN = 7  # every image placeholder shares this id, as <IMG_CONTEXT> does


def make_request(request_id: str, token_ids: list[int], images: list[ImageSpan] | None = None,
                 max_tokens: int = 4) -> Request:
    return Request(request_id, list(token_ids), max_tokens, images=images or [])


def compute(manager: BlockManager, request: Request, num_new_tokens: int) -> None:
    """What a step does to a request: blocks for the new tokens, K/V computed, full blocks registered."""
    manager.append(request, num_new_tokens)
    request.num_computed_tokens += num_new_tokens
    manager.commit(request)


def admit_and_compute(manager: BlockManager, request: Request) -> None:
    manager.admit(request)
    compute(manager, request, request.num_tokens - request.num_computed_tokens)


def test_identical_prompts_share_full_blocks():
    manager = BlockManager(num_blocks=16, block_size=4)
    first = make_request("a", range(10))
    admit_and_compute(manager, first)
    assert manager.prefix_hits_tokens == 0 and manager.prefix_queries_tokens == 10

    second = make_request("b", range(10))
    assert manager.match_prefix(second) == 8
    manager.admit(second)
    assert second.block_ids == first.block_ids[:2]
    assert second.num_computed_tokens == second.num_cached_tokens == 8
    assert [manager.ref_count(block) for block in first.block_ids] == [2, 2, 1]
    assert (manager.prefix_hits_tokens, manager.prefix_queries_tokens) == (8, 20)
    compute(manager, second, 2)
    assert second.block_ids[2] != first.block_ids[2]  # the partial block is private


def test_a_cache_salt_keeps_same_token_prompts_apart():
    """Keys that depend on more than the tokens (a scaled rotary base) are shared only under the same salt."""
    manager = BlockManager(num_blocks=16, block_size=4)
    admit_and_compute(manager, make_request("plain", range(10)))
    salted = make_request("salted", range(10))
    salted.cache_salt = "rope-length:10"
    assert manager.match_prefix(salted) == 0
    admit_and_compute(manager, salted)
    same = make_request("same", range(10))
    same.cache_salt = "rope-length:10"
    assert manager.match_prefix(same) == 8
    other = make_request("other", range(10))
    other.cache_salt = "rope-length:12"
    assert manager.match_prefix(other) == 0


def test_full_hit_recomputes_the_last_block_privately():
    """A prompt cached in full still computes its last block: the shared blocks are never written again."""
    manager = BlockManager(num_blocks=8, block_size=4)
    first = make_request("a", range(8))
    admit_and_compute(manager, first)
    second = make_request("b", range(8))
    assert manager.can_admit(second, 4)
    manager.admit(second)
    assert second.num_computed_tokens == 4 and second.block_ids == first.block_ids[:1]
    free_before = manager.num_free_blocks
    compute(manager, second, 4)  # tokens 4..7 go into a block of its own
    assert manager.num_free_blocks == free_before - 1
    assert second.block_ids[1] != first.block_ids[1]


def test_different_images_with_the_same_token_ids_never_share_blocks():
    manager = BlockManager(num_blocks=16, block_size=4)
    tokens = [1, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 2, 3, 4, 5]
    cat = make_request("cat", tokens, [ImageSpan(1, 4, 1, "cat")])
    admit_and_compute(manager, cat)
    dog = make_request("dog", tokens, [ImageSpan(1, 4, 1, "dog")])
    assert manager.match_prefix(dog) == 0
    same_cat = make_request("cat2", tokens, [ImageSpan(1, 4, 1, "cat")])
    assert manager.match_prefix(same_cat) == 8
    # The same image one token later changes every block it touches, and so every block after it.
    shifted = make_request("shifted", [1, 1] + tokens[1:8], [ImageSpan(2, 4, 1, "cat")])
    assert manager.match_prefix(shifted) == 0


def test_image_in_a_later_block_keeps_the_earlier_hit():
    manager = BlockManager(num_blocks=16, block_size=4)
    tokens = [1, 2, 3, 4, 5, IMAGE_TOKEN, IMAGE_TOKEN, 6, 9]
    admit_and_compute(manager, make_request("a", tokens, [ImageSpan(5, 2, 1, "x")]))
    assert manager.match_prefix(make_request("b", tokens, [ImageSpan(5, 2, 1, "y")])) == 4


def test_free_returns_every_block_and_keeps_hashes_for_reuse():
    manager = BlockManager(num_blocks=8, block_size=4)
    first, second = make_request("a", range(10)), make_request("b", range(10))
    admit_and_compute(manager, first)
    admit_and_compute(manager, second)
    manager.free(first)
    assert first.block_ids == [] and [manager.ref_count(b) for b in second.block_ids] == [1, 1, 1]
    manager.free(second)
    assert manager.num_free_blocks == 8 and manager.usage == 0.0
    third = make_request("c", range(10))
    manager.admit(third)  # the cached free blocks leave the free list
    assert third.num_computed_tokens == 8 and manager.num_free_blocks == 6
    assert all(block not in manager.free_block_ids() for block in third.block_ids)


def test_eviction_reuses_uncached_blocks_first_then_least_recently_freed_tail_first():
    manager = BlockManager(num_blocks=6, block_size=2)
    old, new, partial = make_request("old", [1, 2, 3, 4]), make_request("new", [5, 6, 7, 8]), make_request("p", [9])
    for request in (old, new, partial):
        admit_and_compute(manager, request)
    old_blocks, new_blocks = list(old.block_ids), list(new.block_ids)
    manager.free(old)
    manager.free(new)
    manager.free(partial)  # its block holds no full block: it goes to the front
    expected = [4, 5, old_blocks[1], old_blocks[0], new_blocks[1], new_blocks[0]]
    assert manager.free_block_ids() == expected
    taker = make_request("t", [20, 21, 22, 23, 24, 25, 26])
    manager.admit(taker)
    manager.append(taker, 5)  # 3 blocks: 4, 5, then old's tail is evicted
    assert taker.block_ids == expected[:3]
    assert manager.cached_hash(old_blocks[1]) is None and manager.cached_hash(old_blocks[0]) is not None
    assert manager.match_prefix(make_request("o", [1, 2, 3, 4, 0])) == 2  # old's head is still cached


def test_disabled_prefix_caching_never_hits():
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    admit_and_compute(manager, make_request("a", range(8)))
    assert manager.match_prefix(make_request("b", range(8))) == 0


def test_errors():
    manager = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="3 KV blocks"):
        manager.check_fits(make_request("big", range(8), max_tokens=2))  # 9 stored tokens
    manager.check_fits(make_request("ok", range(8), max_tokens=1))
    request = make_request("a", range(12))
    manager.admit(request)
    assert not manager.can_append(request, 12)
    with pytest.raises(RuntimeError, match="can_append"):
        manager.append(request, 12)
    manager.append(request, 4)
    with pytest.raises(ValueError, match="already holds"):
        manager.admit(request)
    with pytest.raises(ValueError):
        BlockManager(0, 16)


def check_invariants(manager: BlockManager, live: list[Request]) -> None:
    holders = [0] * manager.num_blocks
    for request in live:
        for block in request.block_ids:
            holders[block] += 1
    free = manager.free_block_ids()
    assert len(free) == len(set(free)) == manager.num_free_blocks
    used = [block for block in range(manager.num_blocks) if manager.ref_count(block) > 0]
    assert set(free).isdisjoint(used) and len(free) + len(used) == manager.num_blocks
    for block in range(manager.num_blocks):
        assert manager.ref_count(block) == holders[block] >= 0
        block_hash = manager.cached_hash(block)
        if block_hash is not None:
            assert manager.cached_block(block_hash) == block
    assert len(manager._hash_to_block) == sum(manager.cached_hash(b) is not None for b in range(manager.num_blocks))


def expected_kv(request: Request, position: int) -> tuple:
    """What the K/V at a position stands for: its token, the image feature row it holds, and where it is."""
    for image in request.images:
        if image.offset <= position < image.end:
            return position, IMAGE_TOKEN, image.content_hash, position - image.offset
    return position, request.token_ids_in(position, position + 1)[0], None, None


def random_request(rng: random.Random, index: int) -> Request:
    prefixes = ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7, 1, 8], [])
    tokens = list(rng.choice(prefixes))
    images = []
    if rng.random() < 0.5:
        length = rng.choice((2, 4, 5))
        images.append(ImageSpan(len(tokens), length, 1, rng.choice("xyz")))
        tokens += [IMAGE_TOKEN] * length
    tokens += [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
    return make_request(f"r{index}", tokens, images, max_tokens=8)


def test_invariants_hold_under_random_admit_append_commit_free():
    rng = random.Random(1234)
    manager = BlockManager(num_blocks=24, block_size=4)
    kv = {}  # block -> {offset: expected_kv}: checks that every block a request reads holds its own content
    live: list[Request] = []

    def run(request: Request, num_new: int) -> None:
        manager.append(request, num_new)
        for position in range(request.num_computed_tokens, request.num_computed_tokens + num_new):
            block, offset = request.block_ids[position // 4], position % 4
            value = expected_kv(request, position)
            # A shared or registered block is only ever rewritten with identical values (a full prefix hit).
            if manager.ref_count(block) > 1 or manager.cached_hash(block) is not None:
                assert kv[block][offset] == value
            kv.setdefault(block, {})[offset] = value
        request.num_computed_tokens += num_new
        manager.commit(request)

    def readable(request: Request) -> None:
        for position in range(request.num_computed_tokens):
            assert kv[request.block_ids[position // 4]][position % 4] == expected_kv(request, position)

    for index in range(3000):
        action = rng.random()
        if action < 0.3 or not live:
            request = random_request(rng, index)
            start = manager.match_prefix(request)
            num_new = rng.randrange(1, request.num_tokens - start + 1)
            if manager.can_admit(request, num_new):
                manager.admit(request)
                assert request.num_computed_tokens == start
                readable(request)
                run(request, num_new)
                live.append(request)
        elif action < 0.85:
            request = rng.choice(live)
            if request.num_computed_tokens == request.num_tokens:
                request.output_token_ids.append(rng.randrange(3))  # a sampled token
            num_new = rng.randrange(1, request.num_tokens - request.num_computed_tokens + 1)
            if manager.can_append(request, num_new):
                run(request, num_new)
        elif action < 0.95:
            request = live.pop(rng.randrange(len(live)))
            manager.free(request)
        else:  # preemption and readmission: recompute covers prompt and outputs
            request = rng.choice(live)
            manager.free(request)
            request.num_computed_tokens = 0
            if manager.can_admit(request, 1):
                manager.admit(request)
                readable(request)
                run(request, 1)
            else:
                live.remove(request)
        check_invariants(manager, live)
    assert manager.prefix_hits_tokens > 0
    for request in live:
        manager.free(request)
    check_invariants(manager, [])
    assert manager.num_free_blocks == manager.num_blocks
