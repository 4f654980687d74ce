"""load_video: frames sampled by the model cards' rule, frame-exact, from clips that PyAV writes here in several
codecs and containers; each frame tiled exactly as load_image tiles an image; limits refused before decoding."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import internvl_engine
from internvl_engine import load_image
from internvl_engine.preprocessing import video as video_module
from internvl_engine.preprocessing.video import (VideoLimits, VideoLoadError, VideoTooLargeError, frame_indices,
                                                 load_video, open_video)

av = pytest.importorskip("av")

WIDTH, HEIGHT, FPS, FRAMES = 128, 96, 25, 50
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (name, container, encoder, pixel format): the codec of each is in the PyAV wheels unless it is an external library
CODECS = [("mpeg4-mp4", "mp4", "mpeg4", "yuv420p"), ("h264-mp4", "mp4", "libx264", "yuv420p"),
          ("mjpeg-avi", "avi", "mjpeg", "yuvj420p"), ("vp9-webm", "webm", "libvpx-vp9", "yuv420p"),
          ("ffv1-mkv", "matroska", "ffv1", "yuv420p")]


def can_encode(encoder: str) -> bool:
    try:
        av.codec.Codec(encoder, "w")
    except Exception:  # UnknownCodecError: this PyAV build lacks it
        return False
    return True


def index_pattern(index: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """Frame `index` as 8 black/white stripes, bit k of the index in stripe k (16 px wide at 128 px): lossy codecs
    blur the edges, never the middle of a stripe. A red block marks the top-left corner (rotation tests)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    stripe = width // 8
    for bit in range(8):
        if (index >> bit) & 1:
            pixels[:, bit * stripe:(bit + 1) * stripe] = 255
    pixels[: height // 4, : stripe // 2] = (255, 0, 0)
    return pixels


def write_clip(target, container: str = "mp4", encoder: str = "mpeg4", pix_fmt: str = "yuv420p",
               frames: int = FRAMES, fps: int = FPS, width: int = WIDTH, height: int = HEIGHT,
               rotation: int | None = None) -> bytes | None:
    """A clip of index_pattern frames; `target` a path, or None for the bytes."""
    buffer = io.BytesIO() if target is None else None
    output = av.open(buffer if target is None else str(target), "w", format=container)
    stream = output.add_stream(encoder, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    if rotation is not None:
        stream.set_display_rotation(rotation)
    for index in range(frames):
        for packet in stream.encode(av.VideoFrame.from_ndarray(index_pattern(index, width, height), format="rgb24")):
            output.mux(packet)
    for packet in stream.encode():
        output.mux(packet)
    output.close()
    return buffer.getvalue() if target is None else None


def decoded_indices(pixel_values: torch.Tensor) -> list[int]:
    """The index each one-tile frame shows: the red channel in the middle of each stripe, de-normalised."""
    red = pixel_values[:, 0, 224, :] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # [frames, 448] in [0, 1]
    centres = [int((bit + 0.5) * 448 / 8) for bit in range(8)]
    bits = (red[:, centres] > 0.5).int()  # [frames, 8]
    return [int(sum(int(bit) << k for k, bit in enumerate(row))) for row in bits]


def model_card_get_index(bound, fps, max_frame, first_idx=0, num_segments=32) -> list[int]:
    """InternVL2's get_index as its model card writes it (numpy's round), for comparison."""
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("clips")
    made = {}
    for name, container, encoder, pix_fmt in CODECS:
        if can_encode(encoder):
            path = folder / f"{name}.{ {'matroska': 'mkv'}.get(container, container)}"
            write_clip(path, container, encoder, pix_fmt)
            made[name] = path
    return made


def test_at_least_two_codecs_and_containers_can_be_written(clips):
    assert len(clips) >= 2, f"only {sorted(clips)} could be written by this PyAV build"
    assert "mpeg4-mp4" in clips and "mjpeg-avi" in clips  # FFmpeg's own encoders: every PyAV wheel has them


@pytest.mark.parametrize("total, fps, segments, bound", [
    (50, 25.0, 8, None), (50, 25.0, 5, (0.3, 1.1)), (3, 30.0, 8, None), (1, 24.0, 4, None), (1000, 29.97, 32, None),
    (301, 30000 / 1001, 16, (2.5, 7.25)), (120, 12.5, 7, (0.0, 100.0)), (64, 8.0, 64, None), (17, 60.0, 3, (0.1, 0.2)),
])
def test_frame_indices_are_the_model_cards(total, fps, segments, bound):
    assert frame_indices(total, fps, segments, bound) == model_card_get_index(bound, fps, total - 1, 0, segments)


@pytest.mark.parametrize("name", [name for name, *_ in CODECS])
@pytest.mark.parametrize("segments, bound", [(8, None), (5, (0.3, 1.1)), (16, None)])
def test_sampled_frames_are_the_ones_the_rule_selects(clips, name, segments, bound):
    if name not in clips:
        pytest.skip(f"this PyAV build cannot write {name}")
    pixel_values, num_patches_list = load_video(clips[name], num_segments=segments, bound=bound)
    expected = model_card_get_index(bound, FPS, FRAMES - 1, 0, segments)
    assert num_patches_list == [1] * segments and pixel_values.shape == (segments, 3, 448, 448)
    assert decoded_indices(pixel_values) == expected


def test_bytes_file_objects_and_paths_give_the_same_frames(clips):
    path = clips["mpeg4-mp4"]
    from_path = load_video(path)
    from_bytes = load_video(path.read_bytes())
    with open(path, "rb") as handle:
        from_file = load_video(handle)
    assert torch.equal(from_path[0], from_bytes[0]) and torch.equal(from_path[0], from_file[0])
    assert from_path[1] == from_bytes[1] == from_file[1]
    assert internvl_engine.load_video is load_video


def all_frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.parametrize("max_num", [1, 6])
def test_each_frame_is_tiled_as_load_image_tiles_it(clips, max_num):
    path = clips["mpeg4-mp4"]
    pixel_values, num_patches_list = load_video(path, num_segments=4, max_num=max_num)
    frames = all_frames(path)
    expected = [load_image(Image.fromarray(frames[index]), max_num=max_num)
                for index in model_card_get_index(None, FPS, len(frames) - 1, 0, 4)]
    assert num_patches_list == [tiles.shape[0] for tiles in expected] == [1 if max_num == 1 else 7] * 4
    assert torch.equal(pixel_values, torch.cat(expected))


def test_a_short_clip_repeats_frames_as_the_model_cards_do(tmp_path):
    path = tmp_path / "three.mp4"
    write_clip(path, frames=3)
    pixel_values, _ = load_video(path, num_segments=8)
    assert decoded_indices(pixel_values) == model_card_get_index(None, FPS, 2, 0, 8) == [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("rotation, turns", [(90, 1), (-90, 3), (180, 2)])
def test_a_rotated_clip_is_shown_upright_as_decord_shows_it(tmp_path, rotation, turns):
    probe = av.open(io.BytesIO(), "w", format="mp4").add_stream("mpeg4", rate=FPS)
    if not hasattr(probe, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display rotation")
    path = tmp_path / "rotated.mp4"
    write_clip(path, frames=10, rotation=rotation)
    # decord turns the picture by the display matrix's angle (counter-clockwise here, as numpy's rot90)
    frames = all_frames(path)
    pixel_values, num_patches_list = load_video(path, num_segments=2, max_num=6)
    expected = [load_image(Image.fromarray(np.ascontiguousarray(np.rot90(frames[index], turns))), max_num=6)
                for index in model_card_get_index(None, FPS, 9, 0, 2)]
    assert torch.equal(pixel_values, torch.cat(expected))
    assert open_video(path).size == ((HEIGHT, WIDTH) if turns % 2 else (WIDTH, HEIGHT))


def test_matches_decord_when_it_is_installed(clips):
    decord = pytest.importorskip("decord")
    for path in clips.values():
        reader = decord.VideoReader(str(path), num_threads=1)
        indices = model_card_get_index((0.2, 1.5), float(reader.get_avg_fps()), len(reader) - 1, 0, 6)
        expected = torch.cat([load_image(Image.fromarray(reader[index].asnumpy()), max_num=2) for index in indices])
        assert torch.equal(load_video(path, num_segments=6, max_num=2, bound=(0.2, 1.5))[0], expected), path


@pytest.mark.parametrize("bound", [(1.0, 0.5), (float("nan"), 1.0), ("a", "b"), (5.0, 9.0)])
def test_bad_bounds_are_clear_errors(clips, bound):
    with pytest.raises(VideoLoadError, match="bound"):
        load_video(clips["mpeg4-mp4"], bound=bound)


class _NoDecoding:
    """A container whose packets may not be read: limits must be refused from the header alone."""

    def __init__(self, container) -> None:
        self._container = container

    def __getattr__(self, name):
        if name in ("demux", "decode"):
            raise AssertionError(f"the video was read ({name}) before its limits were checked")
        return getattr(self._container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._container.close()


@pytest.mark.parametrize("limits, limit", [
    (VideoLimits(max_duration_s=1.5), "max_video_duration_s"), (VideoLimits(max_side=100), "max_video_side"),
    (VideoLimits(max_pixels=10_000), "max_video_pixels"), (VideoLimits(max_total_frames=40), "max_video_total_frames"),
    (VideoLimits(max_bytes=1000), "max_video_bytes"),
])
@pytest.mark.parametrize("name", ["mpeg4-mp4", "mjpeg-avi", "vp9-webm"])
def test_a_clip_over_a_limit_is_refused_before_decoding(clips, monkeypatch, limits, limit, name):
    if name not in clips:
        pytest.skip(f"this PyAV build cannot write {name}")
    opened = video_module._open_container
    monkeypatch.setattr(video_module, "_open_container", lambda *args: _NoDecoding(opened(*args)))
    with pytest.raises(VideoTooLargeError) as err:
        load_video(clips[name], limits=limits)
    assert err.value.limit == limit and f"({limit})" in str(err.value)


def test_too_many_frames_asked_for_and_limits_off(clips):
    with pytest.raises(VideoTooLargeError, match="max_video_frames") as err:
        load_video(clips["mpeg4-mp4"], num_segments=65)
    assert err.value.limit == "max_video_frames"
    assert load_video(clips["mpeg4-mp4"], num_segments=2, limits=None)[1] == [1, 1]


def test_corrupt_and_unsupported_inputs_are_clear_errors(clips, tmp_path):
    data = clips["mpeg4-mp4"].read_bytes()
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/hostname\n#EXT-X-ENDLIST\n"
    cases = {"garbage": (b"this is not a video" * 50, "not a video"),
             "truncated": (data[: len(data) // 2], "video"),
             "a playlist naming other files": (playlist, "video"),
             "an image": (clips_png(), "video"),
             "empty": (b"", "empty")}
    for label, (payload, words) in cases.items():
        with pytest.raises(VideoLoadError, match=words):
            load_video(payload)
    with pytest.raises(VideoLoadError, match="not found"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoLoadError, match="max_num"):
        load_video(clips["mpeg4-mp4"], max_num=0)


def clips_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


def test_damaged_packets_fail_with_a_clear_error_or_decode(clips):
    """Bytes flipped inside the stream: FFmpeg conceals or refuses, never anything but a VideoLoadError."""
    data = bytearray(clips["mjpeg-avi"].read_bytes())
    rng = np.random.default_rng(0)
    for offset in rng.integers(len(data) // 4, len(data), 200):
        data[offset] ^= 0xFF
    try:
        pixel_values, num_patches_list = load_video(bytes(data))
    except VideoLoadError as err:
        assert str(err)
    else:
        assert pixel_values.shape[0] == sum(num_patches_list) == 8
