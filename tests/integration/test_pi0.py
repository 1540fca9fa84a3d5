"""pi0, pi0.5 and SmolVLA checkpoints in LeRobot's layout through the whole loop: PPO (critic) and GRPO on the toy
task with Flow-SDE log-probs, and export back to the layout they came in. The folders are the tiny
random ones (vlarl.models.pi0.tiny); LeRobot folders store no tokenizer, so the tiny one is passed by path."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlarl.export import export
from vlarl.models.pi0.tiny import write_tiny_pi0, write_tiny_tokenizer
from vlarl.models.smolvla.tiny import write_tiny_smolvla
from vlarl.preflight import load_run_config
from vlarl.trainer import train

pytestmark = pytest.mark.integration

# The tiny folder executes 2 actions of its 10-step chunk per call, hence env.action_chunk=2. A dense reward
# (minus the action's size, tests' own function) so that a random policy's episodes differ and both
# algorithms have a gradient to follow.
SMALL = ["env=toy", "env.action_chunk=2", "reward=external", "reward.function=pi0_rewards:effort",
         "rollout.num_envs=16", "algo.minibatch_size=16", "algo.epochs=1",
         "rollout.eval_every=0", "cluster.dashboard=false", "trainer.iterations=2", "cluster.torch_threads=1"]


@pytest.fixture(autouse=True)
def dense_reward(tmp_path, monkeypatch):
    (tmp_path / "pi0_rewards.py").write_text("import numpy as np\n\n\ndef effort(episode):\n"
                                              "    return -0.1 * np.abs(episode.actions).sum(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture(scope="module", params=["pi0", "pi05", "smolvla"])
def folders(request, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "smolvla":
        model = write_tiny_smolvla(root / "lerobot", seed=0)
    else:
        model = write_tiny_pi0(root / "lerobot", "lerobot", seed=0, kind=request.param)
    return model, write_tiny_tokenizer(root / "tokenizer")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_two_iterations_and_export_in_the_source_layout(ray_local, folders, tmp_path, algo):
    base, tokenizer = folders
    run_dir = tmp_path / "run"
    extra = ["algo=grpo", "algo.group_size=4"] if algo == "grpo" else []
    if algo == "ppo" and json.loads((base / "config.json").read_text())["type"] == "smolvla":
        extra = ["model.lora_rank=2", "model.expert_lora_rank=3"]  # adapters of two ranks, merged for sync and export
    metrics = train(load_run_config([*SMALL, *extra, f"model.path={base}", f"model.tokenizer_path={tokenizer}",
                                     f"trainer.run_dir={run_dir}"]))
    assert len(rows(run_dir)) == 2 and np.isfinite(metrics["actor/pg_loss"])
    assert metrics["rollout/logprob_abs_diff"] < 1e-4  # learner's recomputed Flow-SDE log-probs = the rollout's

    out = export(run_dir / "best_return", tmp_path / "exported")
    source, exported = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert source.keys() == exported.keys()
    assert all(source[k].dtype == exported[k].dtype and source[k].shape == exported[k].shape for k in source)
    assert any(not torch.equal(source[k], exported[k]) for k in source)  # the update reached the weights
    for f in base.iterdir():  # config and normaliser statistics kept byte for byte
        if f.name not in ("model.safetensors", "value_head.safetensors"):
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.skipif(importlib.util.find_spec("libero") is None, reason="LIBERO: bash launch/setup.sh libero")
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_two_iterations_on_libero_with_agentview_and_wrist_cameras(ray_local, folders, tmp_path, algo):
    """Both LIBERO cameras reach the model side by side (the rollout worker's frame transform) and the
    learner re-scores them from the stored batch: the log-probs agree."""
    base, tokenizer = folders
    if algo == "grpo" and json.loads((base / "config.json").read_text())["type"] != "pi05":
        pytest.skip("GRPO on LIBERO runs for one family (pi0.5): the advantage does not depend on the family, "
                    "and every family runs GRPO on the toy task")
    run_dir = tmp_path / "run"
    extra = ["algo=grpo", "algo.group_size=2"] if algo == "grpo" else []
    metrics = train(load_run_config([*SMALL, *extra, "env=libero_spatial", "env.wrist_camera=true", "env.camera_size=64",
                                     "env.image_size=32", "env.max_steps=4", "rollout.num_envs=2",
                                     "algo.minibatch_size=4", f"model.path={base}",
                                     f"model.tokenizer_path={tokenizer}", f"trainer.run_dir={run_dir}"]))
    assert len(rows(run_dir)) == 2 and np.isfinite(metrics["actor/pg_loss"])
    assert metrics["rollout/logprob_abs_diff"] < 1e-4
