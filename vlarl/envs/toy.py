"""A dependency-free 2-D tabletop task with LIBERO's observation schema.

The arena is the unit square drawn on a `grid x grid` board. Each episode places `num_blocks` blocks
of distinct colours on cell centres and a white end effector at a random point; the instruction
names one colour ("move to the red block"), and the task is to reach that block. Reaching any
other block ends the episode as a failure, so a policy that ignores the instruction succeeds only
about 1 / num_blocks of the time. Everything is vectorised in numpy (tens of thousands of steps/s).

Actions are 7-D like LIBERO's (xyz, rotation, gripper) in [-1, 1]; only the first two move the
effector, by at most `max_move` per step. Task id = index of the target colour; init state id
seeds the layout, so (task, init state) pairs are reproducible like LIBERO's init states.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlarl.data.spec import ACTION_DIM, PROPRIO_DIM
from vlarl.envs.base import StepResult, VecEnv

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 220, 40),
    "purple": (170, 60, 200),
    "cyan": (40, 220, 220),
}
BACKGROUND = (40, 40, 40)
EFFECTOR = (255, 255, 255)


@dataclass(frozen=True)
class ToySpec:
    num_colours: int = 4  # number of tasks: one per target colour
    num_blocks: int = 3  # blocks on the table per episode (target + distractors)
    grid: int = 4  # blocks sit on cell centres of a grid x grid board
    image_size: int = 16  # rendered image side in pixels (a multiple of grid)
    max_steps: int = 10  # step limit; the episode is truncated after it
    max_move: float = 0.25  # effector displacement per step at |action| = 1
    success_radius: float = 0.09  # distance to a block centre that counts as reaching it
    num_init_states: int = 10000  # layouts per task used for training


class ToyEnv(VecEnv):
    """A batch of `num_envs` independent toy episodes stepped together."""

    def __init__(self, num_envs: int, spec: ToySpec = ToySpec(), seed: int = 0):
        if not 2 <= spec.num_blocks <= spec.num_colours <= len(COLOURS):
            raise ValueError(
                f"toy env needs 2 <= env.num_blocks ({spec.num_blocks}) <= env.num_tasks "
                f"({spec.num_colours}) <= {len(COLOURS)}; change env.num_blocks or env.num_tasks."
            )
        if not 0 < spec.success_radius < 0.5 / spec.grid:
            raise ValueError(f"env.success_radius ({spec.success_radius}) must lie in (0, {0.5 / spec.grid:g}) so "
                             "neighbouring blocks do not overlap; lower it or use a smaller env.grid.")
        if spec.image_size % spec.grid:
            raise ValueError(f"env.image_size ({spec.image_size}) must be a multiple of env.grid ({spec.grid}).")
        self.num_envs, self.spec, self.seed = num_envs, spec, seed
        self.colour_names = list(COLOURS)[: spec.num_colours]
        self._palette = np.array([COLOURS[c] for c in self.colour_names], dtype=np.uint8)
        n, b = num_envs, spec.num_blocks
        self.block_pos = np.zeros((n, b, 2), np.float32)  # (N, B, 2) block centres
        self.block_colour = np.zeros((n, b), np.int64)  # (N, B) colour index, block 0 is the target
        self.pos = np.zeros((n, 2), np.float32)  # (N, 2) effector position
        self.steps = np.zeros(n, np.int64)  # (N,) steps taken this episode
        self.task_ids = np.zeros(n, np.int64)  # (N,)
        self._board = np.zeros((n, spec.image_size, spec.image_size, 3), np.uint8)  # static layer

    # ---- the env interface ---------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return self.spec.num_colours

    @property
    def num_init_states(self) -> int:
        return self.spec.num_init_states

    @property
    def num_held_out_states(self) -> int:
        return 10**9  # layouts are generated from their id, so any id past training is a fresh one

    @property
    def max_steps(self) -> int:
        return self.spec.max_steps

    def instructions(self) -> list[str]:
        """Instruction of every task, indexed by task id."""
        return [f"move to the {c} block" for c in self.colour_names]

    def reset(self, task_ids, init_state_ids, record: int = 0) -> dict:
        task_ids = np.asarray(task_ids, np.int64)
        init_state_ids = np.asarray(init_state_ids, np.int64)
        if task_ids.shape != (self.num_envs,) or init_state_ids.shape != (self.num_envs,):
            raise ValueError(f"reset needs {self.num_envs} task ids and init state ids.")
        if task_ids.min() < 0 or task_ids.max() >= self.num_tasks:
            raise ValueError(f"task ids must lie in [0, {self.num_tasks}).")
        s, g = self.spec, self.spec.grid
        for i, (task, init) in enumerate(zip(task_ids, init_state_ids)):
            rng = np.random.default_rng((self.seed, int(task), int(init)))
            others = [c for c in range(s.num_colours) if c != task]
            self.block_colour[i] = [task, *rng.choice(others, s.num_blocks - 1, replace=False)]
            cells = rng.choice(g * g, s.num_blocks, replace=False)
            self.block_pos[i] = np.stack([cells % g, cells // g], -1).astype(np.float32) / g + 0.5 / g
            for _ in range(10_000):  # start clear of every block
                p = rng.uniform(0.0, 1.0, 2).astype(np.float32)
                if np.linalg.norm(self.block_pos[i] - p, axis=-1).min() > 2 * s.success_radius:
                    break
            else:
                raise ValueError("no free start position for the effector; lower env.success_radius or env.num_blocks.")
            self.pos[i] = p
        self.task_ids[:] = task_ids
        self.steps[:] = 0
        self._draw_board()
        return self._obs()

    def step(self, actions, env_ids=None) -> StepResult:
        """actions (k, 7) for episodes env_ids (all N when None) -> their StepResult rows."""
        ids = np.arange(self.num_envs) if env_ids is None else np.asarray(env_ids, np.int64)
        actions = np.asarray(actions, np.float32)
        if actions.shape != (len(ids), ACTION_DIM):
            raise ValueError(f"step needs actions of shape ({len(ids)}, {ACTION_DIM}), got {actions.shape}.")
        s = self.spec
        self.pos[ids] = np.clip(self.pos[ids] + np.clip(actions[:, :2], -1, 1) * s.max_move, 0.0, 1.0)
        self.steps[ids] += 1
        dist = np.linalg.norm(self.block_pos[ids] - self.pos[ids, None], axis=-1)  # (k, B)
        touched = dist < s.success_radius
        success = touched[:, 0]
        terminated = touched.any(-1)
        truncated = (self.steps[ids] >= s.max_steps) & ~terminated
        reward = success.astype(np.float32)
        return StepResult(self._obs(ids), reward, terminated, truncated, {"success": success.copy()})

    # ---- scripted policies: demonstrations and baselines ---------------------------------
    def expert_actions(self) -> np.ndarray:
        """Move straight to the instructed block (the policy the task asks for)."""
        return self._towards(self.block_pos[:, 0])

    def block_actions(self, block_index: np.ndarray) -> np.ndarray:
        """Move straight to block `block_index[i]` of env i, whatever the instruction says."""
        return self._towards(self.block_pos[np.arange(self.num_envs), block_index])

    def _towards(self, goal: np.ndarray) -> np.ndarray:
        out = np.zeros((self.num_envs, ACTION_DIM), np.float32)
        out[:, :2] = np.clip((goal - self.pos) / self.spec.max_move, -1, 1)
        return out

    # ---- rendering -----------------------------------------------------------------------
    def _draw_board(self) -> None:
        s, cell = self.spec, self.spec.image_size // self.spec.grid
        self._board[:] = BACKGROUND
        for i in range(self.num_envs):
            for (x, y), c in zip(self.block_pos[i], self.block_colour[i]):
                cx, cy = int(x * s.grid), int(y * s.grid)
                self._board[i, cy * cell:(cy + 1) * cell, cx * cell:(cx + 1) * cell] = self._palette[c]

    def _obs(self, ids: np.ndarray | None = None) -> dict:
        """Observation rows of episodes ids (all when None)."""
        ids = np.arange(self.num_envs) if ids is None else ids
        size = self.spec.image_size
        image = self._board[ids]  # (fancy indexing copies)
        pos = self.pos[ids]
        px = np.clip((pos * size).astype(np.int64), 1, size - 1)  # 2x2 effector marker
        rows = np.arange(len(ids))
        for dy in (-1, 0):
            for dx in (-1, 0):
                image[rows, px[:, 1] + dy, px[:, 0] + dx] = EFFECTOR
        proprio = np.zeros((len(ids), PROPRIO_DIM), np.float32)
        proprio[:, :2] = pos * 2 - 1
        instr = self.instructions()
        return {"image": image, "proprio": proprio, "instruction": [instr[t] for t in self.task_ids[ids]]}
