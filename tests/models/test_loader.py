"""Checkpoint loading: config parsing, sharded / single safetensors, dtypes, strict errors that name the problem."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_engine import AutoModel, ConfigError, InternVLConfig, WeightLoadError
from internvl_engine.models.loader import resolve_dtype

from golden_utils import MODELS, checkpoint, golden_json, golden_tensors, rel_l2

V15 = MODELS[0]


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    """A writable copy of the V1.5 golden checkpoint."""
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint(V15), target)
    for path in target.rglob("*"):
        path.chmod(0o644)
    return target


def edit_config(folder: Path, edit) -> None:
    data = json.loads((folder / "config.json").read_text())
    edit(data)
    (folder / "config.json").write_text(json.dumps(data))


def rewrite_weights(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def shard(folder: Path, num_shards: int) -> None:
    """Re-save a single-file checkpoint as num_shards files plus the index, like the hub's large models."""
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(num_shards):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::num_shards]}
        save_file(part, str(folder / file))
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))


def test_config_parses_golden_configs():
    for name in MODELS:
        cfg = InternVLConfig.from_pretrained(checkpoint(name))
        raw = json.loads((checkpoint(name) / "config.json").read_text())
        assert cfg.vision.hidden_size == raw["vision_config"]["hidden_size"]
        assert cfg.llm.num_key_value_heads == raw["llm_config"]["num_key_value_heads"]
        assert cfg.ps_version == raw["ps_version"]
        assert cfg.num_image_token == 256
        phi3 = raw["llm_config"]["architectures"] == ["Phi3ForCausalLM"]
        assert cfg.llm.architecture == raw["llm_config"]["architectures"][0]
        assert cfg.template == ("phi3-chat" if phi3 else "internlm2-chat")
        assert cfg.llm.rope_scaling.type == ("su" if phi3 else "dynamic")
        if phi3:
            assert cfg.llm.rope_scaling.long_factor == tuple(raw["llm_config"]["rope_scaling"]["long_factor"])
            assert cfg.llm.original_max_position_embeddings == raw["llm_config"]["original_max_position_embeddings"]


def test_absent_fields_take_official_defaults(ckpt):
    def drop(d):
        for key in ("ps_version", "select_layer", "downsample_ratio", "use_thumbnail", "max_dynamic_patch",
                    "min_dynamic_patch", "dynamic_image_size"):
            d.pop(key)
    edit_config(ckpt, drop)
    cfg = InternVLConfig.from_pretrained(ckpt)
    assert (cfg.ps_version, cfg.select_layer, cfg.downsample_ratio) == ("v1", -1, 0.5)
    assert (cfg.use_thumbnail, cfg.max_dynamic_patch, cfg.min_dynamic_patch) == (False, 6, 1)


@pytest.mark.parametrize("section,field", [("llm_config", "vocab_size"), ("llm_config", "num_hidden_layers"),
                                           ("vision_config", "hidden_size"), ("vision_config", "num_attention_heads")])
def test_missing_required_field_is_named(ckpt, section, field):
    edit_config(ckpt, lambda d: d[section].pop(field))
    with pytest.raises(ConfigError, match=f"{section}.{field}"):
        AutoModel.from_pretrained(ckpt)


def test_bad_config_values(ckpt):
    edit_config(ckpt, lambda d: d.update(ps_version="v3"))
    with pytest.raises(ConfigError, match="ps_version"):
        InternVLConfig.from_pretrained(ckpt)
    edit_config(ckpt, lambda d: d.update(ps_version="v1", vision_config={**d["vision_config"], "norm_type": "batch"}))
    with pytest.raises(ConfigError, match="norm_type"):
        InternVLConfig.from_pretrained(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot parse"):
        InternVLConfig.from_pretrained(ckpt)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AutoModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.json not found"):
        AutoModel.from_pretrained(tmp_path)


def test_missing_tensor_is_named(ckpt):
    rewrite_weights(ckpt, lambda t: t.pop("language_model.model.layers.1.attention.wo.weight"))
    with pytest.raises(WeightLoadError, match=r"missing 1 tensor.*layers\.1\.attention\.wo\.weight"):
        AutoModel.from_pretrained(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    rewrite_weights(ckpt, lambda t: t.update({"vision_model.encoder.layers.9.ls1": torch.zeros(4)}))
    with pytest.raises(WeightLoadError, match=r"unexpected.*layers\.9\.ls1"):
        AutoModel.from_pretrained(ckpt)


def test_wrong_shape_is_named(ckpt):
    rewrite_weights(ckpt, lambda t: t.update({"mlp1.1.weight": t["mlp1.1.weight"][:, :-1].contiguous()}))
    with pytest.raises(WeightLoadError, match=r"mlp1\.1\.weight.*shape"):
        AutoModel.from_pretrained(ckpt)


def test_config_that_disagrees_with_weights(ckpt):
    edit_config(ckpt, lambda d: d["llm_config"].update(num_hidden_layers=2))
    with pytest.raises(WeightLoadError, match=r"unexpected.*layers\.2\."):
        AutoModel.from_pretrained(ckpt)


def test_corrupt_and_missing_shards(ckpt):
    shard(ckpt, 3)
    victim = ckpt / "model-00002-of-00003.safetensors"
    victim.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightLoadError, match="model-00002-of-00003.safetensors"):
        AutoModel.from_pretrained(ckpt)
    victim.unlink()
    with pytest.raises(WeightLoadError, match="missing.*model-00002-of-00003"):
        AutoModel.from_pretrained(ckpt)


def test_sharded_checkpoint_matches_single_file(ckpt):
    single = AutoModel.from_pretrained(checkpoint(V15), torch_dtype=torch.float32)
    shard(ckpt, 3)
    sharded = AutoModel.from_pretrained(ckpt, torch_dtype=torch.float32, low_cpu_mem_usage=True,
                                        trust_remote_code=True)
    for (name, a), (_, b) in zip(sorted(single.state_dict().items()), sorted(sharded.state_dict().items())):
        assert torch.equal(a, b), name
    ids = torch.tensor(golden_json(V15)["chat"]["text_single"]["input_ids"])
    logits = sharded(None, ids).logits
    assert rel_l2(logits, golden_tensors(V15)["chat.text_single.prefill_logits"]) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, "bfloat16", "auto"])
def test_target_dtypes(dtype):
    model = AutoModel.from_pretrained(checkpoint(V15), torch_dtype=dtype)
    expected = resolve_dtype(dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert model.eval() is model and model.to("cpu") is model
    ids = torch.tensor(golden_json(V15)["chat"]["text_single"]["input_ids"])
    assert torch.isfinite(model(None, ids).logits).all()


def test_unsupported_dtype():
    with pytest.raises(ValueError, match="torch_dtype"):
        AutoModel.from_pretrained(checkpoint(V15), torch_dtype=torch.int8)


def test_select_layer_runs_fewer_vision_layers(ckpt):
    edit_config(ckpt, lambda d: d.update(select_layer=-2))
    model = AutoModel.from_pretrained(ckpt, torch_dtype=torch.float32)
    pixel_values = torch.randn(1, 3, 448, 448)
    all_states = model.vision_model(pixel_values, return_all_hidden_states=True)
    assert torch.equal(model.vision_model(pixel_values, select_layer=-2), all_states[-2])
    from internvl_engine.models.projector import drop_cls_and_shuffle
    expected = model.mlp1(drop_cls_and_shuffle(all_states[-2], 0.5, model.config.ps_version))
    assert torch.allclose(model.extract_feature(pixel_values), expected)


def test_no_transformers_import():
    root = Path(__file__).resolve().parents[2]
    paths = list((root / "internvl_engine").rglob("*.py")) + list((root / "kernels").rglob("*.py"))
    assert len(paths) > 40
    for path in paths:
        text = path.read_text()
        assert "import transformers" not in text and "from transformers" not in text, path
