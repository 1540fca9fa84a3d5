"""Guard rails for policies with continuous log-densities: log-ratio clipping and a KL penalty.

Pure tensor functions. A flow policy's log-prob is a density over many action values, so one
update can move it by tens of nats and exp() of the log-ratio can overflow; RLinf users report
instability without a KL term after about 150 epochs (ANCHORS.md).
"""

from __future__ import annotations

import torch

from vlarl.algo.advantages import masked_mean


def clip_log_ratio(
    logprobs: torch.Tensor,      # (N, ...) log pi_theta(a), requires grad
    old_logprobs: torch.Tensor,  # (N, ...) log pi_old(a)
    mask: torch.Tensor,          # (N, ...) 1 for real elements
    clip: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """old + clamp(logp - old, -clip, clip): the PPO ratio then stays in [e^-clip, e^clip] and the
    clipped elements stop sending gradient. Returns the clipped log-probs and the fraction clipped."""
    old_logprobs = old_logprobs.detach()
    log_ratio = logprobs - old_logprobs
    clipped = log_ratio.abs() > clip
    out = old_logprobs + log_ratio.clamp(-clip, clip)
    return out, {"actor/log_ratio_clipfrac": masked_mean(clipped.float(), mask).item()}


def kl_to_reference(
    logprobs: torch.Tensor,      # (N, ...) log pi_theta(a), requires grad
    ref_logprobs: torch.Tensor,  # (N, ...) log pi_ref(a) under the initial policy
    mask: torch.Tensor,          # (N, ...)
    normalizer: float | None = None,  # global masked count under data parallelism (see losses.py)
) -> tuple[torch.Tensor, dict[str, float]]:
    """k3 estimate of KL(pi_theta || pi_ref) from actions sampled by (nearly) pi_theta:
    exp(ref - logp) - 1 - (ref - logp), never negative (Schulman, http://joschu.net/blog/kl-approx.html).
    The log-ratio is clamped to +-20 so an unlikely action under the reference cannot overflow."""
    valid = mask.bool()
    diff = torch.where(valid, (ref_logprobs.detach() - logprobs).clamp(-20, 20), torch.zeros_like(logprobs))
    kl = torch.expm1(diff) - diff
    total = torch.where(valid, kl, torch.zeros_like(kl)).sum()
    count = normalizer if normalizer is not None else valid.sum().clamp(min=1)
    return total / count, {"actor/kl_ref": masked_mean(kl.detach(), mask).item()}
