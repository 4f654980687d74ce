"""`internvl-engine demo` and `chat` run end to end through the normal loading path."""
from __future__ import annotations

import pytest

from internvl_engine.cli import main
from internvl_engine.preprocessing.tiling import plan_tiles

from golden_utils import MODELS, checkpoint, golden_json, image_path


def test_demo_builds_a_tiny_checkpoint_and_chats(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INTERNVL_ENGINE_CACHE", str(tmp_path))
    assert main(["demo", "--max-new-tokens", "4", "--max-tiles", "6"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out
    tiles = plan_tiles(1280, 720, max_num=6, use_thumbnail=True).num_tiles  # the demo's generated picture
    assert f"{tiles} tiles of 448x448 (max_num 6), {tiles * 256} visual tokens" in out
    for stage in ("load checkpoint", "preprocess (tiling)", "vision encoder + projector", "LLM prefill",
                  "LLM decode"):
        assert stage in out
    assert (tmp_path / "demo-internvl-chat-v1-5-seed0" / "config.json").is_file()


def test_demo_runs_the_phi3_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INTERNVL_ENGINE_CACHE", str(tmp_path))
    assert main(["demo", "--preset", "mini-internvl-chat-4b-v1-5", "--max-new-tokens", "4", "--max-tiles", "2"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "response:" in out
    assert (tmp_path / "demo-mini-internvl-chat-4b-v1-5-seed0" / "config.json").is_file()


@pytest.mark.parametrize("name", MODELS)
def test_chat_command_matches_the_official_response(name, capsys):
    spec = golden_json(name)["chat"]["image_one_tile"]
    (image, max_num), = spec["call"]["images"]
    code = main(["chat", "--model", str(checkpoint(name)), "--image", str(image_path(image)),
                 "--max-tiles", str(max_num), "--max-new-tokens", "16", "--dtype", "float32",
                 spec["call"]["question"]])
    assert code == 0
    out = capsys.readouterr().out
    assert f"response: {spec['response']}\n" in out


def test_chat_command_reports_bad_input(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code = main(["chat", "--model", str(checkpoint(MODELS[0])), "--image", str(bad), "Describe."])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("internvl-engine: error: image 1: ") and "broken.png" in err and err.count("\n") == 1, err
    assert main(["chat", "--model", str(tmp_path / "missing"), "Hi"]) == 1
    assert capsys.readouterr().err.startswith("internvl-engine: error: checkpoint path ")
