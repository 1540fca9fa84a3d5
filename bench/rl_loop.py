"""RL on the toy task from a warm start, in one process: how fast each setting learns, per episode.

Runs the trainer's own pieces without Ray or the curriculum (tasks and layouts drawn uniformly): a
`LearnerWorker` (one gloo rank) and a `RolloutWorker` collect, update and sync in a loop, and a
second worker evaluates greedily and sampled on the same 256 held-out episodes every --eval-every
iterations, splitting how episodes end (success, wrong block, time-out; bench/greedy_gap.py). The
warm start (--bc steps of behaviour cloning) is cached under --cache per (model, steps, seed,
threads), so settings are compared from one and the same policy.

    .venv/bin/python bench/rl_loop.py --bc 1500 --episodes 512 --iters 40 algo.minibatch_size=2048 algo.actor_lr=1e-3
    .venv/bin/python bench/rl_loop.py --bc 1500 --episodes 128 --iters 100                  # the small-batch rows
    RL_THREADS=1 .venv/bin/python bench/rl_loop.py --bc 1500 --demo-batch 512 cluster.torch_threads=2 ...
        # the trainer's warm start at rollout.num_envs=512 (2 threads), RL on 1 thread

Extra key=value arguments are config overrides (on top of env=toy, actor_lr 3e-4, 1 torch thread).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from greedy_gap import outcomes  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                     set_model_state_dict)

from vlarl.config import load_config, warm_start_lr  # noqa: E402
from vlarl.data.batch import TrajectoryBatch  # noqa: E402
from vlarl.envs.base import held_out_episodes  # noqa: E402
from vlarl.trainer import prepare_model  # noqa: E402
from vlarl.workers.learner import LearnerWorker, free_port  # noqa: E402
from vlarl.workers.rollout import RolloutWorker  # noqa: E402

EVAL = 256


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="default", help="run folder under runs/bench_rl_loop/ and report name")
    p.add_argument("--bc", type=int, default=1500, help="warm-start steps")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=128, help="episodes per iteration")
    p.add_argument("--demo-batch", type=int, default=128,
                   help="demonstration episodes per round of the warm start's 4096 (the trainer uses rollout.num_envs)")
    p.add_argument("--cache", default="runs/bench_rl_loop/warm_starts")
    p.add_argument("--out", default=None, help="JSON report (default bench/results/rl_loop_NAME.json)")
    args, overrides = p.parse_known_args()
    run_dir = Path("runs/bench_rl_loop") / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(["env=toy", f"rollout.num_envs={args.episodes}", f"trainer.run_dir={run_dir}",
                       f"trainer.seed={args.seed}", "cluster.torch_threads=1", "algo.actor_lr=3e-4", *overrides])
    folder = prepare_model(cfg, run_dir)
    plain = OmegaConf.to_container(cfg, resolve=True)
    learner = LearnerWorker(plain, 0, 1, folder)
    learner.setup("127.0.0.1", free_port())
    worker = RolloutWorker(plain, 0, folder, args.episodes)
    evaluator = RolloutWorker(plain, 1, folder, EVAL)
    opts = StateDictOptions(full_state_dict=True)
    cache = Path(args.cache) / (f"{cfg.model.name}_bc{args.bc}_d{args.demo_batch}_s{args.seed}"
                                f"_t{cfg.cluster.torch_threads}.pt")
    if args.bc > 0 and cache.exists():
        set_model_state_dict(learner.model, torch.load(cache), options=opts)
    elif args.bc > 0:
        rng, n = np.random.default_rng((args.seed, 7)), args.demo_batch  # the trainer's draws (warm_start)
        demo_worker = RolloutWorker(plain, 0, folder, n)
        demos = [demo_worker.demonstrations(rng.integers(0, 4, n).tolist(), rng.integers(0, 10000, n).tolist())
                 for _ in range(max(1, 4096 // n))]
        learner.behaviour_clone(TrajectoryBatch.concat(demos), args.bc, 128, warm_start_lr(cfg))
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(get_model_state_dict(learner.model, options=opts), cache)
    if os.environ.get("RL_THREADS"):  # the warm start may be taken with other threads than the RL
        torch.set_num_threads(int(os.environ["RL_THREADS"]))

    def push() -> None:
        state = get_model_state_dict(learner.model, options=opts)
        worker.engine.load_state_dict(state)
        evaluator.engine.load_state_dict(state)

    tasks_e, inits_e = held_out_episodes(4, 10000, 10**9, 0, EVAL)

    def evaluate(it: int) -> dict:
        greedy = evaluator.collect(tasks_e, inits_e, list(range(EVAL)), 10**6 + it, greedy=True)
        sampled = evaluator.collect(tasks_e, inits_e, list(range(EVAL)), 10**6 + it)
        return {"greedy": outcomes(greedy), "sampled": outcomes(sampled)}

    push()
    start = time.time()
    log = [{"it": 0, "seconds": 0.0, **evaluate(-1)}]
    print(json.dumps(log[-1]), flush=True)
    g = cfg.algo.group_size
    rng = np.random.default_rng((args.seed, 99))
    for it in range(args.iters):
        groups = args.episodes // g
        tasks, inits = np.repeat(rng.integers(0, 4, groups), g), np.repeat(rng.integers(0, 10000, groups), g)
        batch = worker.collect(tasks.tolist(), inits.tolist(), np.repeat(np.arange(groups), g).tolist(), it)
        metrics = learner.update(batch, it)
        push()
        row = {"it": it + 1, "seconds": round(time.time() - start, 1), "train": outcomes(batch),
               **{k: metrics[k] for k in ("actor/approx_kl", "actor/clipfrac", "actor/entropy") if k in metrics}}
        if (it + 1) % args.eval_every == 0:
            row.update(evaluate(it))
            print(json.dumps(row), flush=True)
        log.append(row)
    learner.shutdown()
    out = Path(args.out or f"bench/results/rl_loop_{args.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bc_steps": args.bc, "episodes": args.episodes, "overrides": overrides,
                               "eval_episodes": EVAL, "log": log}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
