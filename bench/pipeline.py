"""Pipelined rollouts: env steps/s of one rollout worker with rollout.pipeline_stages=1 vs 2 on the same
simulators, beside env-only and engine-only steps/s, in one run.

    .venv/bin/python bench/pipeline.py [--envs 4] [--max-steps 40] [--repeats 2] [--stages 1 2] [key=value ...]

Defaults: libero_spatial, the tiny token VLA, the hf engine (key=value overrides pick others, e.g.
rollout.engine=vllm model.tiny.heads=2, or cluster.device=cuda). Writes bench/results/pipeline.json:
- env-only: the worker's simulators stepped with random actions, no engine;
- engine-only: the worker's engine on the observations of a collected batch, no env, at the batch
  of all envs and at the batch of one stage;
- rollout: `collect` with S stages; resets are timed apart and left out of steps/s;
- efficiency = rollout steps/s / min(env-only, engine-only at the batch of all envs): 1 is perfect
  overlap. `sequential_bound` is what no overlap at all would give: 1 / (1/env + 1/engine) / min.
On a machine with few cores the simulators and a CPU engine share them, so overlap buys less there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlarl.config import load_config  # noqa: E402
from vlarl.trainer import prepare_model  # noqa: E402
from vlarl.workers.rollout import RolloutWorker  # noqa: E402


class TimedReset:
    """Wraps env.reset to add its seconds up, so rollout steps/s can leave resets out."""

    def __init__(self, env):
        self.reset, self.seconds = env.reset, 0.0

    def __call__(self, *a, **kw):
        start = time.perf_counter()
        try:
            return self.reset(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - start


def env_only(worker: RolloutWorker, tasks: list[int], inits: list[int], steps: int, seed: int = 0) -> float:
    """steps/s of the worker's environments stepped together with uniform random actions."""
    env, rng = worker.env, np.random.default_rng(seed)
    env.reset(tasks, inits)
    width = worker.engine.model.config.action_dim
    done, start = 0, time.perf_counter()
    for _ in range(steps):
        res = env.step(rng.uniform(-1, 1, (len(tasks), width)).astype(np.float32))
        done += len(tasks)
        if (res.terminated | res.truncated).any():  # random actions rarely end an episode; stop if one does
            break
    return done / (time.perf_counter() - start)


def engine_only(worker: RolloutWorker, batch, rows: int, repeats: int) -> float:
    """steps/s of the worker's engine on stored observations, `rows` environments per call."""
    n, horizon = batch.images.shape[:2]
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    obs = lambda t: {"image": batch.images[:rows, t], "proprio": batch.proprio[:rows, t],  # noqa: E731
                     "instruction": batch.instructions[:rows]}
    temperature = worker.cfg.rollout.temperature
    worker.engine.generate(obs(0), temperature, False, gens[:rows])  # warm-up
    start, done = time.perf_counter(), 0
    for _ in range(repeats):
        for t in range(horizon - 1):
            worker.engine.generate(obs(t), temperature, False, gens[:rows])
            done += rows
    return done / (time.perf_counter() - start)


def rollout(worker: RolloutWorker, stages: int, tasks, inits, repeats: int) -> dict:
    worker.cfg.rollout.pipeline_stages = stages  # the same worker, engine and simulators for every S
    timer = worker.env.reset = TimedReset(worker.env)
    steps, total = 0, 0.0
    for r in range(repeats):
        start = time.perf_counter()
        batch = worker.collect(tasks, inits, list(range(len(tasks))), iteration=r)
        total += time.perf_counter() - start
        steps += int(batch.mask.sum())
        assert batch.env_restarts == 0, "a simulator restarted: the timing is void"
    worker.env.reset = timer.reset
    return {"stages": stages, "steps": steps, "seconds": total - timer.seconds, "reset_seconds": timer.seconds,
            "steps_per_s": steps / (total - timer.seconds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--envs", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=40, help="env.max_steps: policy steps per episode")
    p.add_argument("--repeats", type=int, default=2, help="episodes per measurement")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default="bench/results/pipeline.json")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args()
    n = args.envs
    with tempfile.TemporaryDirectory(prefix="vlarl-bench-pipeline-") as tmp:
        cfg = load_config([f"trainer.run_dir={tmp}", f"rollout.num_envs={n}", f"env.max_steps={args.max_steps}",
                           *args.overrides])
        worker = RolloutWorker(OmegaConf.to_container(cfg, resolve=True), 0, prepare_model(cfg, Path(tmp)), n)
        try:
            tasks = [i % worker.env.num_tasks for i in range(n)]
            inits = [i % worker.env.num_init_states for i in range(n)]
            start = time.perf_counter()
            warm = worker.collect(tasks, inits, list(range(n)), iteration=100)  # builds the scenes once
            print(f"warm-up episode (first resets included): {time.perf_counter() - start:.1f} s", flush=True)
            env_rate = env_only(worker, tasks, inits, args.max_steps)
            print(f"env only: {env_rate:.2f} steps/s", flush=True)
            engine = {}
            for s in sorted({1, *args.stages}):
                rows = len(np.array_split(np.arange(n), min(s, n))[0])
                engine[rows] = engine_only(worker, warm, rows, args.repeats)
                print(f"engine only, batch {rows}: {engine[rows]:.2f} steps/s", flush=True)
            bound = min(env_rate, engine[n])
            runs = []
            for s in args.stages:
                row = rollout(worker, s, tasks, inits, args.repeats)
                row["efficiency"] = row["steps_per_s"] / bound
                runs.append(row)
                print(f"rollout, {s} stage(s): {row['steps_per_s']:.2f} steps/s, efficiency {row['efficiency']:.2f}",
                      flush=True)
        finally:
            worker.shutdown()
    by_s = {r["stages"]: r for r in runs}
    report = {
        "env": cfg.env.name, "envs": n, "max_steps": args.max_steps, "engine": cfg.rollout.engine,
        "device": cfg.cluster.device, "torch_threads": cfg.cluster.torch_threads, "cpus": os.cpu_count(),
        "machine": platform.machine(), "overrides": args.overrides, "repeats": args.repeats,
        "env_only_steps_per_s": env_rate,
        "engine_only_steps_per_s": {str(k): v for k, v in engine.items()},  # keyed by rows per call
        "bound_steps_per_s": bound,  # min(env-only, engine-only at the batch of all envs)
        # what no overlap at all would give, relative to the bound: 1 / (1/env + 1/engine) / bound
        "sequential_bound": 1 / (1 / env_rate + 1 / engine[n]) / bound,
        "rollout": runs,
        "speedup": by_s[2]["steps_per_s"] / by_s[1]["steps_per_s"] if {1, 2} <= by_s.keys() else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
