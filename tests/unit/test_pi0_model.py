"""pi0 against transformers' own PI0ForConditionalGeneration, across both upstream layouts, and
pi0 and pi0.5 through load -> save -> load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from vlarl.models.pi0.family import Pi0
from vlarl.models.pi0.tiny import tiny_inputs as inputs
from vlarl.models.pi0.tiny import write_tiny_pi0, write_tiny_tokenizer
from vlarl.models.registry import default_model_cfg, family_of_folder

torch.set_num_threads(1)
B = 2


def model_cfg(tokenizer: Path, **extra):
    cfg = default_model_cfg()
    OmegaConf.set_struct(cfg, False)
    cfg.tokenizer_path = str(tokenizer)
    for k, v in extra.items():
        OmegaConf.update(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pi0")
    return {"lerobot": write_tiny_pi0(root / "lerobot", "lerobot", seed=1),
            "openpi": write_tiny_pi0(root / "openpi", "openpi", seed=1),
            "pi05-lerobot": write_tiny_pi0(root / "pi05-lerobot", "lerobot", seed=1, kind="pi05"),
            "pi05-openpi": write_tiny_pi0(root / "pi05-openpi", "openpi", seed=1, kind="pi05"),
            "tokenizer": write_tiny_tokenizer(root / "tokenizer")}


def reference_inputs(model, images, proprio, ids, mask):
    full_ids, full_mask, pixels, pixel_mask = model.prefix_inputs(images, ids, mask)
    return dict(state=model.state(proprio), input_ids=full_ids, attention_mask=full_mask, pixel_values=pixels,
                pixel_attention_mask=pixel_mask)


def test_prompt_pixels_and_state_follow_pi0(folders):
    model, tok, _ = Pi0().load(folders["lerobot"], model_cfg(folders["tokenizer"]))
    ids = model.encode_instruction(tok, " open the drawer ")
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "open", "the", "drawer", "\n"]
    images, proprio, *_ = inputs(model, tok)
    pixels = model.pixel_values(images)
    s = model.image_size
    assert pixels.shape == (B, 2, 3, s, s)
    wrist = images[:, :, s:].permute(0, 3, 1, 2).float() / 255 * 2 - 1
    assert torch.equal(pixels[:, 1], wrist)
    st = model.spec.stats
    state = model.state(proprio)
    assert state.shape == (B, 32) and torch.all(state[:, 8:] == 0)
    assert st.mode == "mean_std"
    expected = (proprio - torch.tensor(st.state_mean)) / (torch.tensor(st.state_std) + 1e-8)
    assert torch.allclose(state[:, :8], expected)


def test_velocity_and_ode_chunk_equal_transformers(folders):
    model, tok, _ = Pi0().load(folders["lerobot"], model_cfg(folders["tokenizer"], **{"flow.num_steps": 10}))
    model.eval()
    obs = inputs(model, tok)
    ref = reference_inputs(model, *obs)
    chunk, dims = model.spec.chunk_size, model.spec.max_action_dim
    with torch.no_grad():
        context, _ = model.encode_context(*obs)
        x = torch.randn(B, chunk * dims, generator=torch.Generator().manual_seed(3))
        for t in (1.0, 0.55, 0.1):
            tt = torch.full((B,), t)
            v, _ = model.velocity(context, x, tt)
            expected = model.backbone(noise=x.view(B, chunk, dims), timestep=tt, **ref).logits
            assert (v - expected.reshape(B, -1)).abs().max() < 1e-5, t
        chains, _, _, executed = model.sample(*obs, greedy=True, generator=torch.Generator().manual_seed(4))
        expected = model.backbone.sample_actions(noise=chains[:, 0].view(B, chunk, dims), num_steps=10, **ref)
    assert (chains[:, -1] - expected.reshape(B, -1)).abs().max() < 1e-5
    assert torch.equal(executed, model.executed(chains[:, -1]))  # the first executed_steps actions, 7-D each
    assert torch.allclose(executed, expected[:, :model.spec.executed_steps, :7].reshape(B, -1), atol=1e-5, rtol=0)


def test_lerobot_and_openpi_folders_give_the_same_actions(folders):
    cfg = model_cfg(folders["tokenizer"], executed_steps=2)  # openpi's config.json has no n_action_steps
    loaded = {k: Pi0().load(folders[k], cfg) for k in ("lerobot", "openpi")}
    a, b = (loaded[k].model.backbone.state_dict() for k in ("lerobot", "openpi"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out = {}
    for k, (model, tok, actions) in loaded.items():
        obs = inputs(model, tok)
        _, _, _, x0 = model.sample(*obs, greedy=True, generator=torch.Generator().manual_seed(5))
        out[k] = actions.unnormalize(x0.numpy())
    # Only the normaliser epsilons differ (LeRobot 1e-8 / 0, openpi 1e-6 / 1e-6).
    np.testing.assert_allclose(out["lerobot"], out["openpi"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["lerobot", "openpi", "pi05-lerobot", "pi05-openpi"])
def test_load_save_load_reproduces_the_folder(folders, layout, tmp_path):
    src = folders[layout]
    cfg = model_cfg(folders["tokenizer"])
    family = family_of_folder(src)
    assert family.name == ("pi05" if layout.startswith("pi05") else "pi0")
    loaded = family.load(src, cfg)
    family.save(tmp_path / "again", loaded)
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and before[k].shape == after[k].shape, k
        assert torch.equal(before[k], after[k]), k
    files = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}  # noqa: E731
    old, new = files(src), files(tmp_path / "again")
    assert set(new) == set(old) | {"value_head.safetensors"}
    assert all(new[k] == old[k] for k in old if k != "model.safetensors")
    again = family.load(tmp_path / "again", cfg)
    a, b = loaded.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
