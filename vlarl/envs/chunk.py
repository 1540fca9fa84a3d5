"""Action chunking for environments that step one action at a time (the toy task).

The policy emits n actions per call, (N, 7n); the wrapper executes them in order (the first
`replan` of them with env.replan_steps, then the policy is asked again) and returns what
followed the last one, or what followed the step that ended the episode: an env that ends inside a
chunk keeps that step's observation, reward and flags, and its later sub-steps are ignored. Rewards
inside a chunk are summed. One policy call is one step of the wrapper, so `max_steps` counts calls.
`info["executed"]` says how many of each call's actions ran (the learner leaves the rest out of the
policy loss: they had no effect on the return).
"""

from __future__ import annotations

import numpy as np

from vlarl.data.spec import ACTION_DIM
from vlarl.envs.base import StepResult, VecEnv


class ChunkedEnv(VecEnv):
    def __init__(self, env, chunk: int, replan: int = 0):
        if not 0 <= replan <= chunk:
            raise ValueError(f"env.replan_steps={replan} must lie in 0..env.action_chunk ({chunk}); 0 executes "
                             "the whole chunk.")
        self.env, self.chunk = env, chunk
        self.executed = replan or chunk  # environment steps per policy call

    def __getattr__(self, name):  # num_tasks, instructions(), reset(), block_actions(), ...
        return getattr(self.env, name)

    @property
    def max_steps(self) -> int:
        return -(-self.env.max_steps // self.executed)

    def step(self, actions, env_ids=None) -> StepResult:
        """actions (k, 7n) for episodes env_ids (all N when None) -> one StepResult per episode covering
        up to n environment steps."""
        actions = np.asarray(actions, np.float32)
        n = self.env.num_envs if env_ids is None else len(env_ids)
        if actions.shape != (n, ACTION_DIM * self.chunk):
            raise ValueError(f"step needs actions of shape ({n}, {ACTION_DIM * self.chunk}) with "
                             f"env.action_chunk={self.chunk}, got {actions.shape}.")
        ended, reward = np.zeros(n, bool), np.zeros(n, np.float32)
        executed = np.zeros(n, np.int64)  # (n,) actions of the chunk that ran
        final = None
        for k in range(self.executed):
            res = self.env.step(actions[:, k * ACTION_DIM:(k + 1) * ACTION_DIM], env_ids)
            live = ~ended
            reward += np.where(live, res.reward, 0.0).astype(np.float32)
            executed += live
            if final is None:
                final = res._replace(obs={key: (list(v) if isinstance(v, list) else v.copy()) for key, v in res.obs.items()},
                                     info={key: v.copy() for key, v in res.info.items()})
            else:
                _take_rows(final, res, live)
            ended |= res.terminated | res.truncated
            if ended.all():
                break
        final.info["executed"] = executed
        return final._replace(reward=reward)

    def expert_actions(self) -> np.ndarray:
        """The scripted expert's next n actions, planned by replaying the toy's motion model."""
        env = self.env
        pos, out = env.pos.copy(), []
        for _ in range(self.chunk):
            step = np.zeros((env.num_envs, ACTION_DIM), np.float32)
            step[:, :2] = np.clip((env.block_pos[:, 0] - pos) / env.spec.max_move, -1, 1)
            pos = np.clip(pos + step[:, :2] * env.spec.max_move, 0.0, 1.0)
            out.append(step)
        return np.concatenate(out, 1)


def _take_rows(final: StepResult, res: StepResult, rows: np.ndarray) -> None:
    """Overwrite `final`'s per-env entries with `res`'s where `rows` is True (envs still running)."""
    for key, v in res.obs.items():
        if isinstance(v, list):
            final.obs[key][:] = [new if r else old for old, new, r in zip(final.obs[key], v, rows)]
        else:
            final.obs[key][rows] = v[rows]
    for key, v in res.info.items():
        final.info[key][rows] = v[rows]
    final.terminated[rows] = res.terminated[rows]
    final.truncated[rows] = res.truncated[rows]
