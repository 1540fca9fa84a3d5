"""Learning in a short budget: greedy success on held-out toy episodes rises clearly.

The full benchmark (bench/learn_toy.py) runs 2,500 warm-start steps and 100 RL iterations; this CI
version runs the same pipeline shorter: behaviour cloning on scripted demonstrations, then PPO
iterations, with evaluation before anything, after the warm start and at the end.
"""

from __future__ import annotations

import json

import pytest

from vlarl.config import load_config
from vlarl.trainer import train

pytestmark = pytest.mark.integration


def test_greedy_success_rises(ray_local, tmp_path):
    cfg = load_config(["env=toy", f"trainer.run_dir={tmp_path}", "trainer.bc_warmup_steps=1500", "trainer.iterations=4",
                       "rollout.eval_every=4", "rollout.eval_episodes=256", "rollout.num_envs=64",
                       "algo.actor_lr=3e-4", "cluster.dashboard=false", "cluster.torch_threads=2"])
    final = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in rows if r["iteration"] == -1)
    initial = before["eval/initial_success_rate"]
    assert initial <= 0.30, f"the untrained policy should be near chance, got {initial}"
    assert before["bc/loss_last"] < 0.5 * before["bc/loss_first"]
    assert final["eval/success_rate"] >= initial + 0.10, (initial, before["eval/success_rate"], final["eval/success_rate"])
