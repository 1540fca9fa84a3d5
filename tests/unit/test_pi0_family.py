"""The pi0 family's folder-level behaviour: detection, errors a user can cause, cameras, LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from vlarl.models.family import FamilyError
from vlarl.models.lora import apply_lora, merge_lora_state_dict
from vlarl.models.pi0.family import Pi0
from vlarl.models.pi05.family import Pi05
from vlarl.models.pi0.tiny import write_tiny_pi0, write_tiny_tokenizer
from vlarl.models.registry import default_model_cfg

torch.set_num_threads(1)


def model_cfg(tokenizer=None, path=None):
    cfg = default_model_cfg()
    OmegaConf.set_struct(cfg, False)
    cfg.tokenizer_path = str(tokenizer) if tokenizer else None
    cfg.path = str(path) if path else None
    return cfg


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pi0fam")
    return write_tiny_pi0(root / "lerobot", "lerobot"), write_tiny_tokenizer(root / "tok")


def test_recognises_both_layouts_and_nothing_else(tmp_path):
    for layout in ("lerobot", "openpi"):
        for kind, family in (("pi0", Pi0()), ("pi05", Pi05())):
            folder = write_tiny_pi0(tmp_path / kind / layout, layout, kind=kind)
            config = json.loads((folder / "config.json").read_text())
            other = Pi05() if kind == "pi0" else Pi0()
            assert family.recognises(config, folder) and not other.recognises(config, folder), (kind, layout)
    assert not Pi0().recognises({"type": "pi05"})
    assert not Pi0().recognises({"model_type": "openvla"})


def test_missing_tokenizer_says_which_and_how_in_one_sentence(tmp_path):
    folder = write_tiny_pi0(tmp_path / "m", "lerobot", tokenizer_name="vlarl-test/no-such-paligemma-tokenizer")
    with pytest.raises(FamilyError) as err:
        Pi0().check(folder, model_cfg())
    message = str(err.value)
    assert "vlarl-test/no-such-paligemma-tokenizer" in message and "model.tokenizer_path=DIR" in message
    assert "\n" not in message


def test_a_checkpoint_of_the_other_kind_is_refused_with_the_family_to_set(folders, tmp_path):
    folder = write_tiny_pi0(tmp_path / "m", "lerobot")
    weights = load_file(folder / "model.safetensors")
    weights["model.time_mlp_in.weight"] = torch.zeros(2, 2)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(FamilyError, match="holds a pi0.5 model.*model.family=pi05"):
        Pi0().check(folder, model_cfg(folders[1]))
    pi05 = write_tiny_pi0(tmp_path / "pi05", "openpi", kind="pi05")
    with pytest.raises(FamilyError, match="holds a pi0.5 model.*model.family=pi05"):
        Pi0().check(pi05, model_cfg(folders[1]))
    with pytest.raises(FamilyError, match="holds a pi0 model.*model.family=pi0 "):
        Pi05().check(folders[0], model_cfg(folders[1]))


def test_cameras_side_by_side_and_fewer_cameras(folders):
    model, tok, _ = Pi0().load(folders[0], model_cfg(folders[1]))
    s = model.image_size
    obs = {"image": np.full((2, s, s, 3), 10, np.uint8), "wrist_image": np.full((2, s, s, 3), 200, np.uint8)}
    transform = Pi0().frame_transform("libero_spatial", model_cfg(folders[1], folders[0]))
    strip = transform(obs)
    assert strip.shape == (2, s, 2 * s, 3) and (strip[:, :, :s] == 10).all() and (strip[:, :, s:] == 200).all()
    assert Pi0().frame_transform("toy", model_cfg(folders[1], folders[0])) is None
    with pytest.raises(FamilyError, match="env.wrist_camera=true"):
        transform({"image": obs["image"]})
    ids = torch.tensor([model.encode_instruction(tok, "move to the red block")] * 2)
    for images in (strip, obs["image"]):  # two cameras; one (the toy environment's)
        out = model.sample(torch.as_tensor(images), torch.zeros(2, 8), ids, torch.ones_like(ids), greedy=True,
                           generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out[3]).all()


def test_padded_rows_score_as_alone_and_loads_agree(folders):
    cfg = model_cfg(folders[1])
    model, tok, _ = Pi0().load(folders[0], cfg)
    other = Pi0().load(folders[0], cfg).model
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # seeded heads
    s = model.image_size
    images = torch.randint(0, 256, (2, s, 2 * s, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    proprio = torch.randn(2, 8)
    rows = [model.encode_instruction(tok, t) for t in ("put the cream cheese in the bowl", "open")]
    ids, mask = torch.zeros(2, len(rows[0]), dtype=torch.long), torch.zeros(2, len(rows[0]), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, -len(r):], mask[i, -len(r):] = torch.tensor(r), 1
    with torch.no_grad():
        both_ctx, both_v = model.encode_context(images, proprio, ids, mask)
        x, t = torch.randn(2, model.flow_width), torch.full((2,), 0.6)
        both = model.velocity(both_ctx, x, t)[0]
        alone_ctx, alone_v = model.encode_context(images[1:], proprio[1:], ids[1:, -len(rows[1]):],
                                                  mask[1:, -len(rows[1]):])
        alone = model.velocity(alone_ctx, x[1:], t[1:])[0]
    assert (both[1:] - alone).abs().max() < 1e-5 and (both_v[1:] - alone_v).abs().max() < 1e-5


def test_lora_on_paligemma_merges_back_to_the_base_names(folders):
    model = Pi0().load(folders[0], model_cfg(folders[1])).model
    base = set(model.state_dict())
    model = apply_lora(model, rank=2, alpha=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert all("lora_" in n or n.startswith(model.lora_trainable) for n in trainable)
    assert set(merge_lora_state_dict(model.state_dict(), 2.0)) == base
    assert model.fsdp_units() and model.action_kind == "flow" and model.config.action_dim % 7 == 0
