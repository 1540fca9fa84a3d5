"""Scripted demonstrations of the toy task, written in any dataset format (tests, demos, the README).

    python -m vlarl.datasets.toy OUT --format hdf5|lerobot [--episodes 256] [--seed 0] [--image-size 16]

hdf5 writes one LIBERO-layout file per task (LIBERO's convention) into OUT; lerobot writes a LeRobot v3
dataset folder OUT.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from vlarl.datasets.common import Episode
from vlarl.datasets.hdf5 import write_hdf5
from vlarl.datasets.lerobot import write_lerobot
from vlarl.envs.toy import ToyEnv, ToySpec


def toy_episodes(num_episodes: int, seed: int = 0, spec: ToySpec = ToySpec()) -> list[Episode]:
    """The toy task's scripted expert (ToyEnv.expert_actions) on random tasks and layouts, one episode each."""
    env = ToyEnv(num_episodes, spec, seed)
    rng = np.random.default_rng((seed, 11))
    obs = env.reset(rng.integers(0, env.num_tasks, num_episodes), rng.integers(0, spec.num_init_states, num_episodes))
    steps: list[list[tuple]] = [[] for _ in range(num_episodes)]
    ended = np.zeros(num_episodes, bool)
    instructions = list(obs["instruction"])
    for _ in range(spec.max_steps):
        actions = env.expert_actions()
        for i in np.nonzero(~ended)[0]:
            steps[i].append((obs["image"][i], obs["proprio"][i], actions[i]))
        result = env.step(actions)  # ended episodes step too; their rows are ignored
        ended |= result.terminated | result.truncated
        obs = result.obs
        if ended.all():
            break
    return [Episode(np.stack([s[0] for s in ep]), np.stack([s[1] for s in ep]), np.stack([s[2] for s in ep]),
                    instructions[i], f"toy episode {i}") for i, ep in enumerate(steps)]


def write_toy(out: str | Path, format: str, episodes: list[Episode]) -> list[Path]:
    """hdf5: one file per task under out (named like LIBERO's, <instruction>_demo.hdf5); lerobot: folder out."""
    out = Path(out)
    if format == "lerobot":
        return [write_lerobot(out, episodes)]
    by_task: dict[str, list[Episode]] = {}
    for e in episodes:
        by_task.setdefault(e.instruction, []).append(e)
    return [write_hdf5(out / (re.sub(r"\W+", "_", task).strip("_") + "_demo.hdf5"), eps)
            for task, eps in by_task.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write scripted toy-task demonstrations as a dataset.")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", choices=("hdf5", "lerobot"), default="hdf5")
    p.add_argument("--episodes", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=16, help="a multiple of 4 (the toy board's grid)")
    args = p.parse_args(argv)
    episodes = toy_episodes(args.episodes, args.seed, ToySpec(image_size=args.image_size))
    paths = write_toy(args.out, args.format, episodes)
    print(f"vlarl: wrote {len(episodes)} episodes ({sum(len(e) for e in episodes)} steps) to "
          f"{', '.join(map(str, paths)) if len(paths) < 3 else f'{len(paths)} files in {args.out}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
