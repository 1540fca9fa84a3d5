"""One learner rank, two FSDP2 ranks (gloo), and two ranks accumulating gradients over micro-batches
take the same step on the same batch.

The learner divides losses by global element counts and multiplies by the world size because FSDP
averages gradients; if that bookkeeping (or the per-rank slicing of minibatches, the split into
micro-batches, or the sharded scoring of old log-probs) were off, the groups would end at different
weights.
"""

from __future__ import annotations

import pytest
import ray
from omegaconf import OmegaConf

from vlarl.config import load_config
from vlarl.envs import make_env
from vlarl.models.openvla.tiny import write_tiny_openvla
from vlarl.models.registry import build_tiny_model, load_model, save_model
from vlarl.workers.learner import LearnerActor
from vlarl.workers.rollout import RolloutWorker

pytestmark = pytest.mark.integration


def setup_group(learners: list) -> None:
    """Form the process group and shard the model exactly as vlarl.trainer.start_workers does."""
    addr, port = ray.get(learners[0].rendezvous_address.remote())
    ray.get([l.setup.remote(addr, port) for l in learners])


def full_model_state(learners: list) -> dict:
    """Collective on every rank; rank 0 holds the full model state dict."""
    return ray.get([l.full_state.remote() for l in learners])[0][0]


def stop(learners: list) -> None:
    try:
        ray.get([l.shutdown.remote() for l in learners], timeout=60)
    finally:
        for l in learners:
            ray.kill(l)


def mixed_batch(plain: dict, folder: str, n: int):
    """A batch of n episodes, some succeeding and some not. A batch without a single success has all-zero
    rewards, and with the value head's zero init all-zero advantages and value targets: no gradient, and
    any two learners would "agree". Sampling is seeded by the iteration, so try a few."""
    rollout = ray.remote(RolloutWorker).options(num_cpus=1).remote(plain, 0, folder, n)
    try:
        for iteration in range(10):
            batch = ray.get(rollout.collect.remote([i % 4 for i in range(n)], list(range(n)), list(range(n)), iteration))
            if batch.success.any() and not batch.success.all():
                return batch
    finally:
        ray.kill(rollout)
    raise AssertionError("no batch with mixed outcomes in 10 tries")


def model_folder(family: str, tmp_path) -> tuple[str, list[str]]:
    """A model folder of the family and the settings that load it."""
    folder = tmp_path / "model"
    if family == "openvla":  # full-weight training of the decoder and projector, towers frozen
        write_tiny_openvla(folder, seed=0)
        return str(folder), ["model=openvla", "model.unnorm_key=libero_spatial_no_noops", "model.lora_rank=0",
                             f"model.path={folder}"]
    # Chunks of 2: calls whose episode ended after their first action leave the second out of the loss,
    # so the global counts of executed tokens that every rank divides by are checked too.
    # env.max_steps=20: still 10 calls per episode, enough steps for several minibatches.
    cfg = load_config(["env=toy", "env.action_chunk=2"])
    save_model(folder, build_tiny_model(cfg.model, cfg.env.image_size, make_env(cfg.env, 1, 0).instructions(), 0, 2))
    return str(folder), ["env.action_chunk=2", "env.max_steps=20"]


@pytest.mark.parametrize("family", ["tiny_token", "openvla"])
def test_one_rank_and_two_ranks_take_the_same_step(ray_local, tmp_path, family):
    folder, settings = model_folder(family, tmp_path)
    cfg = load_config(["env=toy", f"trainer.run_dir={tmp_path}", "rollout.num_envs=16", "algo.epochs=1",
                       "algo.minibatch_size=32", "rollout.eval_every=0", "cluster.dashboard=false", *settings])
    plain = OmegaConf.to_container(cfg, resolve=True)

    batch = mixed_batch(plain, folder, 16)
    if family == "tiny_token":
        assert (batch.executed[batch.mask] < 2).any(), "no call ran only part of its chunk"
    steps = int(batch.lengths.sum())
    assert steps >= 3 * 32, f"only {steps} steps: too few for several minibatches of 32"
    initial = load_model(folder, cfg.model).model.state_dict()

    results = {}
    # (ranks, algo.microbatch_size): 16 steps per rank and minibatch in pieces of 5 -> 4 pieces of 4.
    # Micro-batching is family-independent bookkeeping: the tiny model checks it, OpenVLA its sharding.
    groups = ((1, 0), (2, 0), (2, 5)) if family == "tiny_token" else ((1, 0), (2, 0))
    for world_size, micro in groups:
        variant = OmegaConf.to_container(OmegaConf.merge(plain, {"algo": {"microbatch_size": micro}}))
        learners = [LearnerActor.options(num_cpus=1).remote(variant, r, world_size, folder)
                    for r in range(world_size)]
        try:
            setup_group(learners)
            metrics = ray.get([l.update.remote(batch, 0) for l in learners])
            results[world_size, micro] = (full_model_state(learners), metrics)
        finally:
            stop(learners)

    (after1, m1), (after2, m2) = results[1, 0], results[2, 0]
    after_micro, m_micro = results.get((2, 5), results[2, 0])
    assert set(initial) == set(after1) == set(after2) and initial
    moved = max((after1[k].float() - initial[k].float()).abs().max().item() for k in initial)
    assert moved > 1e-4, f"the update did not move the weights (max change {moved})"
    policy_moved = max((after1[k] - initial[k]).abs().max().item() for k in initial if not k.startswith("value_head"))
    assert policy_moved > 1e-4, f"only the value head moved (policy max change {policy_moved})"
    diffs = {k: (after1[k].float() - after2[k].float()).abs().max().item() for k in after1}
    worst = max(diffs, key=diffs.get)
    # Measured here: 3e-6 at most (k_proj.bias, whose true gradient is zero, so Adam scales
    # rounding noise up), against a largest update of 4e-3.
    assert diffs[worst] < 1e-5, f"1 rank vs 2 ranks differ most in {worst}: {diffs[worst]:.3g} (update {moved:.3g})"
    micro_diffs = {k: (after1[k].float() - after_micro[k].float()).abs().max().item() for k in after1}
    worst = max(micro_diffs, key=micro_diffs.get)
    assert micro_diffs[worst] < 1e-5, (f"1 rank vs 2 ranks in micro-batches of 5 differ most in {worst}: "
                                       f"{micro_diffs[worst]:.3g} (update {moved:.3g})")
    assert abs(m_micro[0]["actor/pg_loss"] - m2[0]["actor/pg_loss"]) < 1e-5  # metrics are per-step means either way
    # Both ranks scored the same batch: the kept-step count is global, not per rank.
    assert m1[0]["actor/kept_steps"] == m2[0]["actor/kept_steps"] == m2[1]["actor/kept_steps"] == steps
