"""GPU paths: the hf engine and a 1-rank NCCL learner on CUDA. Skipped on machines without CUDA."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from vlarl.config import load_config
from vlarl.trainer import prepare_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    run = tmp_path_factory.mktemp("gpu")
    cfg = load_config(["env=toy", "cluster.device=cuda", "rollout.num_envs=16", "algo.minibatch_size=32", "algo.epochs=1",
                       f"trainer.run_dir={run}"])
    return cfg, prepare_model(cfg, Path(run))


def test_engine_on_cuda_matches_cpu_greedy(setup):
    from vlarl.envs.toy import ToyEnv
    from vlarl.models.registry import load_model
    from vlarl.rollout.hf_engine import HFEngine

    cfg, folder = setup
    env = ToyEnv(16)
    obs = env.reset(np.arange(16) % 4, np.arange(16))
    outs = []
    for device in ("cpu", "cuda"):
        model, tok, at = load_model(folder)
        outs.append(HFEngine(model, tok, at, device).generate(obs, 1.0, greedy=True))
    assert (outs[0].tokens == outs[1].tokens).mean() > 0.95  # TF32/kernels may flip a near-tie
    np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-3)


def test_nccl_learner_updates_on_cuda(setup):
    from vlarl.workers.learner import LearnerWorker, free_port
    from vlarl.workers.rollout import RolloutWorker

    cfg, folder = setup
    plain = OmegaConf.to_container(cfg)
    batch = RolloutWorker(plain, 0, folder, 16).collect(list(np.arange(16) % 4), list(range(16)), list(range(16)), 0)
    learner = LearnerWorker(plain, 0, 1, folder)
    learner.setup("127.0.0.1", free_port())
    before = {k: v.clone() for k, v in learner.full_state()[0].items()}
    metrics = learner.update(batch, 0)
    after = learner.full_state()[0]
    assert np.isfinite(metrics["actor/pg_loss"])
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-6

    # A sharded checkpoint from CUDA shards (staged to host, written in the background) holds
    # exactly the trained weights, and loading it puts them back into the CUDA shards.
    from vlarl.workers.checkpoint import STATE_DIR, CheckpointActor, read_model_state

    trained = {k: v.clone() for k, v in after.items()}
    keeper = CheckpointActor(str(Path(cfg.trainer.run_dir) / "sharded"))
    state_dir = keeper.begin_shards(1)
    learner.save_shards(state_dir)
    path = keeper.commit(1, state_dir, 0.0, {"iteration": 1}, {}, learner.shards_written())
    on_disk = read_model_state(path)
    assert set(on_disk) == set(trained) and all(torch.equal(on_disk[k], trained[k]) for k in trained)
    learner.update(batch, 1)  # move the weights on, then load the checkpoint back
    learner.load_shards(str(Path(path) / STATE_DIR))
    restored = learner.full_state()[0]
    assert all(torch.equal(restored[k], trained[k]) for k in trained)
    learner.shutdown()
