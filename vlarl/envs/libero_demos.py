"""Scripted LIBERO demonstrations: `python -m vlarl.envs.libero_demos --suite libero_spatial --out DIR`.

A controller that reads object poses from the simulator (`vlarl.envs.libero_script.PickPlace`)
solves each task of a pick-and-place suite (libero_spatial, libero_object) from the suite's init
states, and the episodes are written as LIBERO-layout HDF5, one file per task, which
`python -m vlarl.sft data.path=DIR` reads:

    DIR/<task name>_demo.hdf5
        data                 attrs: problem_info (JSON with language_instruction), env_args (JSON),
                                    bddl_file_name, macros_image_convention (opengl), num_demos, total
        data/demo_N          attrs: num_samples, success, init_state, grasp_attempts
        data/demo_N/obs/agentview_rgb, eye_in_hand_rgb   (T, S, S, 3) uint8, as robosuite renders them
        data/demo_N/obs/ee_pos (T, 3), ee_ori (T, 3) axis-angle, ee_states (T, 6), gripper_states (T, 2),
                        joint_states (T, 7)
        data/demo_N/actions  (T, 7) OSC_POSE deltas in [-1, 1], gripper -1 open / +1 closed
        data/demo_N/rewards, dones (T,) uint8; states (T, D) MuJoCo states, to replay at another camera size
    DIR/report.json      per-task successes and episode lengths

obs[t] is what the robot saw before actions[t]. Every episode is written with its `success` flag;
`--successful-only` keeps the solved ones. Episode k of a task starts from init state
`--first-init-state` + k, after the same seeded reset and 10 settling steps as vlarl's LIBERO env,
so the frames match what a policy sees there. Training uses init states 0..num_init_states-1 (40 by
default) and evaluation the rest: keep demonstrations below that. `--no-render` runs physics only
(no cameras, about 10x faster on a CPU) and writes only report.json: the way to measure success.

Measured with `python -m vlarl.envs.libero_demos --suite SUITE --episodes-per-task 10 --no-render --out
runs/demo_check/SUITE` (init states 0-9 of every task): libero_spatial 100/100 and libero_object 100/100
solved, every task 10/10; per-task lengths in the README section "Scripted LIBERO demonstrations".
"""

from __future__ import annotations

import os

# Single-threaded BLAS: the OSC controller's small matrix products are much slower when OpenBLAS spreads
# them over busy cores (measured on 2 cores under load: 320 ms per step with its threads, 22 ms without).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from vlarl.envs.libero import SUITE_INIT_STATES, SUITE_MAX_STEPS, SimulatorError, render_backend  # noqa: E402
from vlarl.envs.libero_script import PickPlace, Scene, UnsupportedGoal, parse_goal  # noqa: E402
from vlarl.envs.libero_sim import (NOOP, SCENE_CAMERA, SEED_STRIDE, WRIST_CAMERA, quat_to_axis_angle,  # noqa: E402
                                   quiet_stderr)

SCRIPTED_SUITES = ("libero_spatial", "libero_object")  # single pick-and-place goals
SETTLE_STEPS = 10  # no-op steps after the init state, as in vlarl's LIBERO env (LiberoSpec.settle_steps)


@dataclass
class DemoEpisode:
    """One scripted episode; the obs arrays are empty when nothing was rendered."""

    init_state: int
    actions: list = field(default_factory=list)  # (7,) per step
    rewards: list = field(default_factory=list)  # float per step
    states: list = field(default_factory=list)  # (D,) MuJoCo state before each action
    obs: dict = field(default_factory=dict)  # key -> list of per-step arrays
    success: bool = False
    attempts: int = 0  # grasps the controller made (more than 1: a grasp slipped and was retried)
    phases: list = field(default_factory=list)  # (step, phase) where the controller changed phase

    def __len__(self) -> int:
        return len(self.actions)


class TaskSim:
    """One LIBERO task in this process, with cameras (`camera_size` > 0) or physics only."""

    def __init__(self, suite: str, task: int, camera_size: int):
        with quiet_stderr(), contextlib.redirect_stdout(io.StringIO()):  # robosuite's macro warnings
            from libero.libero import benchmark, get_libero_path
            from libero.libero.envs.env_wrapper import ControlEnv

            self.suite = benchmark.get_benchmark_dict()[suite]()
        self.task = self.suite.get_task(task)
        self.task_id = task
        self.bddl_file = os.path.join(get_libero_path("bddl_files"), self.task.problem_folder, self.task.bddl_file)
        self.camera_size = camera_size
        self.env_kwargs = {"robots": ["Panda"], "controller": "OSC_POSE", "control_freq": 20,
                           "camera_names": [SCENE_CAMERA, WRIST_CAMERA], "camera_heights": camera_size or 128,
                           "camera_widths": camera_size or 128}
        render = camera_size > 0
        self.env = ControlEnv(bddl_file_name=self.bddl_file, use_camera_obs=render, has_offscreen_renderer=render,
                              **self.env_kwargs)
        self.init_states = self.suite.get_task_init_states(task)
        self.scene: Scene | None = None  # made at each reset (robosuite rebuilds its MjSim then)
        self.goal = parse_goal(self.env.env.parsed_problem["goal_state"])

    @property
    def instruction(self) -> str:
        return self.task.language

    def reset(self, init_state: int) -> tuple[dict, bool]:
        """The seeded reset of vlarl's LIBERO env (libero_sim.Simulator.reset): same start, same pixels."""
        np.random.seed(self.task_id * SEED_STRIDE + init_state)
        self.env.reset()
        obs = self.env.set_init_state(self.init_states[init_state])
        self.scene = Scene(self.env.env)
        done = False
        for _ in range(SETTLE_STEPS):
            obs, _, done, _ = self.env.step(NOOP)
        return obs, bool(done)

    def close(self) -> None:
        self.env.close()


def run_episode(sim: TaskSim, init_state: int, max_steps: int) -> DemoEpisode:
    """Reset to `init_state` and let the scripted controller act until success or `max_steps`."""
    obs, done = sim.reset(init_state)
    controller = PickPlace(sim.goal)
    ep = DemoEpisode(init_state)
    render = sim.camera_size > 0
    while not done and len(ep) < max_steps and not controller.gave_up:
        if render:
            _record(ep.obs, obs)
        ep.states.append(sim.env.get_sim_state())
        phase = controller.phase
        action = controller.act(sim.scene)
        if controller.phase != phase or not ep.phases:
            ep.phases.append((len(ep), controller.phase))
        obs, reward, done, _ = sim.env.step(action)
        ep.actions.append(action.astype(np.float64))
        ep.rewards.append(float(reward))
    ep.success = bool(done)
    ep.attempts = controller.attempts
    return ep


def _record(store: dict, obs: dict) -> None:
    """robosuite observation -> the LIBERO dataset's obs keys (frames as rendered, OpenGL's origin)."""
    quat = obs["robot0_eef_quat"]
    row = {"agentview_rgb": obs[f"{SCENE_CAMERA}_image"], "eye_in_hand_rgb": obs[f"{WRIST_CAMERA}_image"],
           "ee_pos": obs["robot0_eef_pos"], "ee_ori": quat_to_axis_angle(quat),
           "gripper_states": obs["robot0_gripper_qpos"], "joint_states": obs["robot0_joint_pos"]}
    row["ee_states"] = np.concatenate([row["ee_pos"], row["ee_ori"]])
    for key, value in row.items():
        store.setdefault(key, []).append(np.array(value))


class DemoFile:
    """One task's LIBERO-layout HDF5 file (see the module docstring), written one demo at a time so a
    task's frames are never all in memory; it appears under its name only once closed."""

    def __init__(self, path: Path, sim: TaskSim):
        import h5py
        import robosuite.macros as macros

        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp")
        self.file = h5py.File(self.tmp, "w")
        self.data = self.file.create_group("data")
        self.demos, self.total = 0, 0
        env = sim.env
        attrs = self.data.attrs
        attrs["problem_info"] = json.dumps({"problem_name": env.problem_name, "domain_name": env.domain_name,
                                            "language_instruction": sim.instruction})
        attrs["env_args"] = json.dumps({"type": 1, "env_name": env.problem_name, "problem_name": env.problem_name,
                                        "bddl_file": sim.bddl_file, "env_kwargs": sim.env_kwargs})
        attrs["bddl_file_name"] = sim.bddl_file
        attrs["macros_image_convention"] = macros.IMAGE_CONVENTION  # how robosuite rendered the frames
        attrs["env_name"] = env.problem_name
        attrs["generator"] = "vlarl.envs.libero_demos (scripted, privileged simulator state)"

    def add(self, ep: DemoEpisode) -> None:
        demo = self.data.create_group(f"demo_{self.demos}")
        demo.attrs["num_samples"] = len(ep)
        demo.attrs["success"] = ep.success
        demo.attrs["init_state"] = ep.init_state
        demo.attrs["grasp_attempts"] = ep.attempts
        demo.create_dataset("actions", data=np.stack(ep.actions))  # (T, 7)
        dones = np.zeros(len(ep), np.uint8)  # (T,) the episode ends at its last step
        dones[-1] = 1
        demo.create_dataset("rewards", data=(np.array(ep.rewards) > 0).astype(np.uint8))  # (T,) 1 on success
        demo.create_dataset("dones", data=dones)
        demo.create_dataset("states", data=np.stack(ep.states))  # (T, D)
        obs = demo.create_group("obs")
        for key, rows in ep.obs.items():
            array = np.stack(rows)
            if array.dtype == np.uint8:  # frames (T, S, S, 3): compressed, one chunk per frame
                obs.create_dataset(key, data=array, compression="gzip", compression_opts=4,
                                   chunks=(1, *array.shape[1:]))
            else:
                obs.create_dataset(key, data=array.astype(np.float64))
        self.demos += 1
        self.total += len(ep)

    def close(self) -> Path | None:
        """Finish the file; None (and no file) when no demo was added."""
        self.data.attrs["num_demos"] = self.demos
        self.data.attrs["total"] = self.total
        self.file.close()
        if not self.demos:
            self.tmp.unlink()
            return None
        self.tmp.replace(self.path)
        return self.path


def run(suite: str, tasks: list[int], episodes: int, first_init_state: int, out: Path, camera_size: int,
        successful_only: bool = False, max_steps: int | None = None, log=print) -> dict:
    """Run `episodes` scripted episodes of each task; write HDF5 files (when rendering) and report.json."""
    max_steps = max_steps or SUITE_MAX_STEPS[suite]
    report = {"suite": suite, "episodes_per_task": episodes, "init_states": [first_init_state,
              first_init_state + episodes - 1], "camera_size": camera_size, "max_steps": max_steps, "tasks": {}}
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        start = time.monotonic()
        sim = TaskSim(suite, task, camera_size)
        file = DemoFile(out / f"{sim.task.name}_demo.hdf5", sim) if camera_size > 0 else None
        lengths, failed, regrasped = [], [], 0
        try:
            for k in range(episodes):
                ep = run_episode(sim, first_init_state + k, max_steps)
                (lengths if ep.success else failed).append(len(ep) if ep.success else ep.init_state)
                regrasped += ep.attempts > 1
                if file is not None and len(ep) and (ep.success or not successful_only):
                    file.add(ep)
        finally:
            path = file.close() if file is not None else None
            sim.close()
        entry = {"name": sim.task.name, "instruction": sim.instruction, "episodes": episodes,
                 "successes": len(lengths), "success_rate": len(lengths) / episodes,
                 "mean_length_successful": float(np.mean(lengths)) if lengths else None,
                 "failed_init_states": failed, "regrasped_episodes": regrasped,
                 "seconds": round(time.monotonic() - start, 1)}
        if path is not None:
            entry["file"] = str(path)
        report["tasks"][str(task)] = entry
        log(f"[{suite} task {task}] {len(lengths)}/{episodes} solved  ({entry['seconds']:.0f} s)  {sim.instruction}"
            + (f"  failed init states {failed}" if failed else ""))
    total = sum(t["episodes"] for t in report["tasks"].values())
    report["success_rate"] = sum(t["successes"] for t in report["tasks"].values()) / max(total, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log(f"[{suite}] {report['success_rate']:.0%} of {total} episodes solved; report: {out / 'report.json'}")
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlarl.envs.libero_demos", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="libero_spatial", help=f"one of {', '.join(SCRIPTED_SUITES)}")
    p.add_argument("--episodes-per-task", type=int, default=5, help="episodes per task (init states in order)")
    p.add_argument("--out", required=True, type=Path, help="folder for the HDF5 files and report.json")
    p.add_argument("--tasks", default="all", help="comma-separated task ids, or all")
    p.add_argument("--first-init-state", type=int, default=0, help="init state of each task's first episode")
    p.add_argument("--camera-size", type=int, default=128, help="side of the rendered frames in pixels")
    p.add_argument("--max-steps", type=int, default=0, help="steps per episode; 0: the suite's evaluation limit")
    p.add_argument("--successful-only", action="store_true", help="write only the episodes that solved the task")
    p.add_argument("--no-render", action="store_true", help="physics only: measure success, write report.json")
    return p.parse_args(argv)


class OptionError(ValueError):
    """An option the demonstrator cannot honour; the message says which to change."""


def check_args(args: argparse.Namespace) -> list[int]:
    """The task ids to run, or an OptionError saying which option to change."""
    if args.suite not in SCRIPTED_SUITES:
        raise OptionError(f"--suite {args.suite} is not scripted; choose one of {', '.join(SCRIPTED_SUITES)}.")
    if args.tasks != "all" and not all(t.strip().isdigit() for t in args.tasks.split(",")):
        raise OptionError(f"--tasks {args.tasks} is not a comma-separated list of task ids; give e.g. 0,3 or all.")
    tasks = list(range(10)) if args.tasks == "all" else [int(t) for t in args.tasks.split(",")]
    if any(not 0 <= t < 10 for t in tasks):
        raise OptionError(f"--tasks {args.tasks} names a task outside 0..9 of {args.suite}; give ids in 0..9.")
    last = args.first_init_state + args.episodes_per_task
    if args.episodes_per_task < 1 or args.first_init_state < 0 or last > SUITE_INIT_STATES:
        raise OptionError(f"init states {args.first_init_state}..{last - 1} are outside LIBERO's "
                          f"{SUITE_INIT_STATES} per task; lower --episodes-per-task or --first-init-state.")
    if not args.no_render and args.camera_size < 8:
        raise OptionError(f"--camera-size {args.camera_size} is too small; give at least 8 pixels.")
    return tasks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tasks = check_args(args)
        if not args.no_render:  # before robosuite loads: MuJoCo picks its OpenGL backend on import
            backend = render_backend()
            os.environ.setdefault("MUJOCO_GL", backend)
            os.environ.setdefault("PYOPENGL_PLATFORM", backend)
        run(args.suite, tasks, args.episodes_per_task, args.first_init_state, args.out,
            0 if args.no_render else args.camera_size, args.successful_only, args.max_steps or None)
    except (OptionError, UnsupportedGoal, SimulatorError) as e:
        print(f"vlarl: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
