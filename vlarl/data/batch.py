"""The one record that travels between actors: a batch of whole episodes.

Episodes are rows; steps are columns up to the longest episode (T). Observation arrays have one
more column than actions: column t is the observation the action at t was taken from, and the
column after an episode's last step holds the observation that followed it (used to bootstrap a
truncated episode's value). Arrays are numpy so they travel through Ray's object store zero-copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np

from vlarl.data.spec import ACTION_DIM


@dataclass
class TrajectoryBatch:
    images: np.ndarray  # (N, T+1, H, W, 3) uint8
    proprio: np.ndarray  # (N, T+1, P) float32
    instructions: list  # (N,) str, one instruction per episode
    task_ids: np.ndarray  # (N,) int64
    init_state_ids: np.ndarray  # (N,) int64
    group_ids: np.ndarray  # (N,) int64: episodes of one (task, init state) group share an id
    action_tokens: np.ndarray  # (N, T, D) int64 token ids; (N, T, 0) for flow policies
    rollout_logprobs: np.ndarray  # (N, T, D) float32 log-probs under the rollout engine, per token or per flow element
    rewards: np.ndarray  # (N, T) float32
    mask: np.ndarray  # (N, T) bool: step t is part of the episode
    dones: np.ndarray  # (N, T) bool: last step of the episode (terminated or truncated)
    terminated: np.ndarray  # (N, T) bool: last step and ended by the task (no bootstrap)
    success: np.ndarray  # (N,) bool
    weights_version: int = 0  # version of the weights that generated the batch
    env_restarts: int = 0  # simulators restarted while collecting (their episodes end truncated)
    actions: Optional[np.ndarray] = None  # (N, T, A) float32 actions sent to the environments (reward providers)
    videos: dict = field(default_factory=dict)  # {episode: (L+1, H, W, 3) uint8} frames of recorded episodes
    chains: Optional[np.ndarray] = None  # (N, T, K+1, A) float32 flow denoising chains x_1 .. x_0, flow policies only
    sde_steps: Optional[np.ndarray] = None  # (N, T) int64 each chain's Gaussian step (Flow-SDE), else -1
    sampled_actions: Optional[np.ndarray] = None  # (N, T, D) float32 Gaussian draws (OpenVLA-OFT's L1 head), else None
    timeouts: Optional[np.ndarray] = None  # (N, T) bool: last step and ended by the task's step limit (truncated)
    # (N, T) int64: actions of each step's chunk the environment ran (fewer than the chunk where the episode
    # ended inside it or env.replan_steps cut it); None: all of them
    executed: Optional[np.ndarray] = None

    @property
    def num_episodes(self) -> int:
        return len(self.task_ids)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) steps per episode"""
        return self.mask.sum(1)

    @property
    def episode_returns(self) -> np.ndarray:
        """(N,) undiscounted return"""
        return (self.rewards * self.mask).sum(1)

    @classmethod
    def concat(cls, batches: list["TrajectoryBatch"], group_offset: bool = True) -> "TrajectoryBatch":
        """Join batches along episodes, padding the step axis to the longest."""
        t_max = max(b.mask.shape[1] for b in batches)
        out, next_group, offset = {}, 0, 0
        parts: dict[str, list] = {f.name: [] for f in fields(cls)}
        for b in batches:
            pad = t_max - b.mask.shape[1]
            for f in fields(cls):
                v = getattr(b, f.name)
                if f.name in ("weights_version", "instructions", "env_restarts") or v is None:
                    parts[f.name].append(v)
                    continue
                if f.name == "videos":  # frames keyed by episode index
                    parts[f.name].append({k + offset: x for k, x in v.items()})
                    continue
                if f.name == "group_ids" and group_offset:
                    v = v - v.min() + next_group
                    next_group = int(v.max()) + 1
                if v.ndim >= 2 and pad:
                    v = np.concatenate([v, np.zeros((v.shape[0], pad, *v.shape[2:]), v.dtype)], 1)
                parts[f.name].append(v)
            offset += b.num_episodes
        for name, vs in parts.items():
            if name == "weights_version":
                out[name] = min(vs)
            elif name == "env_restarts":
                out[name] = sum(vs)
            elif any(v is None for v in vs):  # an optional field some batch lacks
                out[name] = None
            elif name == "instructions":
                out[name] = [s for v in vs for s in v]
            elif name == "videos":
                out[name] = {k: f for v in vs for k, f in v.items()}
            else:
                out[name] = np.concatenate(vs, 0)
        return cls(**out)

    def select(self, rows: np.ndarray) -> "TrajectoryBatch":
        """The episodes `rows` (int indices, in that order) as a batch of their own."""
        rows = np.asarray(rows, np.int64)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "instructions":
                v = [v[i] for i in rows]
            elif f.name == "videos":
                v = {new: v[old] for new, old in enumerate(rows.tolist()) if old in v}
            elif isinstance(v, np.ndarray):
                v = v[rows]
            out[f.name] = v
        return type(self)(**out)

    def flat_steps(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices (episode, step) of every real step, in row-major order: (S,), (S,)"""
        return np.nonzero(self.mask)

    def no_bootstrap(self, bootstrap_time_limit: bool = False) -> np.ndarray:
        """(N, T) bool: steps after which no value follows: the task ended the episode, or (unless
        `bootstrap_time_limit`) its step limit did. The policy does not see the clock, so bootstrapping
        at the limit would value running out of time like any state that looks the same, and a policy
        that wanders until the limit would look as good as one that succeeds."""
        if bootstrap_time_limit or self.timeouts is None:
            return self.terminated
        return self.terminated | self.timeouts

    def executed_mask(self, ep: np.ndarray, t: np.ndarray, width: int, action_dim: int) -> np.ndarray:
        """(S, width) bool for the steps (ep, t): which log-prob elements belong to actions the environment
        ran. Every family lays a call's `action_dim` values out action by action (7 per action) and a flow
        policy repeats that layout once per Gaussian step, so element j belongs to action
        (j % action_dim) // 7. An action never executed had no effect on the return: its log-prob would
        only add noise to the policy gradient."""
        if width % action_dim:
            raise ValueError(f"{width} log-probs per step are not a whole number of {action_dim}-value calls.")
        if self.executed is None:
            return np.ones((len(ep), width), bool)
        action = (np.arange(width) % action_dim) // ACTION_DIM  # (width,) action index within the chunk
        return action[None, :] < self.executed[ep, t][:, None]

    def last_obs_steps(self) -> np.ndarray:
        """(N,) column of the observation after each episode's last step"""
        return self.lengths


@dataclass
class EvalEpisodes:
    """Outcome of greedy evaluation episodes, with videos of the recorded ones."""
    task_ids: np.ndarray  # (N,) int64
    init_state_ids: np.ndarray  # (N,) int64
    success: np.ndarray  # (N,) bool
    returns: np.ndarray  # (N,) float32 undiscounted
    lengths: np.ndarray  # (N,) int64 policy steps
    videos: dict  # {episode index: (L+1, H, W, 3) uint8 frames}, for the first `record` episodes
    weights_version: int = 0
    env_restarts: int = 0
