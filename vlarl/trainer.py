"""The single controller: one loop that reads top to bottom.

Each iteration: the curriculum picks (task, init state) groups, rollout workers collect episodes,
the learner group scores them and runs PPO epochs, rank 0 pushes the new weights to every rollout
worker (version += 1), the curriculum hears the results, the checkpoint actor saves, and the
metrics go to the console, metrics.jsonl, TensorBoard and wandb.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
from omegaconf import DictConfig, OmegaConf

from vlarl.algo.advantages import group_filter_mask
from vlarl.cluster import (SetupError, check_renderer, init_ray, on_driver_node, release, rollout_worker,
                           start_learners, start_rollout_workers)
from vlarl.config import warm_start_lr
from vlarl.data.batch import TrajectoryBatch
from vlarl.envs.base import held_out_episodes
from vlarl.faults import gather, is_fault, probe, settle_nodes, until_alive
from vlarl.metrics import DashboardGauges, MetricsLogger, Timer
from vlarl.placement import Placement
from vlarl.rollout.weight_sync import describe_transport
from vlarl.rewards import RewardProvider, make_reward, score
from vlarl.workers.checkpoint import CheckpointActor
from vlarl.workers.curriculum import CurriculumManager


@dataclass
class Workers:
    rollout: list  # RolloutWorker actor handles
    learners: list  # LearnerWorker actor handles, rank order
    curriculum: object  # CurriculumManager actor handle
    checkpoint: object  # CheckpointActor actor handle
    num_params: int  # parameters of the policy
    placement: Placement  # the placement groups every rollout worker and learner rank lives in
    model_folder: str  # the folder every actor loads (replacements too)
    run_dir: Path
    log: Callable[[str], None] = print  # the run's console log (set once the logger exists)
    nodes: dict = field(default_factory=lambda: {"rollout": [], "learner": []})  # node id of each actor (placement.json)
    faults: dict = field(default_factory=lambda: {"faults/actor_restarts": 0.0, "faults/iterations_replayed": 0.0,
                                                   "faults/recoveries": 0.0})  # this job's counts
    commit: object = None  # the CheckpointActor.commit in flight (sharded checkpoints), or None


def train(cfg: DictConfig) -> dict:
    """Run `cfg.trainer.iterations` iterations (resuming from run_dir when possible); returns the last metrics."""
    run_dir = Path(cfg.trainer.run_dir).resolve()
    if not cfg.trainer.resume and any((run_dir / p).exists() for p in ("checkpoints", "best_return", "metrics.jsonl")):
        raise SetupError(f"trainer.resume=false but {run_dir} already holds a run; choose a new trainer.run_dir "
                          "or delete that folder (nothing there was touched).")
    check_renderer(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    w = start_workers(cfg, prepare_model(cfg, run_dir), run_dir)
    logger = MetricsLogger(run_dir, OmegaConf.to_container(cfg), cfg.trainer.iterations, cfg.trainer.wandb,
                           cfg.trainer.wandb_project)
    w.log = logger.info
    logger.dashboard = DashboardGauges(run_dir.name)
    logger.info(f"vlarl: {w.num_params:,} parameters, {len(w.rollout)} rollout worker(s), "
                f"{len(w.learners)} learner rank(s); run dir {run_dir}")
    logger.info(f"vlarl: weight sync {describe_transport(cfg)}")
    record_placement(w)
    reward = None
    try:
        reward = make_reward(cfg, run_dir)
        return loop(cfg, w, logger, reward)
    finally:
        if reward is not None:
            reward.close()
        if w.commit is not None:  # stopped by an error or Ctrl-C: keep the checkpoint whose shards are written
            try:
                settle_commit(cfg, w)
            except Exception as e:
                logger.info(f"vlarl: the last checkpoint was not committed ({_first_line(e)}); a re-run resumes "
                            "from the one before")
        logger.close()
        stop_workers(w)


def loop(cfg: DictConfig, w: "Workers", logger: MetricsLogger, reward: RewardProvider) -> dict:
    start, version, env_steps = begin(cfg, w, logger)
    timer, metrics = Timer(), {}
    logger.start_clock()
    it, end = start, cfg.trainer.iterations
    with stop_on_signal(logger) as stop:
        while it < end or w.commit is not None:
            try:
                if it < end:
                    metrics, version, env_steps = iteration(cfg, w, logger, reward, timer, it, version, env_steps)
                    it += 1
                    if stop:  # SIGTERM / SIGUSR1 (pre-emption): this iteration is the last of the job
                        if not saves_at(cfg, it - 1):
                            save_checkpoint(cfg, w, it - 1, version, env_steps, metrics["rollout/return"])
                        end = it
                        logger.info(f"vlarl: stopping after iteration {it} on {stop[0]}; run the same command to "
                                    "resume from its checkpoint")
                else:
                    settle_commit(cfg, w)  # the last checkpoint is on disk before the job ends
            except Exception as e:
                if not is_fault(e):
                    raise
                timer.pop()
                it, version, env_steps = recover(cfg, w, logger, e, it)
    return metrics


@contextmanager
def stop_on_signal(logger: MetricsLogger):
    """Within it, a first SIGTERM or SIGUSR1 (a scheduler pre-empting the job: Slurm's --signal,
    `ray job stop`, Kubernetes) asks the loop to finish the iteration it is in, checkpoint it and
    end; a second stops at once (KeyboardInterrupt: the last committed checkpoint stands). Yields
    the list the signal's name lands in. Signals are only caught on the main thread."""
    stop: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum, frame):
        if stop:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        stop.append(signal.Signals(signum).name)
        logger.info(f"vlarl: {stop[0]}: finishing this iteration and checkpointing it; send it again to stop at once")

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def saves_at(cfg: DictConfig, it: int) -> bool:
    """Whether iteration `it` (0-based) ends with a checkpoint."""
    return (it + 1) % cfg.trainer.save_every == 0 or it + 1 == cfg.trainer.iterations


def iteration(cfg: DictConfig, w: "Workers", logger: MetricsLogger, reward: RewardProvider, timer: Timer, it: int,
              version: int, env_steps: int) -> tuple[dict, int, int]:
    """One iteration: collect, reward, update, sync, evaluate, checkpoint, log. Returns (metrics,
    weights version, env steps so far)."""
    with timer("collect"):
        batch = collect(cfg, w, it, version, frames_wanted(cfg, reward))
    with timer("reward"):  # the one place rewards are decided, for every policy and algorithm
        batch = score(reward, batch, it)
    collected = batch  # what the policy did, before dynamic sampling keeps some of it
    sampled, steps_collected = rollout_metrics(collected), int(collected.lengths.sum())
    if cfg.algo.dynamic_sampling:
        with timer("resample"):
            batch, more = dynamic_sampling(cfg, w, it, version, reward, batch)
        sampled.update(more)
        steps_collected += int(more["rollout/resampled_steps"])
    with timer("update"):
        sleep_engines(cfg, w)  # colocated vLLM engines give the GPU to the learners until the sync
        batch_ref = ray.put(batch)  # one copy in the object store, read by every rank
        metrics = mean_over_ranks(learners_get(cfg, [l.update.remote(batch_ref, it) for l in w.learners]))
    with timer("sync"):
        version = push_weights(cfg, w, version + 1)
    w.curriculum.report.remote(collected.task_ids.tolist(), collected.success.astype(float).tolist())
    evaluated = None
    if cfg.rollout.eval_every and (it + 1) % cfg.rollout.eval_every == 0:
        with timer("eval"):
            evaluated = evaluate(cfg, w, it, version)
            metrics["eval/success_rate"] = evaluated["success_rate"]
            metrics.update({f"eval/{s}/success_rate": r["success_rate"] for s, r in evaluated.get("suites", {}).items()})
    if robustness_due(cfg, it):
        with timer("eval_robustness"):
            metrics.update(evaluate_robustness(cfg, w, it, version, evaluated))
    env_steps += steps_collected
    metrics.update(sampled, **reward.metrics(), **ray.get(w.curriculum.stats.remote()), **w.faults)
    metrics["env/restarts"] = batch.env_restarts
    metrics.update({"env/steps": env_steps, "rollout/weights_version": version})
    if saves_at(cfg, it):
        with timer("checkpoint"):
            save_checkpoint(cfg, w, it, version, env_steps, metrics["rollout/return"])
    metrics.update(timer.pop())
    collect_seconds = metrics["timing/collect"] + metrics.get("timing/resample", 0.0)
    metrics["perf/env_steps_per_s"] = steps_collected / max(collect_seconds, 1e-9)
    metrics["perf/actions_per_s"] = metrics["perf/env_steps_per_s"] * cfg.env.action_chunk  # actions per policy call
    logger.log(it, metrics, ray.get(w.curriculum.task_stats.remote()))
    return metrics, version, env_steps


def begin(cfg: DictConfig, w: "Workers", logger: MetricsLogger, rewind: bool = False) -> tuple[int, int, int]:
    """Restore the latest checkpoint (if any), push its weights, and report the starting policy when
    the run starts from scratch. `rewind` (after a fault): drop the metrics of the iterations that
    will run again. Returns (first iteration to run, weights version, env steps so far)."""
    start, version, env_steps = resume(cfg, w, logger)
    if rewind:
        logger.rewind(start)
    # Rollout workers start from the learners' weights; a resumed run keeps its checkpointed version.
    version = push_weights(cfg, w, version if start else version + 1)
    if start == 0:
        version = initial_report(cfg, w, logger, version)
    elif start >= cfg.trainer.iterations and not rewind:
        logger.info(f"vlarl: {cfg.trainer.run_dir} already finished {start} iterations; raise trainer.iterations "
                    "to continue it, or choose a new trainer.run_dir.")
    return start, version, env_steps


# ---- faults -------------------------------------------------------------------------------------------
def recover(cfg: DictConfig, w: "Workers", logger: MetricsLogger, error: BaseException, it: int) -> tuple[int, int, int]:
    """A lost actor, node or collective in iteration `it`: replace what is gone and continue from the
    last checkpoint. The iterations since then (the interrupted one included) run again, exactly as
    they first would have: sampling is derived from (seed, iteration)."""
    w.faults["faults/recoveries"] += 1
    if w.faults["faults/recoveries"] > cfg.cluster.max_recoveries:
        raise SetupError(f"{int(w.faults['faults/recoveries'])} faults in this job, more than cluster.max_recoveries="
                         f"{cfg.cluster.max_recoveries}; the last: {_first_line(error)}. Re-running the command "
                         "resumes from the last checkpoint.") from error
    logger.info(f"vlarl: fault in iteration {it + 1}: {_first_line(error)}; recovering")
    replace_lost(cfg, w)
    try:
        settle_commit(cfg, w)  # a checkpoint whose shards all reached the disk still counts
    except Exception as e:
        if not is_fault(e):
            raise
        logger.info(f"vlarl: the checkpoint being written was lost ({_first_line(e)}); resuming from the one before")
    for attempt in range(3):  # a node Ray has not yet marked dead can take a replacement down with it
        try:
            start, version, env_steps = begin(cfg, w, logger, rewind=True)
            break
        except Exception as e:
            if not is_fault(e) or attempt == 2:
                raise
            replace_lost(cfg, w)
    replayed = it - start + 1
    w.faults["faults/iterations_replayed"] += replayed
    record_placement(w)
    logger.info(f"vlarl: recovered; continuing at iteration {start + 1} ({replayed} iteration(s) to run again)")
    return start, version, env_steps


def replace_lost(cfg: DictConfig, w: "Workers") -> None:
    """Replace every rollout worker that does not answer; rebuild the learner group if any rank does not."""
    rollout_ok, learners_ok = probe(w.rollout), probe(w.learners)
    lost_nodes = [n for ok, n in zip(rollout_ok + learners_ok, w.nodes["rollout"] + w.nodes["learner"]) if not ok]
    settle_nodes(lost_nodes, cfg.cluster.recovery_timeout_s)
    for i, ok in enumerate(rollout_ok):
        if not ok:
            replace_rollout_worker(cfg, w, i)
    if not all(learners_ok):
        rebuild_learners(cfg, w)


def replace_rollout_worker(cfg: DictConfig, w: "Workers", index: int) -> None:
    """A new rollout worker `index` in its bundle, once Ray has re-placed the bundle on a live node."""
    ray.kill(w.rollout[index], no_restart=True)

    def make(deadline: float):
        w.placement.wait(deadline - time.monotonic(), "after a lost rollout worker")
        worker = rollout_worker(cfg, w.model_folder, w.placement, index)
        try:
            gather([worker.env_shape.remote()], min(deadline - time.monotonic(), cfg.cluster.placement_timeout_s))
        except Exception:
            ray.kill(worker, no_restart=True)
            raise
        return worker

    w.rollout[index] = until_alive(make, cfg.cluster.recovery_timeout_s, f"rollout worker {index}")
    w.faults["faults/actor_restarts"] += 1
    record_placement(w)
    w.log(f"vlarl: rollout worker {index} replaced on node {ray.get(w.rollout[index].node_id.remote())[:12]}")


def rebuild_learners(cfg: DictConfig, w: "Workers") -> None:
    """A process group cannot take a new member: every rank starts again (resume() then loads the
    checkpoint into them)."""
    for learner in w.learners:
        ray.kill(learner, no_restart=True)

    def make(deadline: float):
        w.placement.wait(deadline - time.monotonic(), "after a lost learner rank")
        return start_learners(cfg, w.model_folder, w.placement)[0]

    w.learners = until_alive(make, cfg.cluster.recovery_timeout_s, "the learner group")
    w.faults["faults/actor_restarts"] += len(w.learners)
    w.log(f"vlarl: learner group rebuilt ({len(w.learners)} rank(s))")


def learners_get(cfg: DictConfig, refs: list) -> list:
    """The results of one call on every learner rank; a lost rank or a call past
    cluster.collective_timeout_s raises at once (vlarl.faults.gather)."""
    return gather(refs, cfg.cluster.collective_timeout_s)


def record_placement(w: "Workers") -> None:
    """run_dir/placement.json: the node of every actor, as Ray placed it (null for one that does not
    answer); rewritten whenever an actor is replaced."""
    def nodes(actors: list) -> list:
        out = []
        for ref in [a.node_id.remote() for a in actors]:
            try:
                out.append(ray.get(ref, timeout=30))
            except Exception:  # lost: the recovery under way replaces it
                out.append(None)
        return out

    known = {"rollout": nodes(w.rollout), "learner": nodes(w.learners)}
    for role, ids in known.items():  # keep the last known node of an actor that does not answer
        old = w.nodes.get(role, [])
        w.nodes[role] = [n if n is not None or i >= len(old) else old[i] for i, n in enumerate(ids)]
    tmp = w.run_dir / f".placement.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(known, indent=1))
    os.replace(tmp, w.run_dir / "placement.json")


def _first_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None)  # a failed remote call: what failed inside it
    if isinstance(cause, BaseException) and cause is not e:
        e = cause
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# ---- setup ------------------------------------------------------------------------------------


def prepare_model(cfg: DictConfig, run_dir: Path) -> str:
    """The model folder every actor loads: model.path, or a tiny model built once into run_dir/base_model."""
    if cfg.model.path is not None:
        return str(Path(cfg.model.path).resolve())
    folder = run_dir / "base_model"
    if not (folder / "config.json").is_file():
        from vlarl.envs import make_env
        from vlarl.models.registry import build_tiny_model, save_model

        instructions = make_env(cfg.env, 1, cfg.trainer.seed).instructions()
        loaded = build_tiny_model(cfg.model, cfg.env.image_size, instructions, cfg.trainer.seed, cfg.env.action_chunk)
        tmp = folder.with_name(f".tmp-base_model-{os.getpid()}")
        save_model(tmp, loaded)
        os.replace(tmp, folder)
    return str(folder)


def arm_names(task_suites: list[str] | None) -> list[str] | None:
    """Curriculum arm names "suite/task" (task counted within its suite), or None (toy env: ids)."""
    if task_suites is None:
        return None
    seen: dict[str, int] = {}
    names = []
    for suite in task_suites:
        names.append(f"{suite}/{seen.get(suite, 0)}")
        seen[suite] = seen.get(suite, 0) + 1
    return names


def start_workers(cfg: DictConfig, model_folder: str, run_dir: Path) -> Workers:
    placement = Placement(cfg)  # stops with one sentence when the cluster cannot hold the run
    rollout = start_rollout_workers(cfg, model_folder, placement)
    if cfg.cluster.colocate:  # vLLM measures free GPU memory at start: let it, before the learners allocate
        ray.get([r.env_shape.remote() for r in rollout])
    learners, num_params = start_learners(cfg, model_folder, placement)
    env_probe = ray.get(rollout[0].env_shape.remote())
    if env_probe["num_init_states"] == 0:
        placement.remove()
        raise ValueError(f"env.name={cfg.env.name} holds {env_probe['num_held_out_states']} init states per task, no "
                         f"more than env.num_init_states={cfg.env.num_init_states}: it can be evaluated, not trained "
                         f"on; lower env.num_init_states below {env_probe['num_held_out_states']} to train on it.")
    curriculum = ray.remote(CurriculumManager).options(**on_driver_node()).remote(
        env_probe["num_tasks"], env_probe["num_init_states"], cfg.trainer.curriculum_alpha,
        cfg.trainer.curriculum_floor, cfg.trainer.seed, arm_names(env_probe["task_suites"]))
    plain = OmegaConf.to_container(cfg, resolve=True)
    checkpoint = ray.remote(CheckpointActor).options(**on_driver_node()).remote(str(run_dir), cfg.trainer.keep_last,
                                                                                0.99, plain)
    return Workers(rollout, learners, curriculum, checkpoint, num_params, placement, model_folder, run_dir)


def stop_workers(w: Workers) -> None:
    """Release the actors (and the learners' process group) so the cluster is free for the next job."""
    release([*w.learners, *w.rollout], [w.curriculum, w.checkpoint])
    w.placement.remove()


def resume(cfg: DictConfig, w: Workers, logger: MetricsLogger) -> tuple[int, int, int]:
    """Restore learner, optimizer, curriculum and EMA state from the latest checkpoint, if any.
    Returns (first iteration to run, weights version, env steps so far)."""
    path = ray.get(w.checkpoint.latest.remote()) if cfg.trainer.resume else None
    if path is None:
        return 0, 0, 0
    state = ray.get(w.checkpoint.load.remote(path))
    if "state_dir" in state:  # sharded: every rank reads its part, whatever number of ranks wrote it
        learners_get(cfg, [l.load_shards.remote(state["state_dir"]) for l in w.learners])
    else:
        weights, optim = ray.put(state["model_state"]), ray.put(state["optimizer_state"])  # one copy for all ranks
        learners_get(cfg, [l.load_full_state.remote(weights, optim) for l in w.learners])
    ray.get(w.curriculum.load_state_dict.remote(state["curriculum_state"]))
    ray.get(w.checkpoint.load_ema_state.remote(state["ema_state"]))
    ts = state["trainer_state"]
    logger.info(f"vlarl: resumed from {path} at iteration {ts['iteration'] + 1}")
    return ts["iteration"], ts["weights_version"], ts["env_steps"]


# ---- the phases ---------------------------------------------------------------------------------
def collect(cfg: DictConfig, w: Workers, iteration: int, version: int, record: int = 0) -> TrajectoryBatch:
    """One episode per environment from curriculum-chosen (task, init state) groups, split over workers;
    each worker records the frames of its first `record` episodes."""
    g = cfg.algo.group_size
    tasks, inits = ray.get(w.curriculum.sample.remote(iteration, cfg.rollout.num_envs // g, g))
    groups = np.repeat(np.arange(cfg.rollout.num_envs // g), g)
    parts = np.array_split(np.arange(cfg.rollout.num_envs), len(w.rollout))
    jobs = [([tasks[i] for i in p], [inits[i] for i in p], groups[p].tolist()) for p in parts]
    return TrajectoryBatch.concat(run_episodes(cfg, w, version, jobs, iteration, record), group_offset=False)


def dynamic_sampling(cfg: DictConfig, w: Workers, iteration: int, version: int, reward: RewardProvider,
                     batch: TrajectoryBatch) -> tuple[TrajectoryBatch, dict]:
    """DAPO's dynamic sampling (Yu et al. 2025; SimpleVLA-RL): a group whose returns all agree (every
    episode failed, or every one succeeded) has zero group-relative advantage and only dilutes the
    update. Keep the informative groups (mean return in [algo.filter_low, algo.filter_high]) and collect
    further rounds, each with fresh tasks and noise, until there are as many as a batch has groups or
    algo.sampling_rounds rounds ran. Returns the kept groups (the batch unchanged if none) and metrics."""
    a = cfg.algo
    want = cfg.rollout.num_envs // a.group_size
    kept, have, rounds, steps = [], 0, 0, 0
    while True:
        mask = group_filter_mask(torch.as_tensor(batch.episode_returns), torch.as_tensor(batch.group_ids),
                                 a.filter_low, a.filter_high).numpy()
        groups = np.unique(batch.group_ids[mask])[:want - have]
        if len(groups):
            kept.append(batch.select(np.nonzero(np.isin(batch.group_ids, groups))[0]))
            have += len(groups)
        rounds += 1
        if have >= want or rounds >= a.sampling_rounds:
            break
        # A distinct sampling key per round: curriculum draws and noise differ from every other round's.
        batch = score(reward, collect(cfg, w, iteration + rounds * 2**32, version), iteration)
        steps += int(batch.lengths.sum())
    metrics = {"rollout/sampling_rounds": float(rounds), "rollout/informative_groups": have / want,
               "rollout/resampled_steps": float(steps)}
    return (TrajectoryBatch.concat(kept) if kept else batch), metrics


def frames_wanted(cfg: DictConfig, reward: RewardProvider) -> int:
    """Episodes per rollout worker whose frames the reward provider needs (human labelling)."""
    return int(round(reward.wants_frames * cfg.rollout.num_envs / cfg.cluster.num_rollout_workers))


def run_episodes(cfg: DictConfig, w: Workers, version: int, jobs: list, iteration: int,
                 record: int = 0) -> list[TrajectoryBatch]:
    """jobs[i] = (tasks, inits, groups) for rollout worker i. A worker lost on the way (its process or
    its node) is replaced, given the current weights, and runs its episodes again: they come out as
    the lost ones would have (every env's generator is derived from the seed and the iteration)."""
    out: list = [None] * len(jobs)
    while True:
        todo = [i for i, b in enumerate(out) if b is None]
        refs = {i: w.rollout[i].collect.remote(*jobs[i], iteration, record=record) for i in todo}
        lost = []
        for i, ref in refs.items():
            try:
                out[i] = gather([ref], cfg.cluster.collective_timeout_s)[0]
            except Exception as e:
                if not is_fault(e):
                    raise
                lost.append(i)
        if not lost:
            break
        w.log(f"vlarl: rollout worker(s) {lost} lost in iteration {iteration + 1}; collecting their episodes again")
        for i in lost:
            replace_rollout_worker(cfg, w, i)
        push_weights(cfg, w, version)
    stale = [i for i, b in enumerate(out) if b.weights_version != version]
    if stale:
        raise RuntimeError(f"rollout worker(s) {stale} did not take weights version {version}; check the worker logs.")
    return out


def sleep_engines(cfg: DictConfig, w: Workers) -> None:
    """vLLM engines that share GPUs with the learners free their memory (no-op otherwise); the next
    weight push or rollout wakes them."""
    gather([r.sleep.remote() for r in w.rollout], cfg.cluster.collective_timeout_s)


def push_weights(cfg: DictConfig, w: Workers, version: int) -> int:
    """Learner rank 0 pushes merged weights to every rollout worker; all ranks join the gather."""
    learners_get(cfg, [l.push_weights.remote(w.rollout, version) for l in w.learners])
    return version


def eval_episodes(cfg: DictConfig, probe: dict) -> list[tuple[int, int]]:
    """The (task, init state) pairs of every greedy evaluation: rollout.eval_episodes held-out episodes."""
    return list(zip(*held_out_episodes(probe["num_tasks"], probe["num_init_states"], probe["num_held_out_states"], 0,
                                       cfg.rollout.eval_episodes)))


def evaluate(cfg: DictConfig, w: Workers, iteration: int, version: int, suite: str | None = None) -> dict:
    """Greedy success over rollout.eval_episodes held-out episodes (of `suite`, default the one trained
    on); the report (per task, per episode) and videos of the first rollout.eval_videos episodes go to
    run_dir/eval/iter_NNNNNN/ (a robustness suite's under its name). Returns the report."""
    from vlarl.eval import greedy_episodes, report, write_json, write_videos

    probe = ray.get(w.rollout[0].env_shape.remote(suite))
    result = greedy_episodes(w.rollout, cfg.rollout.num_envs // len(w.rollout), eval_episodes(cfg, probe),
                             10**6 + 1000 * (iteration + 1), cfg.rollout.eval_videos, version, suite)
    folder = Path(cfg.trainer.run_dir) / "eval" / f"iter_{iteration + 1:06d}"
    rep = report(result, probe["instructions"], suite or cfg.env.name, probe["task_suites"])
    rep["videos"] = write_videos(result, folder if suite is None else folder / suite, failures_only=suite is not None)
    write_json(folder / ("report.json" if suite is None else f"{suite}/report.json"), rep)
    return rep


def robustness_due(cfg: DictConfig, it: int) -> bool:
    every = cfg.rollout.eval_robustness_every or cfg.rollout.eval_every
    return bool(cfg.rollout.eval_robustness and every and (it + 1) % every == 0)


def evaluate_robustness(cfg: DictConfig, w: Workers, iteration: int, version: int, evaluated: dict | None) -> dict:
    """The trained-on suite (its evaluation of this iteration, when there was one) and each of
    rollout.eval_robustness's perturbed suites on the same episode budget -> eval_robust/<perturbation>/
    success_rate and ratio_to_base metrics; the table (json, md, png) goes to run_dir/eval/iter_NNNNNN/."""
    from vlarl.eval import write_json
    from vlarl.robustness import robustness_metrics, robustness_variants, table, write_robustness

    if cfg.env.train_suites:  # the mixture's evaluation mixes suites: evaluate env.name on its own
        evaluated = evaluate(cfg, w, iteration, version, cfg.env.name)
    suites = {cfg.env.name: evaluated or evaluate(cfg, w, iteration, version)}
    for suite in robustness_variants(cfg):
        suites[suite] = evaluate(cfg, w, iteration, version, suite)
    result = table(cfg.env.name, suites)
    folder = Path(cfg.trainer.run_dir) / "eval" / f"iter_{iteration + 1:06d}"
    result["files"] = write_robustness(result, folder)
    write_json(folder / "robustness.json", result)
    return robustness_metrics(result)


def initial_report(cfg: DictConfig, w: Workers, logger: MetricsLogger, version: int) -> int:
    """Greedy success of the starting policy, then the BC warm start (if on) and its success,
    logged as iteration -1 so the gain RL brings stays visible. Returns the weights version."""
    metrics = {}
    if cfg.rollout.eval_every:
        metrics["eval/initial_success_rate"] = evaluate(cfg, w, -1, version)["success_rate"]
    if cfg.trainer.bc_warmup_steps > 0:
        bc, version = warm_start(cfg, w, logger, version)
        metrics.update(bc)
        if cfg.rollout.eval_every:
            metrics["eval/success_rate"] = evaluate(cfg, w, -1, version)["success_rate"]
    if metrics:
        logger.record(-1, metrics)
        logger.info("vlarl: before RL: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return version


def warm_start(cfg: DictConfig, w: Workers, logger: MetricsLogger, version: int) -> tuple[dict, int]:
    """Behaviour cloning on scripted demonstrations before RL, reported as bc/* so the RL gain stays
    visible; the new weights go to the rollout workers. With trainer.bc_target_success it runs in
    pieces of trainer.bc_check_every steps and stops at the first piece after which greedy success
    on the held-out episodes (those of evaluate) reaches the target, or at trainer.bc_warmup_steps;
    bc/steps says how many it took. Returns the metrics and the weights version."""
    from vlarl.eval import greedy_episodes

    probe = ray.get(w.rollout[0].env_shape.remote())
    per_worker = cfg.rollout.num_envs // len(w.rollout)
    rng = np.random.default_rng((cfg.trainer.seed, 7))
    demos = []
    for _ in range(max(1, cfg.trainer.bc_episodes // cfg.rollout.num_envs)):
        refs = [r.demonstrations.remote(rng.integers(0, probe["num_tasks"], per_worker).tolist(),
                                        rng.integers(0, probe["num_init_states"], per_worker).tolist())
                for r in w.rollout]
        demos += ray.get(refs)
    batch = TrajectoryBatch.concat(demos)
    demo_success = float(batch.success.mean())
    batch = ray.put(batch)  # sent once, read by every piece
    total, target = cfg.trainer.bc_warmup_steps, cfg.trainer.bc_target_success
    piece = total if target is None else min(cfg.trainer.bc_check_every, total)
    episodes = eval_episodes(cfg, probe)
    done, out = 0, {}
    while done < total:
        steps = min(piece, total - done)
        out = mean_over_ranks(learners_get(cfg, [
            l.behaviour_clone.remote(batch, steps, cfg.trainer.bc_minibatch_size, warm_start_lr(cfg), keep=target is not None,
                                     total=total) for l in w.learners]))
        done += steps
        version = push_weights(cfg, w, version + 1)
        if target is None:
            break
        success = float(greedy_episodes(w.rollout, per_worker, episodes, 10**6, 0, version).success.mean())
        logger.info(f"vlarl: warm start {done}/{total} steps: greedy success {success:.3f} (target {target:g})")
        if success >= target:
            break
    if target is not None:
        learners_get(cfg, [l.end_behaviour_clone.remote() for l in w.learners])
    out["bc/demo_success"] = demo_success
    return out, version


def save_checkpoint(cfg, w: Workers, it: int, version: int, env_steps: int, current_return: float) -> None:
    """Checkpoint step it + 1. Sharded: each rank writes its shard in the background and the
    checkpoint actor commits the step once all are on disk (settled at the next save or the end of
    the run). Full: rank 0 gathers the state, the checkpoint actor writes it (update_best first, so
    the periodic checkpoint carries the EMA that includes this step)."""
    trainer_state = {"iteration": it + 1, "weights_version": version, "env_steps": env_steps,
                     "seed": cfg.trainer.seed}  # every actor derives its randomness from (seed, iteration)
    curriculum_state = w.curriculum.state_dict.remote()
    if cfg.trainer.checkpoint_format == "sharded":
        settle_commit(cfg, w)  # the previous save's shards had a whole iteration to reach the disk
        state_dir = ray.get(w.checkpoint.begin_shards.remote(it + 1))
        learners_get(cfg, [l.save_shards.remote(state_dir) for l in w.learners])  # back once staged in host memory
        written = [l.shards_written.remote() for l in w.learners]
        w.commit = w.checkpoint.commit.remote(it + 1, state_dir, current_return, trainer_state, curriculum_state,
                                              *written)
        return
    pairs = [l.checkpoint_state.options(num_returns=2).remote() for l in w.learners]
    model_ref, optim_ref = pairs[0]
    learners_get(cfg, [p[0] for p in pairs[1:]])  # the other ranks only join the gather
    gather([model_ref, optim_ref], cfg.cluster.collective_timeout_s, fetch=False)  # rank 0's state stays in the store
    ray.get(w.checkpoint.update_best.remote(it + 1, current_return, model_ref, optim_ref, trainer_state, curriculum_state))
    ray.get(w.checkpoint.save.remote(it + 1, model_ref, optim_ref, trainer_state, curriculum_state))


def settle_commit(cfg, w: Workers) -> None:
    """Wait for the sharded checkpoint in flight, if any (bounded like a collective; a lost rank fails it)."""
    ref, w.commit = w.commit, None
    if ref is not None:
        gather([ref], cfg.cluster.collective_timeout_s)


# ---- metrics --------------------------------------------------------------------------------------
def rollout_metrics(batch: TrajectoryBatch) -> dict:
    return {"rollout/success_rate": float(batch.success.mean()),
            "rollout/return": float(batch.episode_returns.mean()),
            "rollout/episode_length": float(batch.lengths.mean()),
            "rollout/episodes": float(batch.num_episodes)}


def mean_over_ranks(per_rank: list[dict]) -> dict:
    return {k: float(np.mean([m[k] for m in per_rank])) for k in per_rank[0]}

