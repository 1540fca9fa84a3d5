"""LIBERO suites as one vectorised environment whose simulators live in subprocesses.

Each of the `num_envs` episodes runs in its own simulator process (`vlarl.envs.libero_sim`), all
stepped in parallel. A simulator that dies (segfault, SIGKILL, Python error) or does not answer
within `step_timeout` seconds is killed and replaced; its episode ends truncated, the restart is
counted (`restarts`, logged as env/restarts) and the other episodes carry on.

Actions are 7-D in robosuite's units: xyz and rotation deltas in [-1, 1] (the OSC controller scales
them) and the gripper, where -1 opens and +1 closes. Datasets that store +1 = open (OpenVLA's LIBERO
RLDS data) set `invert_gripper`. The policy's normalised actions reach these units through the
action tokenizer's q01/q99 statistics (identity for tiny models). With `action_chunk` n the policy
emits n actions (7n values) per call and the simulator executes them in order, stopping at success.

Init states: LIBERO stores 50 per task. Training draws from the first `num_init_states`, evaluation
from the rest (`held_out_episodes`), so reported success is never measured on trained-on states.
Suites: the standard five and the perturbed variants the installed benchmark lists (libero_suites.py);
a variant with no more init states than `num_init_states` (some hold 10) is evaluation-only: all of
its states are held out.

Mixtures (`env.train_suites`): the tasks of several suites in one env, indexed in order (suite 0's
tasks, then suite 1's, ...), so each (suite, task) is an arm of its own for the curriculum; every
simulator can build any of them. Each episode keeps its own suite's step limit (env.max_steps for
suites on env.name's base, the standard limit of their base for others).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import numpy as np

from vlarl.data.spec import ACTION_DIM, PROPRIO_DIM
from vlarl.envs.base import StepResult, VecEnv

from vlarl.envs.libero_suites import STANDARD as SUITE_MAX_STEPS  # the standard suites' step limits
from vlarl.envs.libero_suites import base_suite, check_suite, max_steps, perturbation

SUITE_INIT_STATES = 50  # init states per task of the standard suites
RENDER_HELP = ("LIBERO renders its cameras with OpenGL and neither EGL nor OSMesa works here: install Debian's "
               "libosmesa6 (apt-get install -y libosmesa6) for CPU rendering, or use a machine with an NVIDIA "
               "driver for EGL.")


class SimulatorError(RuntimeError):
    """A simulator failed in a way a restart did not fix (for example a broken asset)."""


@dataclass
class LiberoSpec:
    suite: str  # libero_spatial | libero_object | libero_goal | libero_10 | libero_90 | a perturbed variant
    num_tasks: int  # the suite's first num_tasks tasks (of each suite in a mixture)
    num_init_states: int  # training init states per task; the rest of the 50 are held out
    max_steps: int  # simulator steps per episode (truncation)
    action_chunk: int = 1  # actions per policy call
    replan_steps: int = 0  # of them executed before the policy is asked again (0: all, open loop)
    camera_size: int = 128  # rendered side in pixels (videos use this)
    image_size: int = 64  # side fed to the model
    settle_steps: int = 10  # no-op steps after placing the init state
    wrist_camera: bool = False  # also render the wrist camera as obs["wrist_image"]
    invert_gripper: bool = False  # the policy's gripper uses +1 = open
    step_timeout: float = 60.0  # seconds a simulator may take for one policy step
    reset_timeout: float = 300.0  # seconds for a reset (includes building the scene)
    sim_cache: int = 4  # built scenes kept per simulator process
    render: str = "auto"  # auto | egl | osmesa
    suites: tuple[str, ...] = ()  # a mixture: the suites whose tasks the env holds (suite among them); () = suite alone


def bddl_language(path: str) -> str:
    """The `(:language ...)` instruction a BDDL task file states, whitespace normalised."""
    import re

    with open(path) as f:
        match = re.search(r"\(:language\s+([^)]*)\)", f.read())
    return " ".join(match.group(1).split()) if match else ""


@functools.lru_cache(maxsize=None)
def suite_tasks(suite: str) -> list[tuple[str, str]]:
    """(name, instruction) of every task in a suite, in the suite's order.

    Standard suites: the benchmark's task language (what the published evaluations prompt with).
    Perturbed variants: the same, unless the variant's BDDL file states another instruction than the
    base suite's file for that task (LIBERO-PRO's `_lan` paraphrases, `_task` redesigned goals): then
    that one. The benchmark's task language is derived from the task name, which those variants keep,
    so it would still give the base instruction."""
    check_suite(suite)
    with contextlib.redirect_stdout(io.StringIO()):  # LIBERO prints its task order on every load
        from libero.libero import benchmark

        listed = benchmark.get_benchmark_dict()
        s = listed[suite]()
        tasks = [(s.get_task(i).name, s.get_task(i).language) for i in range(s.n_tasks)]
        if not perturbation(suite):
            return tasks
        base = listed[base_suite(suite)]()
        stated = [bddl_language(base.get_task_bddl_file_path(i)) for i in range(base.n_tasks)]
        out = []
        for i, (name, language) in enumerate(tasks):  # variants keep the base suite's task order
            own = bddl_language(s.get_task_bddl_file_path(i))
            changed = own and (i >= len(stated) or own.lower() != stated[i].lower())
            out.append((name, own if changed else language))
        return out


@functools.lru_cache(maxsize=None)
def suite_init_states(suite: str) -> int:
    """Init states per task of a suite (50 for the standard ones; some perturbed variants hold 10)."""
    check_suite(suite)
    with contextlib.redirect_stdout(io.StringIO()):
        from libero.libero import benchmark

        s = benchmark.get_benchmark_dict()[suite]()
        return min(len(s.get_task_init_states(i)) for i in range(s.n_tasks))


def mixture_suites(spec: LiberoSpec) -> list[str]:
    """The suites an env holds: spec.suites (checked: distinct, spec.suite among them), or spec.suite."""
    if not spec.suites:
        return [spec.suite]
    suites = list(spec.suites)
    for s in suites:
        check_suite(s)
    if len(set(suites)) < len(suites):
        raise ValueError(f"env.train_suites={suites} names a suite twice; list each once.")
    if spec.suite not in suites:
        raise ValueError(f"env.train_suites={suites} does not hold env.name={spec.suite}: the mixture includes the "
                         f"suite the run is named after (its base for robustness); add {spec.suite} or pick one "
                         "of the list as env.name.")
    return suites


def suite_step_limit(suite: str, spec: LiberoSpec) -> int:
    """Simulator steps per episode of a suite: spec.max_steps on spec.suite's base, else the suite's standard limit."""
    return spec.max_steps if base_suite(suite) == base_suite(spec.suite) else max_steps(suite)


def suite_env(env_cfg, suite: str) -> dict:
    """env overrides that switch a run's env config to one other LIBERO suite (robustness evaluation):
    on env.name's base the same first env.num_tasks tasks (variants keep the base's task order) and
    env.max_steps, so cells compare like with like; on another base all its tasks and its standard limit."""
    tasks = len(suite_tasks(suite))
    if base_suite(suite) == base_suite(env_cfg.name):
        return {"name": suite, "max_steps": env_cfg.max_steps, "num_tasks": min(env_cfg.num_tasks, tasks),
                "train_suites": []}
    return {"name": suite, "max_steps": max_steps(suite), "num_tasks": tasks, "train_suites": []}


def to_robosuite(actions: np.ndarray, action_chunk: int, invert_gripper: bool) -> np.ndarray:
    """(N, 7 * chunk) policy actions in env units -> (N, chunk, 7) robosuite commands: clipped to
    [-1, 1], gripper sign flipped when the policy uses +1 = open."""
    out = np.asarray(actions, np.float64).reshape(len(actions), action_chunk, ACTION_DIM).copy()
    if invert_gripper:
        out[..., -1] *= -1
    return np.clip(out, -1.0, 1.0)


_RENDER_OK: dict[str, bool] = {}


def render_backend(choice: str = "auto") -> str:
    """The OpenGL backend simulators use: MUJOCO_GL if the user set it, else EGL when an NVIDIA GPU is
    visible, else OSMesa. Each candidate is tried once in a subprocess; none working raises."""
    if choice == "auto" and os.environ.get("MUJOCO_GL"):
        choice = os.environ["MUJOCO_GL"]
    if choice == "auto":
        candidates = (["egl"] if os.path.exists("/dev/nvidia0") else []) + ["osmesa"]
    else:
        candidates = [choice]
    for backend in candidates:
        if backend not in _RENDER_OK:
            probe = ("import mujoco; c = mujoco.GLContext(8, 8); c.make_current(); c.free()")
            r = subprocess.run([sys.executable, "-c", probe], env=_gl_env(backend), capture_output=True, timeout=120)
            _RENDER_OK[backend] = r.returncode == 0
        if _RENDER_OK[backend]:
            return backend
    raise SimulatorError(RENDER_HELP if choice == "auto" else f"MUJOCO_GL={choice} does not work here. " + RENDER_HELP)


def _gl_env(backend: str) -> dict:
    """A simulator process's environment: the GL backend, and single-threaded BLAS. The controller's
    small matrix products are much slower when OpenBLAS spreads them over cores other processes use
    (measured on 2 busy cores: 320 ms per step with its threads, 22 ms without)."""
    single = {var: "1" for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**os.environ, **single, "MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend}


class _Sim:
    """Parent-side handle of one simulator process."""

    def __init__(self, cfg: dict, backend: str):
        parent_read, child_write = os.pipe()
        child_read, parent_write = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vlarl.envs.libero_sim", str(child_read), str(child_write), str(os.getpid())],
            pass_fds=(child_read, child_write), env=_gl_env(backend), stdout=subprocess.DEVNULL)
        os.close(child_read), os.close(child_write)
        self.inbox = Connection(parent_read, writable=False)
        self.outbox = Connection(parent_write, readable=False)
        self.outbox.send(("config", cfg))
        self.configured = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, msg: tuple) -> None:
        self.outbox.send(msg)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.inbox.close(), self.outbox.close()


class LiberoEnv(VecEnv):
    steps_in_background = True

    def __init__(self, num_envs: int, spec: LiberoSpec, seed: int = 0):
        suites = mixture_suites(spec)
        self.tasks: list[tuple[str, int, str]] = []  # (suite, task index in it, instruction) per task id
        for suite in suites:
            tasks = suite_tasks(suite)
            if not 1 <= spec.num_tasks <= len(tasks):
                raise ValueError(f"env.num_tasks={spec.num_tasks} but {suite} has {len(tasks)} tasks; "
                                 f"choose 1..{len(tasks)}.")
            self.tasks += [(suite, i, instruction) for i, (_, instruction) in enumerate(tasks[:spec.num_tasks])]
        total = min(suite_init_states(s) for s in suites)
        evaluation_only = len(suites) == 1 and perturbation(spec.suite) and spec.num_init_states >= total
        if not evaluation_only and not 1 <= spec.num_init_states < total:
            short = [s for s in suites if suite_init_states(s) <= spec.num_init_states]
            if len(suites) > 1 and short:
                raise ValueError(f"env.train_suites: {', '.join(short)} hold(s) {total} init states per task, no more "
                                 f"than env.num_init_states={spec.num_init_states}, so they are evaluation-only; drop "
                                 f"them from env.train_suites or lower env.num_init_states below {total}.")
            raise ValueError(f"env.num_init_states={spec.num_init_states} must leave held-out init states for "
                             f"evaluation: choose 1..{total - 1} of {spec.suite}'s {total}.")
        if spec.image_size > spec.camera_size:
            raise ValueError(f"env.image_size={spec.image_size} exceeds env.camera_size={spec.camera_size}; "
                             "render at least at the model's size.")
        self.spec = spec
        self.num_envs = num_envs
        self.num_tasks = len(self.tasks)
        # A perturbed suite with no more init states than training draws from is evaluation-only: every
        # state is held out (num_init_states 0; the trainer refuses to train on it).
        self.num_init_states = 0 if evaluation_only else spec.num_init_states
        self.num_held_out_states = total - self.num_init_states
        self.total_init_states = total
        if not 0 <= spec.replan_steps <= spec.action_chunk:
            raise ValueError(f"env.replan_steps={spec.replan_steps} must lie in 0..env.action_chunk "
                             f"({spec.action_chunk}); 0 executes the whole chunk.")
        self.executed = spec.replan_steps or spec.action_chunk  # simulator steps per policy call
        self.step_limits = {s: suite_step_limit(s, spec) for s in suites}  # simulator steps per episode, per suite
        self.max_steps = math.ceil(max(self.step_limits.values()) / self.executed)  # policy calls per episode (longest)
        self.restarts = 0
        self._sims: list[_Sim | None] = [None] * num_envs
        self._backend: str | None = None
        self._cfg = {"camera_size": spec.camera_size, "image_size": spec.image_size,
                     "settle_steps": spec.settle_steps, "wrist_camera": spec.wrist_camera, "sim_cache": spec.sim_cache}
        self._episode: list[tuple[int, int]] = [(0, 0)] * num_envs
        self._steps = np.zeros(num_envs, np.int64)  # simulator steps in the current episode
        self._limit = np.full(num_envs, spec.max_steps, np.int64)  # its suite's step limit
        self._ended = np.ones(num_envs, bool)
        self._obs: list[dict | None] = [None] * num_envs
        self._waiting: dict[int, tuple[str, float, float]] = {}  # requests in flight: (what, timeout, deadline)
        self._send_failed: dict[int, str] = {}  # simulators whose request could not even be sent: why

    def instructions(self) -> list[str]:
        return [instruction for _, _, instruction in self.tasks]

    def task_suites(self) -> list[str]:
        """The suite of each task id (all the same outside a mixture)."""
        return [suite for suite, _, _ in self.tasks]

    def sim_pids(self) -> list[int | None]:
        return [s.pid if s else None for s in self._sims]

    # ---- episodes --------------------------------------------------------------------------------
    def reset(self, task_ids, init_state_ids, record: int = 0) -> dict:
        """Start episode i on task_ids[i] from init state init_state_ids[i]. The first `record`
        episodes also return the full-size camera frame as obs["frames"][i]."""
        if len(task_ids) != self.num_envs or len(init_state_ids) != self.num_envs:
            raise ValueError(f"reset needs {self.num_envs} task and init-state ids.")
        for t, k in zip(task_ids, init_state_ids):
            if not (0 <= t < self.num_tasks and 0 <= k < self.total_init_states):
                raise ValueError(f"task {t} / init state {k} is outside {self.spec.suite} "
                                 f"({self.num_tasks} tasks, {self.total_init_states} init states each).")
        self._gather(list(self._waiting))  # steps a failed caller sent but never collected
        self._episode = list(zip(map(int, task_ids), map(int, init_state_ids)))
        self._limit[:] = [self.step_limits[self.tasks[t][0]] for t, _ in self._episode]
        self._steps[:] = 0
        self._ended[:] = False
        for attempt in range(2):  # a simulator that fails to reset gets one fresh process
            todo = [i for i in range(self.num_envs) if attempt == 0 or self._obs[i] is None]
            for i in todo:
                self._obs[i] = None
            replies = self._request({i: ("reset", *self.tasks[self._episode[i][0]][:2], self._episode[i][1], i < record)
                                     for i in todo},
                                    self.spec.reset_timeout, "reset")
            for i, reply in replies.items():
                if reply[0] == "ok":
                    self._obs[i] = reply[1]
            if all(o is not None for o in self._obs):
                return self._batch_obs()
        bad = [i for i in range(self.num_envs) if self._obs[i] is None]
        raise SimulatorError(f"LIBERO simulator(s) {bad} failed to reset twice ({self.spec.suite}, task ids "
                             f"{[self._episode[i] for i in bad]}); see the simulator error above.")

    def step(self, actions: np.ndarray, env_ids=None) -> StepResult:
        """actions: (k, 7 * action_chunk) in env units for episodes env_ids (all when None); returns
        their rows. Episodes that already ended are not stepped."""
        ids = range(self.num_envs) if env_ids is None else env_ids
        self.step_send(actions, ids)
        return self.step_recv(ids)

    def step_send(self, actions: np.ndarray, env_ids) -> None:
        """Send one step to the simulators of episodes env_ids and return while they run."""
        ids = [int(i) for i in env_ids]
        actions = to_robosuite(actions, self.spec.action_chunk, self.spec.invert_gripper)
        if len(actions) != len(ids):
            raise ValueError(f"step needs one action row per environment: {len(actions)} rows for {len(ids)} ids.")
        self._send({i: ("step", a[:self.executed][:self._limit[i] - self._steps[i]]) for i, a in zip(ids, actions)
                    if not self._ended[i]}, self.spec.step_timeout, "step")

    def step_recv(self, env_ids) -> StepResult:
        """Wait for the step step_send started on env_ids; rows follow env_ids."""
        ids = [int(i) for i in env_ids]
        replies = self._gather(ids)
        reward = np.zeros(len(ids), np.float32)
        terminated, truncated, timeout = (np.zeros(len(ids), bool) for _ in range(3))
        executed = np.zeros(len(ids), np.int64)  # actions of each chunk the simulator ran
        for row, i in enumerate(ids):
            if i not in replies:  # ended before: not stepped
                continue
            reply = replies[i]
            if reply[0] != "ok":  # crashed or hung: replaced already; the episode ends here
                truncated[row] = True
                continue
            self._obs[i], reward[row], terminated[row], k = reply[1:]
            self._steps[i] += k
            executed[row] = k
            timeout[row] = truncated[row] = not terminated[row] and self._steps[i] >= self._limit[i]
        self._ended[ids] |= terminated | truncated
        return StepResult(self._batch_obs(ids), reward, terminated, truncated,
                          {"success": terminated.copy(), "restarts": self.restarts, "timeout": timeout,
                           "executed": executed})

    def place(self, env_index: int, obj: str, target: str) -> tuple[dict, bool]:
        """Debugging aid: put object `obj` on `target` in episode env_index's simulator; returns the
        packed observation and whether the task now counts as solved."""
        reply = self._request({env_index: ("place", obj, target)}, self.spec.step_timeout, "place")[env_index]
        if reply[0] != "ok":
            raise SimulatorError(f"place failed: {reply[1]}")
        self._obs[env_index] = reply[1]
        return reply[1], reply[2]

    def close(self) -> None:
        for i, s in enumerate(self._sims):
            if s is not None:
                try:
                    s.send(("close",))
                    s.proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
                s.kill()
                self._sims[i] = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- processes ---------------------------------------------------------------------------------
    def _sim(self, i: int) -> _Sim:
        if self._sims[i] is None:
            if self._backend is None:
                self._backend = render_backend(self.spec.render)
            self._sims[i] = _Sim(self._cfg, self._backend)
        return self._sims[i]

    def _request(self, messages: dict[int, tuple], timeout: float, what: str) -> dict[int, tuple]:
        """Send messages[i] to simulator i, all at once, and wait for one reply from each."""
        self._send(messages, timeout, what)
        return self._gather(list(messages))

    def _send(self, messages: dict[int, tuple], timeout: float, what: str) -> None:
        """Send messages[i] to simulator i without waiting; each reply is due `timeout` s after its send."""
        for i, msg in messages.items():
            if i in self._waiting:
                raise RuntimeError(f"LIBERO simulator {i} already has a {self._waiting[i][0]} request in flight.")
            try:
                self._sim(i).send(msg)
            except OSError as e:  # BrokenPipeError: the process is already gone
                self._send_failed[i] = (f"exited before the {what} request ({e.strerror or e}, code "
                                        f"{self._sims[i].proc.poll()})")
            self._waiting[i] = (what, timeout, time.monotonic() + timeout)

    def _gather(self, ids: list[int]) -> dict[int, tuple]:
        """Wait for the reply of every simulator in ids with a request in flight (others are left out).
        A simulator that dies (even between two requests, so the send itself fails), errs or misses its
        deadline is killed and replaced (the new one builds lazily); its reply is ("failed", why)."""
        ids = [i for i in ids if i in self._waiting]
        replies: dict[int, tuple] = {i: ("failed", self._send_failed.pop(i)) for i in ids if i in self._send_failed}
        pending = {self._sims[i].inbox: i for i in ids if i not in replies}
        while pending:
            deadline = min(self._waiting[i][2] for i in pending.values())
            ready = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                now = time.monotonic()
                for conn, i in list(pending.items()):
                    if self._waiting[i][2] <= now:
                        del pending[conn]
                        replies[i] = ("failed", f"no answer within {self._waiting[i][1]:g} s")
                continue
            for conn in ready:
                i = pending[conn]
                try:
                    reply = conn.recv()
                    if reply[0] == "ok" and not self._sims[i].configured:  # the ("config",) answer
                        self._sims[i].configured = True
                        continue
                except (EOFError, OSError):
                    reply = ("failed", f"exited with code {self._sims[i].proc.poll()}")
                del pending[conn]
                replies[i] = reply
        for i in ids:
            what = self._waiting.pop(i)[0]
            if replies[i][0] != "ok":
                self._restart(i, what, replies[i][1])
        return replies

    def _restart(self, i: int, what: str, why: str) -> None:
        suite, task = self.tasks[self._episode[i][0]][:2]
        init = self._episode[i][1]
        print(f"vlarl: LIBERO simulator {i} (pid {self._sims[i].pid}, {suite} task {task}, init state "
              f"{init}, step {self._steps[i]}) failed during {what}: {why.strip()}; restarting it, the episode "
              "ends truncated.", file=sys.stderr, flush=True)
        self._sims[i].kill()
        self._sims[i] = None
        self.restarts += 1
        self._sim(i)

    def _batch_obs(self, ids: list[int] | None = None) -> dict:
        """Observation rows of episodes ids (all when None); frames keyed by episode index."""
        ids = range(self.num_envs) if ids is None else ids
        rows = [self._obs[i] for i in ids]
        obs = {"image": np.stack([o["image"] for o in rows]),
               "proprio": np.stack([o["proprio"] for o in rows]).astype(np.float32),
               "instruction": [self.tasks[self._episode[i][0]][2] for i in ids]}
        if self.spec.wrist_camera:
            obs["wrist_image"] = np.stack([o["wrist_image"] for o in rows])
        frames = {i: o["frame"] for i, o in zip(ids, rows) if "frame" in o}
        if frames:
            obs["frames"] = frames
        assert obs["proprio"].shape[1] == PROPRIO_DIM
        return obs
