"""PPO/GRPO losses: clipped policy loss, clipped value loss, entropy, KL and importance weights.

Pure tensor functions: no config objects, no distributed calls. Losses return a scalar tensor and
a dict of python-float metrics (local masked means, namespaced `actor/` and `critic/`).

Normalisation: each loss is sum(per_element * mask) / normalizer. By default the normalizer is the
local mask count, i.e. a plain masked mean. With gradient accumulation or data parallelism, pass
the GLOBAL count of masked elements instead, so every micro-batch / rank contributes its share of
one full-batch mean: the per-shard gradients then SUM to the full-batch gradient, and 1 rank and
N ranks train identically. If the data-parallel wrapper AVERAGES gradients (torch DDP does),
pass global_count / world_size.
"""

from __future__ import annotations

import torch

from vlarl.algo.advantages import masked_mean


def _normalize(total: torch.Tensor, mask: torch.Tensor, normalizer: float | torch.Tensor | None) -> torch.Tensor:
    """total / normalizer, the normalizer defaulting to the local mask count (at least 1)."""
    if normalizer is None:
        normalizer = mask.sum().clamp(min=1.0)
    return total / normalizer


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where, not x * mask: a NaN/inf left in padding would survive NaN * 0.
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum()


def policy_loss(
    logprobs: torch.Tensor,      # (N, ...) log pi_theta(a), requires grad
    old_logprobs: torch.Tensor,  # (N, ...) log pi_old(a) from the learner before this update
    advantages: torch.Tensor,    # (N, ...) broadcast per action token
    mask: torch.Tensor,          # (N, ...) 1 for real action tokens
    clip_low: float,
    clip_high: float,
    is_weights: torch.Tensor | None = None,          # (N, ...) truncated IS weights, no grad
    normalizer: float | torch.Tensor | None = None,  # global masked count under DP; see module doc
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with asymmetric clip range [1 - clip_low, 1 + clip_high].

    pg = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A), ratio = exp(logp - old_logp).
    A larger clip_high ("clip-higher", DAPO, Yu et al. 2025; SimpleVLA-RL uses 0.2/0.28) lets
    low-probability actions with positive advantage grow faster, which keeps exploration alive.
    """
    valid = mask.bool()
    mask = mask.to(logprobs.dtype)
    old_logprobs = old_logprobs.detach()
    # Neutralise padding before exp: garbage there could overflow to inf and send NaN gradients
    # back into the model through 0 * inf, even though the forward value is masked out.
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    advantages = torch.where(valid, advantages.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    pg_unclipped = -ratio * advantages
    pg_clipped = -torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    pg = torch.maximum(pg_unclipped, pg_clipped)
    if is_weights is not None:
        pg = pg * torch.where(valid, is_weights.detach(), torch.ones_like(pg))
    loss = _normalize(_masked_sum(pg, mask), mask, normalizer)

    with torch.no_grad():
        # The clipped term is taken only when the ratio left the range in the direction the
        # advantage pushes it; a ratio outside the range on the other side still gets gradient.
        clipped = ((advantages > 0) & (ratio > 1.0 + clip_high)) | ((advantages < 0) & (ratio < 1.0 - clip_low))
        metrics = {
            "actor/pg_loss": masked_mean(pg, mask).item(),
            "actor/clipfrac": masked_mean(clipped.to(ratio.dtype), mask).item(),
            "actor/approx_kl": approx_kl(logprobs, old_logprobs, mask).item(),
            "actor/ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, metrics


def ratio_units(
    logprobs: torch.Tensor,  # (N, D) log-probs per token (or per flow element) of each step's action(s)
    level: str,
    mask: torch.Tensor | None = None,  # (N, D) bool, the elements of executed actions; None: all
    action_dim: int = 7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probs PPO takes one ratio of each (algo.logprob_level), and which of them count: per token
    (N, D) as given; per action (N, D / action_dim), each consecutive action_dim log-probs summed (one 7-D
    action's joint log-prob); per chunk (N, 1), the whole step's summed, so the clip bounds everything one
    policy call emitted. SimpleVLA-RL keeps one ratio per token; RLinf sums per action or per chunk (its
    `logprob_type`); for a single-action model action and chunk coincide. Masked elements (actions the
    environment never ran) are left out of the sums, and a unit counts when any element in it does.
    Returns (units, unit_mask), unit_mask bool."""
    if mask is None:
        mask = torch.ones_like(logprobs, dtype=torch.bool)
    mask = mask.bool()
    if level == "token":
        return logprobs, mask
    kept = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    if level == "action":
        if logprobs.shape[-1] % action_dim:
            raise ValueError(f"logprob_level=action needs a multiple of {action_dim} log-probs per step; got "
                             f"{logprobs.shape[-1]}.")
        return kept.unflatten(-1, (-1, action_dim)).sum(-1), mask.unflatten(-1, (-1, action_dim)).any(-1)
    if level == "chunk":
        return kept.sum(-1, keepdim=True), mask.any(-1, keepdim=True)
    raise ValueError(f"logprob level {level!r} is not token, action or chunk.")


def value_loss(
    values: torch.Tensor,      # (N, ...) critic output, requires grad
    old_values: torch.Tensor,  # (N, ...) critic output at rollout time
    returns: torch.Tensor,     # (N, ...) GAE returns (targets)
    mask: torch.Tensor,        # (N, ...) 1 for real steps
    clip: float,
    normalizer: float | torch.Tensor | None = None,  # global masked count under DP; see module doc
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: 0.5 * max((v - R)^2, (v_clip - R)^2), v_clip = old_v + clamp(v - old_v, -c, c).

    Taking the max is pessimistic: the critic cannot move more than `clip` from its rollout-time
    estimate to reduce the loss, mirroring the policy's trust region (PPO2 baselines).
    """
    valid = mask.bool()
    mask = mask.to(values.dtype)
    # Padding is replaced by zeros so that garbage there cannot produce inf/NaN gradients.
    zeros = torch.zeros_like(values)
    values = torch.where(valid, values, zeros)
    old_values = torch.where(valid, old_values.detach(), zeros)
    returns = torch.where(valid, returns.detach(), zeros)
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (v_clipped - returns) ** 2
    vf = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
    loss = _normalize(_masked_sum(vf, mask), mask, normalizer)

    with torch.no_grad():
        metrics = {
            "critic/vf_loss": masked_mean(vf, mask).item(),
            "critic/vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).to(vf.dtype), mask).item(),
            "critic/values_mean": masked_mean(values, mask).item(),
        }
    return loss, metrics


def entropy_from_logits(
    logits: torch.Tensor,  # (..., V) unnormalised scores over V choices (e.g. action bins)
) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: logits (..., V) -> entropy (...).

    Computed from log_softmax (a logsumexp), so large logits do not overflow. Half-precision
    logits are upcast to float32; -inf logits (masked vocabulary) contribute 0, not NaN.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    # Clamping -inf to the most negative finite value makes 0 * logp == 0 in forward and backward.
    logp_finite = logp.clamp(min=torch.finfo(dtype).min)
    return -(logp.exp() * logp_finite).sum(dim=-1)


def approx_kl(
    logprobs: torch.Tensor,      # (N, ...) log pi_theta(a)
    old_logprobs: torch.Tensor,  # (N, ...) log pi_old(a), a ~ pi_old
    mask: torch.Tensor,          # (N, ...)
) -> torch.Tensor:
    """Masked mean of (ratio - 1) - log ratio, a scalar tensor.

    Schulman's "k3" estimator of KL(pi_old || pi_theta) from samples of pi_old: unbiased and,
    unlike -log ratio, never negative per sample (http://joschu.net/blog/kl-approx.html).
    """
    # Zero log-ratio on padding keeps exp() finite there, so a KL penalty built on this stays NaN-free.
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


def truncated_is_weights(
    old_logprobs: torch.Tensor,      # (N, ...) learner log-probs of the sampled actions
    rollout_logprobs: torch.Tensor,  # (N, ...) log-probs reported by the rollout engine
    cap: float,
) -> torch.Tensor:
    """min(exp(old_logprobs - rollout_logprobs), cap), detached; same shape as the inputs.

    The rollout engine (vLLM, bf16 kernels) and the learner disagree slightly on the same policy;
    truncated importance sampling corrects for that mismatch while the cap (about 2) bounds the
    variance a single badly-mismatched token can add (Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training").
    """
    with torch.no_grad():
        return torch.exp(old_logprobs - rollout_logprobs).clamp(max=cap)
