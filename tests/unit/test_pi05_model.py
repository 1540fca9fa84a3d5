"""pi0.5's hand-written parts against independent computations: adaRMS against transformers' Gemma layer
and its own formula, the state-bearing prompt against a hand-computed case, and the cached expert's
velocity against a joint-sequence reference written out here step by step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers.models.gemma.modeling_gemma import GemmaConfig, GemmaDecoderLayer, GemmaRotaryEmbedding

from vlarl.models.pi0.tiny import tiny_inputs as inputs
from vlarl.models.pi0.tiny import write_tiny_tokenizer
from vlarl.models.pi05.family import Pi05
from vlarl.models.pi05.modeling import AdaRMSDecoderLayer, AdaRMSNorm
from vlarl.models.pi05.tiny import write_tiny_pi05
from vlarl.models.registry import default_model_cfg

torch.set_num_threads(1)
B = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pi05")
    return {"lerobot": write_tiny_pi05(root / "lerobot", "lerobot", seed=2),
            "openpi": write_tiny_pi05(root / "openpi", "openpi", seed=2),
            "tokenizer": write_tiny_tokenizer(root / "tokenizer")}


def load(folders, layout="lerobot", **extra):
    cfg = default_model_cfg()
    OmegaConf.set_struct(cfg, False)
    cfg.tokenizer_path, cfg.executed_steps = str(folders["tokenizer"]), 2
    for k, v in extra.items():
        OmegaConf.update(cfg, k, v)
    return Pi05().load(folders[layout], cfg)


def gemma_config(width=16):
    return GemmaConfig(hidden_size=width, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, vocab_size=10, hidden_act="gelu_pytorch_tanh")


def test_adarms_norm_is_its_formula():
    torch.manual_seed(0)
    norm = AdaRMSNorm(6, 4, eps=1e-6)
    torch.nn.init.normal_(norm.dense.weight)
    torch.nn.init.normal_(norm.dense.bias)
    x, cond = torch.randn(3, 5, 6), torch.randn(3, 4)
    out, gate = norm(x, cond)
    w, b = norm.dense.weight.detach().numpy(), norm.dense.bias.detach().numpy()
    for i in range(3):
        mod = w @ cond[i].numpy() + b  # (18,) = scale | shift | gate
        scale, shift, g = mod[:6], mod[6:12], mod[12:]
        for j in range(5):
            v = x[i, j].numpy()
            expected = v / math.sqrt((v ** 2).mean() + 1e-6) * (1 + scale) + shift
            np.testing.assert_allclose(out[i, j].detach().numpy(), expected, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(gate[i, 0].detach().numpy(), g, atol=1e-6, rtol=1e-6)


def test_adarms_layer_with_constant_modulation_is_the_gemma_layer():
    """dense = 0 with bias (scale = w, shift = 0, gate = 1) is RMSNorm with weight w and plain residuals:
    the layer must then equal transformers' GemmaDecoderLayer with the same weights."""
    torch.manual_seed(1)
    config = gemma_config()
    plain, ada = GemmaDecoderLayer(config, 0), AdaRMSDecoderLayer(config, 0)
    for name in ("self_attn", "mlp"):
        getattr(ada, name).load_state_dict(getattr(plain, name).state_dict())
    for norm in ("input_layernorm", "post_attention_layernorm"):
        w = torch.randn(16) * 0.3
        getattr(plain, norm).weight.data.copy_(w)
        dense = getattr(ada, norm).dense
        dense.weight.data.zero_()
        dense.bias.data.copy_(torch.cat([w, torch.zeros(16), torch.ones(16)]))
    x = torch.randn(2, 5, 16)
    positions = torch.arange(5)[None].expand(2, 5)
    rotary = GemmaRotaryEmbedding(config)(x, positions)
    with torch.no_grad():
        expected = plain(x, position_ids=positions, position_embeddings=rotary)
        out = ada(x, torch.randn(2, 16), position_ids=positions, position_embeddings=rotary)
    assert (out - expected).abs().max() < 1e-5


def test_prompt_carries_the_discretised_state(folders):
    model, tok, _ = load(folders)
    st = model.spec.stats
    assert st.mode == "quantiles" and model.spec.tokenizer_max_length == 200
    # Normalised values chosen to hit known bins: bin = floor((v + 1) * 128), -1 below -1, 255 from 1 on.
    wanted = np.array([-1.0, -0.99, 0.0, 0.5, 0.999, 1.0, 1.7, -1.2], np.float32)
    bins = [0, 1, 128, 192, 255, 255, 255, -1]
    q01, q99 = np.asarray(st.state_mean, np.float32), np.asarray(st.state_std, np.float32)
    proprio = torch.from_numpy((wanted + 1) / 2 * (q99 - q01) + q01)[None]  # LeRobot: x = (x_n + 1) d / 2 + q01
    ids = model.encode_instruction(tok, " open_the drawer\n")
    prompt, mask = model.prompt(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), proprio)
    state = " ".join(map(str, bins + [128] * 24))  # LeRobot pads the state to 32 dims (zeros: bin 128)
    expected = [tok.bos_token_id] + tok(f"Task: open the drawer, State: {state};\nAction: ",
                                        add_special_tokens=False)["input_ids"]
    assert prompt[0].tolist() == expected and mask.all()
    openpi, otok, _ = load(folders, "openpi")
    q01, q99 = np.asarray(openpi.spec.stats.state_mean), np.asarray(openpi.spec.stats.state_std)
    proprio = torch.from_numpy(((wanted + 1) / 2 * (q99 - q01 + 1e-6) + q01).astype(np.float32))[None]
    ids = openpi.encode_instruction(otok, "open the drawer")
    prompt, _ = openpi.prompt(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), proprio)
    text = otok.decode(prompt[0, 1:].tolist())  # openpi tokenizes the state's own 8 dims
    assert text.replace(" ", "") == f"Task:openthedrawer,State:{''.join(map(str, bins))};\nAction:"


def joint_reference_velocity(model, obs, x, t):
    """pi0.5's velocity without the KV cache or vlarl's masks: the prefix's per-layer inputs from
    PaliGemma, then every expert layer written out (adaRMS, rotary, attention over [prefix | actions]
    with softmax by hand, gated residuals), as LeRobot's joint forward computes the suffix rows."""
    bb, spec = model.backbone, model.spec
    vlm_lm, dit = bb.model.vlm.language_model, bb.model.dit
    ids, mask, pixels, pixel_mask = model.prefix_inputs(obs[0], *model.prompt(obs[2], obs[3], obs[1]))
    embeds = bb.model.embed_prefix(ids, pixels, pixel_mask)
    out = bb.model.vlm(inputs_embeds=embeds, attention_mask=mask, position_ids=mask.cumsum(-1) - 1,
                       token_type_ids=torch.zeros_like(mask), output_hidden_states=True, return_dict=True)
    prefix_in = out.hidden_states  # input of each PaliGemma layer
    chunk, width = spec.chunk_size, spec.action_expert.width
    positions = torch.cat([mask, torch.ones(B, chunk, dtype=mask.dtype)], 1).cumsum(-1) - 1
    angle = t[:, None] * bb.time_embed.sinusoid_freq
    emb_t = torch.cat([angle.sin(), angle.cos()], 1)
    cond = torch.nn.functional.silu(bb.time_mlp_out(torch.nn.functional.silu(bb.time_mlp_in(emb_t))))
    h = bb.action_in_proj(x.view(B, chunk, -1))

    def ada(norm, v):
        scale, shift, gate = (cond @ norm.dense.weight.T + norm.dense.bias).split(width, -1)
        n = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
        return n * (1 + scale[:, None]) + shift[:, None], gate[:, None]

    def rope(v, pos, layer_rotary):
        cos, sin = layer_rotary(v, pos)
        half = v.shape[-1] // 2
        rotated = torch.cat([-v[..., half:], v[..., :half]], -1)
        return v * cos[:, None] + rotated * sin[:, None]

    visible = torch.cat([mask.bool(), torch.ones(B, chunk, dtype=torch.bool)], 1)
    for i, layer in enumerate(dit.layers):
        pl = vlm_lm.layers[i]
        p = pl.input_layernorm(prefix_in[i])
        kp = pl.self_attn.k_proj(p).view(B, -1, 1, spec.paligemma.head_dim).transpose(1, 2)
        vp = pl.self_attn.v_proj(p).view(B, -1, 1, spec.paligemma.head_dim).transpose(1, 2)
        a, gate = ada(layer.input_layernorm, h)
        heads, hd = spec.action_expert.num_heads, spec.action_expert.head_dim
        q = layer.self_attn.q_proj(a).view(B, chunk, heads, hd).transpose(1, 2)
        k = layer.self_attn.k_proj(a).view(B, chunk, 1, hd).transpose(1, 2)
        v = layer.self_attn.v_proj(a).view(B, chunk, 1, hd).transpose(1, 2)
        prefix_pos, action_pos = positions[:, :mask.shape[1]], positions[:, mask.shape[1]:]
        keys = torch.cat([rope(kp, prefix_pos, vlm_lm.rotary_emb), rope(k, action_pos, dit.rotary_emb)], 2)
        values = torch.cat([vp, v], 2)
        q = rope(q, action_pos, dit.rotary_emb)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(hd)  # one KV head shared by every query head
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        attended = (scores.softmax(-1) @ values).transpose(1, 2).reshape(B, chunk, heads * hd)
        h = h + layer.self_attn.o_proj(attended) * gate
        a, gate = ada(layer.post_attention_layernorm, h)
        h = h + layer.mlp(a) * gate
    h, _ = ada(dit.norm, h)
    return bb.action_out_proj(h).reshape(B, -1)


@pytest.mark.parametrize("layout", ["lerobot", "openpi"])
def test_cached_velocity_equals_the_joint_sequence_reference(folders, layout):
    model, tok, _ = load(folders, layout)
    model.eval()
    obs = inputs(model, tok)
    x = torch.randn(B, model.flow_width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        context, _ = model.encode_context(*obs)
        for t in (1.0, 0.4):
            tt = torch.full((B,), t)
            v, _ = model.velocity(context, x, tt)
            assert (v - joint_reference_velocity(model, obs, x, tt)).abs().max() < 1e-5, t


def test_lerobot_and_openpi_folders_hold_the_same_model(folders):
    a, b = (load(folders, k).model.backbone.state_dict() for k in ("lerobot", "openpi"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".dense." in k for k in a) and "time_mlp_in.weight" in a
