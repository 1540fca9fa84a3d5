"""One LIBERO simulator in its own process: `python -m vlarl.envs.libero_sim READ_FD WRITE_FD`.

The parent (`vlarl.envs.libero.LiberoEnv`) talks to it over two pipes with pickled tuples:
    ("config", dict)                      -> ("ok",)
    ("reset", suite, task, init_id, record) -> ("ok", obs, terminated)
    ("step", actions (n, 7))              -> ("ok", obs, reward, terminated, steps_run)
    ("place", object, target)             -> ("ok", obs, terminated)    # debugging and tests
    ("close",)                            -> exits
Any error is answered ("error", traceback) and the parent treats the simulator as crashed. A
process of its own means a MuJoCo segfault or a hang costs one episode, never the rollout worker.

Built environments are kept per (suite, task) in a small LRU cache: building one takes seconds (XML,
meshes, renderer), resetting a built one a fraction of that.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import traceback
from collections import OrderedDict
from multiprocessing.connection import Connection

import numpy as np

NOOP = np.array([0, 0, 0, 0, 0, 0, -1], np.float64)  # hold still, gripper open (robosuite: -1 opens)
SCENE_CAMERA, WRIST_CAMERA = "agentview", "robot0_eye_in_hand"
SEED_STRIDE = 1000  # init-state ids per task are far below this


def set_process_name(name: str) -> None:
    """What `ps -o comm` shows: vlarl-sim while building, vlarl-sim-ep while an episode runs."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def die_with_parent(parent_pid: int) -> None:
    """A killed rollout worker must not leave simulators behind."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


@contextlib.contextmanager
def quiet_stderr():
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(devnull)


def quat_to_axis_angle(q: np.ndarray) -> np.ndarray:
    """(4,) xyzw quaternion (robosuite's order) -> (3,) axis * angle."""
    x, y, z, w = q
    w = float(np.clip(w, -1.0, 1.0))
    s = np.sqrt(max(1.0 - w * w, 0.0))
    if s < 1e-8:
        return np.zeros(3, np.float32)
    return (np.array([x, y, z]) * (2.0 * np.arccos(w) / s)).astype(np.float32)


def upright(image: np.ndarray) -> np.ndarray:
    """robosuite renders with OpenGL's bottom-left origin; LIBERO policies see the frame rotated 180
    degrees (the convention of OpenVLA's and pi0's LIBERO data)."""
    return np.ascontiguousarray(image[::-1, ::-1])


class Simulator:
    def __init__(self, cfg: dict):
        with quiet_stderr():  # robosuite warns about its macro file on every import
            from libero.libero import benchmark, get_libero_path
            from libero.libero.envs import OffScreenRenderEnv  # noqa: F401  (the import is the slow part)

        self.cfg = cfg
        self.listed = benchmark.get_benchmark_dict()
        self.suites: dict = {}  # suite name -> the benchmark's suite object (a mixture steps several)
        self.bddl_root = get_libero_path("bddl_files")
        self.envs: OrderedDict = OrderedDict()  # (suite, task) -> built scene, least recently used first
        self.init_states: dict[tuple[str, int], np.ndarray] = {}
        self.env = None
        self.record = False

    def _env(self, suite: str, task: int):
        from libero.libero.envs import OffScreenRenderEnv

        key = (suite, task)
        if key in self.envs:
            self.envs.move_to_end(key)
            return self.envs[key]
        while len(self.envs) >= self.cfg["sim_cache"]:
            _, old = self.envs.popitem(last=False)
            old.close()
        if suite not in self.suites:
            self.suites[suite] = self.listed[suite]()
        t = self.suites[suite].get_task(task)
        size = self.cfg["camera_size"]
        cameras = [SCENE_CAMERA] + ([WRIST_CAMERA] if self.cfg["wrist_camera"] else [])
        env = OffScreenRenderEnv(bddl_file_name=os.path.join(self.bddl_root, t.problem_folder, t.bddl_file),
                                 camera_heights=size, camera_widths=size, camera_names=cameras)
        self.envs[key] = env
        self.init_states[key] = self.suites[suite].get_task_init_states(task)
        return env

    def reset(self, suite: str, task: int, init_id: int, record: bool):
        set_process_name("vlarl-sim")
        self.env = self._env(suite, task)
        self.record = record
        # An init state fixes the objects' joints but not where reset puts the fixtures (cabinet,
        # stove): LIBERO samples those from numpy's global RNG. Seeding it per (task, init state)
        # makes an episode's start, pixels included, the same every time.
        np.random.seed(task * SEED_STRIDE + init_id)
        self.env.reset()
        obs = self.env.set_init_state(self.init_states[(suite, task)][init_id])
        done = False
        for _ in range(self.cfg["settle_steps"]):  # objects drop onto the table before the policy acts
            obs, _, done, _ = self.env.step(NOOP)
        set_process_name("vlarl-sim-ep")
        return self.pack(obs), bool(done)

    def step(self, actions: np.ndarray):
        reward, done, k = 0.0, False, 0
        for a in actions:
            obs, r, done, _ = self.env.step(np.asarray(a, np.float64))
            reward, k = reward + float(r), k + 1
            if done:
                break
        return self.pack(obs), reward, bool(done), k

    def place(self, obj: str, target: str):
        """Put `obj` just above `target` (an object or a region site) and let physics settle it."""
        inner = self.env.env
        sim = inner.sim
        if target in inner.object_sites_dict:
            pos = sim.data.site_xpos[sim.model.site_name2id(inner.object_sites_dict[target].name)].copy()
        else:
            pos = sim.data.body_xpos[sim.model.body_name2id(inner.get_object(target).root_body)].copy()
        joint = inner.get_object(obj).joints[-1]
        qpos = sim.data.get_joint_qpos(joint).copy()
        qpos[:3] = pos + np.array([0.0, 0.0, 0.05])
        sim.data.set_joint_qpos(joint, qpos)
        sim.data.set_joint_qvel(joint, np.zeros(6))
        sim.forward()
        done = False
        for _ in range(self.cfg["settle_steps"] * 2):
            obs, _, done, _ = self.env.step(NOOP)
        return self.pack(obs), bool(done)

    def pack(self, obs: dict) -> dict:
        import cv2

        size = self.cfg["image_size"]
        frame = upright(obs[f"{SCENE_CAMERA}_image"])
        out = {"image": _resize(cv2, frame, size), "proprio": np.concatenate([
            obs["robot0_eef_pos"].astype(np.float32), quat_to_axis_angle(obs["robot0_eef_quat"]),
            obs["robot0_gripper_qpos"].astype(np.float32)])}
        if self.cfg["wrist_camera"]:
            out["wrist_image"] = _resize(cv2, upright(obs[f"{WRIST_CAMERA}_image"]), size)
        if self.record:
            out["frame"] = frame
        return out

    def close(self):
        for env in self.envs.values():
            env.close()
        self.envs.clear()


def _resize(cv2, image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size:
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def main(argv: list[str]) -> None:
    read_fd, write_fd, parent_pid = (int(a) for a in argv)
    die_with_parent(parent_pid)
    set_process_name("vlarl-sim")
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    sim = None
    while True:
        try:
            msg = inbox.recv()
        except EOFError:  # the parent is gone
            break
        try:
            if msg[0] == "config":
                sim = Simulator(msg[1])
                outbox.send(("ok",))
            elif msg[0] == "reset":
                outbox.send(("ok", *sim.reset(*msg[1:])))
            elif msg[0] == "step":
                outbox.send(("ok", *sim.step(msg[1])))
            elif msg[0] == "place":
                outbox.send(("ok", *sim.place(*msg[1:])))
            elif msg[0] == "close":
                break
            else:
                outbox.send(("error", f"unknown command {msg[0]!r}"))
        except Exception:
            outbox.send(("error", traceback.format_exc()))
    if sim is not None:
        sim.close()


if __name__ == "__main__":
    main(sys.argv[1:])
