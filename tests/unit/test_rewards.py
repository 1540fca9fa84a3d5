"""Reward providers: external-function checks, composite arithmetic, how rewards land in the batch."""

from __future__ import annotations

import io
import os
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from vlarl.config import ConfigError
from vlarl.preflight import load_run_config
from vlarl.data.batch import TrajectoryBatch
from vlarl.rewards import Episode, score
from vlarl.rewards.builtin import CompositeReward, ExternalReward, SuccessReward, load_function
from vlarl.rewards.human import HumanReward, parse_answer
from vlarl.rewards.store import LabelStore

USER_MODULE = """
import math
import numpy as np

def effort(episode):                      # per step: -0.1 x |action|_1
    return -0.1 * np.abs(episode.actions).sum(1)

def bonus(episode):                       # per episode
    return 0.5 if "red" in episode.instruction else -0.5

def two_args(episode, scale):
    return 0.0

def not_finite(episode):
    return math.nan

def wrong_length(episode):
    return np.zeros(len(episode.env_rewards) + 1)
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def episode(eid, instruction, actions, env_rewards, success=False, frames=None):
    actions = np.asarray(actions, np.float32)
    return Episode(eid, instruction, actions, np.asarray(env_rewards, np.float32), success, 0, 0, 3, frames)


@pytest.mark.parametrize("spec, words", [
    ("no_such_module_xyz:f", "cannot be imported"),
    ("my_rewards:missing", "has no function 'missing'"),
    ("my_rewards:two_args", "must accept one argument"),
    ("my_rewards:not_finite", "non-finite"),
    ("my_rewards:wrong_length", "shape (4,)"),
    ("my_rewards", "module:function"),
])
def test_external_function_is_checked_at_start(user_module, spec, words):
    with pytest.raises(ValueError, match=None) as err:
        load_function(spec)
    assert words in str(err.value)
    # The same mistake in a run's config stops at load_run_config with a ConfigError.
    with pytest.raises(ConfigError) as cerr:
        load_run_config(["env=toy", "reward=external", f"reward.function={spec}"])
    assert words in str(cerr.value)


def test_external_function_accepted(user_module):
    cfg = load_run_config(["env=toy", "reward=external", "reward.function=my_rewards:effort"])
    assert cfg.reward.function == "my_rewards:effort"


def test_composite_matches_hand_computation(user_module):
    eps = [episode("a", "pick the red block", [[1, -1, 0, 0, 0, 0, 0], [0.5, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 2]],
                   [0, 0, 1], success=True),
           episode("b", "pick the blue block", [[0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, -1]], [0, 0])]
    composite = CompositeReward([(SuccessReward(), 2.0), (ExternalReward("my_rewards:effort"), 1.0),
                                 (ExternalReward("my_rewards:bonus"), 0.5)])
    got = composite.rewards(eps)
    # a: success 2 x [0, 0, 1]; effort -0.1 x [2, 0.5, 2]; bonus 0.5 x 0.5 at the last step
    np.testing.assert_allclose(got[0], [-0.2, -0.05, 2.0 - 0.2 + 0.25], atol=1e-6)
    # b: no success; effort -0.1 x [1, 1]; bonus 0.5 x -0.5 at the last step
    np.testing.assert_allclose(got[1], [-0.1, -0.1 - 0.25], atol=1e-6)


def test_composite_from_config(user_module):
    cfg = load_run_config(["env=toy", "reward=composite", "reward.function=my_rewards:bonus",
                       "reward.components=[{name: success, weight: 1.0}, {name: external, weight: -2.0}]"])
    assert [(c.name, c.weight) for c in cfg.reward.components] == [("success", 1.0), ("external", -2.0)]
    with pytest.raises(ConfigError, match="not providers"):
        load_run_config(["env=toy", "reward=composite", "reward.components=[{name: succes, weight: 1.0}]"])


def tiny_batch() -> TrajectoryBatch:
    n, t = 2, 3
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    return TrajectoryBatch(
        images=np.zeros((n, t + 1, 4, 4, 3), np.uint8), proprio=np.zeros((n, t + 1, 2), np.float32),
        instructions=["pick the red block", "pick the blue block"], task_ids=np.array([0, 1]),
        init_state_ids=np.array([5, 6]), group_ids=np.array([0, 1]), action_tokens=np.zeros((n, t, 7), np.int64),
        rollout_logprobs=np.zeros((n, t, 7), np.float32), rewards=np.array([[0, 0, 1], [0, 0, 0]], np.float32),
        mask=mask, dones=np.zeros((n, t), bool), terminated=np.zeros((n, t), bool), success=np.array([True, False]),
        actions=np.ones((n, t, 7), np.float32), videos={1: np.zeros((3, 4, 4, 3), np.uint8)})


def test_score_puts_episode_rewards_at_the_last_step(user_module):
    batch = score(ExternalReward("my_rewards:bonus"), tiny_batch(), 0)
    np.testing.assert_allclose(batch.rewards, [[0, 0, 0.5], [0, -0.5, 0]])
    np.testing.assert_allclose(batch.episode_returns, [0.5, -0.5])
    assert batch.success.tolist() == [True, False]  # the curriculum still hears the environment's success
    batch = score(ExternalReward("my_rewards:effort"), tiny_batch(), 0)
    np.testing.assert_allclose(batch.rewards, [[-0.7, -0.7, -0.7], [-0.7, -0.7, 0]], atol=1e-6)


def test_concat_keeps_actions_and_offsets_videos():
    a, b = tiny_batch(), tiny_batch()
    b.videos = {0: np.ones((2, 4, 4, 3), np.uint8)}
    joined = TrajectoryBatch.concat([a, b])
    assert sorted(joined.videos) == [1, 2] and joined.videos[2].max() == 1
    assert joined.actions.shape == (4, 3, 7)


@pytest.mark.parametrize("text, want", [("s", (1.0, "success")), ("failure\n", (0.0, "failure")),
                                        ("-0.25", (-0.25, "score")), ("1.5", None), ("nan", None), ("x", None)])
def test_console_answers(text, want):
    assert parse_answer(text) == want


def test_console_mode_stores_labels_and_never_asks_twice(tmp_path):
    rcfg = SimpleNamespace(human_fraction=1.0, human_timeout=5.0, mode="terminal", host="127.0.0.1", port=0)
    frames = np.zeros((3, 4, 4, 3), np.uint8)
    eps = [episode("it000000-ep0000", "pick the red block", np.zeros((2, 7)), [0, 1], True, frames),
           episode("it000000-ep0001", "pick the blue block", np.zeros((2, 7)), [0, 0], False, frames),
           episode("it000000-ep0002", "pick the green block", np.zeros((2, 7)), [0, 0], False)]  # not recorded
    human = HumanReward(rcfg, tmp_path)
    r, w = os.pipe()
    os.write(w, b"maybe\n-0.5\ns\n")
    os.close(w)
    out = io.StringIO()
    with os.fdopen(r) as stdin:
        human.console = (stdin, out)
        got = human.rewards(eps)
    assert [float(np.sum(g)) for g in got] == [-0.5, 1.0, 0.0]
    assert "not a label" in out.getvalue()
    assert human.metrics() == {"reward/human_labels": 2.0, "reward/human_timeouts": 0.0}
    assert (tmp_path / "feedback" / "videos" / "it000000-ep0000.mp4").stat().st_size > 0
    human.close()
    store = LabelStore(tmp_path / "feedback" / "labels.sqlite", tmp_path.name)  # a restart finds the labels
    assert store.labels(["it000000-ep0000", "it000000-ep0001"]) == {"it000000-ep0000": -0.5, "it000000-ep0001": 1.0}
