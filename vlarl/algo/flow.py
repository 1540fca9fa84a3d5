"""Gaussian denoising steps of flow policies: the math behind Flow-SDE and Flow-Noise log-probs.

Pure tensor functions. Convention (pi-RL, Flow-GRPO): t = 1 is noise, t = 0 is the action; K
denoising steps of size delta = 1/K; the network predicts the velocity v, so the Euler ODE step is
x_{t - delta} = x_t - delta * v. Making one or every step a Gaussian transition with a known mean
and std gives each sampled chain an exact log-density, which PPO needs (ANCHORS.md).
"""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def step_times(num_steps: int) -> torch.Tensor:
    """(K,) the time t_k each denoising step k starts from: 1, 1 - delta, ..., delta."""
    return 1.0 - torch.arange(num_steps, dtype=torch.float32) / num_steps


def sde_sigma(t: torch.Tensor, num_steps: int, noise_level: float) -> torch.Tensor:
    """sigma_t = a * sqrt(t / (1 - t)); at t = 1 the denominator is 1 - t_1 = delta (t_1 = 1 - delta).

    t  # (...) step start times in (0, 1]
    """
    delta = 1.0 / num_steps
    return noise_level * torch.sqrt(t / torch.clamp(1.0 - t, min=delta))


def sde_mean(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor, delta: float) -> torch.Tensor:
    """Mean of the Flow-SDE step: x - delta * v - (sigma^2 * delta / (2 t)) * (x + (1 - t) * v).

    x, v   # (B, A) state and velocity at time t
    t      # (B, 1) step start time
    sigma  # (B, 1) sigma_t
    The correction term is the score of the marginal (x1_hat = x + (1 - t) v estimates the noise),
    which keeps the SDE's marginals equal to the ODE's (Flow-GRPO, Liu et al. 2025).
    """
    return x - delta * v - (sigma**2 * delta / (2 * t)) * (x + (1 - t) * v)


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per element: (B, A) -> (B, A); std broadcasts. A diagonal Gaussian's
    density is the sum over the last dim; the learner keeps the elements apart (one PPO ratio per
    action value, as one per token for the token VLA)."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).expand_as(x)
    z = (x - mean) / std
    return -0.5 * z**2 - torch.log(std) - LOG_SQRT_2PI


def gaussian_entropy(std: torch.Tensor) -> torch.Tensor:
    """Entropy of each element's Gaussian: std (B, A) -> (B, A)."""
    return torch.log(std) + 0.5 + LOG_SQRT_2PI


def squash_std(raw: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map unbounded network outputs into [low, high] with a sigmoid (Flow-Noise's learned std)."""
    return low + (high - low) * torch.sigmoid(raw)


def floor_std(std: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """std clamped below at `floor` (DPPO clips at 0.1: tiny stds make log-probs explode) and the
    fraction of entries that hit the floor, a scalar tensor for the `actor/std_at_floor` metric."""
    return std.clamp(min=floor), (std < floor).float().mean()
