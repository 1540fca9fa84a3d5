"""Why a weak token policy succeeds more often sampled than greedy, and whether it reads the instruction.

Runs in one process (no Ray): builds the tiny token VLA, behaviour-clones it on scripted
demonstrations (as the trainer's warm start does) and, after each of --bc-steps (marks of one warm
start), plays the same 256 held-out episodes greedily and sampled (4 draws) and records how episodes
end (success, wrong block, time-out) and the share of block-reaching sampled episodes that reached
the named block (`reads_instruction`: 1/3 for a policy blind to the instruction with 3 blocks, 1 for
one that always picks the right block). After the last mark it also records how far greedy
time-outs move per step and how much of the first action dimension's mass sits on the two extreme
bins.

    .venv/bin/python bench/greedy_gap.py --bc-steps 600 --out bench/results/greedy_gap.json
    .venv/bin/python bench/greedy_gap.py --bc-steps 1000 1500 2000 2500 3000 --threads 2   # the warm start's curve
    .venv/bin/python bench/greedy_gap.py --model openvla_oft --bc-steps 500 1000 2000   # the OFT-shaped tiny model

Extra key=value arguments override the config (as in bench/learn_toy.py); --model takes learn_toy's model
settings (for openvla_oft: a tiny discrete-head OFT folder, chunks of 4, written under --run-dir).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf  # noqa: E402

from learn_toy import MODELS, model_overrides  # noqa: E402
from vlarl.config import load_config  # noqa: E402
from vlarl.data.batch import TrajectoryBatch  # noqa: E402
from vlarl.envs.base import held_out_episodes  # noqa: E402
from vlarl.trainer import prepare_model  # noqa: E402
from vlarl.workers.learner import LearnerWorker, free_port  # noqa: E402
from vlarl.workers.rollout import RolloutWorker  # noqa: E402


def outcomes(b: TrajectoryBatch) -> dict:
    ended_by_task = b.terminated.any(1)
    return {"success": float(b.success.mean()), "wrong_block": float((ended_by_task & ~b.success).mean()),
            "time_out": float((~ended_by_task).mean())}


def reads_instruction(sampled: list[dict]) -> float:
    """Share of block-reaching episodes that reached the named block, over the sampled draws."""
    hit = sum(o["success"] for o in sampled)
    return hit / max(hit + sum(o["wrong_block"] for o in sampled), 1e-9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bc-steps", type=int, nargs="+", default=[600], help="warm-start steps to evaluate at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the result depends on it)")
    parser.add_argument("--run-dir", default="runs/bench_greedy_gap")
    parser.add_argument("--out", default="bench/results/greedy_gap.json")
    parser.add_argument("--model", default="tiny_token", choices=sorted(MODELS), help="model settings of bench/learn_toy.py")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    n, marks = 256, sorted(args.bc_steps)
    cfg = load_config(["env=toy", f"rollout.num_envs={n}", f"trainer.run_dir={args.run_dir}", f"trainer.seed={args.seed}",
                       f"cluster.torch_threads={args.threads}",
                       *model_overrides(args.model, Path(args.run_dir).resolve()), *args.overrides])
    folder = prepare_model(cfg, Path(args.run_dir))
    plain = OmegaConf.to_container(cfg, resolve=True)
    learner = LearnerWorker(plain, 0, 1, folder)
    learner.setup("127.0.0.1", free_port())
    worker = RolloutWorker(plain, 0, folder, n)
    rng = np.random.default_rng((args.seed, 7))
    demos = [worker.demonstrations(rng.integers(0, 4, n).tolist(), rng.integers(0, 10000, n).tolist()) for _ in range(16)]
    tasks, inits = held_out_episodes(4, 10000, 10**9, 0, n)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    curve, last = [], {}

    def evaluate(step: int) -> None:
        if step not in marks:
            return
        worker.engine.load_state_dict(get_model_state_dict(learner.model, options=StateDictOptions(full_state_dict=True)))
        greedy = worker.collect(tasks, inits, list(range(n)), 0, greedy=True)
        sampled = [outcomes(worker.collect(tasks, inits, list(range(n)), k)) for k in range(4)]
        curve.append({"bc_steps": step, "greedy": outcomes(greedy), "sampled": sampled,
                      "reads_instruction": reads_instruction(sampled)})
        print(json.dumps(curve[-1]), flush=True)
        last["greedy"] = greedy

    bc = learner.behaviour_clone(TrajectoryBatch.concat(demos), marks[-1], 128, 2e-3, after_step=evaluate)
    greedy = last["greedy"]
    time_outs = np.nonzero(~greedy.terminated.any(1))[0]
    moves = np.abs(np.diff(greedy.proprio[time_outs, :, :2], axis=1)).sum(-1) / 2  # L1 move per step, board units
    probs = None
    if worker.engine.model.action_kind == "token":  # the first action dimension's distribution at the first step
        with torch.no_grad():
            m, obs = worker.engine.model, worker.env.reset(tasks, inits)
            embeds, mask, positions = m.prefix(*worker.engine.model_inputs(obs))
            logits = m.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1]
            probs = torch.softmax(m.bin_logits(logits, 1.0), -1)
    report = {"bc_steps": marks[-1], "seed": args.seed, "threads": args.threads, "episodes": n, "bc": bc,
              "greedy": curve[-1]["greedy"], "sampled": curve[-1]["sampled"], "curve": curve,
              "greedy_time_out_move_per_step": float(moves.mean()) if len(time_outs) else None,
              "max_move_per_step_l1": 2 * cfg.env.max_move,
              "first_dim_mass_on_extreme_bins": None if probs is None else float((probs[:, 0] + probs[:, -1]).mean()),
              "first_dim_max_prob": None if probs is None else float(probs.max(-1).values.mean())}
    learner.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "curve"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
