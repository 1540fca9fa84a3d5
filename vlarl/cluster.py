"""Starting and stopping the Ray side of a job: the cluster, the rollout workers, GPU placement.

Shared by the training loop (vlarl/trainer.py) and checkpoint evaluation (vlarl/eval.py).
"""

from __future__ import annotations

import os

import numpy as np
import ray
from omegaconf import DictConfig, OmegaConf

from vlarl.workers.rollout import RolloutWorker


class SetupError(RuntimeError):
    """The run directory or the cluster cannot be used as asked; the message says what to do."""


def init_ray(cfg: DictConfig) -> None:
    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:  # an existing cluster, e.g. under `ray job submit`
        ray.init(address=address, log_to_driver=True)
        return
    c = cfg.cluster
    needed = c.num_rollout_workers * c.cpus_per_rollout_worker + c.num_learners * c.cpus_per_learner
    # address="local": always a fresh cluster, never silently joining one started by `ray start`.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(np.ceil(needed))), include_dashboard=c.dashboard,
             dashboard_host="127.0.0.1", log_to_driver=True)


def check_renderer(cfg: DictConfig) -> None:
    """LIBERO cameras need OpenGL (EGL or OSMesa); find out before any actor starts."""
    if cfg.env.name == "toy":
        return
    from vlarl.envs.libero import SimulatorError, render_backend

    try:
        render_backend(cfg.env.render)
    except SimulatorError as e:
        raise SetupError(str(e)) from None


def start_rollout_workers(cfg: DictConfig, model_folder: str, gpu_pairs=None) -> list:
    """cluster.num_rollout_workers RolloutWorker actors sharing rollout.num_envs environments; with
    `gpu_pairs` (colocated_gpus) worker i shares GPU i with learner rank i."""
    c = cfg.cluster
    per_worker = cfg.rollout.num_envs // c.num_rollout_workers
    plain = OmegaConf.to_container(cfg, resolve=True)
    gpu = int(c.device == "cuda")
    return [ray.remote(RolloutWorker).options(num_cpus=c.cpus_per_rollout_worker, max_restarts=3, max_task_retries=1,
                                              **gpu_share(gpu, gpu_pairs, i))
            .remote(plain, i, model_folder, per_worker) for i in range(c.num_rollout_workers)]


def colocated_gpus(cfg: DictConfig):
    """A placement group of one bundle per GPU, each holding one rollout worker and one learner rank."""
    from ray.util.placement_group import placement_group

    c = cfg.cluster
    bundle = {"GPU": 1, "CPU": c.cpus_per_rollout_worker + c.cpus_per_learner}
    pg = placement_group([bundle] * c.num_learners, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=120)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise SetupError(f"cluster.colocate=true needs {c.num_learners} bundle(s) of {bundle} and the Ray cluster "
                         "could not place them in 120 s; check `ray status` for free GPUs and CPUs.")
    return pg


def gpu_share(gpu: int, gpu_pairs, index: int) -> dict:
    """Ray options for actor `index`: a whole GPU, or half of bundle `index`'s GPU when colocated."""
    if gpu_pairs is None:
        return {"num_gpus": gpu}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"num_gpus": 0.5, "scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=gpu_pairs, placement_group_bundle_index=index)}


def release(closable: list, others: list = ()) -> None:
    """Let `closable` actors shut down (process groups, simulators, engines), then kill them all.
    Never raises: on the way out of a failure the original error is the one worth seeing."""
    try:
        ray.get([a.shutdown.remote() for a in closable], timeout=30)
    except Exception:  # a dead or stuck actor: killing it below frees it anyway
        pass
    for actor in [*closable, *others]:
        ray.kill(actor)
