"""LIBERO steps/s: physics alone, physics + rendering, and through vlarl's env layer with K
simulator subprocesses, measured in one run so the cost of the process layer shows as a ratio.

    .venv/bin/python bench/libero_steps.py [--suite libero_spatial] [--steps 100] [--k 1 2 4]

Writes bench/results/libero_steps.json. In-process numbers use one robosuite environment built the
same way the simulator process builds it (agentview camera at --camera-size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlarl.envs.libero import LiberoEnv, LiberoSpec, render_backend  # noqa: E402

HOLD = np.array([0.2, 0, 0, 0, 0, 0, -1], np.float64)  # a small constant motion so physics has work


def in_process(suite: str, camera: bool, size: int, steps: int) -> float:
    """steps/s of one robosuite env in this process, after the usual 10 settling steps."""
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    s = benchmark.get_benchmark_dict()[suite]()
    t = s.get_task(0)
    kwargs = dict(camera_heights=size, camera_widths=size, camera_names=["agentview"]) if camera else \
        dict(use_camera_obs=False)
    env = OffScreenRenderEnv(bddl_file_name=os.path.join(get_libero_path("bddl_files"), t.problem_folder, t.bddl_file),
                             **kwargs)
    env.reset()
    env.set_init_state(s.get_task_init_states(0)[0])
    for _ in range(10):
        env.step(HOLD)
    start = time.perf_counter()
    for _ in range(steps):
        env.step(HOLD)
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def through_env(suite: str, k: int, size: int, steps: int) -> dict:
    """Aggregate steps/s of LiberoEnv with k simulator subprocesses stepped together."""
    env = LiberoEnv(k, LiberoSpec(suite=suite, num_tasks=1, num_init_states=40, max_steps=10 * steps,
                                  camera_size=size, image_size=min(64, size)))
    try:
        start = time.perf_counter()
        env.reset([0] * k, list(range(k)))
        reset_s = time.perf_counter() - start
        actions = np.tile(HOLD.astype(np.float32), (k, 1))
        env.step(actions)
        start = time.perf_counter()
        for _ in range(steps):
            env.step(actions)
        return {"k": k, "steps_per_s": k * steps / (time.perf_counter() - start), "first_reset_s": reset_s,
                "restarts": env.restarts}
    finally:
        env.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--camera-size", type=int, default=128)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", default="bench/results/libero_steps.json")
    args = p.parse_args()
    backend = render_backend()
    os.environ["MUJOCO_GL"] = os.environ["PYOPENGL_PLATFORM"] = backend
    physics = in_process(args.suite, False, args.camera_size, args.steps)
    print(f"physics only: {physics:.1f} steps/s", flush=True)
    rendered = in_process(args.suite, True, args.camera_size, args.steps)
    print(f"physics + {args.camera_size}px render ({backend}): {rendered:.1f} steps/s", flush=True)
    layered = []
    for k in args.k:
        layered.append(through_env(args.suite, k, args.camera_size, args.steps))
        print(f"env layer, {k} subprocess(es): {layered[-1]['steps_per_s']:.1f} steps/s", flush=True)
    one = next((r for r in layered if r["k"] == 1), None)
    report = {
        "suite": args.suite, "steps": args.steps, "camera_size": args.camera_size, "render_backend": backend,
        "cpus": os.cpu_count(), "machine": platform.machine(),
        "physics_steps_per_s": physics, "render_steps_per_s": rendered,
        "render_cost_ms_per_step": 1000 * (1 / rendered - 1 / physics),
        "env_layer": layered,
        # < 1 means the process layer costs something on top of rendering in-process
        "env_layer_1_vs_in_process": one["steps_per_s"] / rendered if one else None,
        "scaling_vs_1": {r["k"]: r["steps_per_s"] / one["steps_per_s"] for r in layered} if one else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
