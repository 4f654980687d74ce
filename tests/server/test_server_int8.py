"""`serve --load-in-8bit` quantizes the checkpoint while loading, says so in /v1/models, and answers with the tokens
of the dequantized float model (weight-only int8 is batch-independent); an int8 checkpoint serves by path."""
from __future__ import annotations

import json
import urllib.request

import torch

from internvl_engine import AutoModel, AutoTokenizer
from internvl_engine.testing.int8_checkpoint import write_int8_checkpoint

from golden_utils import MODELS, checkpoint
from server_utils import post_json, running_server


def models(base_url: str) -> dict:
    with urllib.request.urlopen(base_url + "/v1/models", timeout=30) as response:
        return json.loads(response.read())


def test_load_in_8bit_and_an_int8_checkpoint_serve_the_same_answer(tmp_path):
    folder = write_int8_checkpoint(checkpoint(MODELS[0]), tmp_path / "int8")
    model = AutoModel.from_pretrained(folder, torch_dtype=torch.float32)
    expected = model.chat(AutoTokenizer.from_pretrained(folder), None, "Tell me a story.",
                          dict(max_new_tokens=12, do_sample=False))
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 12,
            "temperature": 0}
    for args in (["--model", str(checkpoint(MODELS[0])), "--load-in-8bit"], ["--model", str(folder)]):
        with running_server(*args, "--served-model-name", "m") as server:
            assert models(server.base_url)["data"][0]["weight_dtype"] == "int8 weight-only (float32 activations)"
            status, answer = post_json(server.api_url + "/chat/completions", body)
            assert status == 200 and answer["choices"][0]["message"]["content"] == expected
