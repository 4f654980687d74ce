"""What `internvl-engine demo | chat | serve` tells a user: --help describes every option and its default, and
every error is one line on stderr (`internvl-engine: error: ...`, exit status 2 for the command line, 1 otherwise)
that names what is wrong: a value out of range, a device this machine lacks, a port in use, a corrupt image."""
from __future__ import annotations

import argparse
import io
import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from internvl_engine import LLM, SamplingParams
from internvl_engine.cli import build_parser, main
from internvl_engine.devices import DeviceError, resolve_device
from internvl_engine.preprocessing.image_io import ImageLoadError, ImageTooLargeError

from golden_utils import MODELS, checkpoint

COMMANDS = ("demo", "chat", "serve", "serve-ray")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def error_line(capsys) -> str:
    """The command's stderr, which must be exactly one line starting with 'internvl-engine: error: '."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("internvl-engine: error: "), err
    return err[len("internvl-engine: error: "):-1]


@pytest.fixture
def no_cuda_build(monkeypatch):
    """This torch as a CPU-only build, whatever the machine has."""
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty checkpoint cache: a test can tell that nothing was built."""
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("INTERNVL_ENGINE_CACHE", str(folder))
    monkeypatch.delenv("INTERNVL_ENGINE_DEBUG", raising=False)
    return folder


# ---- --help ----

def test_every_option_describes_itself_and_its_default():
    parser = build_parser()
    assert parser.description
    commands = subparsers(parser)
    assert set(COMMANDS) <= set(commands)
    for command in COMMANDS:
        sub = commands[command]
        assert sub.description, command
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"{command} {name} has no help"
            if not action.option_strings:  # a positional: a description is enough
                continue
            text = formatter._expand_help(action)  # %(default)s etc. filled in, as --help shows it
            assert "\n" not in text
            if action.required:
                assert "required" in text, f"{command} {name}: {text!r}"
            else:
                assert "default" in text, f"{command} {name} does not say its default: {text!r}"
            if isinstance(action, argparse._StoreTrueAction):
                assert "default: off" in text, f"{command} {name}: {text!r}"
        sub.format_help()  # every %-template renders


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_runs(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"] if command else ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--traceback" in out and "INTERNVL_ENGINE_DEBUG" in out
    if command == "serve":
        assert "--default-max-tokens N" in out and "(default 4096)" in out


def test_the_api_key_from_the_environment_is_not_shown_in_help(monkeypatch, capsys):
    monkeypatch.setenv("INTERNVL_ENGINE_API_KEY", "sk-secret-123")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "sk-secret-123" not in capsys.readouterr().out


def test_default_max_tokens_is_a_serve_option():
    serve = subparsers(build_parser())["serve"]
    assert serve.parse_args(["--tiny"]).default_max_tokens == 4096
    assert serve.parse_args(["--tiny", "--default-max-tokens", "100"]).default_max_tokens == 100


# ---- command-line values, checked by the parser (exit status 2) ----

@pytest.mark.parametrize("argv, message", [
    (["demo", "--max-tiles", "0"], "--max-tiles must be an integer between 1 and 40 (got 0)"),
    (["chat", "--model", "m", "--max-tiles", "41", "hi"], "--max-tiles must be an integer between 1 and 40 (got 41)"),
    (["demo", "--max-tiles", "many"], "--max-tiles must be an integer between 1 and 40 (got many)"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer (got 0)"),
    (["demo", "--dtype", "int4"], "--dtype must be one of auto, float32, bfloat16, float16 (got int4)"),
    (["serve", "--tiny", "--max-num-seqs", "0"], "--max-num-seqs must be a positive integer (got 0)"),
    (["serve", "--tiny", "--block-size", "-16"], "--block-size must be a positive integer (got -16)"),
    (["serve", "--tiny", "--default-max-tokens", "0"], "--default-max-tokens must be a positive integer (got 0)"),
    (["serve", "--tiny", "--max-tiles-per-image", "0"], "--max-tiles-per-image must be a positive integer (got 0)"),
    (["serve", "--tiny", "--port", "70000"], "--port must be an integer between 0 and 65535 (got 70000)"),
    (["serve", "--tiny", "--kv-cache-fraction", "1.5"], "--kv-cache-fraction must be a number in (0, 1] (got 1.5)"),
    (["serve", "--tiny", "--header-timeout-s", "0"], "--header-timeout-s must be a positive number (got 0)"),
    (["serve", "--tiny", "--feature-cache-bytes", "-1"], "--feature-cache-bytes must be an integer >= 0 (got -1)"),
])
def test_out_of_range_values_are_one_line_naming_the_option(argv, message, cache, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    line = error_line(capsys)
    assert line.startswith(message + "; see 'internvl-engine "), line
    assert not any(cache.iterdir())


def test_other_command_line_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["chat"])
    assert exit_.value.code == 2
    assert "the following arguments are required: --model, question" in error_line(capsys)
    with pytest.raises(SystemExit):
        main(["serve", "--log-level", "loud"])
    assert "invalid choice: 'loud'" in error_line(capsys)


def test_valid_values_still_parse():
    commands = subparsers(build_parser())
    demo = commands["demo"].parse_args(["--max-tiles", "40", "--max-new-tokens", "1", "--dtype", "bf16"])
    assert (demo.max_tiles, demo.max_new_tokens, demo.dtype) == (40, 1, "bf16")
    serve = commands["serve"].parse_args(["--tiny", "--port", "0", "--kv-cache-fraction", "1", "--feature-cache-bytes",
                                          "0", "--max-image-aspect-ratio", "1", "--dtype", "auto"])
    assert (serve.port, serve.kv_cache_fraction, serve.feature_cache_bytes) == (0, 1.0, 0)


# ---- devices ----

def test_resolve_device_on_a_cpu_only_torch(no_cuda_build):
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda", "--device")
    assert str(err.value) == (f"--device cuda: this torch build ({torch.__version__}) has no CUDA support; use "
                              "--device cpu or install a CUDA build of torch")
    with pytest.raises(DeviceError, match=r"^device cuda:1: .* use device='cpu' or install"):
        resolve_device("cuda:1")
    with pytest.raises(DeviceError, match=r"^--device gpu: not a device name; use cpu, cuda or cuda:N"):
        resolve_device("gpu", "--device")
    with pytest.raises(DeviceError, match=r"^--device mps: not supported"):
        resolve_device("mps", "--device")


def test_resolve_device_counts_the_visible_gpus(two_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:1", "--device") == torch.device("cuda:1")
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda:2", "--device")
    assert str(err.value) == ("--device cuda:2: only 2 CUDA devices are visible (cuda:0 to cuda:1; "
                              "CUDA_VISIBLE_DEVICES='3,5')")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"^--device cuda: no CUDA device is visible .* use --device cpu$"):
        resolve_device("cuda", "--device")


@pytest.mark.parametrize("argv", [["demo", "--device", "cuda"], ["chat", "--model", "m", "--device", "cuda:0", "Hi"],
                                  ["serve", "--tiny", "--port", "0", "--device", "cuda"]])
def test_a_cuda_device_without_cuda_is_one_line_before_any_work(argv, no_cuda_build, cache, capsys):
    assert main(argv) == 1
    line = error_line(capsys)
    assert line.startswith(f"--device {argv[argv.index('--device') + 1]}: this torch build")
    assert "use --device cpu" in line
    assert "serving" not in capsys.readouterr().out
    assert not any(cache.iterdir())  # no checkpoint built


def test_an_unknown_device_is_one_line(cache, capsys):
    assert main(["demo", "--device", "gpu"]) == 1
    assert error_line(capsys).startswith("--device gpu: not a device name")


# ---- runtime errors: one line, exit 1; --traceback / INTERNVL_ENGINE_DEBUG=1 add the traceback ----

def test_a_missing_checkpoint_is_one_line(tmp_path, cache, capsys):
    assert main(["chat", "--model", str(tmp_path / "missing"), "Hi"]) == 1
    assert "missing" in error_line(capsys)


@pytest.mark.parametrize("how", ["flag", "flag first", "env"])
def test_traceback_on_request(how, tmp_path, cache, monkeypatch, capsys):
    argv = ["chat", "--model", str(tmp_path / "missing"), "Hi"]
    if how == "flag":
        argv.append("--traceback")
    elif how == "flag first":
        argv.insert(0, "--traceback")
    else:
        monkeypatch.setenv("INTERNVL_ENGINE_DEBUG", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1].startswith("internvl-engine: error: ") and "missing" in err.splitlines()[-1]


def test_demo_with_a_corrupt_image_file_names_it(tmp_path, cache, capsys):
    bad = tmp_path / "cat.jpg"
    bad.write_bytes(b"not an image at all")
    assert main(["demo", "--image", str(bad), "--max-new-tokens", "2"]) == 1
    line = error_line(capsys)
    assert line.startswith("image 1: ") and "cat.jpg" in line and "not an image" in line, line


def test_demo_with_a_missing_image_file_names_it(tmp_path, cache, capsys):
    assert main(["demo", "--image", str(tmp_path / "dog.png"), "--max-new-tokens", "2"]) == 1
    line = error_line(capsys)
    assert line.startswith("image 1: image file not found") and "dog.png" in line, line


# ---- serve: the port first ----

def test_serve_on_a_port_in_use_fails_at_once_in_one_line(tmp_path):
    env = {**os.environ, "INTERNVL_ENGINE_CACHE": str(tmp_path)}
    env.pop("INTERNVL_ENGINE_DEBUG", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "internvl_engine.cli", "serve", "--tiny", "--port", str(port)],
                                capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1, result
    assert result.stderr == (f"internvl-engine: error: cannot listen on 127.0.0.1:{port}: Address already in use "
                             "(is another server running? choose another --port)\n")
    assert "serving" not in result.stdout + result.stderr
    assert not any(tmp_path.iterdir())  # refused before the tiny checkpoint was built or loaded


def test_serve_with_a_host_that_is_not_here_is_one_line(cache, capsys):
    assert main(["serve", "--tiny", "--host", "host.invalid", "--port", "0"]) == 1
    line = error_line(capsys)
    assert line.startswith("cannot listen on host.invalid:0: ") and "check --host" in line
    assert "serving" not in capsys.readouterr().out


# ---- image errors say which image ----

@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(checkpoint(MODELS[0]), dtype=torch.float32, device="cpu", backend="torch")


GREEDY = SamplingParams(max_tokens=2, temperature=0.0)


def png(width: int, height: int, rows: int | None = None) -> bytes:
    """A grayscale PNG; with `rows`, the header claims the size but only that many rows follow (opens, does not
    decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    pixels = (b"\x00" + b"\x80" * width) * (height if rows is None else rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels, 9))
            + chunk(b"IEND", b""))


def good_image() -> Image.Image:
    return Image.new("RGB", (64, 48), (10, 200, 30))


def test_an_unreadable_image_among_several_is_numbered(llm):
    request = {"prompt": "<image>\n<image>\n<image>\nCompare.", "images": [good_image(), b"hello, world", png(8, 8)]}
    with pytest.raises(ImageLoadError) as err:
        llm.prepare(request, GREEDY)
    assert type(err.value) is ImageLoadError
    assert str(err.value).startswith("image 2 of 3: <12 bytes>: not an image"), str(err.value)


def truncated_jpeg() -> bytes:
    """A JPEG cut in half: its header opens, its pixels do not decode."""
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def test_an_image_that_fails_to_decode_is_numbered(llm):
    request = {"prompt": "<image>\n<image>\nCompare.", "images": [png(64, 64), truncated_jpeg()]}
    with pytest.raises(ImageLoadError) as err:
        llm.prepare(request, GREEDY)
    assert str(err.value).startswith("image 2 of 2: "), str(err.value)


def test_a_file_image_is_named_and_a_size_refusal_keeps_its_limit(llm, tmp_path):
    path = tmp_path / "strip.png"
    path.write_bytes(png(1, 40_000, rows=1))  # a side past the 32K limit
    for source in (str(path), path):
        with pytest.raises(ImageTooLargeError) as err:
            llm.prepare({"prompt": "<image>\n<image>\nWhat?", "images": [good_image(), source]}, GREEDY)
        assert err.value.limit == "max_image_side"
        assert str(err.value).startswith("image 2 of 2: ") and "strip.png" in str(err.value), str(err.value)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageLoadError, match=r"^image 1: .*broken\.png"):
        llm.prepare({"prompt": "<image>\nWhat?", "images": [str(broken)]}, GREEDY)


def test_a_bad_data_url_is_numbered(llm):
    with pytest.raises(ImageLoadError, match=r"^image 1: an image data URL must look like"):
        llm.prepare({"prompt": "<image>\nWhat?", "images": ["data:image/png,abc"]}, GREEDY)
