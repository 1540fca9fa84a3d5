"""SmolVLA's cached prefix + interleaved expert against a joint-sequence reference written out here (the
way LeRobot's training forward computes it: prefix and actions in one pass, every attention, mask and
rotation by hand), and its folder-level behaviour."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlarl.models.family import FamilyError
from vlarl.models.pi0.tiny import tiny_inputs as inputs
from vlarl.models.pi0.tiny import write_tiny_tokenizer
from vlarl.models.registry import default_model_cfg, family_of_folder
from vlarl.models.smolvla.family import SmolVLA
from vlarl.models.smolvla.tiny import write_tiny_smolvla

torch.set_num_threads(1)
B = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("smolvla")
    return write_tiny_smolvla(root / "model", seed=5), write_tiny_tokenizer(root / "tokenizer")


def load_cfg(folders):
    cfg = default_model_cfg()
    cfg.tokenizer_path = str(folders[1])
    return cfg


def load(folders):
    return SmolVLA().load(folders[0], load_cfg(folders))


def rope(x, positions, base=10_000.0):
    """x (B, L, H, D) rotated by positions (B, L): first half x1 cos - x2 sin, second x2 cos + x1 sin."""
    half = x.shape[-1] // 2
    freq = positions[..., None].double() / base ** (2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    cos, sin = freq.cos()[:, :, None].float(), freq.sin()[:, :, None].float()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def attend(q, k, v, allowed):
    """q (B, Lq, H, D), k/v (B, Lk, KV, D), allowed (B, Lq, Lk) -> (B, Lq, H * D); kv heads shared by groups."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)


def reference_velocity(model, obs, x, t):
    images, proprio, ids, mask = obs
    bb, spec = model.backbone, model.spec
    vlm = bb.vlm.model
    feats = vlm.connector(vlm.vision_model(pixel_values=model.pixel_values(images).flatten(0, 1)).last_hidden_state)
    width = feats.shape[-1]
    prefix = torch.cat([feats.reshape(B, -1, width) * math.sqrt(width),
                        vlm.text_model.embed_tokens(ids) * math.sqrt(width), bb.state_proj(model.state(proprio))[:, None]], 1)
    chunk = spec.chunk_size
    half = bb.action_in_proj.out_features // 2
    period = spec.min_period * (spec.max_period / spec.min_period) ** torch.linspace(0, 1, half, dtype=torch.float64)
    angle = t.double()[:, None] * 2 * math.pi / period
    time = torch.cat([angle.sin(), angle.cos()], 1).float()[:, None].expand(B, chunk, -1)
    actions = bb.action_in_proj(x.view(B, chunk, -1))
    suffix = bb.action_time_mlp_out(torch.nn.functional.silu(bb.action_time_mlp_in(torch.cat([actions, time], 2))))
    p = prefix.shape[1]
    pad = torch.cat([torch.ones(B, feats.shape[0] // B * feats.shape[1]), mask, torch.ones(B, 1 + chunk)], 1).bool()
    block = torch.tensor([0] * (p - 1) + [1] + [1] * chunk).cumsum(0)  # the state and each action open a block
    allowed = (block[None, :] <= block[:, None])[None] & pad[:, None, :] & pad[:, :, None]
    positions = pad.long().cumsum(-1) - 1
    hp, hs = prefix, suffix
    for i, (vl, el) in enumerate(zip(vlm.text_model.layers, bb.lm_expert.layers)):
        def qkv(layer, h):
            n = layer.input_layernorm(h)
            a, d = layer.self_attn, layer.self_attn.head_dim
            return (a.q_proj(n).unflatten(-1, (-1, d)), a.k_proj(n).unflatten(-1, (-1, d)),
                    a.v_proj(n).unflatten(-1, (-1, d)))
        qp, kp, vp = qkv(vl, hp)
        qp, kp = rope(qp, positions[:, :p]), rope(kp, positions[:, :p])
        if i % spec.self_attn_every_n_layers == 0:  # joint: one attention over prefix and actions
            qs, ks, vs = qkv(el, hs)
            qs, ks = rope(qs, positions[:, p:]), rope(ks, positions[:, p:])
            out = attend(torch.cat([qp, qs], 1), torch.cat([kp, ks], 1), torch.cat([vp, vs], 1), allowed)
            out_p, out_s = out[:, :p], out[:, p:]
        else:  # cross: the prefix attends to itself; actions to the prefix's rotated keys through the expert's k/v
            out_p = attend(qp, kp, vp, allowed[:, :p, :p])
            a = el.self_attn
            qs = rope(a.q_proj(el.input_layernorm(hs)).unflatten(-1, (-1, a.head_dim)),
                      torch.arange(chunk)[None].expand(B, -1))
            ks = a.k_proj(kp.flatten(2)).unflatten(-1, (-1, a.head_dim))
            vs = a.v_proj(vp.flatten(2)).unflatten(-1, (-1, a.head_dim))
            out_s = attend(qs, ks, vs, allowed[:, p:, :p])
        new = []
        for layer, h, out in ((vl, hp, out_p), (el, hs, out_s)):
            h = h + layer.self_attn.o_proj(out)
            new.append(h + layer.mlp(layer.post_attention_layernorm(h)))
        hp, hs = new
    return bb.action_out_proj(bb.lm_expert.norm(hs)).reshape(B, -1)


def test_cached_velocity_equals_the_joint_sequence_reference(folders):
    model, tok, _ = load(folders)
    model.eval()
    assert [layer.cross for layer in model.backbone.lm_expert.layers] == [False, True]  # both kinds run
    obs = inputs(model, tok)
    x = torch.randn(B, model.flow_width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        context, _ = model.encode_context(*obs)
        for t in (1.0, 0.3):
            tt = torch.full((B,), t)
            v, _ = model.velocity(context, x, tt)
            assert (v - reference_velocity(model, obs, x, tt)).abs().max() < 1e-5, t


def test_folder_layout_and_round_trip(folders, tmp_path):
    folder = folders[0]
    config = json.loads((folder / "config.json").read_text())
    assert family_of_folder(folder).name == "smolvla" and config["num_vlm_layers"] == 2
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.vlm_with_expert.lm_expert.layers.1.self_attn.k_proj.weight" in names
    assert "model.vlm_with_expert.vlm.model.text_model.layers.1.mlp.up_proj.weight" in names
    assert not any(".text_model.layers.2." in n for n in names)  # the folder keeps the first num_vlm_layers
    loaded = load(folders)
    SmolVLA().save(tmp_path / "again", loaded)
    again = SmolVLA().load(tmp_path / "again", load_cfg(folders))
    a, b = loaded.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unsupported_variants_stop_with_the_setting(folders, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(folders[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "add_image_special_tokens": True}))
    with pytest.raises(FamilyError, match="add_image_special_tokens"):
        SmolVLA().check(folder, load_cfg(folders))
    (folder / "arch.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "vlm_model_name": "vlarl-test/no-such-smolvlm"}))
    with pytest.raises(FamilyError, match="no-such-smolvlm.*local SmolVLM2 folder"):
        SmolVLA().check(folder, load_cfg(folders))
