"""The vectorised environment interface every environment implements.

An environment holds `num_envs` episodes stepped together:
    reset(task_ids, init_state_ids) -> obs
    step(actions, env_ids=None) -> StepResult(obs, reward, terminated, truncated, info)
    step_send(actions, env_ids); step_recv(env_ids) -> StepResult   (the same step in two halves)
`step` moves the episodes env_ids (all when None) and returns their rows, in env_ids order; actions
have one row per id. `step_send` starts such a step and returns at once, `step_recv` waits for it, so
the rollout worker generates actions for some environments while others step (pipeline stages).
Observations are dicts: `image` uint8 (N, H, W, 3), `proprio` float32 (N, PROPRIO_DIM (vlarl.data.spec)),
`instruction` list[str] of length N; optional `wrist_image`; with `reset(..., record=k)` the first k
episodes may add full-size camera frames as `frames` {env index: (H, W, 3)} for videos (keyed by env
index, also in the rows of a partial step). Actions are float32 (N, ACTION_DIM)
in the environment's own units (the policy's normalised actions are mapped by the tokenizer).
`terminated` means the task itself ended the episode (no bootstrap); `truncated` the step limit
(or a simulator restart). Envs also expose num_tasks, num_init_states (training ids), and
num_held_out_states (ids after those, for evaluation), max_steps (policy calls per episode).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np



class StepResult(NamedTuple):
    obs: dict  # next observation batch
    reward: np.ndarray  # (N,) float32
    terminated: np.ndarray  # (N,) bool: success or failure decided by the task
    truncated: np.ndarray  # (N,) bool: step limit reached
    info: dict  # extra per-env arrays, e.g. "success" (N,) bool


class VecEnv:
    """Base of the environments. In-process ones implement `step` and inherit a `step_send` that steps
    at once and a `step_recv` that hands the result back; LIBERO overrides both, its simulators stepping
    in their own processes meanwhile."""

    steps_in_background = False  # True where step_send returns before the step is done (worth pipelining)

    def step(self, actions, env_ids=None) -> StepResult:
        raise NotImplementedError

    def step_send(self, actions, env_ids) -> None:
        """Start stepping episodes env_ids with actions (len(env_ids), ...); `step_recv(env_ids)` collects."""
        sent = self.__dict__.setdefault("_sent", {})  # (not through a wrapper's __getattr__)
        key = tuple(int(i) for i in env_ids)
        if key in sent:
            raise RuntimeError(f"environments {list(key)} already have a step in flight; step_recv them first.")
        sent[key] = self.step(actions, key)

    def step_recv(self, env_ids) -> StepResult:
        """The StepResult of the step `step_send` started on exactly these env_ids."""
        return self.__dict__.setdefault("_sent", {}).pop(tuple(int(i) for i in env_ids))


def held_out_episodes(num_tasks: int, num_init_states: int, num_held_out: int, start: int,
                      count: int) -> tuple[list[int], list[int]]:
    """Evaluation episodes start..start+count: tasks cycle, init states come from the `num_held_out`
    ids past the training range (cycling when there are fewer than episodes), so reported success is
    never measured on layouts the policy trained on."""
    k = np.arange(start, start + count)
    return (k % num_tasks).tolist(), (num_init_states + (k // num_tasks) % num_held_out).tolist()
