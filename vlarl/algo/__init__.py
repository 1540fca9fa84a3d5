"""RL math for vlarl: advantage estimators and PPO/GRPO losses (pure tensor functions)."""

from vlarl.algo.advantages import gae, group_filter_mask, grpo, masked_mean, masked_whiten
from vlarl.algo.losses import (
    approx_kl,
    entropy_from_logits,
    policy_loss,
    truncated_is_weights,
    value_loss,
)

__all__ = [
    "approx_kl",
    "entropy_from_logits",
    "gae",
    "group_filter_mask",
    "grpo",
    "masked_mean",
    "masked_whiten",
    "policy_loss",
    "truncated_is_weights",
    "value_loss",
]
