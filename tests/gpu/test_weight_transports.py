"""GPU weight transports (rollout.weight_transport): a learner actor pushes to a vLLM engine inside a
RolloutWorker actor over CUDA IPC (both on one GPU, vLLM asleep while the learner trains) and over
NCCL (two GPUs). After each push the engine's greedy actions equal the learner's model and the
weights version advanced. Also times a ~100M-parameter decoder's sync (seconds, GB/s), as
bench/engines.py does. Skipped without CUDA; the NCCL cases need two GPUs (NCCL does not put two
ranks of one communicator on one GPU)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
vllm = pytest.importorskip("vllm", reason="needs vLLM: pip install 'vlarl[vllm]'")

import ray  # noqa: E402

from vlarl.config import load_config  # noqa: E402
from vlarl.placement import Placement  # noqa: E402
from vlarl.trainer import prepare_model  # noqa: E402
from vlarl.workers.learner import LearnerActor  # noqa: E402
from vlarl.workers.rollout import RolloutWorker  # noqa: E402

N = 16
TASKS, INITS = [i % 4 for i in range(N)], list(range(500, 500 + N))
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a second GPU")
# Head size 32 (2 heads of 64): supported by every vLLM attention backend. vllm_memory_fraction is small so
# a colocated learner fits beside the engine.
BASE = ["env=toy", "model.tiny.heads=2", "cluster.device=cuda", "rollout.engine=vllm", f"rollout.num_envs={N}",
        "rollout.vllm_memory_fraction=0.25", "rollout.sync_bucket_mb=1", "algo.minibatch_size=64", "algo.epochs=2",
        "rollout.eval_every=0", "cluster.dashboard=false"]
DECODER_100M = ["model.tiny.hidden=768", "model.tiny.layers=12", "model.tiny.heads=12", "model.tiny.intermediate=3072",
                "rollout.sync_bucket_mb=64"]


def start(run: Path, transport: str, extra: list[str] = ()):
    """A one-rank learner and one vLLM rollout worker, on one GPU (cuda_ipc) or on two (nccl)."""
    colocate = transport == "cuda_ipc"
    cfg = load_config([*BASE, f"rollout.weight_transport={transport}", f"cluster.colocate={str(colocate).lower()}",
                       f"trainer.run_dir={run}", *extra])
    folder = prepare_model(cfg, run)
    plain = OmegaConf.to_container(cfg, resolve=True)
    pg = Placement(cfg)  # one GPU holding both (cuda_ipc), or one GPU each (nccl)
    worker = ray.remote(RolloutWorker).options(**pg.options("rollout", 0)).remote(plain, 0, folder, N)
    ray.get(worker.env_shape.remote())  # the engine has measured its GPU memory before the learner takes any
    learner = LearnerActor.options(**pg.options("learner", 0)).remote(plain, 0, 1, folder)
    ray.get(learner.setup.remote(*ray.get(learner.rendezvous_address.remote())))
    return cfg, folder, worker, learner, pg


def stop(worker, learner, pg) -> None:
    ray.get([worker.shutdown.remote(), learner.shutdown.remote()])
    ray.kill(worker)
    ray.kill(learner)
    pg.remove()


def observations():
    from vlarl.envs.toy import ToyEnv

    return ToyEnv(N).reset(np.arange(N) % 4, np.arange(N))


def engine_greedy(worker, obs) -> np.ndarray:
    return ray.get(worker.__ray_call__.remote(lambda w, o: w.engine.generate(o, 1.0, greedy=True).tokens, obs))


def learner_greedy(learner, folder: str, obs) -> np.ndarray:
    """Greedy tokens of the learner's current weights, by the hf engine on this process's GPU."""
    from vlarl.models.registry import load_model
    from vlarl.rollout.hf_engine import HFEngine

    state = ray.get(learner.full_state.remote())[0]
    model, tokenizer, action_tokenizer = load_model(folder)
    model.load_state_dict(state)
    return HFEngine(model, tokenizer, action_tokenizer, "cuda").generate(obs, 1.0, greedy=True).tokens


def agree(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


@pytest.mark.parametrize("transport", ["cuda_ipc", pytest.param("nccl", marks=TWO_GPUS)])
def test_push_updates_the_engine_to_the_learners_model(ray_local, tmp_path, transport):
    cfg, folder, worker, learner, pg = start(tmp_path, transport)
    try:
        obs = observations()
        assert ray.get(learner.push_weights.remote([worker], 1)) > 0
        before = engine_greedy(worker, obs)
        # Exact in fp32 on CPU (tests/integration/test_vllm_engine.py); GPU kernels may flip a near-tie.
        assert agree(before, learner_greedy(learner, folder, obs)) > 0.95

        batch = ray.get(worker.collect.remote(TASKS, INITS, list(range(N)), 1))
        assert batch.weights_version == 1
        ray.get(worker.sleep.remote())  # what the trainer does before the update; a no-op unless colocated
        for it in range(3):  # a few updates so the greedy actions move clearly
            metrics = ray.get(learner.update.remote(batch, it))
        assert metrics["rollout/logprob_abs_diff"] < 1e-2
        ray.get(learner.push_weights.remote([worker], 2))
        assert ray.get(worker.__ray_call__.remote(lambda w: w.weights_version)) == 2

        after = engine_greedy(worker, obs)
        assert agree(after, learner_greedy(learner, folder, obs)) > 0.95
        assert (after != before).any()  # the update moved the policy and the engine followed
        ray.get(learner.push_weights.remote([worker], 3))  # a second push over the same group / handles
        assert agree(engine_greedy(worker, obs), after) > 0.95
    finally:
        stop(worker, learner, pg)


@pytest.mark.parametrize("transport", ["cuda_ipc", pytest.param("nccl", marks=TWO_GPUS)])
def test_sync_throughput_of_a_100m_decoder(ray_local, tmp_path, transport):
    import time

    cfg, folder, worker, learner, pg = start(tmp_path, transport, DECODER_100M)
    try:
        ray.get(learner.push_weights.remote([worker], 1))  # warm-up: NCCL group, allocator
        times = []
        for version in (2, 3, 4):
            start_s = time.perf_counter()
            gb = ray.get(learner.push_weights.remote([worker], version))
            times.append(time.perf_counter() - start_s)
        seconds = float(np.median(times))
        print(f"\n{transport}: {gb:.3f} GB (whole model, decoder ~100M params) in {seconds:.3f} s = "
              f"{gb / seconds:.2f} GB/s, gather and LoRA merge included")
        assert ray.get(worker.__ray_call__.remote(lambda w: w.weights_version)) == 4
        assert gb > 0.4 and gb / seconds > 0.5  # far below the hardware; catches a fall back through host memory
    finally:
        stop(worker, learner, pg)
