"""OpenVLA-OFT folders through the whole system: PPO with LoRA on the toy task and on LIBERO with
chunked execution, for the discrete and the L1 head, and export back to the OFT layout. The folders
are tiny random ones in the upstream layout (vlarl.models.openvla_oft.tiny)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlarl.config import load_config
from vlarl.export import export
from vlarl.models.openvla_oft.tiny import write_tiny_oft
from vlarl.models.registry import load_model
from vlarl.preflight import load_run_config
from vlarl.rollout.flow_engine import make_engine
from vlarl.trainer import train

pytestmark = pytest.mark.integration

SMALL = ["model=openvla_oft", "model.unnorm_key=libero_spatial_no_noops", "rollout.num_envs=8",
         "algo.minibatch_size=16", "algo.epochs=1", "rollout.eval_every=0", "cluster.dashboard=false",
         "trainer.iterations=2", "model.lora_rank=4", "cluster.torch_threads=1"]
TOY = ["env=toy", "env.num_blocks=2", "env.success_radius=0.12", "env.action_chunk=4", "model.oft.chunk=4",
       "model.oft.num_images=1"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("oft_bases")
    bases = {head: write_tiny_oft(root / head, head, seed=0) for head in ("discrete", "l1")}
    bases["l1_film"] = write_tiny_oft(root / "l1_film", "l1", seed=0, film=True)  # a FiLM fine-tune's layout
    return bases


def iterations(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("head", ["discrete", "l1_film"])  # (the plain L1 head: on LIBERO below)
def test_rl_on_the_toy_task_and_export_round_trip(ray_local, bases, head, tmp_path):
    base = bases[head]
    run_dir = tmp_path / "run"
    metrics = train(load_run_config([*SMALL, *TOY, f"model.path={base}", f"trainer.run_dir={run_dir}"]))
    assert len(iterations(run_dir)) == 2 and np.isfinite(metrics["actor/pg_loss"])
    assert metrics["rollout/logprob_abs_diff"] < 1e-4  # the learner rescoring the engine's chunks
    if head == "l1_film":
        assert "actor/entropy" in metrics

    out = export(run_dir / "best_return", tmp_path / "exported")
    names = sorted(p.name for p in base.glob("*--*checkpoint.pt"))
    assert sorted(p.name for p in out.glob("*--*checkpoint.pt")) == names
    for name in names:  # DDP state dicts; FiLM's backbone file is saved from inside the DDP module
        keys = torch.load(out / name, weights_only=True)
        prefix = "vision_backbone." if name.startswith("vision_backbone--") else "module."
        assert keys and all(k.startswith(prefix) for k in keys), name
    assert json.loads((out / "vlarl_oft.json").read_text())["chunk"] == 4
    # The exported folder (no model.oft settings: it describes itself) acts like the trained checkpoint.
    from vlarl.eval import load_checkpoint

    _, state, _ = load_checkpoint(run_dir / "best_return")
    trained = load_model(base, load_config(["env=toy", *SMALL[:2], *TOY[-2:], "model.oft.chunk=4"]).model)
    trained.model.load_state_dict({k: v.to(torch.bfloat16).float() if not k.startswith("action_log_std") else v
                                   for k, v in state.items()})
    exported = load_model(out, load_config(["env=toy", *SMALL[:2], "model.oft.num_images=1"]).model)
    assert exported.model.spec == trained.model.spec and exported.model.spec.film == (head == "l1_film")
    if head == "l1_film":  # the export carries the trained FiLM layers under upstream's keys
        (backbone,) = out.glob("vision_backbone--*checkpoint.pt")
        saved = torch.load(backbone, weights_only=True)
        film = {k: v for k, v in state.items() if k.startswith("film.")}
        assert film
        for key, value in film.items():
            _, tower, layer, rest = key.split(".", 3)
            torch.testing.assert_close(saved[f"vision_backbone.{tower}.blocks.{layer}.{rest}"].float(), value.float())
    from vlarl.envs.toy import ToyEnv

    obs = ToyEnv(4).reset([0, 1, 2, 3], [0, 1, 2, 3])
    a = make_engine(*trained, "cpu").generate(obs, 1.0, greedy=True)
    b = make_engine(*exported, "cpu").generate(obs, 1.0, greedy=True)
    np.testing.assert_allclose(a.actions, b.actions, atol=1e-2)  # bf16 export of the merged weights


@pytest.mark.skipif(importlib.util.find_spec("libero") is None, reason="LIBERO: bash launch/setup.sh libero")
@pytest.mark.parametrize("head", ["discrete", "l1"])
def test_rl_on_libero_with_two_cameras_proprio_and_8_step_chunks(ray_local, bases, head, tmp_path):
    metrics = train(load_run_config([*SMALL, "env=libero_spatial", f"model.path={bases[head]}",
                                     f"trainer.run_dir={tmp_path}", "rollout.num_envs=2", "env.max_steps=16",
                                     "env.action_chunk=8", "env.wrist_camera=true", "env.invert_gripper=true"]))
    rows = iterations(tmp_path)
    assert len(rows) == 2 and np.isfinite(metrics["actor/pg_loss"])
    assert metrics["rollout/logprob_abs_diff"] < 1e-4
    assert all(r["rollout/episode_length"] <= 2 for r in rows)  # 16 env steps = 2 policy calls of 8
