"""How much of a flow policy's outcome the initial noise decides, on the toy task.

A flow VLA's evaluation runs the ODE from a random x_1 ~ N(0, I). This runs R greedy evaluations
of a checkpoint's policy on the same held-out observations, each from other initial noise, and
reports per observation how often it succeeds. Observations that succeed sometimes and fail
other times have their outcome decided by x_1 (which no log-prob credits: its density has no
parameters). The token VLA's greedy policy has no such noise (its spread is 0).

    .venv/bin/python bench/flow_modes.py --checkpoint RUN/checkpoints/step_000060 [--episodes 128] [--repeats 10]

Writes bench/results/flow_modes.json: mean success, the histogram of per-observation success rates,
and the fractions that always, never and sometimes succeed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlarl.config import load_config  # noqa: E402
from vlarl.envs.base import held_out_episodes  # noqa: E402
from vlarl.workers.checkpoint import is_complete, read_model_state  # noqa: E402
from vlarl.workers.rollout import RolloutWorker  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step directory (or best_return) of a toy run")
    parser.add_argument("--episodes", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench/results/flow_modes.json")
    args = parser.parse_args()
    ckpt = Path(args.checkpoint)
    if not is_complete(str(ckpt)):
        parser.error(f"{ckpt} is not a complete checkpoint directory; pass RUN/checkpoints/step_NNNNNN or RUN/best_return.")
    run_cfg = json.loads((ckpt / "config.json").read_text())
    if run_cfg["env"]["name"] != "toy":
        parser.error(f"{ckpt} is a {run_cfg['env']['name']} run; this benchmark runs the toy task.")
    base = ckpt.parent.parent / "base_model" if ckpt.parent.name == "checkpoints" else ckpt.parent / "base_model"
    cfg = OmegaConf.merge(load_config(["env=toy"]), run_cfg)
    OmegaConf.set_readonly(cfg, False)
    cfg.rollout.num_envs = args.episodes
    worker = RolloutWorker(OmegaConf.to_container(cfg, resolve=True), 0, str(base), args.episodes)
    worker.load_weights(read_model_state(str(ckpt)), 1)
    env = worker.env
    tasks, inits = held_out_episodes(env.num_tasks, env.num_init_states, env.num_held_out_states, 0, args.episodes)
    success = np.stack([worker.evaluate(tasks, inits, seed).success for seed in range(args.repeats)])
    rate = success.mean(0)
    report = {
        "checkpoint": str(ckpt), "policy": cfg.model.policy, "episodes": args.episodes, "repeats": args.repeats,
        "mean_success": float(success.mean()),
        "rate_histogram": np.histogram(rate, bins=args.repeats + 1, range=(-0.5 / args.repeats, 1 + 0.5 / args.repeats))[0].tolist(),
        "always": float((rate == 1).mean()), "never": float((rate == 0).mean()),
        "sometimes": float(((rate > 0) & (rate < 1)).mean()),
    }
    worker.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
