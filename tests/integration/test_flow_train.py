"""The flow VLA through the same trainer loop: toy task (with action chunks) and one LIBERO iteration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlarl.config import load_config
from vlarl.eval import evaluate_checkpoint
from vlarl.trainer import train

from test_train import saved_state  # tests/integration is on sys.path (rootdir-relative imports)

pytestmark = pytest.mark.integration

SMALL = ["model=tiny_flow", "rollout.num_envs=16", "algo.minibatch_size=64", "algo.epochs=2", "cluster.dashboard=false",
         "model.tiny.hidden=32", "model.tiny.vision_hidden=32", "model.flow.expert_hidden=32"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("method", ["sde", "sde_all", "noise"])
def test_flow_ppo_on_toy_with_chunks_and_guard_rails(ray_local, tmp_path, method):
    """Warm start by flow matching, then 2 PPO iterations with 2-action chunks, a KL penalty to the
    initial policy and log-ratio clipping: every guard rail reports, the rollout engine and the learner
    agree on the chains' log-probs, and the expert's weights move."""
    cfg = load_config(["env=toy", f"trainer.run_dir={tmp_path}", "trainer.iterations=2", "rollout.eval_every=2",
                       "rollout.eval_episodes=16", "trainer.bc_warmup_steps=30", "trainer.bc_episodes=64",
                       "env.action_chunk=2", f"model.flow.method={method}", "algo.kl_coef=0.1",
                       "algo.log_ratio_clip=5", *SMALL])
    train(cfg)
    r = rows(tmp_path)
    before, iters = r[0], r[1:]
    assert before["iteration"] == -1 and before["bc/loss_last"] < before["bc/loss_first"]
    assert [x["iteration"] for x in iters] == [0, 1]
    for x in iters:
        for key in ("actor/pg_loss", "critic/vf_loss", "actor/kl_ref", "actor/log_ratio_clipfrac",
                    "actor/std_at_floor", "actor/entropy", "eval/success_rate" if x["iteration"] == 1 else "env/steps"):
            assert key in x and math.isfinite(x[key]), key
        # Stored chains rescored by the learner with the weights that sampled them: the same density.
        assert x["rollout/logprob_abs_diff"] < 1e-3
        # Chunks of 2 over a 10-step episode: at most 5 policy calls per episode.
        assert 0 < x["rollout/episode_length"] <= 5
    assert iters[1]["actor/kl_ref"] > 0  # the policy has left its starting point
    base = load_file(tmp_path / "base_model" / "model.safetensors")
    after = saved_state(tmp_path / "checkpoints" / "step_000002")[0]
    moved = lambda prefix: max((after[k] - base[k]).abs().max().item() for k in base if k.startswith(prefix))  # noqa: E731
    assert moved("expert.velocity_out") > 1e-4 and moved("vision") > 1e-4
    if method == "noise":
        assert moved("expert.noise_out") > 1e-6
        # The stand-alone evaluation command reads a flow checkpoint and runs its ODE greedily.
        summary = evaluate_checkpoint(str(tmp_path / "checkpoints" / "step_000002"), str(tmp_path / "eval_ckpt"),
                                      tasks="0-3", init_states="10000-10001", videos=1, overrides=["rollout.num_envs=8"])
        rep = summary["suites"]["toy"]
        assert rep["episodes"] == 8 and len(rep["episode_results"]) == 8 and 0 < rep["mean_length"] <= 5
        assert json.loads((tmp_path / "eval_ckpt" / "report.json").read_text())["success_rate"] == rep["success_rate"]
        assert len(rep["videos"]) == 1 and Path(rep["videos"][0]).stat().st_size > 0


def test_flow_one_libero_iteration(ray_local, tmp_path):
    pytest.importorskip("libero.libero", reason="LIBERO is installed by `bash launch/setup.sh dev,libero`")
    cfg = load_config([f"trainer.run_dir={tmp_path}", "trainer.iterations=1", "rollout.num_envs=2", "env.max_steps=20",
                       "rollout.eval_every=0", "algo.minibatch_size=16", "algo.epochs=1", *SMALL[4:], "model=tiny_flow",
                       "cluster.dashboard=false"])
    assert cfg.env.name == "libero_spatial"
    metrics = train(cfg)
    assert metrics["env/steps"] > 0 and math.isfinite(metrics["actor/pg_loss"])
    assert metrics["rollout/logprob_abs_diff"] < 1e-3
    state = saved_state(tmp_path / "checkpoints" / "step_000001")[0]
    assert any(k.startswith("expert.") for k in state)
    assert torch.isfinite(torch.cat([v.flatten().float() for v in state.values()])).all()
