"""OpenVLA's token <-> action mapping against hand-computed values.

Edges e_k = -1 + 2k/255 (k = 0..255), centres c_k = -1 + (2k + 1)/255 (k = 0..254).
Token t decodes to c_clip(31999 - t, 0, 254); action a encodes to 32000 - digitize(a, edges).
"""

from __future__ import annotations

import numpy as np
import pytest

from vlarl.models.openvla.action_tokenizer import OpenVLAActionTokenizer

# q01 = -0.5, q99 = 1.5 on the six masked dims: env = 0.5 (n + 1) * 2 - 0.5 = n + 0.5; gripper passes through.
STATS = {"q01": [-0.5] * 6 + [0.0], "q99": [1.5] * 6 + [1.0], "mask": [True] * 6 + [False]}


def centre(k: int) -> float:
    return -1 + (2 * k + 1) / 255


@pytest.fixture
def at():
    return OpenVLAActionTokenizer(STATS)


def test_constants(at):
    assert (at.first_bin_id, at.vocab_size, at.action_dim) == (31744, 32000, 7)
    assert len(at.centres) == 255 and at.centres[127] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("token, k", [(31999, 0), (31998, 1), (31872, 127), (31873, 126), (31745, 254),
                                      (31744, 254)])  # 31744 = digitize index 256, clipped to the top centre
def test_tokens_decode_to_hand_computed_centres(at, token, k):
    normalized = at.tokens_to_normalized(np.full((1, 7), token))
    np.testing.assert_allclose(normalized, centre(k), atol=1e-12)
    actions = at.tokens_to_actions(np.full((1, 7), token))
    np.testing.assert_allclose(actions[0, :6], centre(k) + 0.5, atol=1e-6)
    np.testing.assert_allclose(actions[0, 6], centre(k), atol=1e-6)  # mask False: no un-normalisation


def test_hand_computed_encodings_and_clipping(at):
    # env 0.5 -> normalised 0.0 -> edges e_127 = -1/255 <= 0 < e_128 = 1/255 -> digitize 128 -> 31872
    # env 5.0 -> 4.5 clipped to 1.0 -> digitize 256 -> 31744; env -9 -> -1 -> digitize 1 -> 31999
    # gripper (unmasked) 0.3 -> stays 0.3: e_165 = 75/255 = 0.2941 <= 0.3 < e_166 -> digitize 166 -> 31834
    # gripper 2.0 -> clipped to 1.0 -> 31744; gripper -1.0 -> 31999
    actions = np.array([[0.5, 5.0, -9.0, 0.5 + centre(10), 1.5, -0.5, 0.3],
                        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 2.0],
                        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, -1.0]])
    tokens = at.actions_to_tokens(actions)
    np.testing.assert_array_equal(tokens[0], [31872, 31744, 31999, 32000 - 11, 31744, 31999, 31834])
    assert tokens[1, 6] == 31744 and tokens[2, 6] == 31999
    np.testing.assert_allclose(at.normalize(actions)[0], [0, 1, -1, centre(10), 1, -1, 0.3], atol=1e-6)


def test_round_trips(at):
    tokens = np.arange(31745, 32000)[:, None].repeat(7, 1)  # every token but 31744 is its centre's encoding
    np.testing.assert_array_equal(at.actions_to_tokens(at.tokens_to_actions(tokens)), tokens)
    assert at.actions_to_tokens(at.tokens_to_actions(np.full((1, 7), 31744)))[0, 0] == 31745
    rng = np.random.default_rng(0)
    actions = np.concatenate([rng.uniform(-0.5, 1.5, (100, 6)), rng.uniform(-1, 1, (100, 1))], 1)
    back = at.tokens_to_actions(at.actions_to_tokens(actions))
    assert np.abs(back - actions).max() <= 1 / 255 + 1e-6  # within half a bin (bin width 2/255 in [-1, 1])


def test_out_of_range_tokens_raise(at):
    with pytest.raises(ValueError, match="31744, 32000"):
        at.tokens_to_actions(np.array([[31743] * 7]))
    with pytest.raises(ValueError):
        at.tokens_to_actions(np.array([[32000] * 7]))
