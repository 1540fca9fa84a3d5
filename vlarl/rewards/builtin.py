"""The environment's reward, a user's function, and a weighted sum of providers."""

from __future__ import annotations

import importlib
import inspect

import numpy as np

from vlarl.rewards import Episode, RewardProvider, check_rewards, per_step


class SuccessReward(RewardProvider):
    """The environment's own (sparse) step rewards, unchanged."""

    def rewards(self, episodes: list[Episode]) -> list:
        return [e.env_rewards for e in episodes]


def probe_episode(steps: int = 3) -> Episode:
    """A small, plausible episode to try a user function on before any actor starts."""
    return Episode(episode_id="probe", instruction="pick up the red block", actions=np.zeros((steps, 7), np.float32),
                   env_rewards=np.zeros(steps, np.float32), success=False, task_id=0, init_state_id=0,
                   weights_version=0, frames=None)


def load_function(spec) -> callable:
    """`module:function` -> the function, after checking it imports, takes one Episode and returns
    finite numbers on a probe episode. Raises ValueError naming the problem and the fix."""
    if not spec or ":" not in str(spec):
        raise ValueError(f"reward.function={spec!r} must name a function as module:function, "
                         "e.g. reward.function=my_rewards:shaped.")
    module_name, _, attr = str(spec).partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module's own error on import
        raise ValueError(f"reward.function={spec}: module {module_name!r} cannot be imported ({type(e).__name__}: "
                         f"{e}); put it on PYTHONPATH or fix the module.") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward.function={spec}: {module_name} has no function {attr!r}; check the name.")
    try:
        inspect.signature(fn).bind(probe_episode())
    except TypeError:
        raise ValueError(f"reward.function={spec} has signature {attr}{inspect.signature(fn)} but must accept one "
                         "argument, the Episode: def " f"{attr}(episode) -> float | per-step array.") from None
    try:
        out = fn(probe_episode())
    except Exception as e:
        raise ValueError(f"reward.function={spec} raised {type(e).__name__}: {e} on a probe episode; "
                         "it must handle any episode.") from None
    check_rewards([out], [3], f"reward.function={spec}")
    return fn


class ExternalReward(RewardProvider):
    """A user function `fn(episode) -> float | (L,) array`, checked at start and on every call."""

    def __init__(self, spec: str):
        self.spec, self.fn = spec, load_function(spec)

    def rewards(self, episodes: list[Episode]) -> list:
        out = [self.fn(e) for e in episodes]
        check_rewards(out, [len(e.env_rewards) for e in episodes], f"reward.function={self.spec}")
        return out


class CompositeReward(RewardProvider):
    """sum_k weight_k * provider_k, step by step (an episode reward counts at the last step)."""

    def __init__(self, parts: list[tuple[RewardProvider, float]]):
        self.parts = parts
        self.wants_frames = max((p.wants_frames for p, _ in parts), default=0.0)

    def rewards(self, episodes: list[Episode]) -> list:
        lengths = [len(e.env_rewards) for e in episodes]
        total = [np.zeros(n, np.float64) for n in lengths]
        for provider, weight in self.parts:
            got = provider.rewards(episodes)
            check_rewards(got, lengths, type(provider).__name__)
            for k, (r, n) in enumerate(zip(got, lengths)):
                total[k] += weight * per_step(r, n, n)
        return total

    def metrics(self) -> dict:
        return {k: v for p, _ in self.parts for k, v in p.metrics().items()}

    def close(self) -> None:
        for p, _ in self.parts:
            p.close()
