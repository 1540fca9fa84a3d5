"""Unit tests for vlarl.models.action_tokenizer: bin layout, round trips, q01/q99 statistics."""

import json

import numpy as np
import pytest
import torch

from vlarl.models.action_tokenizer import NUM_BINS, STATS_FILE, ActionStats, ActionTokenizer

VOCAB = 300  # 44 text tokens, then the 256 bins
D = 7


def skewed_stats() -> ActionStats:
    """Non-trivial statistics: dims 0-5 normalised with q01=-0.5, q99=2.0; the gripper (dim 6) masked."""
    return ActionStats(q01=[-0.5] * 6 + [0.0], q99=[2.0] * 6 + [1.0], mask=[True] * 6 + [False])


def test_bins_are_the_last_256_ids():
    tok = ActionTokenizer(VOCAB, ActionStats.identity(D))
    assert NUM_BINS == 256
    assert tok.first_bin_id == VOCAB - 256
    assert tok.action_dim == D
    lowest = tok.actions_to_tokens(np.full((1, D), -1.0, np.float32))
    highest = tok.actions_to_tokens(np.full((1, D), 1.0, np.float32))
    np.testing.assert_array_equal(lowest, VOCAB - 256)
    np.testing.assert_array_equal(highest, VOCAB - 1)
    many = tok.actions_to_tokens(np.random.default_rng(0).uniform(-3, 3, (500, D)).astype(np.float32))
    assert many.dtype == np.int64
    assert many.min() >= VOCAB - 256 and many.max() <= VOCAB - 1


def test_token_ids_increase_with_action_value():
    tok = ActionTokenizer(VOCAB, ActionStats.identity(D))
    values = np.linspace(-1, 1, 1001, dtype=np.float32)
    tokens = tok.actions_to_tokens(np.repeat(values[:, None], D, 1))[:, 0]
    assert (np.diff(tokens) >= 0).all()
    assert len(np.unique(tokens)) == 256  # every bin is reachable


def test_bin_centres():
    tok = ActionTokenizer(VOCAB, ActionStats.identity(D))
    bins = np.array([[0, 127, 128, 255]])
    np.testing.assert_allclose(tok.bins_to_normalized(bins), [[-1 + 1 / 256, -1 / 256, 1 / 256, 1 - 1 / 256]],
                               atol=1e-7)


def test_round_trip_within_half_a_bin_identity_stats():
    tok = ActionTokenizer(VOCAB, ActionStats.identity(D))
    actions = np.random.default_rng(0).uniform(-1, 1, (2000, D)).astype(np.float32)
    back = tok.tokens_to_actions(tok.actions_to_tokens(actions))
    assert back.dtype == np.float32 and back.shape == actions.shape
    # bins are 2/256 wide in normalised units, so centres are at most 1/256 away
    assert np.abs(back - actions).max() <= 1 / 256 + 1e-6


def test_round_trip_within_half_a_bin_skewed_stats():
    stats = skewed_stats()
    tok = ActionTokenizer(VOCAB, stats)
    rng = np.random.default_rng(1)
    actions = np.concatenate([rng.uniform(-0.5, 2.0, (2000, 6)), rng.uniform(-1, 1, (2000, 1))], 1).astype(np.float32)
    back = tok.tokens_to_actions(tok.actions_to_tokens(actions))
    # half a bin in normalised units is 1/256; in env units that is scaled by (q99 - q01) / 2
    half_bin = np.array([1 / 256 * 2.5 / 2] * 6 + [1 / 256])
    assert (np.abs(back - actions) <= half_bin + 1e-6).all()
    np.testing.assert_allclose(tok.normalize(tok.unnormalize(tok.normalize(actions))), tok.normalize(actions),
                               atol=1e-6)


def test_q01_q99_normalisation_by_hand():
    tok = ActionTokenizer(VOCAB, skewed_stats())
    a = np.array([[0.75, 2.0, -0.5, 1.375, 5.0, -3.0, 0.0]], np.float32)
    # 2 * (a - q01) / (q99 - q01) - 1 with q01=-0.5, q99=2.0:
    #   0.75 -> 0, 2.0 -> 1, -0.5 -> -1, 1.375 -> 0.5, 5.0 -> clipped 1, -3.0 -> clipped -1
    np.testing.assert_allclose(tok.normalize(a)[0, :6], [0.0, 1.0, -1.0, 0.5, 1.0, -1.0], atol=1e-6)
    bins = tok.actions_to_tokens(a)[0] - tok.first_bin_id
    # floor((x + 1) / 2 * 256), the top edge landing in the last bin
    np.testing.assert_array_equal(bins[:6], [128, 255, 0, 192, 255, 0])
    # back: bin 128's centre is 1/256, i.e. (1/256 + 1) / 2 * 2.5 - 0.5 = 0.75 + 2.5 / 512
    back = tok.tokens_to_actions(tok.actions_to_tokens(a))
    assert back[0, 0] == pytest.approx(0.75 + 2.5 / 512, abs=1e-6)
    np.testing.assert_allclose(tok.unnormalize(np.array([[0.0] * 7], np.float32))[0, :6], 0.75, atol=1e-6)


def test_masked_dimensions_pass_through_but_are_clipped():
    tok = ActionTokenizer(VOCAB, skewed_stats())
    a = np.zeros((3, D), np.float32)
    a[:, 6] = [0.3, 3.0, -7.0]  # q01=0, q99=1 would map 0.3 to -0.4 if it were normalised
    np.testing.assert_allclose(tok.normalize(a)[:, 6], [0.3, 1.0, -1.0], atol=1e-7)
    np.testing.assert_allclose(tok.unnormalize(np.array([[0.0] * 6 + [0.3]], np.float32))[0, 6], 0.3, atol=1e-7)
    back = tok.tokens_to_actions(tok.actions_to_tokens(a))[:, 6]
    np.testing.assert_allclose(back, [0.3, 1 - 1 / 256, -1 + 1 / 256], atol=1 / 256 + 1e-6)


def test_tokens_to_actions_accepts_torch_and_rejects_text_ids():
    tok = ActionTokenizer(VOCAB, ActionStats.identity(D))
    tokens = torch.full((2, D), VOCAB - 1)
    np.testing.assert_allclose(tok.tokens_to_actions(tokens), 1 - 1 / 256, atol=1e-7)
    bad = np.full((2, D), VOCAB - 1)
    bad[1, 3] = VOCAB - 257  # a text token, not a bin
    with pytest.raises(ValueError, match="bin"):
        tok.tokens_to_actions(bad)


def test_stats_save_load_round_trip(tmp_path):
    stats = skewed_stats()
    stats.save(tmp_path)
    assert (tmp_path / STATS_FILE).is_file()
    assert json.loads((tmp_path / STATS_FILE).read_text())["mask"][-1] is False
    loaded = ActionStats.load(tmp_path)
    assert loaded == stats
    a = np.random.default_rng(2).uniform(-1, 2, (50, D)).astype(np.float32)
    np.testing.assert_array_equal(ActionTokenizer(VOCAB, loaded).actions_to_tokens(a),
                                  ActionTokenizer(VOCAB, stats).actions_to_tokens(a))


def test_missing_stats_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ActionStats.load(tmp_path)
    assert str(tmp_path / STATS_FILE) in str(err.value)


def test_identity_stats():
    stats = ActionStats.identity(3)
    assert stats.q01 == [-1.0] * 3 and stats.q99 == [1.0] * 3 and stats.mask == [True] * 3
    tok = ActionTokenizer(VOCAB, stats)
    a = np.array([[-0.3, 0.0, 0.9]], np.float32)
    np.testing.assert_allclose(tok.normalize(a), a, atol=1e-7)
