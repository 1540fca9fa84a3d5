"""Rewards beyond task success: one provider interface and the built-in providers.

A provider is given whole episodes (`Episode`: frames when recorded, actions, instruction, the
environment's own rewards and success) and returns one reward per episode (a float, credited at the
episode's last step) or one per step (an (L,) array). The trainer calls `score` once per iteration,
for every policy family and algorithm, and the advantages are computed from what it returns.

    reward=success     the environment's sparse reward (the default)
    reward=external    reward.function=module:function, a user function of one Episode
    reward=composite   reward.components=[{name: success, weight: 1.0}, ...], a weighted sum
    reward=human       labels from people, on a web page (reward.mode=web) or in the console
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from vlarl.data.batch import TrajectoryBatch


@dataclass
class Episode:
    episode_id: str  # unique within the run: "it{iteration:06d}-ep{index:04d}"
    instruction: str  # the task's language instruction
    actions: np.ndarray  # (L, A) float32 actions sent to the environment
    env_rewards: np.ndarray  # (L,) float32 the environment's own reward per step
    success: bool  # the environment's success flag
    task_id: int
    init_state_id: int
    weights_version: int  # version of the weights that acted
    frames: Optional[np.ndarray] = None  # (L+1, H, W, 3) uint8, only for episodes recorded for labelling


class RewardProvider:
    """Base of every provider: `rewards` scores a list of episodes; `metrics` and `close` are optional."""

    wants_frames = 0.0  # fraction of each iteration's episodes whose frames this provider needs

    def rewards(self, episodes: list[Episode]) -> list:
        """One float (per episode) or one (L,) array (per step) for each episode, in order."""
        raise NotImplementedError

    def metrics(self) -> dict:
        """reward/* metrics of the last `rewards` call."""
        return {}

    def close(self) -> None:
        pass


def make_reward(cfg, run_dir: Path, name: Optional[str] = None) -> RewardProvider:
    """The provider cfg.reward selects (or the one called `name`, for a composite's components)."""
    from vlarl.rewards.builtin import CompositeReward, ExternalReward, SuccessReward

    name = name or cfg.reward.name
    if name == "success":
        return SuccessReward()
    if name == "external":
        return ExternalReward(cfg.reward.function)
    if name == "composite":
        return CompositeReward([(make_reward(cfg, run_dir, c.name), float(c.weight)) for c in cfg.reward.components])
    if name == "human":
        from vlarl.rewards.human import HumanReward

        return HumanReward(cfg.reward, run_dir)
    raise ValueError(f"reward={name} is unknown; choose one of success, external, composite, human.")


def check_reward_config(reward_cfg) -> None:
    """Checks that need no run: the external function loads and behaves, composites are well formed.
    Raises ValueError with one sentence saying what to fix."""
    from vlarl.rewards.builtin import load_function

    names = [reward_cfg.name]
    if reward_cfg.name == "composite":
        names = [c.name for c in reward_cfg.components]
        if not names:
            raise ValueError("reward=composite needs at least one entry in reward.components, "
                             "e.g. reward.components=[{name: success, weight: 1.0}].")
        bad = [n for n in names if n not in ("success", "external", "human")]
        if bad:
            raise ValueError(f"reward.components names {bad} are not providers; use success, external or human.")
        if names.count("human") > 1 or names.count("external") > 1:
            raise ValueError("reward.components may hold human and external at most once each "
                             "(they share reward.function and the reward.human_* keys).")
    if "external" in names:
        load_function(reward_cfg.function)
    if "human" in names and not 0.0 <= reward_cfg.human_fraction <= 1.0:
        raise ValueError(f"reward.human_fraction must be in [0, 1], got {reward_cfg.human_fraction}.")


def episodes_of(batch: TrajectoryBatch, iteration: int) -> list[Episode]:
    """The batch's episodes as provider input (frames only where the rollout recorded them)."""
    lengths = batch.lengths
    # A rollout path that does not fill batch.actions hands providers (L, 0) actions rather than failing.
    actions = batch.actions if batch.actions is not None else np.zeros((*batch.mask.shape, 0), np.float32)
    return [Episode(episode_id=f"it{iteration:06d}-ep{i:04d}", instruction=batch.instructions[i],
                    actions=actions[i, :lengths[i]], env_rewards=batch.rewards[i, :lengths[i]],
                    success=bool(batch.success[i]), task_id=int(batch.task_ids[i]),
                    init_state_id=int(batch.init_state_ids[i]), weights_version=batch.weights_version,
                    frames=batch.videos.get(i))
            for i in range(batch.num_episodes)]


def per_step(reward, length: int, width: int) -> np.ndarray:
    """(width,) float32 step rewards: an episode reward sits at the last step, a step array is padded."""
    out = np.zeros(width, np.float32)
    r = np.asarray(reward, np.float64)
    if r.ndim == 0:
        out[length - 1] = r
    else:
        out[:length] = r
    return out


def score(provider: RewardProvider, batch: TrajectoryBatch, iteration: int) -> TrajectoryBatch:
    """The batch with its rewards replaced by the provider's (success, used by the curriculum, is kept)."""
    episodes = episodes_of(batch, iteration)
    got = provider.rewards(episodes)
    lengths, width = batch.lengths, batch.rewards.shape[1]
    check_rewards(got, [len(e.env_rewards) for e in episodes], type(provider).__name__)
    rewards = np.stack([per_step(r, int(n), width) for r, n in zip(got, lengths)]) * batch.mask
    return replace(batch, rewards=rewards.astype(np.float32))


def check_rewards(got: list, lengths: list[int], who: str) -> None:
    """A provider's output: one finite float or one finite (L,) array per episode."""
    if len(got) != len(lengths):
        raise ValueError(f"{who} returned {len(got)} rewards for {len(lengths)} episodes; return one per episode.")
    for r, n in zip(got, lengths):
        a = np.asarray(r, np.float64)
        if a.ndim not in (0, 1) or (a.ndim == 1 and a.shape[0] != n):
            raise ValueError(f"{who} returned a reward of shape {a.shape} for an episode of {n} steps; return a "
                             f"float or an array of {n} per-step rewards.")
        if not np.isfinite(a).all():
            raise ValueError(f"{who} returned a non-finite reward ({r!r}); rewards must be finite numbers.")
