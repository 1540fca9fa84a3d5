"""OpenVLAPolicy on a tiny random folder in the real openvla-7b layout: loading without remote code,
greedy decoding vs the slow reference, padding invariance, teacher-forced scores, key errors."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlarl.models.openvla import OpenVLAConfigError, load_openvla
from vlarl.models.openvla.processing import EMPTY_TOKEN_ID, build_prompt
from vlarl.models.openvla.tiny import write_tiny_openvla

INSTRUCTIONS = ["pick up the black bowl between the plate and the ramekin and place it on the plate",
                "move to the red block", "Turn on the STOVE"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_openvla(tmp_path_factory.mktemp("openvla") / "tiny", seed=0)


@pytest.fixture(scope="module")
def loaded(folder):
    torch.manual_seed(0)
    return load_openvla(folder, dtype="float32", unnorm_key="libero_spatial_no_noops")


def images(n: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def test_folder_has_the_real_file_names_and_loads_without_remote_code(folder, loaded):
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "dataset_statistics.json",
            "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
            "special_tokens_map.json", "added_tokens.json", "configuration_prismatic.py", "modeling_prismatic.py",
            "processing_prismatic.py"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "openvla" and config["architectures"] == ["OpenVLAForActionPrediction"]
    assert config["text_config"]["vocab_size"] == 32064 and config["pad_to_multiple_of"] == 64
    weights = load_file(str(folder / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert weights["language_model.model.embed_tokens.weight"].shape[0] == 32064
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in weights
    assert "vision_backbone.fused_featurizer.attn_pool.latent" in weights
    assert not any("prismatic" in name for name in sys.modules)  # the placeholder remote code never ran

    model, tokenizer, action_tokenizer = loaded
    assert (model.first_bin_id, model.vocab_size, model.config.action_dim) == (31744, 32064, 7)
    assert action_tokenizer.first_bin_id == 31744
    assert (tokenizer.vocab_size, len(tokenizer)) == (32000, 32001)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id) == (32000, 1)
    assert tokenizer.convert_ids_to_tokens(EMPTY_TOKEN_ID) == "▁"
    assert model.openvla.text.rms_norm_eps == 1e-6  # missing text_config fields take LlamaConfig defaults
    assert len(model.passthrough) > 0 and not any(p.is_meta for p in model.parameters())


def test_encode_instruction_matches_the_prompt_and_sentencepiece(folder, loaded):
    spm = pytest.importorskip("sentencepiece")
    model, tokenizer, _ = loaded
    ids = model.encode_instruction(tokenizer, "Pick UP the Bowl")
    assert ids == model.encode_instruction(tokenizer, "pick up the bowl")  # lower-cased
    assert ids[-1] == EMPTY_TOKEN_ID and ids[0] != tokenizer.bos_token_id
    prompt = build_prompt("Pick UP the Bowl")
    assert prompt == "In: What action should the robot take to pick up the bowl?\nOut:"
    assert tokenizer(prompt)["input_ids"] == [1] + ids[:-1]
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in INSTRUCTIONS + ["Héllo  wörld 42"]:
        assert sp.encode(build_prompt(text)) == tokenizer(build_prompt(text), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("side", [224, 256])  # 256 goes through the processor's PIL bicubic resize
def test_greedy_engine_actions_equal_the_reference(loaded, side):
    from vlarl.rollout.hf_engine import HFEngine

    model, tokenizer, action_tokenizer = loaded
    engine = HFEngine(model, tokenizer, action_tokenizer)
    obs = {"image": images(3, side, seed=side), "proprio": np.zeros((3, 8), np.float32), "instruction": INSTRUCTIONS}
    out = engine.generate(obs, temperature=1.0, greedy=True)
    for i in range(3):
        ref = model.reference_actions(obs["image"][i], INSTRUCTIONS[i], tokenizer).numpy()
        np.testing.assert_array_equal(out.tokens[i], ref)
    assert out.tokens.min() >= 31744 and out.tokens.max() <= 31999
    np.testing.assert_allclose(out.actions, action_tokenizer.tokens_to_actions(out.tokens))
    full = model.reference_actions(obs["image"][0], INSTRUCTIONS[0], tokenizer, restrict_to_bins=False)
    assert full.shape == (7,) and int(full.max()) < model.vocab_size  # upstream's unrestricted argmax


def test_padded_batch_gives_each_rows_logits(loaded):
    model, tokenizer, _ = loaded
    rows = [model.encode_instruction(tokenizer, t) for t in INSTRUCTIONS]
    width = max(map(len, rows))
    ids = torch.full((3, width), tokenizer.pad_token_id)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    imgs = torch.as_tensor(images(3, 224, seed=1))
    with torch.no_grad():
        e, m, p = model.prefix(imgs, torch.zeros(3, 8), ids, mask)
        batch = model.language_model(inputs_embeds=e, attention_mask=m, position_ids=p).logits[:, -1]
        for i, r in enumerate(rows):
            e1, m1, p1 = model.prefix(imgs[i:i + 1], torch.zeros(1, 8), torch.tensor([r]), torch.ones(1, len(r)))
            alone = model.language_model(inputs_embeds=e1, attention_mask=m1, position_ids=p1).logits[0, -1]
            assert e1.shape[1] == 1 + 256 + len(r)
            assert (batch[i] - alone).abs().max().item() < 1e-5


def test_forward_scores_what_the_engine_sampled(loaded):
    from vlarl.rollout.hf_engine import HFEngine

    model, tokenizer, action_tokenizer = loaded
    engine = HFEngine(model, tokenizer, action_tokenizer)
    obs = {"image": images(3, 224, seed=7), "proprio": np.zeros((3, 8), np.float32), "instruction": INSTRUCTIONS}
    out = engine.generate(obs, temperature=0.7, generator=torch.Generator().manual_seed(0))
    inputs = engine.model_inputs(obs)
    with torch.no_grad():
        logprobs, entropy, values = model(*inputs, torch.as_tensor(out.tokens), temperature=0.7)
    assert logprobs.dtype == entropy.dtype == values.dtype == torch.float32
    assert logprobs.shape == entropy.shape == (3, 7) and values.shape == (3,)
    assert np.abs(logprobs.numpy() - out.logprobs).max() < 1e-5
    assert torch.all(entropy > 0) and torch.all(entropy <= np.log(256) + 1e-5)
    assert torch.equal(values, torch.zeros(3))  # fresh value head: last layer zero


def test_unnorm_key_is_required_and_checked(folder):
    with pytest.raises(OpenVLAConfigError, match="bridge_orig.*libero_spatial_no_noops"):
        load_openvla(folder)  # two datasets, no key
    with pytest.raises(OpenVLAConfigError, match="model.unnorm_key=fractal .*bridge_orig"):
        load_openvla(folder, unnorm_key="fractal")
    model, _, action_tokenizer = load_openvla(folder, unnorm_key="bridge_orig")
    assert model.config.unnorm_key == "bridge_orig" and action_tokenizer.q99[0] == pytest.approx(0.0283)


def test_missing_and_unexpected_weights_are_named(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights.pop("projector.fc3.bias")
    weights["projector.fc4.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(OpenVLAConfigError, match=r"1 missing \(e.g. \['projector.fc3.bias'\]\), 1 unexpected"):
        load_openvla(broken, unnorm_key="bridge_orig")
    config = json.loads((folder / "config.json").read_text())
    del config["timm_model_ids"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(OpenVLAConfigError, match="lacks \\['timm_model_ids'\\]"):
        load_openvla(broken, unnorm_key="bridge_orig")


def test_family_recognises_loads_and_saves(folder, tmp_path):
    from types import SimpleNamespace

    from vlarl.models.openvla.family import OpenVLA, shard_bytes

    family = OpenVLA()
    assert family.recognises(json.loads((folder / "config.json").read_text()))
    assert not family.recognises({"model_type": "llama"})
    cfg = SimpleNamespace(dtype="float32", unnorm_key="libero_spatial", train_vision=False)
    loaded = family.load(folder, cfg)
    model = loaded.model
    assert not any(p.requires_grad for p in model.vision_backbone.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    family.export(tmp_path / "out", loaded, folder, "5GB")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "value_head.safetensors").is_file()
    assert shard_bytes("500MB") == 500 * 10**6 and shard_bytes("2GiB") == 2 * 2**30


def test_real_openvla_7b_sizes_from_timm_ids_alone(folder):
    """A config without timm_override_kwargs and with openvla-7b's minimal text_config builds the
    published architecture (on the meta device: no memory)."""
    from vlarl.models.openvla.checkpoint import expected_shapes
    from vlarl.models.openvla.config import parse_config
    from vlarl.models.openvla.modeling import OpenVLAPolicy

    raw = json.loads((folder / "config.json").read_text())
    del raw["timm_override_kwargs"]
    raw["text_config"] = {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064}
    cfg = parse_config(raw)
    assert [(t.width, t.depth, t.heads, t.prefix_tokens) for t in cfg.towers] == [(1024, 24, 16, 5), (1152, 27, 16, 0)]
    assert (cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.first_bin_id) == (4096, 32, 31744)
    with torch.device("meta"):
        model = OpenVLAPolicy(cfg, [4096, 4304])
    shapes = expected_shapes(model)
    assert shapes["projector.fc1.weight"] == (8704, 2176) and shapes["projector.fc2.weight"] == (4096, 8704)
    assert shapes["projector.fc3.weight"] == (4096, 4096)
    assert shapes["language_model.model.embed_tokens.weight"] == (32064, 4096)
    assert shapes["language_model.lm_head.weight"] == (32064, 4096)
    assert shapes["vision_backbone.featurizer.pos_embed"] == (1, 256, 1024)
    assert shapes["vision_backbone.fused_featurizer.blocks.26.mlp.fc1.weight"] == (4304, 1152)
    assert shapes["vision_backbone.fused_featurizer.attn_pool.kv.weight"] == (2304, 1152)
    assert len(model.vision_backbone.featurizer.layers) == 23 and len(model.vision_backbone.fused_featurizer.layers) == 26
