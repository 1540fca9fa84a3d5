"""The pure parts of the scripted LIBERO controller: goal parsing, rotation errors, grasp clearance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlarl.envs.libero_script import (HAND_HALF, Goal, UnsupportedGoal, axis_angle_between, footprint_clearance,
                                      level, parse_goal, rot_z, wrap_half_turn)


def rodrigues(axis_angle: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(axis_angle)
    k = axis_angle / angle
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def test_goals_of_both_suites_parse_and_others_are_refused():
    assert parse_goal([["on", "akita_black_bowl_1", "plate_1"]]) == Goal("on", "akita_black_bowl_1", "plate_1")
    assert parse_goal([["In", "milk_1", "basket_1_contain_region"]]).kind == "in"
    for goal in ([["open", "wooden_cabinet_1_top_region"]], [["on", "a", "b"], ["on", "c", "d"]]):
        with pytest.raises(UnsupportedGoal, match="not a single"):
            parse_goal(goal)


def test_axis_angle_between_is_the_world_frame_delta_osc_applies():
    rng = np.random.default_rng(0)
    for _ in range(20):
        start = rodrigues(rng.normal(size=3))
        delta = rng.normal(size=3)
        delta *= rng.uniform(0.05, 3.0) / np.linalg.norm(delta)
        goal = rodrigues(delta) @ start  # robosuite: goal = R(delta) @ current
        np.testing.assert_allclose(axis_angle_between(start, goal), delta, atol=1e-6)
    np.testing.assert_allclose(axis_angle_between(np.eye(3), rot_z(0.3)), [0, 0, 0.3], atol=1e-9)
    half = axis_angle_between(np.eye(3), rodrigues(np.array([math.pi, 0, 0])))
    np.testing.assert_allclose(np.abs(half), [math.pi, 0, 0], atol=1e-6)
    assert not axis_angle_between(np.eye(3), np.eye(3)).any()


def test_finger_angles_wrap_to_a_half_turn_and_level_points_down():
    assert wrap_half_turn(math.radians(100)) == pytest.approx(math.radians(-80))
    assert wrap_half_turn(math.radians(-95)) == pytest.approx(math.radians(85))
    tilted = rodrigues(np.array([0.05, -0.03, 0.0])) @ rot_z(0.7) @ np.diag([1.0, -1.0, -1.0])
    r = level(tilted)
    np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-9)
    assert np.linalg.det(r) == pytest.approx(1.0)
    np.testing.assert_allclose(r[:, 2], [0, 0, -1])
    assert math.atan2(r[1, 0], r[0, 0]) == pytest.approx(math.atan2(tilted[1, 0], tilted[0, 0]))


def test_footprint_clearance_measures_the_gap_beside_the_hand():
    box = np.array([[[-0.05, 0.10, 0.0], [0.05, 0.20, 0.3]]])  # (1, 2, 3) starts 10 cm off to +y
    along_x = footprint_clearance(box, np.zeros(2), np.array([1.0, 0.0]), z=0.1)  # fingers close along x
    along_y = footprint_clearance(box, np.zeros(2), np.array([0.0, 1.0]), z=0.1)
    assert along_x == pytest.approx(0.10 - HAND_HALF[1])  # the hand is narrow across the finger line
    assert along_y == 0.0  # and long along it: it reaches into the box
    low = np.array([[[-0.05, 0.10, 0.0], [0.05, 0.20, 0.05]]])
    assert footprint_clearance(low, np.zeros(2), np.array([0.0, 1.0]), z=0.2) == 1.0  # below the fingertips
