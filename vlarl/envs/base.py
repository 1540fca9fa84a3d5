"""The vectorised environment interface every environment implements.

An environment holds `num_envs` episodes stepped together:
    reset(task_ids, init_state_ids) -> obs
    step(actions) -> StepResult(obs, reward, terminated, truncated, info)
Observations are dicts: `image` uint8 (N, H, W, 3), `proprio` float32 (N, PROPRIO_DIM),
`instruction` list[str] of length N; optional `wrist_image`. Actions are float32 (N, ACTION_DIM)
in the environment's own units (the policy's normalised actions are mapped by the tokenizer).
`terminated` means the task itself ended the episode (no bootstrap); `truncated` the step limit.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

ACTION_DIM = 7  # xyz translation, xyz rotation, gripper (LIBERO's layout)
PROPRIO_DIM = 8  # eef position (3), axis-angle (3), gripper joints (2)


class StepResult(NamedTuple):
    obs: dict  # next observation batch
    reward: np.ndarray  # (N,) float32
    terminated: np.ndarray  # (N,) bool: success or failure decided by the task
    truncated: np.ndarray  # (N,) bool: step limit reached
    info: dict  # extra per-env arrays, e.g. "success" (N,) bool


def held_out_episodes(num_tasks: int, num_init_states: int, start: int, count: int) -> tuple[list[int], list[int]]:
    """Evaluation episodes start..start+count: tasks cycle, init states come from past the training
    range, so reported success is never measured on layouts the policy trained on."""
    k = np.arange(start, start + count)
    return (k % num_tasks).tolist(), (num_init_states + k // num_tasks).tolist()


def make_env(env_cfg, num_envs: int, seed: int):
    """Build the vectorised environment named by `env_cfg.name`."""
    if env_cfg.name == "toy":
        from vlarl.envs.toy import ToyEnv, ToySpec

        spec = ToySpec(
            num_colours=env_cfg.num_tasks, num_blocks=env_cfg.num_blocks, grid=env_cfg.grid,
            image_size=env_cfg.image_size, max_steps=env_cfg.max_steps, max_move=env_cfg.max_move,
            success_radius=env_cfg.success_radius, num_init_states=env_cfg.num_init_states,
        )
        return ToyEnv(num_envs, spec, seed)
    raise ValueError(f"env {env_cfg.name!r} is not available in this build; use env=toy.")
