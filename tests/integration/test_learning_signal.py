"""The learning signal lines up: the step limit ends episodes without a bootstrap, and from a uniform
start PPO and GRPO learn a one-state bandit and a two-step version of the toy task to > 95 %.

Bandit: one layout per task (2 tasks, 2 blocks on a 2 x 2 board), one policy step that can reach
anywhere (env.max_move=1), so success is one draw of the action bins landing on the named block:
about 5 % for the untrained (near-uniform) policy. Two-step: the same with half the reach, so the
first action must set up the second. Both are learned only if rewards, values, advantages and
log-probs line up per action token and per episode. Tasks are drawn uniformly
(trainer.curriculum_floor=0.5 with 2 tasks): the curriculum would otherwise send most episodes to
the task not yet solved, and the batch's success would understate the policy's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from vlarl.config import load_config
from vlarl.trainer import prepare_model, train
from vlarl.workers.rollout import RolloutWorker

pytestmark = pytest.mark.integration

BANDIT = ["env=toy", "env.max_steps=1", "env.max_move=1.0", "env.grid=2", "env.success_radius=0.24",
          "env.num_tasks=2", "env.num_blocks=2", "env.num_init_states=1", "rollout.num_envs=128",
          "rollout.eval_every=0", "algo.actor_lr=2e-3", "trainer.curriculum_floor=0.5", "cluster.dashboard=false",
          "cluster.torch_threads=1"]
TWO_STEP = [*BANDIT, "env.max_steps=2", "env.max_move=0.5", "algo.actor_lr=3e-3"]


def test_timeouts_mark_only_the_step_limit(tmp_path):
    cfg = load_config(["env=toy", "env.max_steps=3", f"trainer.run_dir={tmp_path}", "rollout.num_envs=64"])
    w = RolloutWorker(OmegaConf.to_container(cfg, resolve=True), 0, prepare_model(cfg, tmp_path), 64)
    b = w.collect(list(np.arange(64) % 4), list(range(64)), list(range(64)), 0)
    assert b.timeouts.any() and b.terminated.any(), "an untrained policy both times out and touches blocks"
    ends_at_limit = b.dones & ~b.terminated & (np.arange(b.mask.shape[1]) == 2)
    np.testing.assert_array_equal(b.timeouts, ends_at_limit)
    assert not (b.timeouts & b.terminated).any()
    assert b.no_bootstrap().sum() == b.dones.sum()  # every end here is the task's or the limit's


def sampled_success(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["rollout/success_rate"] for r in rows if "rollout/success_rate" in r]


@pytest.mark.parametrize("name,overrides,iterations", [
    ("bandit_ppo", [*BANDIT, "algo=ppo"], 40),
    ("two_step_ppo", [*TWO_STEP, "algo=ppo"], 80),
    ("bandit_grpo", [*BANDIT, "algo=grpo", "algo.dynamic_sampling=true"], 40),
])
def test_learned_from_a_uniform_start(ray_local, tmp_path, name, overrides, iterations):
    cfg = load_config([*overrides, f"trainer.iterations={iterations}", f"trainer.run_dir={tmp_path}"])
    train(cfg)
    curve = sampled_success(tmp_path)
    assert np.mean(curve[:3]) < 0.15, f"{name}: the untrained policy should rarely succeed, got {curve[:3]}"
    # The median of the last ten iterations: near 100 % a large step now and then costs one batch a
    # dip (two-step, seed 0: 0.59 at iteration 67 between 1.0 and 0.97) that the next update repairs.
    assert np.median(curve[-10:]) > 0.95, f"{name}: sampled success {curve}"
