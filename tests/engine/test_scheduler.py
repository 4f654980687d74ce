"""Scheduler: budgets, chunk order, chunked prefill, ViT tiles, preemption, admission; build_batch; a random run."""
from __future__ import annotations

import random
import zlib

import pytest

from internvl_engine.engine.batch_builder import build_batch
from internvl_engine.engine.block_manager import BlockManager
from internvl_engine.engine.request import FinishReason, ImageSpan, Request, RequestStatus
from internvl_engine.engine.scheduler import (QueueFullError, Scheduler, SchedulerConfig, SchedulerOutput, TileSlice,
                                              _StepPlan)

IMAGE_TOKEN = 7


class FakeEngine:
    """Keeps how many tiles of each image content are encoded, as the engine does (features shared by content
    hash), and samples deterministically."""

    def __init__(self, scheduler_config: SchedulerConfig, num_blocks: int) -> None:
        self.encoded: dict[str, set[int]] = {}  # content hash -> its tiles with features
        self.scheduler = Scheduler(scheduler_config, BlockManager(num_blocks, scheduler_config.block_size),
                                   self.tiles_ready)

    def tiles_ready(self, request: Request, image: ImageSpan, first: int) -> int:
        tiles, count = self.encoded.get(image.content_hash, set()), 0
        while first + count < image.num_tiles and first + count in tiles:
            count += 1
        return count

    def has(self, image: ImageSpan, start: int, end: int) -> bool:
        """Whether the features of image tokens [start, end) exist."""
        per_tile = image.num_tokens // image.num_tiles
        lo, hi = max(start, image.offset) - image.offset, min(end, image.end) - image.offset
        return hi <= lo or set(range(lo // per_tile, -(-hi // per_tile))) <= self.encoded.get(image.content_hash, set())

    def encode(self, output: SchedulerOutput) -> None:
        for tile_slice in output.tiles_to_encode:  # from the first tile not encoded, within the image
            tiles = self.encoded.setdefault(tile_slice.image.content_hash, set())
            assert tile_slice.start_tile not in tiles
            assert 0 <= tile_slice.start_tile < tile_slice.end_tile <= tile_slice.image.num_tiles
            # (a slice may run over tiles encoded for a request that started mid-image: rare, and idempotent)
            tiles |= set(range(tile_slice.start_tile, tile_slice.end_tile))

    def step(self, stop_token_ids: frozenset[int] = frozenset()) -> tuple[SchedulerOutput, list[Request]]:
        output = self.scheduler.schedule()
        self.encode(output)
        batch = build_batch(output.chunks, self.scheduler.config.block_size, fake_features(output))
        sampled = {}
        for chunk in output.chunks:  # the model's logits exist only where a chunk reaches its request's end
            request = chunk.request
            if request.num_computed_tokens + chunk.num_new_tokens == request.num_tokens:
                sampled[request.request_id] = token_for(request.request_id, request.num_tokens)
        assert list(sampled) == batch.logit_request_ids
        return output, self.scheduler.update(output, sampled, set(stop_token_ids))


def token_for(request_id: str, position: int) -> int:
    """The fake model's next token: a function of the request and position only, so recompute reproduces it."""
    return random.Random(f"{request_id}:{position}").randrange(60)


def make_engine(num_blocks: int = 256, **config) -> FakeEngine:
    config.setdefault("block_size", 4)
    config.setdefault("max_num_seqs", min(256, config.get("max_num_batched_tokens", 8192)))  # the budget allows
    return FakeEngine(SchedulerConfig(**config), num_blocks)


def text(request_id: str, length: int, max_tokens: int = 4, first: int | None = None) -> Request:
    """A text prompt; different ids get different tokens unless `first` is given (so no accidental prefix hits)."""
    if first is None:
        first = 1000 * (zlib.crc32(request_id.encode()) % 1000)
    return Request(request_id, list(range(first, first + length)), max_tokens)


def with_images(request_id: str, parts: list, max_tokens: int = 2) -> Request:
    """parts: ints are runs of text tokens, (content_hash, tiles, tokens) tuples are images."""
    tokens, images = [], []
    for part in parts:
        if isinstance(part, int):
            tokens += [1] * part
        else:
            content_hash, tiles, length = part
            images.append(ImageSpan(len(tokens), length, tiles, content_hash))
            tokens += [IMAGE_TOKEN] * length
    return Request(request_id, tokens, max_tokens, images=images)


def grants(output: SchedulerOutput) -> list[tuple[str, int]]:
    return [(chunk.request.request_id, chunk.num_new_tokens) for chunk in output.chunks]


def test_decodes_first_then_continuing_prefills_then_new_requests():
    engine = make_engine(max_num_batched_tokens=32)
    engine.scheduler.add_request(text("a", 3, max_tokens=10))
    assert grants(engine.step()[0]) == [("a", 3)]
    engine.scheduler.add_request(text("p", 50))
    engine.scheduler.add_request(text("c", 5))
    assert grants(engine.step()[0]) == [("a", 1), ("p", 31)]
    assert grants(engine.step()[0]) == [("a", 1), ("p", 19), ("c", 5)]
    assert grants(engine.step()[0]) == [("a", 1), ("p", 1), ("c", 1)]


def test_chunked_prefill_spreads_a_long_prompt_while_decodes_run_every_step():
    engine = make_engine(max_num_batched_tokens=64, block_size=16)
    for name in ("d1", "d2"):
        engine.scheduler.add_request(text(name, 5, max_tokens=100))
    engine.step()
    long = text("long", 1000)
    engine.scheduler.add_request(long)
    sizes = []
    while not long.output_token_ids:
        output, _ = engine.step()
        assert grants(output)[:2] == [("d1", 1), ("d2", 1)] and output.num_batched_tokens <= 64
        sizes.append(grants(output)[2][1])
    assert sizes == [62] * 16 + [1000 - 62 * 16]


def test_without_chunked_prefill_a_prompt_waits_for_room_for_all_of_it():
    with pytest.raises(ValueError, match="max_model_len"):
        SchedulerConfig(enable_chunked_prefill=False, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128)
    engine = make_engine(enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=64)
    for name in ("d1", "d2"):
        engine.scheduler.add_request(text(name, 2, max_tokens=3))
    engine.step()
    engine.scheduler.add_request(text("long", 63, max_tokens=1))
    history = [grants(engine.step()[0]) for _ in range(3)]
    assert history == [[("d1", 1), ("d2", 1)], [("d1", 1), ("d2", 1)], [("long", 63)]]


def slices(output: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(s.image.content_hash, s.start_tile, s.end_tile) for s in output.tiles_to_encode]


def test_vit_budget_cuts_the_chunk_at_the_last_tile_it_encodes():
    engine = make_engine(num_blocks=1024, max_num_batched_tokens=4096, max_vit_tiles_per_step=4,
                         max_model_len=4096)
    request = with_images("r", [10, ("x", 3, 768), 5, ("y", 3, 768), 20])
    engine.scheduler.add_request(request)
    output, _ = engine.step()  # x whole, then y's first tile: the chunk stops after y's first 256 tokens
    assert grants(output) == [("r", 10 + 768 + 5 + 256)] and output.num_tiles == 4
    assert slices(output) == [("x", 0, 3), ("y", 0, 1)]
    output, _ = engine.step()
    assert grants(output) == [("r", 512 + 20)] and output.num_tiles == 2 and slices(output) == [("y", 1, 3)]


def test_an_image_larger_than_the_budget_is_encoded_over_several_steps_while_decodes_go_on():
    engine = make_engine(max_num_batched_tokens=1024, max_vit_tiles_per_step=3)
    engine.scheduler.add_request(text("d", 3, max_tokens=20))
    engine.step()
    engine.scheduler.add_request(with_images("big", [2, ("b", 7, 28), 2]))
    history = []
    for _ in range(3):
        output, _ = engine.step()
        history.append((grants(output), slices(output)))
    assert history == [([("d", 1), ("big", 2 + 12)], [("b", 0, 3)]),  # 3 tiles: 12 of the image's 28 tokens
                       ([("d", 1), ("big", 12)], [("b", 3, 6)]),
                       ([("d", 1), ("big", 4 + 2)], [("b", 6, 7)])]  # the last tile, and the text after it


def test_a_chunk_asks_only_for_the_tiles_it_reads():
    engine = make_engine(max_num_batched_tokens=10, max_vit_tiles_per_step=8, max_model_len=64)
    engine.scheduler.add_request(with_images("r", [2, ("b", 7, 28), 2]))
    output, _ = engine.step()  # 10 tokens: 2 of text and 8 image tokens, i.e. 2 tiles
    assert grants(output) == [("r", 10)] and slices(output) == [("b", 0, 2)]


def test_image_is_encoded_once_per_step_and_not_again_mid_image():
    engine = make_engine(max_num_batched_tokens=100, max_vit_tiles_per_step=4, max_model_len=512)
    engine.scheduler.add_request(with_images("a", [("same", 3, 39), 2]))
    engine.scheduler.add_request(with_images("b", [("same", 3, 39), 90]))
    output, _ = engine.step()
    assert output.num_tiles == 3 and slices(output) == [("same", 0, 3)]  # both need it: one slice
    assert grants(output) == [("a", 41), ("b", 59)]
    output, _ = engine.step()  # b continues after the image: features are held, nothing to encode
    assert output.tiles_to_encode == [] and output.num_tiles == 0


def test_preemption_recomputes_the_latest_arrival_and_keeps_its_outputs():
    engine = make_engine(num_blocks=6, max_num_batched_tokens=64)
    a, b, c = (text(name, 7, max_tokens=6, first=10 * ord(name)) for name in "abc")
    for request in (a, b, c):
        engine.scheduler.add_request(request)
    engine.step()
    engine.step()
    outputs_before = list(c.output_token_ids)
    output, _ = engine.step()  # a and b need a third block each: c goes
    assert grants(output) == [("a", 1), ("b", 1)] and output.preempted == [c]
    assert c.status is RequestStatus.WAITING and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert c.output_token_ids == outputs_before and engine.scheduler.waiting[0] is c
    finished = run_to_completion(engine)
    assert sorted(request.request_id for request in finished) == ["a", "b", "c"]
    for request in finished:
        assert request.output_token_ids == expected_outputs(request, frozenset())
    assert engine.scheduler.block_manager.num_free_blocks == 6


def test_preemption_takes_latest_arrivals_first_and_keeps_the_queue_in_arrival_order():
    engine = make_engine(num_blocks=7, max_num_batched_tokens=20, max_vit_tiles_per_step=1)
    engine.scheduler.add_request(with_images("a", [4, ("x", 1, 4), ("y", 1, 20)], max_tokens=1))
    engine.scheduler.add_request(text("b", 3, max_tokens=2))
    engine.scheduler.add_request(text("c", 3, max_tokens=2))
    assert grants(engine.step()[0]) == [("a", 8), ("b", 3), ("c", 3)]  # a stops before y: one tile per step
    output, _ = engine.step()  # a's next 18 tokens need 5 more blocks, 3 are free: c goes, then b
    assert grants(output) == [("a", 18)]
    assert [request.request_id for request in output.preempted] == ["c", "b"]
    assert [request.request_id for request in engine.scheduler.waiting] == ["b", "c"]
    assert len(run_to_completion(engine)) == 3


def test_a_request_preempts_itself_when_it_is_the_latest_arrival():
    engine = make_engine(num_blocks=4, max_num_batched_tokens=64)
    engine.scheduler.add_request(text("a", 5, max_tokens=4))
    engine.scheduler.add_request(text("b", 7, max_tokens=4))
    engine.step()
    engine.step()
    output, _ = engine.step()  # b's token 8 needs a block; b is the latest arrival
    assert grants(output) == [("a", 1)] and [request.request_id for request in output.preempted] == ["b"]
    assert len(run_to_completion(engine)) == 2


def test_preempting_a_request_granted_earlier_in_the_step_returns_its_tokens():
    engine = make_engine(num_blocks=6, max_num_batched_tokens=16, max_vit_tiles_per_step=2)
    engine.scheduler.add_request(with_images("a", [4, ("x", 2, 8), ("y", 2, 8), 4], max_tokens=1))
    engine.scheduler.add_request(text("b", 3, max_tokens=2))
    assert grants(engine.step()[0]) == [("a", 12), ("b", 3)]  # a stops before y (2 tiles per step)
    output, finished = engine.step()  # b (decode) is granted first, then a needs 3 blocks and only 2 are free
    assert grants(output) == [("a", 12)] and output.num_batched_tokens == 12
    assert [request.request_id for request in output.preempted] == ["b"]
    assert [request.request_id for request in finished] == ["a"]
    assert [request.request_id for request in run_to_completion(engine)] == ["b"]


def test_a_request_waits_until_the_token_budget_has_room():
    engine = make_engine(max_num_batched_tokens=2)
    for name in ("a", "b", "c"):
        engine.scheduler.add_request(text(name, 1, max_tokens=2))
    assert grants(engine.step()[0]) == [("a", 1), ("b", 1)]
    assert grants(engine.step()[0]) == [("a", 1), ("b", 1)]  # a and b finish here
    assert grants(engine.step()[0]) == [("c", 1)]


def test_revoking_a_grant_returns_its_tokens_and_only_tiles_no_other_grant_needs():
    plan = _StepPlan(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100, max_vit_tiles_per_step=8))
    shared, own = ImageSpan(0, 12, 3, "shared"), ImageSpan(12, 8, 2, "own")
    first, second = Request("first", [1] * 20, 1, images=[shared]), Request("second", [1] * 20, 1, images=[shared, own])
    shared_slice = TileSlice(first, shared, 0, 3)
    plan.grant(first, 20, (shared_slice,))
    plan.grant(second, 20, (shared_slice, TileSlice(second, own, 0, 2)))  # shared is encoded for first anyway
    assert (plan.tokens_left, plan.tiles_used) == (60, 5)
    plan.revoke(first)  # second still relies on the shared slice: its tiles stay
    assert (plan.tokens_left, plan.tiles_used, plan.slice_end("shared")) == (80, 5, 3)
    plan.revoke(second)
    assert (plan.tokens_left, plan.tiles_used, plan.encoding) == (100, 0, {})
    assert plan.build().chunks == [] and plan.build().tiles_to_encode == []


def test_admission_limits_and_validation():
    engine = make_engine(num_blocks=4, max_waiting=2, max_model_len=32)
    engine.scheduler.add_request(text("a", 3))
    engine.scheduler.add_request(text("b", 3))
    with pytest.raises(QueueFullError):
        engine.scheduler.add_request(text("c", 3))
    assert issubclass(QueueFullError, RuntimeError)
    with pytest.raises(ValueError, match=r"prompt \(10 tokens\) \+ max_tokens \(23\) exceeds max_model_len \(32\)"):
        engine.scheduler.add_request(text("long", 10, max_tokens=23))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.scheduler.add_request(text("empty", 0))
    with pytest.raises(ValueError, match="already in use"):
        engine.scheduler.add_request(text("a", 3))
    with pytest.raises(ValueError, match="bad image span"):
        engine.scheduler.add_request(Request("img", [1, 2], 1, images=[ImageSpan(1, 4, 1, "x")]))
    with pytest.raises(ValueError, match="KV blocks"):  # 12 + 6 - 1 tokens need 5 blocks of 4
        engine.scheduler.add_request(text("huge", 12, max_tokens=6))
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        engine.scheduler.add_request(text("none", 3, max_tokens=0))
    with pytest.raises(ValueError, match="max_num_seqs must be positive"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(63\) must be at least max_num_seqs \(64\)"):
        SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=63)
    SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=64)  # one decode each: fits
    with pytest.raises(ValueError, match="block_size"):
        Scheduler(SchedulerConfig(block_size=16), BlockManager(8, 4), lambda request, image: True)


def test_abort_and_finish_free_everything():
    engine = make_engine(num_blocks=16, max_num_seqs=2)
    for name in ("a", "b", "w"):
        engine.scheduler.add_request(text(name, 6, max_tokens=8))
    output = engine.scheduler.schedule()
    assert engine.scheduler.num_waiting == 1  # w waits for a free seat
    aborted = engine.scheduler.abort("a")  # between schedule() and update(): update skips it
    assert aborted.status is RequestStatus.FINISHED and aborted.finish_reason is FinishReason.ABORT
    assert aborted.block_ids == [] and engine.scheduler.abort("a") is None
    engine.scheduler.update(output, {"b": 1, "w": 1}, set())
    assert aborted.output_token_ids == []
    engine.scheduler.finish(engine.scheduler.running[0], FinishReason.ERROR, error="bad image")
    engine.scheduler.abort("w")
    assert not engine.scheduler.has_unfinished()
    assert engine.scheduler.block_manager.num_free_blocks == 16


def test_identical_prompt_starts_after_its_cached_prefix():
    engine = make_engine(num_blocks=64)
    engine.scheduler.add_request(text("a", 40, max_tokens=1, first=0))
    engine.step()
    second = text("b", 40, max_tokens=2, first=0)
    engine.scheduler.add_request(second)
    # All 10 blocks (block size 4) are cached; the block holding the last token is recomputed privately.
    assert grants(engine.step()[0]) == [("b", 4)] and second.num_cached_tokens == 36


def test_stop_token_finishes_with_stop():
    engine = make_engine()
    request = text("s", 3, max_tokens=50)
    engine.scheduler.add_request(request)
    stop = frozenset({token_for("s", 3)})
    _, finished = engine.step(stop)
    assert finished == [request] and request.finish_reason is FinishReason.STOP
    own = text("own", 3, max_tokens=2)
    own.stop_token_ids = frozenset()  # e.g. ignore_eos: the request's own set replaces the engine's
    engine.scheduler.add_request(own)
    engine.step(frozenset({token_for("own", 3)}))
    assert not own.is_finished and own.output_token_ids == [token_for("own", 3)]


def expected_outputs(request: Request, stop_token_ids: frozenset[int]) -> list[int]:
    outputs = []
    while len(outputs) < request.max_tokens:
        outputs.append(token_for(request.request_id, request.num_prompt_tokens + len(outputs)))
        if outputs[-1] in stop_token_ids:
            break
    return outputs


def run_to_completion(engine: FakeEngine, max_steps: int = 10_000) -> list[Request]:
    finished = []
    for _ in range(max_steps):
        if not engine.scheduler.has_unfinished():
            return finished
        output, done = engine.step()
        assert output.chunks, "no progress"
        finished += done
    raise AssertionError("did not finish")


def fake_features(output: SchedulerOutput) -> dict:
    """Stand-ins for each image's features: row i of an image is ("feature", content hash, i)."""
    return {chunk.request.request_id: {image.content_hash: [("feature", image.content_hash, i)
                                                             for i in range(image.num_tokens)]
                                       for image in chunk.request.images}
            for chunk in output.chunks}


def image_rows(batch) -> dict[int, tuple]:
    """Flat row -> the feature the runner puts there."""
    return {first + i: feature for first, features in batch.image_inserts for i, feature in enumerate(features)}


def brute_force_batch(output: SchedulerOutput, block_size: int) -> dict:
    tokens, positions, rope_lengths, slots, logits, images = [], [], [], [], [], {}
    for chunk in output.chunks:
        request = chunk.request
        for position in range(request.num_computed_tokens, request.num_computed_tokens + chunk.num_new_tokens):
            for image in request.images:
                if image.offset <= position < image.end:
                    images[len(tokens)] = ("feature", image.content_hash, position - image.offset)
            tokens.append(request.all_token_ids[position])
            positions.append(position)
            # the official model's sequence length at this token: the padded prompt's, then one more per output
            rope_lengths.append(max(position + 1, request.num_prompt_tokens) + request.rope_length_offset)
            slots.append(request.block_ids[position // block_size] * block_size + position % block_size)
        if request.num_computed_tokens + chunk.num_new_tokens == request.num_tokens:
            logits.append(len(tokens) - 1)
    return {"input_token_ids": tokens, "positions": positions, "rope_lengths": rope_lengths, "slot_ids": slots,
            "logit_indices": logits, "image_rows": images}


def test_build_batch_matches_a_brute_force_computation():
    engine = make_engine(num_blocks=64, max_num_batched_tokens=40)
    for index, length in enumerate((3, 30, 17, 9)):
        engine.scheduler.add_request(text(f"r{index}", length, max_tokens=5, first=0))  # shared prefixes
    for _ in range(6):
        output = engine.scheduler.schedule()
        batch = build_batch(output.chunks, 4)
        expected = brute_force_batch(output, 4)
        assert image_rows(batch) == expected.pop("image_rows") == {}
        for name, values in expected.items():
            assert getattr(batch, name) == values, name
        lens = [chunk.num_new_tokens for chunk in output.chunks]
        assert batch.query_lens == lens and batch.query_start_locs == [sum(lens[:i]) for i in range(len(lens) + 1)]
        assert batch.context_lens == [c.request.num_computed_tokens + c.num_new_tokens for c in output.chunks]
        assert batch.block_tables == [c.request.block_ids for c in output.chunks]
        sampled = {request_id: 1 for request_id in batch.logit_request_ids}
        engine.scheduler.update(output, sampled, set())


IMAGE_LIBRARY = {"one": 1, "three": 3, "six": 6, "nine": 9}  # content hash -> tiles (nine exceeds the budget)
TOKENS_PER_TILE = 4  # 256 in the real model; small keeps the simulation fast


def random_request(rng: random.Random, index: int) -> Request:
    tokens = list(rng.choice(([5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21], [])))  # shared prefixes: cache hits
    images = []
    for _ in range(rng.choice((0, 0, 1, 2))):
        tokens += [rng.randrange(30, 40) for _ in range(rng.randrange(0, 6))]
        content_hash = rng.choice(list(IMAGE_LIBRARY))
        tiles = IMAGE_LIBRARY[content_hash]
        images.append(ImageSpan(len(tokens), tiles * TOKENS_PER_TILE, tiles, content_hash))
        tokens += [IMAGE_TOKEN] * (tiles * TOKENS_PER_TILE)
    tokens += [rng.randrange(30, 40) for _ in range(rng.randrange(1, 60))]
    return Request(f"r{index}", tokens, min(rng.randrange(1, 30), 160 - len(tokens)), images=images,
                   rope_length_offset=rng.choice((0, 0, 3)))  # as a left-padded batch_chat row


def expected_kv(request: Request, position: int) -> tuple:
    """What the K/V at a position stands for: its token, the image feature row it holds, and where it is."""
    for image in request.images:
        if image.offset <= position < image.end:
            return position, image.content_hash, position - image.offset
    return position, request.all_token_ids[position], None


@pytest.mark.parametrize("seed, chunked, prefix_caching", [(2024, True, True), (7, False, True), (11, True, False)])
def test_random_simulation_finishes_every_request_within_budgets(seed, chunked, prefix_caching):
    simulate(seed, chunked, prefix_caching)


def simulate(seed: int, chunked: bool, prefix_caching: bool) -> None:
    rng = random.Random(seed)
    budget = 48 if chunked else 160  # without chunking a whole prompt must fit one step
    config = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=budget, max_vit_tiles_per_step=8,
                             max_model_len=160, max_waiting=8, block_size=4, enable_chunked_prefill=chunked)
    engine = FakeEngine(config, num_blocks=48)  # 192 token slots: a few requests at a time, so some get preempted
    engine.scheduler.block_manager.enable_prefix_caching = prefix_caching
    scheduler, manager = engine.scheduler, engine.scheduler.block_manager
    stop = frozenset({0})
    pending = [random_request(rng, index) for index in range(80)]
    submitted, finished = [], []
    kv: dict[int, tuple] = {}  # slot -> expected_kv of what was written there
    for _ in range(5000):
        while pending and rng.random() < 0.5:
            try:
                scheduler.add_request(pending[0])
            except QueueFullError:
                break
            submitted.append(pending.pop(0))
        if not scheduler.has_unfinished():
            if not pending:
                break
            continue
        output = scheduler.schedule()
        assert output.chunks, "no progress"
        assert output.num_batched_tokens == sum(c.num_new_tokens for c in output.chunks) <= budget
        assert len(output.chunks) <= 6 and scheduler.num_running <= 6
        contents = [tile_slice.image.content_hash for tile_slice in output.tiles_to_encode]
        assert len(contents) == len(set(contents))  # one slice per content
        assert output.num_tiles == sum(tile_slice.num_tiles for tile_slice in output.tiles_to_encode)
        # Over the tile budget only without chunking, as a step's sole ViT work (one prompt's images).
        owners = {tile_slice.request.request_id for tile_slice in output.tiles_to_encode}
        assert output.num_tiles <= 8 or (not chunked and len(owners) == 1)
        engine.encode(output)
        batch = build_batch(output.chunks, 4, fake_features(output))
        expected = brute_force_batch(output, 4)
        for name in ("input_token_ids", "positions", "rope_lengths", "slot_ids", "logit_indices"):
            assert getattr(batch, name) == expected[name], name
        assert image_rows(batch) == expected["image_rows"]
        for chunk, slot_start, table in zip(output.chunks, batch.query_start_locs, batch.block_tables):
            request = chunk.request
            start, end = request.num_computed_tokens, request.num_computed_tokens + chunk.num_new_tokens
            for image in request.images_in(start, end):  # every image feature the chunk reads exists
                assert engine.has(image, start, end)
            for offset, position in enumerate(range(start, end)):
                kv[batch.slot_ids[slot_start + offset]] = expected_kv(request, position)
            for position in range(end):  # attention reads the whole context through the block table
                assert kv[table[position // 4] * 4 + position % 4] == expected_kv(request, position)
        sampled = {c.request.request_id: token_for(c.request.request_id, c.request.num_tokens)
                   for c in output.chunks if c.request.request_id in batch.logit_request_ids}
        finished += scheduler.update(output, sampled, set(stop))
        for content_hash, tiles in list(engine.encoded.items()):  # the feature cache evicts finished ones now and then
            if len(tiles) == IMAGE_LIBRARY[content_hash] and rng.random() < 0.3:
                del engine.encoded[content_hash]
    assert not pending and not scheduler.has_unfinished() and len(finished) == len(submitted) == 80
    for request in finished:
        assert request.output_token_ids == expected_outputs(request, stop)
        last_is_stop = request.output_token_ids[-1] in stop
        assert request.finish_reason is (FinishReason.STOP if last_is_stop else FinishReason.LENGTH)
    assert sum(request.num_preemptions for request in finished) > 0
    assert (manager.prefix_hits_tokens > 0) == prefix_caching
    assert manager.num_free_blocks == manager.num_blocks
