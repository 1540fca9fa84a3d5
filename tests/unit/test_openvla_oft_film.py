"""OpenVLA-OFT FiLM checkpoints (use_film) on tiny folders in the upstream layout: the FiLMed towers
against a by-hand reference built from the raw file tensors, the instruction embedding, zero FiLM as
the plain backbone, live conditioning, the save -> reload round trip under upstream key names, and
gradients reaching the scale/shift layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlarl.config import load_config
from vlarl.models.openvla import processing
from vlarl.models.openvla_oft.tiny import LIBERO_PROPRIO, write_tiny_oft
from vlarl.models.registry import family_of_folder, load_model, save_model
from vlarl.rollout.flow_engine import make_engine

torch.set_num_threads(1)
FILM_FILE = "vision_backbone--50000_checkpoint.pt"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_tiny_oft(tmp_path_factory.mktemp("film") / "l1", "l1", seed=3, film=True)


def model_cfg(*extra: str):
    return load_config(["env=toy", "model=openvla_oft", "model.oft.chunk=2", *extra]).model


def observations(n: int, seed: int = 0, instructions=None) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, 224, 448, 3), dtype=np.uint8),
            "proprio": rng.normal(0, 0.3, (n, 8)).astype(np.float32) + np.asarray(LIBERO_PROPRIO["mean"], np.float32),
            "instruction": instructions or ["pick up the black bowl and place it on the plate", "open the drawer",
                                            "stack"][:n]}


def reference_tower(raw: dict, name: str, spec, pixels: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
    """timm's ViT with peft's LoRA layers and upstream's FiLMedVisionTransformerBlock, by hand from the
    file's tensors: output of the second-to-last block, prefix tokens dropped."""
    t = {k[len(f"vision_backbone.{name}."):]: v.float() for k, v in raw.items()
         if k.startswith(f"vision_backbone.{name}.")}

    def lora(x, m, op):  # peft: base(x) + lora_B(lora_A(x)) * lora_alpha / r, lora_alpha = min(r, 16)
        a, b = t[f"{m}.lora_A.default.weight"], t[f"{m}.lora_B.default.weight"]
        return op(x, t[f"{m}.base_layer.weight"], t[f"{m}.base_layer.bias"]) + op(op(x, a, None), b, None) * (
            min(a.shape[0], 16) / a.shape[0])

    linear = lambda x, m: lora(x, m, F.linear)  # noqa: E731
    conv = lambda x, m: lora(x, m, lambda x, w, b: F.conv2d(x, w, b, stride=w.shape[-1]))  # noqa: E731 (B: 1x1)
    norm = lambda x, m: F.layer_norm(x, x.shape[-1:], t[f"{m}.weight"], t[f"{m}.bias"], eps=1e-6)  # noqa: E731
    x = conv(pixels, "patch_embed.proj").flatten(2).transpose(1, 2) + t["pos_embed"]
    b, d = x.shape[0], x.shape[-1]
    if spec.cls_token:  # timm no_embed_class: cls and registers get no position
        x = torch.cat([t["cls_token"].expand(b, -1, -1), t["reg_token"].expand(b, -1, -1), x], 1)
    heads = spec.heads
    for i in range(spec.depth - 1):
        blk = f"blocks.{i}.block"
        q, k, v = linear(norm(x, f"{blk}.norm1"), f"{blk}.attn.qkv").reshape(b, -1, 3, heads, d // heads).permute(
            2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, -1)
        y = linear((att @ v).transpose(1, 2).reshape(b, -1, d), f"{blk}.attn.proj")
        x = x + (y * t[f"{blk}.ls1.scale_factor"] if spec.layer_scale else y)
        gamma = F.linear(lang, t[f"blocks.{i}.scale.weight"], t[f"blocks.{i}.scale.bias"])
        beta = F.linear(lang, t[f"blocks.{i}.shift.weight"], t[f"blocks.{i}.shift.bias"])
        x = x * (1 + gamma[:, None]) + beta[:, None]  # FiLM between the attention and MLP halves
        y = linear(F.gelu(linear(norm(x, f"{blk}.norm2"), f"{blk}.mlp.fc1")), f"{blk}.mlp.fc2")
        x = x + (y * t[f"{blk}.ls2.scale_factor"] if spec.layer_scale else y)
    return x[:, spec.prefix_tokens:]


def test_filmed_towers_equal_the_reference_from_the_raw_file(folder):
    loaded = load_model(folder, model_cfg())
    model = loaded.model
    assert family_of_folder(folder).name == "openvla_oft" and model.spec.film and model.film is not None
    raw = torch.load(folder / FILM_FILE, weights_only=True)
    obs = observations(2)
    # the condition: upstream's mean over <s>, the prompt (29871 appended) and </s>, one row at a time
    engine = make_engine(*loaded, "cpu")
    _, _, input_ids, text_mask = engine.model_inputs(obs)
    assert (text_mask == 0).any()  # the shorter prompt is left-padded
    expected = []
    for text in obs["instruction"]:
        ids = list(loaded.tokenizer(processing.build_prompt(text))["input_ids"])
        ids = ids + [processing.EMPTY_TOKEN_ID] * (ids[-1] != processing.EMPTY_TOKEN_ID) + [2]
        expected.append(model.embed_tokens(torch.tensor(ids)).mean(0))
    with torch.no_grad():
        lang = model.instruction_embedding(input_ids, text_mask)
        torch.testing.assert_close(lang, torch.stack(expected), atol=1e-6, rtol=1e-5)
        pixels = processing.pixel_values(obs["image"][:, :, :224], model.pixel_spec)
        ours = model.vision_features(pixels, lang)
        towers = model.vision_backbone.towers()
        ref = torch.cat([reference_tower(raw, name, tower.spec, x, lang) for name, tower, x in
                         zip(model.vision_backbone.names, towers, pixels.split(3, dim=1))], 2)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_batched_greedy_chunk_equals_the_upstream_built_sequence(folder):
    loaded = load_model(folder, model_cfg())
    obs = observations(3)  # different prompt lengths: FiLM's mean must leave the padding out
    out = make_engine(*loaded, "cpu").generate(obs, 1.0, greedy=True)
    for i in range(3):
        ref = loaded.model.reference_chunk(obs["image"][i], obs["proprio"][i], obs["instruction"][i])
        np.testing.assert_allclose(out.samples[i].reshape(ref.shape), ref, atol=1e-5)


def test_zero_film_is_the_plain_backbone_and_the_instruction_steers_the_features(folder):
    model = load_model(folder, model_cfg()).model
    pixels = processing.pixel_values(observations(2)["image"][:, :, :224], model.pixel_spec)
    lang = torch.randn(2, model.openvla.text.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        conditioned = model.vision_features(pixels, lang)
        for p in model.film.parameters():
            p.zero_()
        assert torch.equal(model.vision_features(pixels, lang), model.vision_backbone(pixels))
        assert (conditioned - model.vision_backbone(pixels)).abs().max() > 1e-2

    loaded = load_model(folder, model_cfg())
    obs = observations(2, instructions=["open the top drawer", "put the bowl on the stove"])
    obs["image"][1] = obs["image"][0]
    with torch.no_grad():
        embeds, _, _ = loaded.model.prefix(*make_engine(*loaded, "cpu").model_inputs(obs))
    patches = embeds[:, 1:1 + 2 * 256]  # both cameras' patches, same pixels in both rows
    assert (patches[0] - patches[1]).abs().max() > 1e-3


def test_save_and_reload_keep_the_upstream_file_and_the_outputs(folder, tmp_path):
    loaded = load_model(folder, model_cfg())
    model = loaded.model
    inputs = make_engine(*loaded, "cpu").model_inputs(observations(2, seed=1))
    save_model(tmp_path / "same", loaded)
    source = torch.load(folder / FILM_FILE, weights_only=True)
    saved = torch.load(tmp_path / "same" / FILM_FILE, weights_only=True)
    assert list(saved) == list(source)
    assert all(saved[k].dtype == source[k].dtype and torch.equal(saved[k], source[k]) for k in source)
    for key in ("vision_backbone.featurizer.blocks.0.block.attn.qkv.base_layer.weight",
                "vision_backbone.featurizer.blocks.0.block.ls1.scale_factor",
                "vision_backbone.featurizer.patch_embed.proj.lora_A.default.weight",
                "vision_backbone.fused_featurizer.blocks.1.block.mlp.fc2.lora_B.default.weight",
                "vision_backbone.fused_featurizer.blocks.2.shift.bias",
                "vision_backbone.featurizer.blocks.0.scale.weight"):
        assert key in saved
    assert not any(k.startswith("module.") for k in saved)
    again = load_model(tmp_path / "same", model_cfg()).model
    with torch.no_grad():
        assert torch.equal(again.predicted_actions(*inputs), model.predicted_actions(*inputs))

    # trained: a FiLM layer and one LoRA'd tower weight change (to bfloat16 values, the file's dtype)
    with torch.no_grad():
        fc1 = model.vision_backbone.featurizer.encoder.layer[0].mlp.fc1.weight
        fc1.copy_((fc1 + 0.03).bfloat16().float())
        model.film["fused_featurizer"][1].scale.weight.mul_(2)
        expected = model.predicted_actions(*inputs)
    save_model(tmp_path / "trained", loaded)
    saved = torch.load(tmp_path / "trained" / FILM_FILE, weights_only=True)
    assert list(saved) == list(source)
    module = "vision_backbone.featurizer.blocks.0.block.mlp.fc1"
    assert torch.equal(saved[f"{module}.base_layer.weight"].float(), fc1)
    assert not saved[f"{module}.lora_B.default.weight"].any()  # the base layer alone carries the weight
    assert torch.equal(saved[f"{module}.lora_A.default.weight"], source[f"{module}.lora_A.default.weight"])
    qkv = "vision_backbone.featurizer.blocks.0.block.attn.qkv.lora_B.default.weight"
    assert torch.equal(saved[qkv], source[qkv])  # untouched layers keep their LoRA split
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "trained", model_cfg()).model.predicted_actions(*inputs), expected)


def test_a_gradient_step_reaches_the_film_layers(folder):
    from vlarl.models.lora import apply_lora

    loaded = load_model(folder, model_cfg())
    model = loaded.model
    assert all(p.requires_grad for p in model.film.parameters())
    assert not any(p.requires_grad for p in model.vision_backbone.parameters())  # model.train_vision=false
    inputs = make_engine(*loaded, "cpu").model_inputs(observations(2, seed=2))
    logprobs, _, _ = model(*inputs, torch.zeros(2, model.spec.num_actions))
    (-logprobs.mean()).backward()
    for layers in model.film.values():
        for layer in layers:
            assert layer.scale.weight.grad.abs().sum() > 0 and layer.shift.weight.grad.abs().sum() > 0
    before = model.film["featurizer"][0].scale.weight.detach().clone()
    torch.optim.SGD(model.film.parameters(), lr=1.0).step()
    assert not torch.equal(model.film["featurizer"][0].scale.weight, before)
    apply_lora(model, 4, 8)  # decoder adapters: FiLM trains fully beside them, like the heads
    assert all(p.requires_grad for p in model.film.parameters())
