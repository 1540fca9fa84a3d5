"""RL from a weak start rises by more than a policy that did not learn could show.

Behaviour cloning on scripted demonstrations for 3,000 steps leaves the tiny token VLA at about 50 %
greedy success, where it has just begun to read the instruction (README, Learning from weak starts:
before about 2,500 steps it reaches a block of the wrong colour two times in three, as an
instruction-blind policy does). Then 32 PPO iterations with the weak-start benchmark's large-batch
settings (512 episodes, one 2048-step minibatch per epoch, actor_lr 1e-3), evaluating greedily on the
same 512 held-out episodes after the warm start and at the end. Greedy decoding is deterministic, so
a run whose policy did not change scores exactly what it scored before; the test asks for a rise of
more than two standard errors of the difference of two 512-episode evaluations, the line below which
the weak-start benchmark calls a gain noise (measured earlier: 40.6 % -> 51.0 %, a rise of 3.3 standard
errors; on a fresh install on 2026-12-04: 71.9 % -> 82.6 %, 4.1 standard errors, so the warm start is
weaker than the demonstrator's 90 % but not always near 50 %; the bound below allows 75 %).
"""

from __future__ import annotations

import json
import math

import pytest

from vlarl.config import load_config
from vlarl.trainer import train

pytestmark = pytest.mark.integration

EPISODES = 512


def test_greedy_success_rises_from_a_weak_start(ray_local, tmp_path):
    cfg = load_config(["env=toy", f"trainer.run_dir={tmp_path}", "trainer.bc_warmup_steps=3000", "trainer.iterations=32",
                       "rollout.eval_every=32", f"rollout.eval_episodes={EPISODES}", "rollout.eval_videos=0",
                       "rollout.num_envs=512", "algo.minibatch_size=2048", "algo.actor_lr=1e-3",
                       "cluster.dashboard=false", "cluster.torch_threads=2", "trainer.save_every=32"])
    final = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in rows if r["iteration"] == -1)
    initial, warm, end = before["eval/initial_success_rate"], before["eval/success_rate"], final["eval/success_rate"]
    assert initial <= 0.30, f"the untrained policy should be near chance, got {initial}"
    assert warm <= 0.75, f"3,000 warm-start steps should leave a weak policy, got {warm}"
    stderr = math.sqrt((warm * (1 - warm) + end * (1 - end)) / EPISODES)
    assert end - warm > 2 * stderr, (f"greedy success {warm:.3f} after the warm start, {end:.3f} after 32 PPO "
                                     f"iterations: a rise of {end - warm:+.3f} is within 2 standard errors "
                                     f"({2 * stderr:.3f})")
