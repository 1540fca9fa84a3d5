"""OpenVLA-OFT on tiny folders in the upstream layout (vlarl.models.openvla_oft.tiny): attention
structure, the upstream-built reference sequence, independent references for the heads and the
proprio normalisation, exact rollout log-probs, checks against the tensors, and save/export layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlarl.config import load_config
from vlarl.models.family import FamilyError
from vlarl.models.openvla_oft.modeling import attention_mask_4d
from vlarl.models.openvla_oft.tiny import LIBERO_PROPRIO, write_tiny_oft
from vlarl.models.registry import family_of_folder, load_model, save_model
from vlarl.rollout.flow_engine import make_engine

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("oft")
    return {head: write_tiny_oft(root / head, head, seed=1) for head in ("discrete", "l1")}


def model_cfg(*extra: str):
    return load_config(["env=toy", "model=openvla_oft", "model.oft.chunk=2", *extra]).model


def observations(n: int, cameras: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, 224, 224 * cameras, 3), dtype=np.uint8),
            "proprio": rng.normal(0, 0.3, (n, 8)).astype(np.float32) + np.asarray(LIBERO_PROPRIO["mean"], np.float32),
            "instruction": ["pick up the black bowl and place it on the plate", "open the drawer", "stack"][:n]}


def test_upstream_files_and_the_head_are_detected(folders):
    names = sorted(p.name for p in folders["l1"].iterdir() if p.suffix == ".pt")
    assert names == ["action_head--50000_checkpoint.pt", "proprio_projector--50000_checkpoint.pt"]
    state = torch.load(folders["l1"] / names[0], weights_only=True)
    assert all(k.startswith("module.model.") for k in state) and state["module.model.fc1.weight"].dtype == torch.bfloat16
    for head, kind in (("discrete", "parallel"), ("l1", "gaussian")):
        assert family_of_folder(folders[head]).name == "openvla_oft"
        model = load_model(folders[head], model_cfg()).model
        assert model.action_kind == kind and model.spec.head == head and model.spec.proprio_dim == 8
        assert model.config.action_dim == 14  # chunk 2 x 7 placeholders


@pytest.mark.parametrize("mode", ["full", "prefix_causal"])
def test_placeholders_attend_to_each_other_and_the_prefix_as_configured(folders, mode):
    model = load_model(folders["discrete"], model_cfg(f"model.oft.attention={mode}")).model
    engine = make_engine(*load_model(folders["discrete"], model_cfg(f"model.oft.attention={mode}")), "cpu")
    prefix = model.prefix(*engine.model_inputs(observations(2)))
    n, e = model.spec.num_actions, prefix[0].shape[-1]
    placeholders = torch.randn(2, n, e, generator=torch.Generator().manual_seed(0))
    changed = placeholders.clone()
    changed[:, -1] += 10.0  # the last placeholder's input

    def states(inputs):
        with torch.no_grad():
            b, lp = prefix[1].shape
            return model.decode(*prefix, placeholders=inputs)[0], lp

    (a, lp), (b, _) = states(placeholders), states(changed)
    # a later placeholder's input changes an earlier placeholder's state (states[1] sits on placeholder 0)
    assert (a[:, 1] - b[:, 1]).abs().max() > 1e-4
    with torch.no_grad():
        full_a = model.language_model.model(inputs_embeds=torch.cat([prefix[0], placeholders], 1),
                                            attention_mask=attention_mask_4d(
                                                torch.cat([prefix[1], prefix[1].new_ones(2, n)], 1), lp, mode,
                                                torch.float32),
                                            position_ids=torch.cat([prefix[2], prefix[2][:, -1:] + 1 +
                                                                    torch.arange(n)], 1)).last_hidden_state
    if mode == "prefix_causal":
        # a placeholder never changes a prefix state: the prefix equals the plain causal decoder on the prefix alone
        assert torch.equal(a[:, 0], b[:, 0])
        with torch.no_grad():
            alone = model.language_model.model(inputs_embeds=prefix[0], attention_mask=prefix[1],
                                               position_ids=prefix[2]).last_hidden_state
        real = prefix[1].bool()
        torch.testing.assert_close(full_a[:, :lp][real], alone[real], atol=1e-5, rtol=1e-4)
    else:  # upstream's fork: the prefix sees the placeholders too
        assert (a[:, 0] - b[:, 0]).abs().max() > 1e-5


def test_attention_mask_by_hand():
    mask = torch.tensor([[1, 0, 1, 1, 1]])
    full = attention_mask_4d(mask, 3, "full", torch.float32)[0, 0] == 0
    causal = attention_mask_4d(mask, 3, "prefix_causal", torch.float32)[0, 0] == 0
    assert full.tolist() == [[True, False, True, True, True]] * 5
    assert causal.tolist() == [[True, False, False, False, False], [True, False, False, False, False],
                               [True, False, True, False, False], [True, False, True, True, True],
                               [True, False, True, True, True]]


@pytest.mark.parametrize("head", ["discrete", "l1"])
@pytest.mark.parametrize("mode", ["full", "prefix_causal"])
def test_greedy_batched_chunk_equals_the_upstream_built_sequence(folders, head, mode):
    loaded = load_model(folders[head], model_cfg(f"model.oft.attention={mode}"))
    engine = make_engine(*loaded, "cpu")
    obs = observations(3)  # rows of different prompt lengths: the shorter ones are left-padded
    out = engine.generate(obs, 1.0, greedy=True)
    inner = loaded.action_tokenizer.inner.inner
    for i in range(3):
        ref = loaded.model.reference_chunk(obs["image"][i], obs["proprio"][i], obs["instruction"][i])
        if head == "l1":
            np.testing.assert_allclose(out.samples[i].reshape(ref.shape), ref, atol=1e-5)
        else:
            np.testing.assert_array_equal(inner.tokens_to_normalized(out.tokens[i]).reshape(ref.shape), ref)


@pytest.mark.parametrize("head", ["discrete", "l1"])
def test_rollout_logprobs_equal_the_learner_forward(folders, head):
    loaded = load_model(folders[head], model_cfg())
    engine = make_engine(*loaded, "cpu")
    obs = observations(3, seed=2)
    out = engine.generate(obs, 1.2, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    scored = torch.as_tensor(next(iter(out.record().values())))
    with torch.no_grad():
        logprobs, entropy, values = loaded.model(*engine.model_inputs(obs), scored, temperature=1.2)
    assert np.abs(logprobs.numpy() - out.logprobs).max() < 1e-4
    assert torch.isfinite(entropy).all() and values.shape == (3,)


def test_action_logits_are_the_language_heads_action_rows(folders):
    model = load_model(folders["discrete"], model_cfg()).model
    states = torch.randn(3, 5, model.openvla.text.hidden_size, dtype=model.dtype)
    with torch.no_grad():
        full = model.language_model.lm_head(states).float()  # every vocabulary row, then the action ids
    expected = full[..., model.first_bin_id:model.first_bin_id + 256]
    assert model.dtype == torch.float32 and full.shape[-1] == 32064
    torch.testing.assert_close(model.action_logits(states), expected)


def test_l1_head_and_gaussian_against_independent_references(folders):
    model = load_model(folders["l1"], model_cfg()).model
    head = {k: v.float() for k, v in model.action_head.state_dict().items()}
    states = torch.randn(2, model.spec.num_actions, model.openvla.text.hidden_size)
    x = states.reshape(2, model.spec.chunk, -1)  # each action's 7 states side by side
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], head[p + ".weight"], head[p + ".bias"])  # noqa: E731
    lin = lambda x, p: x @ head[p + ".weight"].T + head[p + ".bias"]  # noqa: E731
    x = torch.relu(lin(ln(x, "model.layer_norm1"), "model.fc1"))
    for i in range(2):
        x = x + torch.relu(lin(ln(x, f"model.mlp_resnet_blocks.{i}.ffn.0"), f"model.mlp_resnet_blocks.{i}.ffn.1"))
    expected = lin(ln(x, "model.layer_norm2"), "model.fc2")
    with torch.no_grad():
        torch.testing.assert_close(model.action_head(states), expected, atol=1e-5, rtol=1e-5)
    # the Gaussian policy: torch.distributions' log-density and entropy
    from vlarl.models.openvla_oft.modeling import gaussian_logprob

    mean, x, log_std = torch.randn(4, 14), torch.randn(4, 14), model.log_std().detach()
    normal = torch.distributions.Normal(mean, log_std.exp())
    torch.testing.assert_close(gaussian_logprob(x, mean, log_std), normal.log_prob(x))
    engine = make_engine(*load_model(folders["l1"], model_cfg()), "cpu")
    obs = observations(1)
    with torch.no_grad():
        _, entropy, _ = model(*engine.model_inputs(obs), torch.zeros(1, 14))
    torch.testing.assert_close(entropy[0], normal.entropy()[0])
    assert math.isclose(float(log_std[0]), -1.6, abs_tol=1e-6)  # model.oft.init_log_std


def test_proprio_is_normalised_with_the_checkpoints_bounds_q99(folders):
    model = load_model(folders["l1"], model_cfg()).model
    raw = np.array([[0.0, 0.1, 1.0, 3.0, 0.0, -0.1, 0.02, -0.02], [-9.0] * 8])
    q01, q99 = np.array(LIBERO_PROPRIO["q01"]), np.array(LIBERO_PROPRIO["q99"])
    expected = np.clip(2 * (raw - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)  # openvla_utils.normalize_proprio
    np.testing.assert_allclose(model.normalize_proprio(torch.tensor(raw)).numpy(), expected, atol=1e-6)


def test_chunk_actions_decode_each_action_with_the_gripper_convention(folders):
    loaded = load_model(folders["l1"], model_cfg())
    at = loaded.action_tokenizer
    normalized = np.zeros((1, 14), np.float32)
    normalized[0, 6], normalized[0, 13] = 0.9, 0.1  # gripper of action 0 open, of action 1 closed
    actions = at.normalized_to_actions(normalized)
    assert actions[0, 6] == 1 and actions[0, 13] == -1
    inner = loaded.action_tokenizer.inner.inner
    np.testing.assert_allclose(actions[0, :6], inner.unnormalize(np.zeros((1, 7)))[0, :6], atol=1e-6)
    np.testing.assert_allclose(at.actions_to_normalized(actions)[0, 6::7], [1.0, 0.0])
    tokens = at.actions_to_tokens(actions)
    assert tokens.shape == (1, 14) and np.array_equal(at.tokens_to_actions(tokens)[0, 6::7], [1.0, -1.0])


def test_folders_that_do_not_fit_stop_with_the_fix(folders, tmp_path):
    import shutil

    bad = tmp_path / "film"
    shutil.copytree(folders["l1"], bad)
    torch.save({}, bad / "vision_backbone--50000_checkpoint.pt")
    with pytest.raises(FamilyError, match="FiLM"):
        load_model(bad, model_cfg())
    (bad / "vision_backbone--50000_checkpoint.pt").rename(bad / "noisy_action_projector--50000_checkpoint.pt")
    with pytest.raises(FamilyError, match="diffusion"):
        load_model(bad, model_cfg())
    (bad / "noisy_action_projector--50000_checkpoint.pt").unlink()
    shutil.copyfile(bad / "action_head--50000_checkpoint.pt", bad / "action_head--60000_checkpoint.pt")
    with pytest.raises(FamilyError, match="2 action_head checkpoints"):
        load_model(bad, model_cfg())
    (bad / "action_head--60000_checkpoint.pt").unlink()
    with pytest.raises(FamilyError, match="set model.oft.head=auto or l1"):
        load_model(bad, model_cfg("model.oft.head=discrete"))
    with pytest.raises(FamilyError, match="no action_head"):
        load_model(folders["discrete"], model_cfg("model.oft.head=l1"))
    state = torch.load(bad / "proprio_projector--50000_checkpoint.pt", weights_only=True)
    torch.save({k: v[:, :5] if k == "module.fc1.weight" else v for k, v in state.items()},
               bad / "proprio_projector--50000_checkpoint.pt")
    with pytest.raises(FamilyError, match="reads 5 values"):
        load_model(bad, model_cfg())
    model = load_model(folders["discrete"], model_cfg()).model
    with pytest.raises(ValueError, match="env.wrist_camera=true"):
        model.camera_tiles(torch.zeros(1, 224, 224, 3, dtype=torch.uint8))


@pytest.mark.parametrize("head", ["discrete", "l1"])
def test_save_writes_upstream_names_and_describes_the_run(folders, head, tmp_path):
    loaded = load_model(folders[head], model_cfg())
    with torch.no_grad():
        if loaded.model.action_log_std is not None:
            loaded.model.action_log_std.fill_(-0.7)  # learned: travels in vlarl_oft.json
    save_model(tmp_path / "out", loaded)
    out = tmp_path / "out"
    expected = sorted(p.name for p in folders[head].glob("*--*checkpoint.pt"))
    assert sorted(p.name for p in out.glob("*--*checkpoint.pt")) == expected
    for name in expected:
        a, b = (torch.load(f / name, weights_only=True) for f in (folders[head], out))
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    recorded = json.loads((out / "vlarl_oft.json").read_text())
    assert recorded["chunk"] == 2 and recorded["head"] == head and recorded["num_images"] == 2
    # the exported folder describes itself: no model.oft needed, a conflicting one is refused
    again = load_model(out, load_config(["env=toy", "model=openvla_oft"]).model)
    assert again.model.spec == loaded.model.spec
    if head == "l1":
        assert torch.allclose(again.model.action_log_std, torch.full((7,), -0.7))
    with pytest.raises(FamilyError, match="drop the override"):
        load_model(out, model_cfg("model.oft.chunk=3"))


def test_run_settings_that_do_not_fit_stop_at_start(folders):
    from vlarl.config import ConfigError
    from vlarl.preflight import load_run_config

    base = ["env=toy", "model=openvla_oft", f"model.path={folders['discrete']}"]
    with pytest.raises(ConfigError, match="set env.action_chunk=8"):
        load_run_config(base)  # model.oft.chunk defaults to LIBERO's 8
    with pytest.raises(ConfigError, match="rollout.engine=hf"):
        load_run_config([*base, "env.action_chunk=8", "rollout.engine=vllm"])
    assert load_run_config([*base, "env.action_chunk=8"]).model.family == "openvla_oft"
