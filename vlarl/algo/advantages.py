"""Advantage estimators: GAE for PPO with a critic, group-normalised returns for GRPO.

Pure tensor functions: no config objects, no distributed state. Episodes are laid out one per row
of a (B, T) batch; each row's real steps are a prefix selected by `mask` (1...1 0...0), and
everything past the prefix is padding whose contents are never read into the result.
"""

from __future__ import annotations

import torch


def masked_mean(
    x: torch.Tensor,     # (...) any shape
    mask: torch.Tensor,  # (...) same shape as x, bool or 0/1 float
    dim: int | None = None,
) -> torch.Tensor:
    """Mean of `x` over the elements where `mask` is set, over all elements or along `dim`.

    An all-masked slice gives 0 rather than NaN, so empty micro-batches do not poison a loss.
    """
    mask = mask.to(x.dtype)
    # torch.where, not x * mask: padding may hold NaN/inf and NaN * 0 is still NaN.
    total = torch.where(mask > 0, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / mask.sum().clamp(min=1.0)
    return total.sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(
    x: torch.Tensor,     # (...) any shape
    mask: torch.Tensor,  # (...) same shape as x
    eps: float = 1e-8,
) -> torch.Tensor:
    """Shift and scale `x` to zero mean and unit (population) std over the masked elements.

    Returns the same shape as x, zero where mask == 0 so padding never leaks into a loss.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def gae(
    rewards: torch.Tensor,      # (B, T) reward received after the action at step t
    values: torch.Tensor,       # (B, T) critic value of the observation at step t
    dones: torch.Tensor,        # (B, T) bool, 1 at the last real step (terminated or truncated)
    terminated: torch.Tensor,   # (B, T) bool, 1 at the last step if the episode really ended
    last_values: torch.Tensor,  # (B,) value of the observation after the last real step
    mask: torch.Tensor,         # (B, T) 1 for real steps, a prefix of each row
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016), one episode per row.

    delta_t = r_t + gamma * V_next * (1 - terminated_t) - V_t, with V_next = values[t+1], or
    last_values at the step where the episode ends; A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1}.
    A time-limit truncation (done & ~terminated) bootstraps from last_values; a real
    termination (success/failure) does not, since no reward follows it.

    Returns (advantages, returns), both (B, T), returns = advantages + values, zero where mask == 0.
    """
    B, T = rewards.shape
    valid = mask.bool()
    # The last real step of a row ends its episode even if the caller did not flag it (a rollout
    # cut off mid-episode): values[t+1] there is padding, so treat it as a truncation.
    is_last = valid & ~torch.cat([valid[:, 1:], valid.new_zeros(B, 1)], dim=1)
    ends = dones.bool() | terminated.bool() | is_last
    terminated = terminated.bool()

    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(last_values)        # (B,) A_{t+1}
    next_values = last_values                       # (B,) values[t+1]; unused where the row ends at T-1
    for t in reversed(range(T)):
        # torch.where rather than arithmetic with (1 - done): padding may hold NaN, and 0 * NaN = NaN.
        v_next = torch.where(ends[:, t], last_values, next_values)
        bootstrap = torch.where(terminated[:, t], torch.zeros_like(v_next), gamma * v_next)
        delta = rewards[:, t] + bootstrap - values[:, t]
        carry = torch.where(ends[:, t], torch.zeros_like(next_adv), next_adv)
        adv_t = delta + gamma * lam * carry
        advantages[:, t] = adv_t
        next_adv = adv_t
        next_values = values[:, t]

    zeros = torch.zeros_like(advantages)
    advantages = torch.where(valid, advantages, zeros)
    returns = torch.where(valid, advantages + values, zeros)
    return advantages, returns


def _group_stats(
    episode_returns: torch.Tensor,  # (B,)
    group_ids: torch.Tensor,        # (B,) long
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row group mean, population std and group size, each (B,), computed without a Python loop."""
    _, inverse = torch.unique(group_ids, return_inverse=True)   # (B,) dense group index 0..G-1
    num_groups = int(inverse.max().item()) + 1
    x = episode_returns
    count = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, torch.ones_like(x))
    total = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    mean = (total / count)[inverse]
    sq_dev = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, (x - mean) ** 2)
    std = (sq_dev / count).sqrt()[inverse]
    return mean, std, count[inverse]


def grpo(
    episode_returns: torch.Tensor,  # (B,) one scalar return (e.g. success 0/1) per rollout
    group_ids: torch.Tensor,        # (B,) long, same id = same (task, init state)
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath): A = (R - mean_group) / (std_group + eps).

    std is the population std (unbiased=False): every group is then scaled to unit second moment
    whatever its size G, and a G=2 group with different returns gives exactly +-1. veRL uses
    torch.std (unbiased), which differs by a factor sqrt((G - 1) / G). Groups of size 1 get 0,
    as do groups whose returns are all equal (no signal about which rollout was better).

    Returns advantages (B,); the caller broadcasts them to every action token of the episode.
    """
    if episode_returns.numel() == 0:
        return torch.zeros_like(episode_returns)
    mean, std, count = _group_stats(episode_returns, group_ids)
    advantages = (episode_returns - mean) / (std + eps)
    return torch.where(count > 1, advantages, torch.zeros_like(advantages))


def rloo(
    episode_returns: torch.Tensor,  # (B,) one scalar return per rollout
    group_ids: torch.Tensor,        # (B,) long, same id = same (task, init state)
    eps: float = 1e-6,
) -> torch.Tensor:
    """Leave-one-out baseline (REINFORCE leave-one-out, Ahmadian et al. 2024; RIPT-VLA): each rollout is
    compared with the mean of the OTHER G - 1 rollouts of its group, A_i = R_i - mean_{j != i} R_j
    = G / (G - 1) * (R_i - mean_group). Unlike GRPO it does not divide by the group's std, so a group
    with one success in eight moves the policy no harder than one with four. Groups of size 1 get 0.

    Returns advantages (B,); the caller broadcasts them to every action token of the episode.
    """
    if episode_returns.numel() == 0:
        return torch.zeros_like(episode_returns)
    mean, _, count = _group_stats(episode_returns, group_ids)
    advantages = count / (count - 1).clamp(min=eps) * (episode_returns - mean)
    return torch.where(count > 1, advantages, torch.zeros_like(advantages))


# Episode-level estimators: one advantage per rollout from its group's returns (algo.advantage).
EPISODE_ADVANTAGES = {"grpo": grpo, "rloo": rloo}


def group_filter_mask(
    episode_returns: torch.Tensor,  # (B,)
    group_ids: torch.Tensor,        # (B,) long
    low: float,
    high: float,
) -> torch.Tensor:
    """True for rows whose group mean return lies in [low, high]; returns (B,) bool.

    All-fail and all-success groups have zero GRPO advantage and only dilute the batch, so
    SimpleVLA-RL and RLinf drop groups with mean success outside [0.1, 0.9] and resample.
    """
    if episode_returns.numel() == 0:
        return torch.zeros_like(episode_returns, dtype=torch.bool)
    mean, _, _ = _group_stats(episode_returns, group_ids)
    return (mean >= low) & (mean <= high)
