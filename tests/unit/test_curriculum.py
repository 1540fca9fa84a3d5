"""Unit tests for vlarl.workers.curriculum.CurriculumManager (plain class, no Ray)."""

import json

import numpy as np
import pytest

from vlarl.workers.curriculum import CurriculumManager


def test_probs_sum_to_one_and_respect_floor():
    """A skewed EMA state still gives a distribution with every task at or above the floor."""
    cm = CurriculumManager(num_tasks=10, num_init_states=50, floor_prob=0.03)
    # Drive tasks to extremes: 0-2 always fail, 3-5 always succeed, the rest stay unseen (0.5).
    for _ in range(50):
        cm.report([0, 1, 2, 3, 4, 5], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    p = cm.probs()
    assert p.shape == (10,)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert (p >= 0.03 - 1e-12).all()


def test_all_solved_is_uniform_not_nan():
    """All weights 0 (every task solved) must not divide by zero: the epsilon gives uniform."""
    cm = CurriculumManager(num_tasks=4, num_init_states=1, ema_alpha=0.0, floor_prob=0.0)
    cm.report([0, 1, 2, 3], [1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(cm.probs(), np.full(4, 0.25))


def test_frontier_task_gets_more_probability():
    """A task at 50% EMA outweighs tasks at 0% and 100%."""
    cm = CurriculumManager(num_tasks=3, num_init_states=1, ema_alpha=0.0, floor_prob=0.02)
    cm.report([0, 1, 2], [0.0, 0.5, 1.0])  # alpha 0: EMA becomes the batch mean exactly
    p = cm.probs()
    assert p[1] > p[0] and p[1] > p[2]
    # Hand computation: weights ~ (eps, 1+eps, eps); p1 = 0.02 + 0.94 * (1+eps)/(1+3 eps).
    eps = 1e-6
    assert p[1] == pytest.approx(0.02 + 0.94 * (1 + eps) / (1 + 3 * eps))
    assert p[0] == pytest.approx(0.02 + 0.94 * eps / (1 + 3 * eps))


def test_ema_arithmetic_matches_hand_computation():
    """Successes are averaged per task, then s <- a s + (1 - a) mean; untouched tasks stay put."""
    cm = CurriculumManager(num_tasks=3, num_init_states=5, ema_alpha=0.9)
    cm.report([0, 0, 0, 1], [1.0, 0.0, 1.0, 0.0])
    # task 0: 0.9 * 0.5 + 0.1 * (2/3); task 1: 0.9 * 0.5 + 0.1 * 0; task 2 unseen.
    assert cm.success_ema() == pytest.approx([0.45 + 0.1 * 2 / 3, 0.45, 0.5])
    cm.report([0], [1.0])
    assert cm.success_ema()[0] == pytest.approx(0.9 * (0.45 + 0.1 * 2 / 3) + 0.1)
    assert cm.state_dict()["counts"] == [4, 1, 0]


def test_sample_is_deterministic_per_iteration():
    """Same (seed, iteration) gives the same draw, even from a fresh instance; iterations differ."""
    a = CurriculumManager(num_tasks=20, num_init_states=50, seed=7)
    b = CurriculumManager(num_tasks=20, num_init_states=50, seed=7)
    assert a.sample(3, num_groups=16, group_size=4) == b.sample(3, num_groups=16, group_size=4)
    # Calling sample does not advance hidden state: repeating the call repeats the draw.
    assert a.sample(3, 16, 4) == a.sample(3, 16, 4)
    assert a.sample(3, 16, 4) != a.sample(4, 16, 4)
    c = CurriculumManager(num_tasks=20, num_init_states=50, seed=8)
    assert a.sample(3, 16, 4) != c.sample(3, 16, 4)


def test_groups_are_consecutive():
    """Each group is group_size copies of one (task, init) pair, in consecutive positions."""
    cm = CurriculumManager(num_tasks=10, num_init_states=50)
    tasks, inits = cm.sample(0, num_groups=6, group_size=5)
    assert len(tasks) == len(inits) == 30
    for g in range(6):
        block = slice(g * 5, (g + 1) * 5)
        assert len(set(tasks[block])) == 1 and len(set(inits[block])) == 1
    assert all(0 <= t < 10 for t in tasks) and all(0 <= i < 50 for i in inits)
    assert all(isinstance(t, int) for t in tasks + inits)


def test_state_dict_round_trip_reproduces_future():
    """A manager restored from JSON samples and weights exactly like the original."""
    original = CurriculumManager(num_tasks=8, num_init_states=10, seed=3)
    rng = np.random.default_rng(0)
    for it in range(5):
        tasks, _ = original.sample(it, 4, 2)
        original.report(tasks, rng.random(len(tasks)).round().tolist())
    state = json.loads(json.dumps(original.state_dict()))
    resumed = CurriculumManager(num_tasks=8, num_init_states=10, seed=3)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(resumed.probs(), original.probs())
    for it in range(5, 8):
        assert resumed.sample(it, 4, 2) == original.sample(it, 4, 2)
    assert resumed.stats() == original.stats()


def test_load_state_dict_rejects_other_task_count():
    """Resuming with a different suite fails with a message saying what to do."""
    state = CurriculumManager(num_tasks=8, num_init_states=10).state_dict()
    with pytest.raises(ValueError, match="same task suite"):
        CurriculumManager(num_tasks=10, num_init_states=10).load_state_dict(state)


def test_invalid_floor_raises_clear_error():
    """floor_prob * num_tasks > 1 cannot be a distribution; the error names the limit."""
    with pytest.raises(ValueError, match=r"at most 1/num_tasks = 0\.1"):
        CurriculumManager(num_tasks=10, num_init_states=1, floor_prob=0.2)


def test_report_validates_inputs():
    """Mismatched lengths and out-of-range task ids are rejected."""
    cm = CurriculumManager(num_tasks=3, num_init_states=1)
    with pytest.raises(ValueError, match="one success per episode"):
        cm.report([0, 1], [1.0])
    with pytest.raises(ValueError, match="outside 0..2"):
        cm.report([3], [1.0])


def test_stats_keys_and_values():
    """stats() reports the namespaced extremes of EMA and probability."""
    cm = CurriculumManager(num_tasks=2, num_init_states=1, ema_alpha=0.5, floor_prob=0.0)
    cm.report([0], [0.0])  # task 0 EMA 0.25, task 1 unseen 0.5
    stats = cm.stats()
    assert stats["curriculum/min_success_ema"] == pytest.approx(0.25)
    assert stats["curriculum/max_success_ema"] == pytest.approx(0.5)
    assert stats["curriculum/max_prob"] == pytest.approx(cm.probs().max())
    assert stats["curriculum/tasks_seen"] == 1.0


def test_mixture_arms_are_named_in_the_state_and_checked_on_resume():
    names = ["libero_spatial/0", "libero_spatial/1", "libero_spatial_swap/0", "libero_spatial_swap/1"]
    cm = CurriculumManager(num_tasks=4, num_init_states=40, arm_names=names)
    cm.report([2, 2, 3], [1.0, 1.0, 0.0])
    state = json.loads(json.dumps(cm.state_dict()))
    assert state["arms"] == names and state["counts"] == [0, 0, 2, 1]
    assert cm.task_stats()["names"] == names
    other = CurriculumManager(num_tasks=4, num_init_states=40, arm_names=names[2:] + names[:2])
    with pytest.raises(ValueError, match="libero_spatial/0 -> libero_spatial_swap/0"):
        other.load_state_dict(state)
    same = CurriculumManager(num_tasks=4, num_init_states=40, arm_names=names)
    same.load_state_dict(state)
    assert same.success_ema() == cm.success_ema()
    with pytest.raises(ValueError, match="3 arm names for 4 tasks"):
        CurriculumManager(num_tasks=4, num_init_states=40, arm_names=names[:3])

