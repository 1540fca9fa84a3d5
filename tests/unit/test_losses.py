"""Unit tests for vlarl.algo.losses against slow pure-python references and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from vlarl.algo.losses import approx_kl, entropy_from_logits, policy_loss, truncated_is_weights, value_loss

SEEDS = [0, 1, 2, 3, 4]
CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def random_batch(seed, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    old_logprobs = logprobs + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)  # ratios spread across the clip range
    advantages = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) < 0.7
    mask.view(-1)[0] = True
    return logprobs, old_logprobs, advantages, mask


# ---------------------------------------------------------------------------------------------
# Slow references over flat python lists.
# ---------------------------------------------------------------------------------------------


def reference_policy(logp, old, adv, mask, cl, ch, w=None):
    pgs, clipped, kls, ratios = [], [], [], []
    for i in range(len(logp)):
        if not mask[i]:
            continue
        r = math.exp(logp[i] - old[i])
        pg = -min(r * adv[i], min(max(r, 1 - cl), 1 + ch) * adv[i])
        pgs.append(pg * (w[i] if w is not None else 1.0))
        clipped.append(1.0 if (adv[i] > 0 and r > 1 + ch) or (adv[i] < 0 and r < 1 - cl) else 0.0)
        kls.append((r - 1) - math.log(r))
        ratios.append(r)
    n = len(pgs)
    return sum(pgs) / n, sum(clipped) / n, sum(kls) / n, sum(ratios) / n


def reference_value(v, old, ret, mask, c):
    losses, clipped = [], []
    for i in range(len(v)):
        if not mask[i]:
            continue
        v_clip = old[i] + min(max(v[i] - old[i], -c), c)
        a, b = (v[i] - ret[i]) ** 2, (v_clip - ret[i]) ** 2
        losses.append(0.5 * max(a, b))
        clipped.append(1.0 if b > a else 0.0)
    return sum(losses) / len(losses), sum(clipped) / len(clipped)


def flat(*tensors):
    return [t.reshape(-1).tolist() for t in tensors]


# ---------------------------------------------------------------------------------------------
# policy_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_weights", [False, True])
def test_policy_loss_matches_reference(seed, with_weights):
    logprobs, old, adv, mask = random_batch(seed)
    weights = torch.rand(logprobs.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2 if with_weights else None
    loss, m = policy_loss(logprobs, old, adv, mask, CLIP_LOW, CLIP_HIGH, is_weights=weights)
    ref_loss, ref_clip, ref_kl, ref_ratio = reference_policy(
        *flat(logprobs, old, adv, mask), CLIP_LOW, CLIP_HIGH, weights.reshape(-1).tolist() if with_weights else None
    )
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
    assert m["actor/pg_loss"] == pytest.approx(ref_loss, rel=1e-10)
    assert m["actor/clipfrac"] == pytest.approx(ref_clip)
    assert m["actor/approx_kl"] == pytest.approx(ref_kl, rel=1e-10)
    assert m["actor/ratio_mean"] == pytest.approx(ref_ratio, rel=1e-10)
    assert all(isinstance(v, float) for v in m.values())


def test_policy_loss_hand_case():
    # clip range [0.8, 1.28].  ratio, A -> unclipped r*A, clipped clip(r)*A, pg = -min, clipped taken?
    #   1.5,  1 ->  1.5,  1.28 -> -1.28  yes (too high, A > 0)
    #   0.5, -1 -> -0.5, -0.8  ->  0.8   yes (too low, A < 0)
    #   1.1, -1 -> -1.1, -1.1  ->  1.1   no  (inside the range)
    #   0.7,  1 ->  0.7,  0.8  -> -0.7   no  (too low, but A > 0 so the ratio keeps its gradient)
    #   1.5, -1 -> -1.5, -1.28 ->  1.5   no  (too high, but A < 0)
    #   3.0,  1 ->  masked out
    # loss = (-1.28 + 0.8 + 1.1 - 0.7 + 1.5) / 5 = 0.284; clipfrac = 2 / 5 = 0.4
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7, 1.5, 3.0])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    loss, m = policy_loss(ratio.log(), torch.zeros(6), adv, mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(0.284, rel=1e-6)
    assert m["actor/clipfrac"] == pytest.approx(0.4)
    assert m["actor/ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1 + 0.7 + 1.5) / 5, rel=1e-6)


def test_policy_loss_gradient_flows_only_through_unclipped_terms():
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7, 1.5, 3.0], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    logprobs = ratio.log().requires_grad_()
    old = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(logprobs, old, adv, mask, 0.2, 0.28)
    loss.backward()
    # d/dlogp of -r*A/5 is -r*A/5 where unclipped; 0 where clipped or masked.
    expected = torch.tensor([0.0, 0.0, 1.1 / 5, -0.7 / 5, 1.5 / 5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected)
    assert old.grad is None  # old log-probs are a constant of the update


@pytest.mark.parametrize("seed", SEEDS)
def test_policy_loss_global_normalizer_splits_across_ranks(seed):
    # Two "ranks" with unequal token counts, each normalised by the global count: the sum of
    # their gradients equals the full-batch gradient (a local mean per rank would not).
    logprobs, old, adv, mask = random_batch(seed, shape=(8, 5))
    mask[:4] = torch.rand(4, 5, generator=torch.Generator().manual_seed(seed)) < 0.3  # unbalanced halves
    mask[0, 0] = True
    full = logprobs.clone().requires_grad_()
    loss_full, _ = policy_loss(full, old, adv, mask, CLIP_LOW, CLIP_HIGH)
    loss_full.backward()

    global_count = mask.sum()
    grads, losses = [], []
    for half in (slice(0, 4), slice(4, 8)):
        lp = logprobs[half].clone().requires_grad_()
        loss, _ = policy_loss(lp, old[half], adv[half], mask[half], CLIP_LOW, CLIP_HIGH, normalizer=global_count)
        loss.backward()
        grads.append(lp.grad)
        losses.append(loss)
    torch.testing.assert_close(torch.cat(grads), full.grad)
    torch.testing.assert_close(losses[0] + losses[1], loss_full)


def test_policy_loss_is_weights_scale_gradient_and_get_none():
    logprobs, old, adv, mask = random_batch(0)
    weights = torch.full(logprobs.shape, 2.0, dtype=torch.float64, requires_grad=True)
    lp1 = logprobs.clone().requires_grad_()
    lp2 = logprobs.clone().requires_grad_()
    policy_loss(lp1, old, adv, mask, CLIP_LOW, CLIP_HIGH)[0].backward()
    policy_loss(lp2, old, adv, mask, CLIP_LOW, CLIP_HIGH, is_weights=weights)[0].backward()
    torch.testing.assert_close(lp2.grad, 2.0 * lp1.grad)
    assert weights.grad is None
    assert torch.isfinite(lp1.grad).all() and lp1.grad.abs().sum() > 0


@pytest.mark.parametrize("pad_logp,pad_old,pad_adv", [(float("nan"),) * 3, (50.0, -100.0, 1.0), (0.0, 0.0, float("inf"))])
def test_policy_loss_garbage_padding_gets_zero_gradient(pad_logp, pad_old, pad_adv):
    # NaN or exp-overflowing padding must not reach the loss, the metrics or the gradient.
    logprobs = torch.tensor([-1.0, pad_logp], requires_grad=True)
    old = torch.tensor([-1.2, pad_old])
    adv = torch.tensor([1.0, pad_adv])
    weights = torch.tensor([1.0, float("nan")])
    loss, m = policy_loss(logprobs, old, adv, torch.tensor([True, False]), CLIP_LOW, CLIP_HIGH, is_weights=weights)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in m.values())
    assert torch.isfinite(logprobs.grad[0]) and logprobs.grad[1].item() == 0.0


def test_policy_loss_empty_mask_is_zero():
    empty, _ = policy_loss(torch.zeros(3), torch.zeros(3), torch.ones(3), torch.zeros(3), CLIP_LOW, CLIP_HIGH)
    assert empty.item() == 0.0


# ---------------------------------------------------------------------------------------------
# value_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_value_loss_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(7, 4, generator=g, dtype=torch.float64)
    values = old + 0.4 * torch.randn(7, 4, generator=g, dtype=torch.float64)
    returns = torch.randn(7, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(7, 4, generator=g) < 0.7
    mask[0, 0] = True
    loss, m = value_loss(values, old, returns, mask, clip=0.2)
    ref_loss, ref_clip = reference_value(*flat(values, old, returns, mask), 0.2)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
    assert m["critic/vf_loss"] == pytest.approx(ref_loss, rel=1e-10)
    assert m["critic/vf_clipfrac"] == pytest.approx(ref_clip)
    vals = [v for v, k in zip(*flat(values, mask)) if k]
    assert m["critic/values_mean"] == pytest.approx(sum(vals) / len(vals))


def test_value_loss_hand_case_and_gradient():
    # v=[1.5, 0.0, 0.9], old=[1.0, 0.0, 1.0], R=[2.0, 1.0, 0.0], c=0.2, last element masked out.
    # v_clip = [1.2, 0.0]; (v-R)^2 = [0.25, 1.0]; (v_clip-R)^2 = [0.64, 1.0]; max = [0.64, 1.0]
    # loss = 0.5 * (0.64 + 1.0) / 2 = 0.41; clipfrac = 1/2 (only the first took the clipped term)
    # grad: first element is clipped (constant in v) -> 0; second: (v - R) / 2 = -0.5
    values = torch.tensor([1.5, 0.0, 0.9], requires_grad=True)
    old = torch.tensor([1.0, 0.0, 1.0])
    returns = torch.tensor([2.0, 1.0, 0.0])
    mask = torch.tensor([1.0, 1.0, 0.0])
    loss, m = value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.41, rel=1e-6)
    assert m["critic/vf_clipfrac"] == pytest.approx(0.5)
    assert m["critic/values_mean"] == pytest.approx(0.75)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([0.0, -0.5, 0.0]))


def test_value_loss_garbage_padding_gets_zero_gradient():
    values = torch.tensor([0.5, float("nan"), 1e30], requires_grad=True)
    old = torch.tensor([0.4, float("nan"), -1e30])
    returns = torch.tensor([1.0, float("inf"), 1e30])
    loss, m = value_loss(values, old, returns, torch.tensor([True, False, False]), clip=0.2)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in m.values())
    torch.testing.assert_close(values.grad, torch.tensor([-0.5, 0.0, 0.0]))


def test_value_loss_global_normalizer_splits():
    g = torch.Generator().manual_seed(0)
    old, returns = torch.randn(10, generator=g), torch.randn(10, generator=g)
    values = old + 0.3 * torch.randn(10, generator=g)
    mask = torch.rand(10, generator=g) < 0.6
    full = values.clone().requires_grad_()
    value_loss(full, old, returns, mask, clip=0.2)[0].backward()
    grads = []
    for half in (slice(0, 3), slice(3, 10)):
        v = values[half].clone().requires_grad_()
        value_loss(v, old[half], returns[half], mask[half], clip=0.2, normalizer=mask.sum())[0].backward()
        grads.append(v.grad)
    torch.testing.assert_close(torch.cat(grads), full.grad)


# ---------------------------------------------------------------------------------------------
# entropy, approx_kl, truncated_is_weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_entropy_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(3, 4, 11, generator=g, dtype=torch.float64)
    ent = entropy_from_logits(logits)
    assert ent.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            row = logits[i, j].tolist()
            z = sum(math.exp(x) for x in row)
            p = [math.exp(x) / z for x in row]
            assert ent[i, j].item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-10)


def test_entropy_hand_cases_and_stability():
    # uniform over 4 -> log 4 = 1.386294; [1000, 1000] -> log 2 (naive exp overflows);
    # [0, -inf] -> 0 (a masked vocabulary entry contributes nothing, not NaN).
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1000.0, 1000.0, -float("inf"), -float("inf")], [0.0, -float("inf"), -float("inf"), -float("inf")]], requires_grad=True)
    ent = entropy_from_logits(logits)
    torch.testing.assert_close(ent.detach(), torch.tensor([math.log(4), math.log(2), 0.0]))
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert entropy_from_logits(torch.zeros(2, 8, dtype=torch.bfloat16)).dtype == torch.float32


@pytest.mark.parametrize("seed", SEEDS)
def test_approx_kl_matches_reference(seed):
    logprobs, old, _, mask = random_batch(seed)
    kl = approx_kl(logprobs, old, mask)
    terms = [(math.exp(a - b) - 1) - (a - b) for a, b, k in zip(*flat(logprobs, old, mask)) if k]
    assert kl.dim() == 0 and kl.item() == pytest.approx(sum(terms) / len(terms), rel=1e-10)
    assert kl.item() >= 0.0


def test_approx_kl_hand_case():
    # log ratios [0, log 2] -> terms [0, (2 - 1) - log 2 = 0.306853]; mean = 0.153426
    kl = approx_kl(torch.tensor([0.0, math.log(2), 5.0]), torch.zeros(3), torch.tensor([1, 1, 0]))
    assert kl.item() == pytest.approx((1 - math.log(2)) / 2, rel=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_truncated_is_weights_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(20, generator=g, dtype=torch.float64) * 3
    rollout = (old + torch.randn(20, generator=g, dtype=torch.float64)).requires_grad_()
    w = truncated_is_weights(old, rollout, cap=2.0)
    assert not w.requires_grad
    for a, b, x in zip(old.tolist(), rollout.tolist(), w.tolist()):
        assert x == pytest.approx(min(math.exp(a - b), 2.0), rel=1e-10)


def test_truncated_is_weights_hand_case():
    # exp(0) = 1, exp(log 1.5) = 1.5, exp(log 3) = 3 -> capped at 2, exp(-1) = 0.367879
    old = torch.tensor([0.0, math.log(1.5), math.log(3.0), -1.0])
    w = truncated_is_weights(old, torch.zeros(4), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 1.5, 2.0, 0.367879]), rtol=1e-5, atol=1e-6)


def test_ratio_units_per_token_per_action_and_per_chunk():
    from vlarl.algo.losses import ratio_units

    lp = torch.tensor([[-1.0, -2.0, -0.5, 0.0, -0.25, -0.25], [0.0, -0.25, -0.25, -1.0, -1.0, -1.0]])
    units, mask = ratio_units(lp, "token")
    assert torch.equal(units, lp) and bool(mask.all())
    # Two 3-D actions per step: each action's joint log-prob, then the whole chunk's.
    assert ratio_units(lp, "action", action_dim=3)[0].tolist() == [[-3.5, -0.5], [-0.5, -3.0]]
    assert ratio_units(lp, "chunk")[0].tolist() == [[-4.0], [-3.5]]
    # One ratio per chunk: exp of the summed differences, the product of the per-token ratios.
    old = torch.zeros_like(lp)
    joint = torch.exp(ratio_units(lp, "chunk")[0] - ratio_units(old, "chunk")[0])[:, 0]
    assert torch.allclose(joint, torch.exp(lp - old).prod(1))
    with pytest.raises(ValueError, match="multiple of 4"):
        ratio_units(lp, "action", action_dim=4)
    with pytest.raises(ValueError, match="not token, action or chunk"):
        ratio_units(lp, "step")


def test_ratio_units_leave_out_actions_never_executed():
    from vlarl.algo.losses import ratio_units

    lp = torch.tensor([[-1.0, -2.0, -0.5, 0.0, -0.25, -0.25], [0.0, -0.25, -0.25, -1.0, -1.0, -1.0]])
    # Row 0 ran only its first 3-D action, row 1 both.
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    units, unit_mask = ratio_units(lp, "token", mask)
    assert torch.equal(units, lp) and torch.equal(unit_mask, mask)
    units, unit_mask = ratio_units(lp, "action", mask, action_dim=3)
    assert units.tolist() == [[-3.5, 0.0], [-0.5, -3.0]] and unit_mask.tolist() == [[True, False], [True, True]]
    units, unit_mask = ratio_units(lp, "chunk", mask)
    assert units.tolist() == [[-3.5], [-3.5]] and unit_mask.tolist() == [[True], [True]]
