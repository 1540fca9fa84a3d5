"""OpenVLA's action <-> token mapping (prismatic/vla/action_tokenizer.py and `predict_action`).

Upstream bins [-1, 1] with the 256 EDGES of linspace(-1, 1, 256), i.e. 255 intervals whose centres
are the decodable values. Encoding clips the normalised action to [-1, 1], takes
`np.digitize(a, edges)` (an index in 1..256; exactly 1.0 gives 256) and emits token 32000 - index,
so ids count DOWN from the base vocabulary size: 31744 (a = 1.0) .. 31999 (a in [-1, edge 1)).
Decoding maps token t to centre clip(32000 - t - 1, 0, 254); tokens 31744 and 31745 both decode to
the top centre. The model's 256 action slots are tokens first_bin_id + i, i in 0..255, with
first_bin_id = 32000 - 256 = 31744 (base vocabulary, not the 32064 padded rows, minus the bins).

Normalisation is OpenVLA's BOUNDS_Q99 (prismatic/vla/datasets/rlds/utils/data_utils.py):
2 (x - q01) / (q99 - q01 + 1e-8) - 1, clipped to [-1, 1], on dimensions whose `mask` is True;
others (the gripper) pass through. Un-normalisation (`predict_action`) is its inverse on masked
dimensions, identity elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch

from vlarl.models.action_tokenizer import ActionStats


class OpenVLAActionTokenizer:
    def __init__(self, action_stats: dict, base_vocab_size: int = 32000, n_bins: int = 256):
        """action_stats: one dataset's norm_stats[...]["action"] (q01, q99, optional mask)."""
        self.q01 = np.asarray(action_stats["q01"], np.float64)  # (D,)
        self.q99 = np.asarray(action_stats["q99"], np.float64)  # (D,)
        self.mask = np.asarray(action_stats.get("mask", [True] * len(self.q01)), bool)  # (D,)
        self.vocab_size = base_vocab_size  # action ids count down from here
        self.n_bins = n_bins
        self.first_bin_id = base_vocab_size - n_bins  # token of model slot 0 (31744)
        self.edges = np.linspace(-1.0, 1.0, n_bins)  # (256,) bin edges
        self.centres = (self.edges[:-1] + self.edges[1:]) / 2.0  # (255,) decodable values
        self.stats = ActionStats(self.q01.tolist(), self.q99.tolist(), self.mask.tolist())

    @property
    def action_dim(self) -> int:
        return len(self.q01)

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        """env units (N, D) -> [-1, 1] (N, D); unmasked dimensions pass through, then clipped."""
        scaled = 2 * (np.asarray(actions, np.float64) - self.q01) / (self.q99 - self.q01 + 1e-8) - 1
        return np.clip(np.where(self.mask, scaled, actions), -1, 1).astype(np.float32)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        """[-1, 1] (N, D) -> env units (N, D)"""
        normalized = np.asarray(normalized, np.float64)
        scaled = 0.5 * (normalized + 1) * (self.q99 - self.q01) + self.q01
        return np.where(self.mask, scaled, normalized).astype(np.float32)

    def tokens_to_normalized(self, tokens) -> np.ndarray:
        """token ids (N, D) -> bin centres in [-1, 1] (N, D)"""
        tokens = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens, np.int64)
        if tokens.size and (tokens.min() < self.first_bin_id or tokens.max() >= self.vocab_size):
            raise ValueError(f"action tokens must lie in [{self.first_bin_id}, {self.vocab_size}); got "
                             f"{tokens.min()}..{tokens.max()}.")
        index = np.clip(self.vocab_size - tokens - 1, 0, len(self.centres) - 1)
        return self.centres[index]

    def tokens_to_actions(self, tokens) -> np.ndarray:
        """token ids (N, D) -> env actions (N, D)"""
        return self.unnormalize(self.tokens_to_normalized(tokens))

    def actions_to_tokens(self, actions: np.ndarray) -> np.ndarray:
        """env actions (N, D) -> token ids (N, D) int64"""
        normalized = np.clip(self.normalize(actions).astype(np.float64), -1.0, 1.0)
        return (self.vocab_size - np.digitize(normalized, self.edges)).astype(np.int64)
