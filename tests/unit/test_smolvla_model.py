"""SmolVLA's cached prefix + interleaved expert against a joint-sequence reference written out here (the
way LeRobot's training forward computes it: prefix and actions in one pass, every attention, mask and
rotation by hand), its folder-level behaviour, and the two config.json options that change the model:
add_image_special_tokens and num_expert_layers < num_vlm_layers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlarl.models.family import FamilyError
from vlarl.models.pi0.tiny import tiny_inputs as inputs
from vlarl.models.pi0.tiny import write_tiny_tokenizer as write_word_tokenizer
from vlarl.models.registry import default_model_cfg, family_of_folder
from vlarl.models.smolvla.config import read_spec
from vlarl.models.smolvla.family import SmolVLA
from vlarl.models.smolvla.tiny import write_tiny_smolvla, write_tiny_tokenizer

torch.set_num_threads(1)
B = 2
TOKENS_PER_CAMERA = 4  # the tiny backbone: (16 px / 4 px patches)^2 = 16 patches, pixel shuffle by 2 -> 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("smolvla")
    return write_tiny_smolvla(root / "model", seed=5), write_tiny_tokenizer(root / "tokenizer")


@pytest.fixture(scope="module")
def variant(folders, tmp_path_factory):
    """variant(**options) -> (folder, tokenizer folder): a tiny folder written with tiny_spec's options."""
    root = tmp_path_factory.mktemp("smolvla_variants")
    written = {}

    def write(**options):
        key = tuple(sorted(options.items()))
        if key not in written:
            written[key] = write_tiny_smolvla(root / f"m{len(written)}", seed=5, **options)
        return written[key], folders[1]
    return write


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


def reference_velocity(model, obs, x, t, marks=None, empty_slots=0):
    """The velocity as one joint pass. marks: the ids (fake, global) placed around each camera as
    [fake, global] camera [fake], embedded unscaled (LeRobot's add_image_special_tokens), plus the three for
    each of `empty_slots` empty cameras. Expert layer j sits at VLM layer j * stride; the VLM layers between
    run on the prefix alone and leave the actions as they are."""
    images, proprio, ids, mask = obs
    bb, spec = model.backbone, model.spec
    vlm = bb.vlm.model
    pixels = model.pixel_values(images)
    n = pixels.shape[1]
    feats = vlm.connector(vlm.vision_model(pixel_values=pixels.flatten(0, 1)).last_hidden_state)
    width = feats.shape[-1]
    cams = (feats * math.sqrt(width)).reshape(B, n, -1, width)
    pieces = []
    for c in range(n):
        if marks is not None:
            pieces.append(vlm.text_model.embed_tokens(torch.tensor([marks[0], marks[1]]))[None].expand(B, -1, -1))
        pieces.append(cams[:, c])
        if marks is not None:
            pieces.append(vlm.text_model.embed_tokens(torch.tensor([marks[0]]))[None].expand(B, -1, -1))
    for _ in range(empty_slots):
        empty = vlm.text_model.embed_tokens(torch.tensor([marks[0], marks[1], marks[0]]))
        pieces.append(empty[None].expand(B, -1, -1))
    images_len = sum(piece.shape[1] for piece in pieces)
    prefix = torch.cat([*pieces, vlm.text_model.embed_tokens(ids) * math.sqrt(width),
                        bb.state_proj(model.state(proprio))[:, None]], 1)
    chunk = spec.chunk_size
    half = bb.action_in_proj.out_features // 2
    period = spec.min_period * (spec.max_period / spec.min_period) ** torch.linspace(0, 1, half, dtype=torch.float64)
    angle = t.double()[:, None] * 2 * math.pi / period
    time = torch.cat([angle.sin(), angle.cos()], 1).float()[:, None].expand(B, chunk, -1)
    actions = bb.action_in_proj(x.view(B, chunk, -1))
    suffix = bb.action_time_mlp_out(torch.nn.functional.silu(bb.action_time_mlp_in(torch.cat([actions, time], 2))))
    p = prefix.shape[1]
    pad = torch.cat([torch.ones(B, images_len), mask, torch.ones(B, 1 + chunk)], 1).bool()
    block = torch.tensor([0] * (p - 1) + [1] + [1] * chunk).cumsum(0)  # the state and each action open a block
    allowed = (block[None, :] <= block[:, None])[None] & pad[:, None, :] & pad[:, :, None]
    positions = pad.long().cumsum(-1) - 1
    stride = spec.num_vlm_layers // len(bb.lm_expert.layers)

    def qkv(layer, h):
        n = layer.input_layernorm(h)
        a, d = layer.self_attn, layer.self_attn.head_dim
        return (a.q_proj(n).unflatten(-1, (-1, d)), a.k_proj(n).unflatten(-1, (-1, d)),
                a.v_proj(n).unflatten(-1, (-1, d)))

    def residual(layer, h, out):
        h = h + layer.self_attn.o_proj(out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    hp, hs = prefix, suffix
    for i, vl in enumerate(vlm.text_model.layers):
        el = bb.lm_expert.layers[i // stride] if i % stride == 0 else None
        qp, kp, vp = qkv(vl, hp)
        qp, kp = rope(qp, positions[:, :p]), rope(kp, positions[:, :p])
        n_self = spec.self_attn_every_n_layers
        joint = spec.attention_mode != "cross_attn" or (n_self > 0 and i % n_self == 0)
        if el is None:  # no expert layer here: the prefix attends to itself, the actions wait
            hp = residual(vl, hp, attend(qp, kp, vp, allowed[:, :p, :p]))
            continue
        if joint:  # joint: one attention over prefix and actions
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
        hp, hs = residual(vl, hp, out_p), residual(el, hs, out_s)
    return bb.action_out_proj(bb.lm_expert.norm(hs)).reshape(B, -1)


def assert_matches_reference(model, tok, **reference):
    obs = inputs(model, tok)
    x = torch.randn(B, model.flow_width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        context, _ = model.encode_context(*obs)
        for t in (1.0, 0.3):
            tt = torch.full((B,), t)
            v, _ = model.velocity(context, x, tt)
            assert (v - reference_velocity(model, obs, x, tt, **reference)).abs().max() < 1e-5, t


def test_cached_velocity_equals_the_joint_sequence_reference(folders):
    model, tok, _ = load(folders)
    model.eval()
    assert [layer.cross for layer in model.backbone.lm_expert.layers] == [False, True]  # both kinds run
    assert_matches_reference(model, tok)


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
    word_tokenizer = {"tokenizer_path": str(write_word_tokenizer(tmp_path / "words"))}
    cases = [  # (config.json changes, model settings, the error's words)
        ({"add_image_special_tokens": True}, word_tokenizer, "add_image_special_tokens=true.*no fake_image_token"),
        ({"num_vlm_layers": 4, "num_expert_layers": 3}, {},
         "num_vlm_layers=4 is not a multiple of num_expert_layers=3"),
        # expert layer 1 would sit at VLM layer 2, a joint layer, with k/v projections shaped for cross-attention
        ({"num_vlm_layers": 4, "num_expert_layers": 2, "self_attn_every_n_layers": 2}, {},
         "expert layer 1 pairs with VLM layer 2, which self-attends.*LeRobot cannot run"),
    ]
    for changes, settings, words in cases:
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        cfg = load_cfg(folders)
        for key, value in settings.items():
            setattr(cfg, key, value)
        with pytest.raises(FamilyError, match=words):
            SmolVLA().check(folder, cfg)
    (folder / "arch.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "vlm_model_name": "vlarl-test/no-such-smolvlm"}))
    with pytest.raises(FamilyError, match="no-such-smolvlm.*local SmolVLM2 folder"):
        SmolVLA().check(folder, load_cfg(folders))


def test_num_vlm_layers_below_one_keeps_the_whole_backbone(folders, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(folders[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_vlm_layers": -1}))
    spec = read_spec(folder)
    assert (spec.num_vlm_layers, spec.num_expert_layers) == (4, 4)  # the tiny SmolVLM2 has 4 text layers


@pytest.mark.parametrize("cameras, empty", [(2, 0), (3, 1)])
def test_image_special_tokens_wrap_each_camera(variant, cameras, empty):
    folder, tokenizer_dir = variant(add_image_special_tokens=True, cameras=cameras, empty_cameras=empty)
    config = json.loads((folder / "config.json").read_text())
    assert config["add_image_special_tokens"] is True and config["empty_cameras"] == empty
    model, tok, _ = SmolVLA().load(folder, load_cfg((folder, tokenizer_dir)))
    model.eval()
    fake, glob = tok.convert_tokens_to_ids("<fake_token_around_image>"), tok.convert_tokens_to_ids("<global-img>")
    assert fake != glob and tok.unk_token_id not in (fake, glob)
    seen = {}
    text_model = model.backbone.vlm.model.text_model
    hook = text_model.register_forward_pre_hook(lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True)
    obs = inputs(model, tok)  # two cameras side by side
    try:
        with torch.no_grad():
            (_, _, pad), _ = model.encode_context(*obs)
    finally:
        hook.remove()
    words = obs[2].shape[1]
    assert pad.shape == (B, 2 * (2 + TOKENS_PER_CAMERA + 1) + 3 * empty + words + 1)
    images_len = pad.shape[1] - words - 1
    assert pad[:, :images_len].all()  # the special tokens are never padding
    embeds, table = seen["inputs_embeds"], text_model.embed_tokens.weight
    step = 2 + TOKENS_PER_CAMERA + 1
    for c in range(2):  # [fake, global] camera c [fake], the table's rows as they are (not scaled)
        start = c * step
        for offset, token in ((0, fake), (1, glob), (step - 1, fake)):
            assert torch.equal(embeds[:, start + offset], table[token].expand(B, -1)), (c, offset)
    for offset, token in enumerate([fake, glob, fake] * empty):  # an empty camera slot keeps its three
        assert torch.equal(embeds[:, 2 * step + offset], table[token].expand(B, -1))
    assert (seen["position_ids"][:, :images_len] == torch.arange(images_len)).all()  # each takes a position
    assert_matches_reference(model, tok, marks=(fake, glob), empty_slots=empty)


# (num_vlm_layers, num_expert_layers, self_attn_every_n_layers, attention_mode) -> kinds of the expert layers
EXPERTS = {(4, 2, 3, "cross_attn"): [False, True], (4, 2, 0, "cross_attn"): [True, True],
           (4, 1, 2, "cross_attn"): [False], (4, 2, 2, "self_attn"): [False, False], (4, 4, 2, "cross_attn"):
           [False, True, False, True]}


@pytest.mark.parametrize("layers, experts, every, mode", list(EXPERTS))
def test_fewer_expert_layers_pair_with_every_stride_th_vlm_layer(variant, layers, experts, every, mode):
    folder, tokenizer_dir = variant(num_vlm_layers=layers, num_expert_layers=experts,
                                    self_attn_every_n_layers=every, attention_mode=mode)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_expert_layers"] == (experts if experts < layers else -1)
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        expert_names = {n for n in f.keys() if ".lm_expert.layers." in n}
        k_in = [f.get_slice(f"model.vlm_with_expert.lm_expert.layers.{j}.self_attn.k_proj.weight").get_shape()[1]
                for j in range(experts)]
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in expert_names} == set(range(experts))
    kinds = EXPERTS[layers, experts, every, mode]
    assert k_in == [16 if cross else 24 for cross in kinds]  # cross: the VLM's 2 x 8 keys; self: the 24-wide expert
    model, tok, _ = SmolVLA().load(folder, load_cfg((folder, tokenizer_dir)))
    model.eval()
    assert [layer.cross for layer in model.backbone.lm_expert.layers] == kinds
    assert_matches_reference(model, tok)

    # Expert layer j reads VLM layer j * stride's cache and no other: replacing the others' changes nothing.
    obs = inputs(model, tok)
    x = torch.randn(B, model.flow_width, generator=torch.Generator().manual_seed(4))
    t = torch.full((B,), 0.6)
    stride = layers // experts
    with torch.no_grad():
        (keys, vals, pad), _ = model.encode_context(*obs)
        v = model.velocity((keys, vals, pad), x, t)[0]
        for i in range(layers):
            noisy_keys = tuple(torch.randn_like(k) if m == i else k for m, k in enumerate(keys))
            noisy_vals = tuple(torch.randn_like(k) if m == i else k for m, k in enumerate(vals))
            moved = (model.velocity((noisy_keys, noisy_vals, pad), x, t)[0] - v).abs().max()
            assert (moved > 1e-3) == (i % stride == 0), (i, moved)
