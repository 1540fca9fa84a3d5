"""load -> save -> load of an upstream-layout OpenVLA folder: exact key set, dtypes and tensors (kept
tensors included), config and statistics preserved, value head beside the weights, sharding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from vlarl.models.openvla import OpenVLAConfigError, load_openvla, save_openvla
from vlarl.models.openvla.checkpoint import INDEX, VALUE_HEAD, read_header, read_tensors
from vlarl.models.openvla.tiny import write_tiny_openvla

KEY = "libero_spatial_no_noops"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_openvla(tmp_path_factory.mktemp("openvla") / "base", seed=1)


def all_weights(folder) -> dict[str, torch.Tensor]:
    header = read_header(folder)
    return read_tensors(header, list(header))


def assert_same_weights(a, b) -> None:
    wa, wb = all_weights(a), all_weights(b)
    assert set(wa) == set(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape and torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_exact(base, tmp_path, dtype):
    model, tokenizer, _ = load_openvla(base, dtype=dtype, unnorm_key=KEY)
    out = tmp_path / "saved"
    save_openvla(out, model, tokenizer, base)
    assert_same_weights(base, out)  # every upstream tensor back, passthrough ones included
    assert (out / "model.safetensors").is_file() and not (out / INDEX).exists()
    for name in ("config.json", "preprocessor_config.json", "dataset_statistics.json", "generation_config.json",
                 "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    with safe_open(str(out / VALUE_HEAD), framework="pt") as f:
        assert sorted(f.keys()) == [f"value_head.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    assert not any(k.startswith("value_head") for k in read_header(out))

    again, _, _ = load_openvla(out, dtype=dtype, unnorm_key=KEY)
    a, b = model.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert set(model.passthrough) == set(again.passthrough)
    assert all(torch.equal(model.passthrough[k], again.passthrough[k]) for k in model.passthrough)
    assert again.openvla.norm_stats == json.loads((base / "config.json").read_text())["norm_stats"]


def test_trained_weights_and_value_head_survive(base, tmp_path):
    model, tokenizer, _ = load_openvla(base, unnorm_key=KEY)
    with torch.no_grad():
        model.projector.fc1.weight.add_(0.5)
        model.vision_backbone.featurizer.encoder.layer[0].attention.k_proj.weight.mul_(2)
        model.vision_backbone.fused_featurizer.encoder.layers[1].self_attn.v_proj.bias.fill_(0.25)
        model.value_head[2].weight.fill_(0.125)
    state = model.state_dict()
    out = tmp_path / "trained"
    save_openvla(out, model, tokenizer, base, state_dict=state)
    again, _, _ = load_openvla(out, unnorm_key=KEY)
    for k, v in again.state_dict().items():  # upstream tensors went through the base's bf16; the head did not
        assert torch.equal(v, state[k] if k.startswith("value_head") else state[k].bfloat16().float()), k
    old, new = all_weights(base), all_weights(out)
    qkv = "vision_backbone.featurizer.blocks.0.attn.qkv.weight"
    d = old[qkv].shape[1]
    assert torch.equal(new[qkv][d:2 * d], old[qkv][d:2 * d] * 2) and torch.equal(new[qkv][:d], old[qkv][:d])


def test_sharded_save_and_load(base, tmp_path):
    model, tokenizer, _ = load_openvla(base, unnorm_key=KEY)
    out = tmp_path / "sharded"
    save_openvla(out, model, tokenizer, shard_bytes=2_000_000)  # base defaults to the source folder
    index = json.loads((out / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in all_weights(base).values())
    assert_same_weights(base, out)
    again, _, _ = load_openvla(out, unnorm_key=KEY)
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_refuses_to_overwrite_its_base(base):
    model, tokenizer, _ = load_openvla(base, unnorm_key=KEY)
    with pytest.raises(OpenVLAConfigError, match="overwrite its base"):
        save_openvla(base, model, tokenizer)
