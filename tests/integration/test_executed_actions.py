"""Actions the environment never ran do not move the policy.

A chunk's actions after the step that ended its episode (and those past env.replan_steps) had no
effect on the return, so their log-probs would only add noise to the policy gradient. The learner
leaves them out: a batch whose never-executed actions are replaced by other tokens takes exactly the
same step, while the same batch with every action counted (as before the batch recorded what ran)
takes a different one.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import ray
from omegaconf import OmegaConf

from vlarl.config import load_config
from vlarl.envs import make_env
from vlarl.models.registry import build_tiny_model, load_model, save_model
from vlarl.workers.learner import LearnerActor

from test_learner_ranks import mixed_batch  # tests/integration is on sys.path (rootdir-relative imports)

pytestmark = pytest.mark.integration

CHUNK = 2


def updated_state(plain: dict, folder: str, batch) -> dict:
    """The full model state after one update of a fresh one-rank learner on `batch`."""
    learner = LearnerActor.options(num_cpus=1).remote(plain, 0, 1, folder)
    try:
        addr, port = ray.get(learner.rendezvous_address.remote())
        ray.get(learner.setup.remote(addr, port))
        ray.get(learner.update.remote(batch, 0))
        return ray.get(learner.full_state.remote())[0]
    finally:
        ray.get(learner.shutdown.remote(), timeout=60)
        ray.kill(learner)


def test_actions_never_executed_leave_the_update_unchanged(ray_local, tmp_path):
    cfg = load_config(["env=toy", f"env.action_chunk={CHUNK}", f"trainer.run_dir={tmp_path}", "rollout.num_envs=32",
                       "algo.epochs=2", "algo.minibatch_size=32", "rollout.eval_every=0", "cluster.dashboard=false"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    folder = str(tmp_path / "model")
    save_model(folder, build_tiny_model(cfg.model, cfg.env.image_size, make_env(cfg.env, 1, 0).instructions(), 0, CHUNK))

    batch = mixed_batch(plain, folder, 32)
    real = batch.mask
    short = real & (batch.executed < CHUNK)
    assert short.any(), "no episode ended inside a chunk"
    assert (batch.executed[real] >= 1).all() and not batch.executed[~real].any()

    # The second action's tokens of every call that ran only one action, moved to other bins.
    altered = copy.deepcopy(batch)
    first = load_model(folder, cfg.model).action_tokenizer.first_bin_id  # token id of bin 0
    altered.action_tokens[short, 7:] = first + (batch.action_tokens[short, 7:] - first + 128) % 256
    assert (altered.action_tokens != batch.action_tokens).any()
    counted = copy.deepcopy(batch)
    counted.executed = None

    before = load_model(folder, cfg.model).model.state_dict()
    after, after_altered, after_counted = (updated_state(plain, folder, b) for b in (batch, altered, counted))
    moved = max((after[k].float() - before[k].float()).abs().max().item() for k in before)
    same = max((after[k].float() - after_altered[k].float()).abs().max().item() for k in after)
    other = max((after[k].float() - after_counted[k].float()).abs().max().item() for k in after)
    assert moved > 1e-4, f"the update did not move the weights (max change {moved})"
    assert same < 1e-6, f"never-executed tokens changed the update by {same:.3g} (update {moved:.3g})"
    assert other > 1e-5, f"counting every action changed nothing ({other:.3g}): the test shows nothing"
