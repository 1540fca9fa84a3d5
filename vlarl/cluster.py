"""Starting and stopping the Ray side of a job: the cluster, the rollout workers, GPU placement.

Shared by the training loop (vlarl/trainer.py) and checkpoint evaluation (vlarl/eval.py).
"""

from __future__ import annotations

import os

import ray
from omegaconf import DictConfig, OmegaConf

from vlarl.faults import SetupError
from vlarl.workers.learner import LearnerActor
from vlarl.workers.rollout import RolloutWorker


def init_ray(cfg: DictConfig) -> None:
    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:  # an existing cluster, e.g. under `ray job submit`
        ray.init(address=address, log_to_driver=True)
        return
    from vlarl.placement import local_resources

    c = cfg.cluster
    # address="local": always a fresh cluster, never silently joining one started by `ray start`.
    metrics = {} if c.metrics_port is None else {"_metrics_export_port": int(c.metrics_port)}
    ray.init(address="local", **local_resources(c), **metrics,
             include_dashboard=c.dashboard, dashboard_host="127.0.0.1", log_to_driver=True)


def check_renderer(cfg: DictConfig) -> None:
    """LIBERO cameras need OpenGL (EGL or OSMesa); find out before any actor starts."""
    if cfg.env.name == "toy":
        return
    from vlarl.envs.libero import SimulatorError, render_backend

    try:
        render_backend(cfg.env.render)
    except SimulatorError as e:
        raise SetupError(str(e)) from None


def start_rollout_workers(cfg: DictConfig, model_folder: str, placement) -> list:
    """cluster.num_rollout_workers RolloutWorker actors sharing rollout.num_envs environments, worker i
    in bundle i of `placement` (vlarl.placement.Placement)."""
    return [rollout_worker(cfg, model_folder, placement, i) for i in range(cfg.cluster.num_rollout_workers)]


def rollout_worker(cfg: DictConfig, model_folder: str, placement, index: int):
    """Rollout worker `index` (a lost one is replaced by the trainer, not restarted by Ray: the
    trainer re-sends the weights and re-collects its episodes)."""
    per_worker = cfg.rollout.num_envs // cfg.cluster.num_rollout_workers
    plain = OmegaConf.to_container(cfg, resolve=True)
    return ray.remote(RolloutWorker).options(**placement.options("rollout", index)).remote(
        plain, index, model_folder, per_worker)


def start_learners(cfg: DictConfig, model_folder: str, placement) -> tuple[list, int]:
    """The FSDP learner group, rank r in bundle r of `placement`, its process group formed; returns
    (actors in rank order, parameters of the policy). Ranks that do not start within
    cluster.placement_timeout_s, or a failed setup, kill the whole group and raise."""
    from vlarl.faults import gather

    c, plain = cfg.cluster, OmegaConf.to_container(cfg, resolve=True)
    learners = [LearnerActor.options(**placement.options("learner", r))
                .remote(plain, r, c.num_learners, model_folder) for r in range(c.num_learners)]
    try:
        gather([l.node_id.remote() for l in learners], c.placement_timeout_s)
        addr, port = ray.get(learners[0].rendezvous_address.remote())
        num_params = gather([l.setup.remote(addr, port) for l in learners], c.collective_timeout_s)[0]
    except BaseException:
        for learner in learners:
            ray.kill(learner, no_restart=True)
        raise
    return learners, num_params


def on_driver_node() -> dict:
    """Ray options that keep an actor on the driver's node: the curriculum and the checkpoint actor
    outlive any other node, and the checkpoints land where the driver's trainer.run_dir is."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        node_id=ray.get_runtime_context().get_node_id(), soft=False)}


def release(closable: list, others: list = ()) -> None:
    """Let `closable` actors shut down (process groups, simulators, engines), then kill them all.
    Never raises: on the way out of a failure the original error is the one worth seeing."""
    try:
        ray.get([a.shutdown.remote() for a in closable], timeout=30)
    except Exception:  # a dead or stuck actor: killing it below frees it anyway
        pass
    for actor in [*closable, *others]:
        ray.kill(actor)
