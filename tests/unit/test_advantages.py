"""Unit tests for vlarl.algo.advantages against slow pure-python references and hand-computed cases."""

from __future__ import annotations

import math
import random

import pytest
import torch

from vlarl.algo.advantages import gae, group_filter_mask, grpo, masked_mean, masked_whiten, rloo

SEEDS = [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Slow references: one episode / one element at a time, plain python floats.
# ---------------------------------------------------------------------------------------------


def reference_gae(rewards, values, terminated, last_value, length, gamma, lam):
    """GAE for one episode of `length` real steps, given as python lists (padding ignored)."""
    adv = [0.0] * length
    next_adv = 0.0
    for t in reversed(range(length)):
        if t == length - 1:
            v_next = 0.0 if terminated else last_value
            delta = rewards[t] + gamma * v_next - values[t]
            adv[t] = delta
        else:
            delta = rewards[t] + gamma * values[t + 1] - values[t]
            adv[t] = delta + gamma * lam * next_adv
        next_adv = adv[t]
    return adv


def reference_grpo(returns, ids, eps):
    out = []
    for i, r in enumerate(returns):
        group = [returns[j] for j in range(len(returns)) if ids[j] == ids[i]]
        if len(group) == 1:
            out.append(0.0)
            continue
        mean = sum(group) / len(group)
        std = math.sqrt(sum((g - mean) ** 2 for g in group) / len(group))
        out.append((r - mean) / (std + eps))
    return out


def make_episodes(seed, B=6, T=7, garbage=1e3):
    """Random (B, T) batch, one episode per row with random length and random ending kind."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lengths = [rng.randint(1, T) for _ in range(B)]
    lengths[0] = T  # always include a full-length row
    is_terminated = [rng.random() < 0.5 for _ in range(B)]
    mask = torch.zeros(B, T, dtype=torch.bool)
    dones = torch.zeros(B, T, dtype=torch.bool)
    terminated = torch.zeros(B, T, dtype=torch.bool)
    for b, L in enumerate(lengths):
        mask[b, :L] = True
        dones[b, L - 1] = True
        terminated[b, L - 1] = is_terminated[b]
    # Padding holds large garbage: it must never reach the result.
    rewards = torch.where(mask, torch.randn(B, T, generator=g, dtype=torch.float64), torch.tensor(garbage, dtype=torch.float64))
    values = torch.where(mask, torch.randn(B, T, generator=g, dtype=torch.float64), torch.tensor(-garbage, dtype=torch.float64))
    last_values = torch.randn(B, generator=g, dtype=torch.float64)
    return rewards, values, dones, terminated, last_values, mask, lengths, is_terminated


# ---------------------------------------------------------------------------------------------
# gae
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.8), (1.0, 1.0), (0.5, 0.0)])
def test_gae_matches_reference(seed, gamma, lam):
    rewards, values, dones, terminated, last_values, mask, lengths, is_term = make_episodes(seed)
    adv, ret = gae(rewards, values, dones, terminated, last_values, mask, gamma=gamma, lam=lam)
    assert adv.shape == rewards.shape and ret.shape == rewards.shape
    for b, L in enumerate(lengths):
        expected = reference_gae(
            rewards[b].tolist(), values[b].tolist(), is_term[b], last_values[b].item(), L, gamma, lam
        )
        for t in range(rewards.shape[1]):
            if t < L:
                assert adv[b, t].item() == pytest.approx(expected[t], rel=1e-10, abs=1e-10)
                assert ret[b, t].item() == pytest.approx(expected[t] + values[b, t].item(), rel=1e-10, abs=1e-10)
            else:
                assert adv[b, t].item() == 0.0 and ret[b, t].item() == 0.0


def test_gae_hand_case():
    # One 3-step episode padded to T=4, gamma=0.9, lam=0.8, r=[1, 0, 2], V=[0.5, 1.0, 1.5].
    # Terminated:  delta2 = 2 - 1.5 = 0.5                   A2 = 0.5
    #              delta1 = 0 + 0.9*1.5 - 1.0 = 0.35         A1 = 0.35 + 0.72*0.5  = 0.71
    #              delta0 = 1 + 0.9*1.0 - 0.5 = 1.4          A0 = 1.4  + 0.72*0.71 = 1.9112
    # Truncated with last_value 2.0:
    #              delta2 = 2 + 0.9*2.0 - 1.5 = 2.3          A2 = 2.3
    #                                                        A1 = 0.35 + 0.72*2.3   = 2.006
    #                                                        A0 = 1.4  + 0.72*2.006 = 2.84432
    rewards = torch.tensor([[1.0, 0.0, 2.0, 9.0]] * 2, dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0]] * 2, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]] * 2, dtype=torch.bool)
    dones = torch.tensor([[0, 0, 1, 0]] * 2, dtype=torch.bool)
    terminated = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    last_values = torch.tensor([2.0, 2.0], dtype=torch.float64)
    adv, ret = gae(rewards, values, dones, terminated, last_values, mask, gamma=0.9, lam=0.8)
    expected_adv = torch.tensor([[1.9112, 0.71, 0.5, 0.0], [2.84432, 2.006, 2.3, 0.0]], dtype=torch.float64)
    expected_ret = torch.tensor([[2.4112, 1.71, 2.0, 0.0], [3.34432, 3.006, 3.8, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, expected_ret)


@pytest.mark.parametrize("seed", SEEDS)
def test_gae_only_truncated_rows_bootstrap(seed):
    rewards, values, dones, terminated, last_values, mask, lengths, is_term = make_episodes(seed, B=10)
    adv1, _ = gae(rewards, values, dones, terminated, last_values, mask, gamma=0.99, lam=0.95)
    adv2, _ = gae(rewards, values, dones, terminated, last_values + 5.0, mask, gamma=0.99, lam=0.95)
    for b in range(len(lengths)):
        changed = not torch.equal(adv1[b], adv2[b])
        assert changed == (not is_term[b]), f"row {b} terminated={is_term[b]} changed={changed}"
    # Truncated rows shift by exactly gamma * 5 * (gamma * lam)^(steps to the end) on real steps.
    for b, L in enumerate(lengths):
        if not is_term[b]:
            for t in range(L):
                shift = 0.99 * 5.0 * (0.99 * 0.95) ** (L - 1 - t)
                assert (adv2[b, t] - adv1[b, t]).item() == pytest.approx(shift, rel=1e-9)


def test_gae_unflagged_row_end_is_truncation():
    # A row whose real steps run out without a done flag (rollout stopped mid-episode) must
    # bootstrap from last_values, not read values[t+1] from the padding.
    rewards = torch.tensor([[1.0, 1.0, 0.0]])
    values = torch.tensor([[0.0, 0.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    flagged = torch.tensor([[0, 1, 0]], dtype=torch.bool)
    none = torch.zeros(1, 3, dtype=torch.bool)
    last_values = torch.tensor([3.0])
    a_flagged, _ = gae(rewards, values, flagged, none, last_values, mask, gamma=0.9, lam=0.8)
    a_unflagged, _ = gae(rewards, values, none, none, last_values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(a_flagged, a_unflagged)


def test_gae_nan_padding_does_not_leak():
    rewards, values, dones, terminated, last_values, mask, *_ = make_episodes(0, garbage=float("nan"))
    adv, ret = gae(rewards, values, dones, terminated, last_values, mask, gamma=0.99, lam=0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


def test_gae_float_mask_equals_bool_mask():
    rewards, values, dones, terminated, last_values, mask, *_ = make_episodes(1)
    adv_b, ret_b = gae(rewards, values, dones, terminated, last_values, mask, gamma=0.99, lam=0.95)
    adv_f, ret_f = gae(rewards, values, dones, terminated, last_values, mask.double(), gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv_b, adv_f)
    torch.testing.assert_close(ret_b, ret_f)


# ---------------------------------------------------------------------------------------------
# grpo and group filtering
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_matches_reference(seed):
    rng = random.Random(seed)
    B = 24
    # Non-contiguous, shuffled ids with mixed group sizes, including singletons.
    ids = [rng.choice([3, 7, 7, 11, 42, 42, 42, 100 + rng.randint(0, 5)]) for _ in range(B)]
    returns = [float(rng.random() < 0.5) if rng.random() < 0.5 else rng.gauss(0, 2) for _ in range(B)]
    adv = grpo(torch.tensor(returns, dtype=torch.float64), torch.tensor(ids), eps=1e-6)
    expected = reference_grpo(returns, ids, 1e-6)
    for i in range(B):
        assert adv[i].item() == pytest.approx(expected[i], rel=1e-9, abs=1e-9)


def test_grpo_hand_case():
    # group 0: [1, 0, 1, 0] mean 0.5, population std 0.5       -> [1, -1, 1, -1]
    # group 5: [3, 1, 2]    mean 2, std sqrt(2/3) = 0.816497    -> [1.224745, -1.224745, 0]
    # group 9: [1, 1]       std 0                               -> [0, 0]
    # group 2: [4]          singleton                           -> [0]
    returns = torch.tensor([1.0, 0.0, 3.0, 1.0, 1.0, 0.0, 1.0, 2.0, 1.0, 4.0])
    ids = torch.tensor([0, 0, 5, 0, 9, 0, 5, 5, 9, 2])
    adv = grpo(returns, ids, eps=1e-6)
    expected = torch.tensor([1.0, -1.0, 1.224745, 1.0, 0.0, -1.0, -1.224745, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5)


def test_grpo_uses_population_std():
    # G=2 with different returns gives exactly +-1 (up to eps) with the population std;
    # the unbiased std would give +-0.7071.
    adv = grpo(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("seed", SEEDS)
def test_group_filter_mask_matches_reference(seed):
    rng = random.Random(seed)
    B, G = 40, 8
    ids = list(range(B // G)) * G
    rng.shuffle(ids)
    p = {i: rng.choice([0.0, 0.3, 0.7, 1.0]) for i in set(ids)}
    returns = [float(rng.random() < p[i]) for i in ids]
    keep = group_filter_mask(torch.tensor(returns), torch.tensor(ids), low=0.1, high=0.9)
    for i in range(B):
        group = [returns[j] for j in range(B) if ids[j] == ids[i]]
        mean = sum(group) / len(group)
        assert bool(keep[i]) == (0.1 <= mean <= 0.9)


def test_group_filter_mask_hand_case():
    # group 0 all fail (mean 0) -> drop; group 1 all succeed (mean 1) -> drop;
    # group 2 mean 0.5 -> keep; group 3 mean 0.1 with 10 rollouts -> keep (bounds inclusive).
    returns = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0] + [1.0] + [0.0] * 9)
    ids = torch.tensor([0, 0, 1, 1, 2, 2] + [3] * 10)
    keep = group_filter_mask(returns, ids, low=0.1, high=0.9)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, False, False, False, True, True] + [True] * 10


# ---------------------------------------------------------------------------------------------
# masked_mean / masked_whiten
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_mean_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 6, generator=g) < 0.6
    mask[0] = False  # an empty row gives 0, not NaN
    vals = [x[i, j].item() for i in range(5) for j in range(6) if mask[i, j]]
    assert masked_mean(x, mask).item() == pytest.approx(sum(vals) / len(vals))
    row_means = masked_mean(x, mask, dim=1)
    for i in range(5):
        row = [x[i, j].item() for j in range(6) if mask[i, j]]
        assert row_means[i].item() == pytest.approx(sum(row) / len(row) if row else 0.0)
    col_means = masked_mean(x, mask.double(), dim=0)
    for j in range(6):
        col = [x[i, j].item() for i in range(5) if mask[i, j]]
        assert col_means[j].item() == pytest.approx(sum(col) / len(col) if col else 0.0)


def test_masked_mean_hand_case_ignores_nan_padding():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 4 + 6) / 4)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 5.0]))


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_whiten_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    x = 3.0 + 2.0 * torch.randn(4, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 9, generator=g) < 0.7
    out = masked_whiten(x, mask, eps=0.0)
    vals = [x[i, j].item() for i in range(4) for j in range(9) if mask[i, j]]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    for i in range(4):
        for j in range(9):
            expected = (x[i, j].item() - mean) / std if mask[i, j] else 0.0
            assert out[i, j].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_masked_whiten_hand_case():
    # masked values [1, 3, 5]: mean 3, population std sqrt(8/3) = 1.632993 -> [-1.224745, 0, 1.224745]
    x = torch.tensor([1.0, 3.0, 100.0, 5.0])
    mask = torch.tensor([1, 1, 0, 1], dtype=torch.bool)
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([-1.224745, 0.0, 0.0, 1.224745]))


# ---------------------------------------------------------------------------------------------
# RLOO
# ---------------------------------------------------------------------------------------------


def reference_rloo(returns, ids):
    out = []
    for i, r in enumerate(returns):
        others = [returns[j] for j in range(len(returns)) if ids[j] == ids[i] and j != i]
        out.append(r - sum(others) / len(others) if others else 0.0)
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_rloo_matches_reference(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    ids = [rng.randint(0, 5) for _ in range(n)]
    returns = [float(rng.random() < 0.4) + rng.random() * 0.1 for _ in range(n)]
    got = rloo(torch.tensor(returns, dtype=torch.float64), torch.tensor(ids))
    assert got.tolist() == pytest.approx(reference_rloo(returns, ids), abs=1e-9)


def test_rloo_hand_case():
    # One success in a group of four: 1 - 0 = 1 for it, 0 - 1/3 for each failure; a lone rollout gets 0.
    got = rloo(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 0, 1]))
    assert got.tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3, 0.0])


# ---------------------------------------------------------------------------------------------
# The step limit ends an episode: no bootstrap there (TrajectoryBatch.no_bootstrap)
# ---------------------------------------------------------------------------------------------


def _one_step_batch(terminated: bool, timeout: bool):
    import numpy as np

    from vlarl.data.batch import TrajectoryBatch

    n, t = 1, 1
    return TrajectoryBatch(
        images=np.zeros((n, t + 1, 2, 2, 3), np.uint8), proprio=np.zeros((n, t + 1, 8), np.float32),
        instructions=["x"], task_ids=np.zeros(n, np.int64), init_state_ids=np.zeros(n, np.int64),
        group_ids=np.zeros(n, np.int64), action_tokens=np.zeros((n, t, 7), np.int64),
        rollout_logprobs=np.zeros((n, t, 7), np.float32), rewards=np.zeros((n, t), np.float32),
        mask=np.ones((n, t), bool), dones=np.ones((n, t), bool), terminated=np.full((n, t), terminated),
        success=np.zeros(n, bool), timeouts=np.full((n, t), timeout))


def test_step_limit_is_terminal_unless_asked_to_bootstrap():
    # A failed one-step episode that ran out of time, V(s) = 0.2, V(next) = 0.5, gamma 0.99: it is
    # worth exactly its reward, 0, so A = 0 - 0.2; bootstrapping would have scored it 0.99 * 0.5 - 0.2 > 0.
    batch = _one_step_batch(terminated=False, timeout=True)
    values, last = torch.tensor([[0.2]]), torch.tensor([0.5])

    def advantage(no_bootstrap):
        adv, _ = gae(torch.tensor(batch.rewards), values, torch.tensor(batch.dones), torch.tensor(no_bootstrap),
                     last, torch.tensor(batch.mask), 0.99, 0.95)
        return adv.item()

    assert advantage(batch.no_bootstrap()) == pytest.approx(-0.2)
    assert advantage(batch.no_bootstrap(bootstrap_time_limit=True)) == pytest.approx(0.99 * 0.5 - 0.2)
    # A truncation that is not the step limit (a simulator restart) still bootstraps.
    restart = _one_step_batch(terminated=False, timeout=False)
    assert not restart.no_bootstrap().any()


def test_select_keeps_rows_and_their_fields():
    import numpy as np

    from vlarl.data.batch import TrajectoryBatch

    parts = [_one_step_batch(terminated=bool(i % 2), timeout=not i % 2) for i in range(3)]
    for i, b in enumerate(parts):
        b.task_ids[:] = i
        b.instructions = [f"task {i}"]
        b.videos = {0: np.full((2, 2, 2, 3), i, np.uint8)}
    batch = TrajectoryBatch.concat(parts)
    sub = batch.select(np.array([2, 0]))
    assert sub.task_ids.tolist() == [2, 0] and sub.instructions == ["task 2", "task 0"]
    assert sub.terminated[:, 0].tolist() == [False, False] and sub.timeouts[:, 0].tolist() == [True, True]
    assert sorted(sub.videos) == [0, 1] and sub.videos[0][0, 0, 0, 0] == 2 and sub.videos[1][0, 0, 0, 0] == 0
