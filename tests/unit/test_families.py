"""One interface test suite, run over every model family (vlarl/models/family.py).

Each family writes a tiny folder in its own layout; the same tests then load it through the registry
(no family named), roll out with the PyTorch engine, score the rollout with the learner's forward,
apply LoRA, and save and reload it. A new family adds one line to WRITERS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlarl.config import load_config
from vlarl.data.spec import ACTION_DIM
from vlarl.envs.toy import ToyEnv, ToySpec
from vlarl.models.lora import apply_lora, merge_lora_state_dict
from vlarl.models.registry import FAMILIES, build_tiny_model, family_of_folder, load_model, save_model
from vlarl.models.flow_policy import pack_chains
from vlarl.rollout.flow_engine import ENGINES, make_engine

torch.set_num_threads(1)


# Each writer makes a tiny folder of its family in `out` and returns the settings that load it.
def write_tiny(preset: str, image_size: int = 16):
    def write(out: Path) -> list[str]:
        cfg = load_config(["env=toy", f"model={preset}"])
        save_model(out, build_tiny_model(cfg.model, image_size, ToyEnv(1).instructions(), seed=3))
        return []
    return write


def write_openvla(out: Path) -> list[str]:
    from vlarl.models.openvla.tiny import write_tiny_openvla

    write_tiny_openvla(out, seed=3)
    return ["model.unnorm_key=libero_spatial_no_noops"]  # the tiny folder holds two datasets


def write_pi0(out: Path) -> list[str]:
    from vlarl.models.pi0.tiny import write_tiny_pi0, write_tiny_tokenizer

    write_tiny_pi0(out, "lerobot", seed=3)
    return [f"model.tokenizer_path={write_tiny_tokenizer(out.parent / 'tokenizer')}"]  # LeRobot folders hold none


def write_pi05(out: Path) -> list[str]:
    from vlarl.models.pi0.tiny import write_tiny_tokenizer
    from vlarl.models.pi05.tiny import write_tiny_pi05

    write_tiny_pi05(out, "lerobot", seed=3)
    return [f"model.tokenizer_path={write_tiny_tokenizer(out.parent / 'tokenizer')}"]


def write_smolvla(out: Path) -> list[str]:
    from vlarl.models.pi0.tiny import write_tiny_tokenizer
    from vlarl.models.smolvla.tiny import write_tiny_smolvla

    write_tiny_smolvla(out, seed=3)
    return [f"model.tokenizer_path={write_tiny_tokenizer(out.parent / 'tokenizer')}"]


def write_oft(head: str):
    def write(out: Path) -> list[str]:
        from vlarl.models.openvla_oft.tiny import write_tiny_oft

        write_tiny_oft(out, head, seed=3)
        return ["model.oft.num_images=1", "model.oft.chunk=2"]  # the toy env renders one camera
    return write


# "family:variant" keys test a family's other layouts (OFT's L1-head folders).
WRITERS = {"tiny_token": write_tiny("tiny_token"), "tiny_flow": write_tiny("tiny_flow"), "openvla": write_openvla,
           "openvla_oft": write_oft("discrete"), "openvla_oft:l1": write_oft("l1"),
           "pi0": write_pi0, "pi05": write_pi05, "smolvla": write_smolvla}
SETTINGS: dict[str, list[str]] = {}  # family -> the settings its folder needs (filled by the fixture)


def test_every_family_is_tested():
    assert {k.split(":")[0] for k in WRITERS} == set(FAMILIES)


def model_cfg(name: str):
    return load_config(["env=toy", *SETTINGS.get(name, [])]).model


@pytest.fixture(scope="module", params=sorted(WRITERS))
def family_folder(request, tmp_path_factory):
    key = request.param
    folder = tmp_path_factory.mktemp(key.replace(":", "_")) / "model"
    name = key.split(":")[0]
    SETTINGS[name] = WRITERS[key](folder)
    return name, folder


def observations(model, n: int, seed: int = 0) -> dict:
    env = ToyEnv(n, ToySpec(image_size=model.image_size), seed)
    return env.reset(np.arange(n) % env.num_tasks, np.arange(n) + 7 * seed)


def scored_actions(out) -> torch.Tensor:
    """What the learner scores for an engine output: token ids, Gaussian draws, or packed flow chains."""
    record = out.record()
    if "sampled_actions" in record:
        return torch.as_tensor(record["sampled_actions"])
    if "chains" in record:
        return pack_chains(torch.from_numpy(record["chains"]), torch.from_numpy(record["sde_steps"]))
    return torch.as_tensor(record["action_tokens"])


def test_detects_its_own_folder_and_obeys_the_override(family_folder):
    name, folder = family_folder
    assert family_of_folder(folder).name == name
    assert family_of_folder(folder, name).name == name


def test_loaded_model_has_the_interface(family_folder):
    name, folder = family_folder
    model, tokenizer, action_tokenizer = load_model(folder, model_cfg(name))
    assert model.action_kind in ENGINES
    assert model.config.action_dim % ACTION_DIM == 0 and isinstance(model.image_size, int)
    units = model.fsdp_units()
    assert units and all(isinstance(u, torch.nn.Module) for u in units)
    names = [n for n, _ in model.language_model.named_modules()]
    for target in model.lora_targets:
        assert any(n.endswith(target) for n in names), f"{name}: LoRA target {target} matches no decoder module"
    ids = model.encode_instruction(tokenizer, "put the red block on the plate")
    assert ids and all(isinstance(i, int) for i in ids)
    if model.action_kind in ("token", "parallel"):
        assert 0 <= model.first_bin_id and model.first_bin_id + 256 <= model.vocab_size


def test_rollout_logprobs_match_the_learner_forward(family_folder):
    name, folder = family_folder
    model, tokenizer, action_tokenizer = load_model(folder, model_cfg(name))
    engine = make_engine(model, tokenizer, action_tokenizer, "cpu")
    obs = observations(model, 3)
    out = engine.generate(obs, temperature=1.3, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    assert out.actions.shape == (3, model.config.action_dim) and np.isfinite(out.actions).all()
    with torch.no_grad():
        logprobs = model(*engine.model_inputs(obs), scored_actions(out), temperature=1.3)[0]
    np.testing.assert_allclose(logprobs.numpy(), out.logprobs, atol=1e-4, rtol=0)


def test_padded_batch_scores_each_row_as_alone(family_folder):
    name, folder = family_folder
    model, tokenizer, action_tokenizer = load_model(folder, model_cfg(name))
    engine = make_engine(model, tokenizer, action_tokenizer, "cpu")
    obs = observations(model, 2)
    obs["instruction"] = ["move to the red block", "red"]  # different lengths: row 1 is left-padded
    out = engine.generate(obs, temperature=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = model(*engine.model_inputs(obs), scored_actions(out), temperature=1.0)
        for i in range(2):
            row = {k: v[i:i + 1] for k, v in obs.items()}
            alone = model(*engine.model_inputs(row), scored_actions(out)[i:i + 1], temperature=1.0)
            np.testing.assert_allclose(both[0][i:i + 1].numpy(), alone[0].numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(both[2][i:i + 1].numpy(), alone[2].numpy(), atol=1e-5, rtol=0)


def test_save_and_reload_keep_weights_and_greedy_actions(family_folder, tmp_path):
    name, folder = family_folder
    loaded = load_model(folder, model_cfg(name))
    engine = make_engine(*loaded, "cpu")
    obs = observations(loaded.model, 2, seed=1)
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731  (a flow policy's ODE starts from noise)
    before = engine.generate(obs, temperature=1.0, greedy=True, generator=seed())
    save_model(tmp_path / "again", loaded)
    again = load_model(tmp_path / "again", model_cfg(name))
    assert again.family.name == name
    a, b = loaded.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    after = make_engine(*again, "cpu").generate(obs, temperature=1.0, greedy=True, generator=seed())
    np.testing.assert_array_equal(before.actions, after.actions)


def test_lora_trains_adapters_and_merges_back_to_the_base_names(family_folder):
    name, folder = family_folder
    model = load_model(folder, model_cfg(name)).model
    base_keys = set(model.state_dict())
    model = apply_lora(model, rank=2, alpha=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert all("lora_" in n or n.startswith(tuple(model.lora_trainable)) for n in trainable)
    assert set(merge_lora_state_dict(model.state_dict(), 2.0)) == base_keys


def test_a_folder_that_does_not_fit_the_run_stops_at_start_with_one_line(tmp_path):
    from vlarl.config import ConfigError
    from vlarl.preflight import load_run_config

    folder = tmp_path / "openvla"
    write_openvla(folder)
    cases = {"model.unnorm_key": [],  # two datasets in norm_stats: which one?
             "bridge_orig": ["model.unnorm_key=nonesuch"],  # names the ones there are
             "rollout.engine=hf": ["model.unnorm_key=bridge_orig", "rollout.engine=vllm", "model.family=tiny_flow"]}
    for words, extra in cases.items():
        with pytest.raises(ConfigError) as err:
            load_run_config(["env=toy", f"model.path={folder}", *extra])
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert load_run_config(["env=toy", f"model.path={folder}", "model.unnorm_key=bridge_orig"]).model.path
    pi0 = tmp_path / "pi0"
    settings = write_pi0(pi0)  # executes 2 actions of its chunk per call
    with pytest.raises(ConfigError, match="emits 2 action.*set env.action_chunk=2"):
        load_run_config(["env=toy", f"model.path={pi0}", *settings])
    assert load_run_config(["env=toy", "env.action_chunk=2", f"model.path={pi0}", *settings]).model.path


def test_loading_twice_gives_the_same_weights(family_folder):
    """Learner ranks and rollout workers each load the folder: anything created at load (e.g. a fresh
    value head) must come out the same in every process."""
    name, folder = family_folder
    a, b = load_model(folder, model_cfg(name)).model.state_dict(), load_model(folder, model_cfg(name)).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_expert_settings_only_where_the_family_has_an_action_expert(tmp_path):
    from vlarl.config import ConfigError
    from vlarl.preflight import load_run_config

    expert_lora = ["model.lora_rank=2", "model.expert_lora_rank=3"]
    for extra, words in ((["model.value_from=expert"], "model.value_from=expert is for pi0, pi05 and smolvla"),
                         (expert_lora, "model.expert_lora_rank is for pi0, pi05 and smolvla"),
                         (["model.expert_lora_rank=3"], "set model.lora_rank > 0 too")):
        with pytest.raises(ConfigError, match=words):
            load_run_config(["env=toy", *extra])
    folder = tmp_path / "openvla"
    write_openvla(folder)
    openvla = ["env=toy", f"model.path={folder}", "model.unnorm_key=bridge_orig"]
    with pytest.raises(ConfigError, match="not available for openvla models; choose model.value_from=prefix"):
        load_run_config([*openvla, "model.value_from=expert"])
    with pytest.raises(ConfigError, match="holds a openvla model: set model.expert_lora_rank=0"):
        load_run_config([*openvla, *expert_lora])
    pi0 = tmp_path / "pi0"
    settings = write_pi0(pi0)
    cfg = load_run_config(["env=toy", "env.action_chunk=2", f"model.path={pi0}", "model.value_from=expert",
                           *expert_lora, *settings])
    assert cfg.model.value_from == "expert" and cfg.model.expert_lora_rank == 3


def test_expert_lora_adapts_the_action_expert_at_its_own_rank(family_folder):
    name, folder = family_folder
    if not FAMILIES[name].action_expert:
        pytest.skip(f"{name} has no action expert")
    model = load_model(folder, model_cfg(name)).model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model = apply_lora(model, rank=2, alpha=4, expert_rank=3)
    expert = model.expert_name + "."
    ranks = {n.startswith(expert): p.shape[0] for n, p in model.named_parameters() if ".lora_A." in n}
    assert ranks == {False: 2, True: 3}  # decoder adapters rank 2, expert adapters rank 3
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable if n.startswith(expert))
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            torch.nn.init.normal_(p)
    state = model.state_dict()
    merged = merge_lora_state_dict(state, alpha=4)
    assert merged.keys() == base.keys()
    a_name = next(n for n in state if n.startswith(expert) and ".lora_A." in n)
    prefix = a_name.split(".lora_A.")[0]
    expected = base[prefix + ".weight"] + 4 / 3 * state[prefix + ".lora_B.default.weight"] @ state[a_name]
    assert torch.allclose(merged[prefix + ".weight"], expected, atol=1e-6)


def test_attention_kernels_score_alike(family_folder):
    """model.attn_implementation reaches every transformers model inside the policy, and eager and
    SDPA attention give the learner the same log-probs and values (float32)."""
    from vlarl.models.attention import attention_of, set_attention

    name, folder = family_folder
    model, tokenizer, action_tokenizer = load_model(folder, model_cfg(name))
    engine = make_engine(model, tokenizer, action_tokenizer, "cpu")
    obs = observations(model, 2)
    obs["instruction"] = ["move to the red block", "red"]  # padding: the mask paths differ per kernel
    out = engine.generate(obs, temperature=1.0, generator=torch.Generator().manual_seed(0))
    scores = {}
    for kernel in ("eager", "sdpa"):
        assert set_attention(model, kernel, "cpu") == kernel and attention_of(model) == {kernel}
        with torch.no_grad():
            scores[kernel] = model(*engine.model_inputs(obs), scored_actions(out), temperature=1.0)
    for i in (0, 2):  # log-probs, values
        np.testing.assert_allclose(scores["eager"][i].numpy(), scores["sdpa"][i].numpy(), atol=1e-5, rtol=0)
    assert set_attention(model, "auto", "cpu") == "sdpa"  # no FlashAttention-2 on a CPU
    with pytest.raises(ValueError, match="flash_attention_2 cannot be used here"):
        set_attention(model, "flash_attention_2", "cpu")
