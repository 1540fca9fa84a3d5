"""Continuous actions <-> tokens: 256 uniform bins over [-1, 1] at the tail of the vocabulary.

Convention: bin b in [0, 256) is token `vocab_size - 256 + b` (ids increase with the action value)
and stands for the bin centre -1 + (2b + 1) / 256. OpenVLA uses the same tail but counts down from
the last id; loading real OpenVLA checkpoints needs that mapping flipped. Environment actions are
normalised to [-1, 1] with per-dataset q01/q99 statistics before binning; dimensions whose `mask`
entry is False (OpenVLA leaves the gripper alone) pass through unnormalised but are still clipped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

NUM_BINS = 256
STATS_FILE = "action_stats.json"


@dataclass
class ActionStats:
    q01: list[float]  # (D,) 1st percentile of each action dimension in env units
    q99: list[float]  # (D,) 99th percentile
    mask: list[bool]  # (D,) which dimensions are normalised

    @classmethod
    def identity(cls, dim: int) -> "ActionStats":
        return cls([-1.0] * dim, [1.0] * dim, [True] * dim)

    def save(self, folder: str | Path) -> None:
        (Path(folder) / STATS_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "ActionStats":
        path = Path(folder) / STATS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; a vlarl model folder needs its action statistics.")
        return cls(**json.loads(path.read_text()))


class ActionTokenizer:
    def __init__(self, vocab_size: int, stats: ActionStats):
        self.vocab_size = vocab_size
        self.first_bin_id = vocab_size - NUM_BINS  # id of bin 0
        self.stats = stats
        self._q01 = np.asarray(stats.q01, np.float32)
        self._q99 = np.asarray(stats.q99, np.float32)
        self._mask = np.asarray(stats.mask, bool)

    @property
    def action_dim(self) -> int:
        return len(self._q01)

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        """env units (N, D) -> [-1, 1] (N, D)"""
        scaled = 2 * (actions - self._q01) / np.maximum(self._q99 - self._q01, 1e-8) - 1
        return np.clip(np.where(self._mask, scaled, actions), -1, 1).astype(np.float32)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        """[-1, 1] (N, D) -> env units (N, D)"""
        scaled = (normalized + 1) / 2 * (self._q99 - self._q01) + self._q01
        return np.where(self._mask, scaled, normalized).astype(np.float32)

    def bins_to_normalized(self, bins: np.ndarray) -> np.ndarray:
        """bin indices (N, D) -> bin centres in [-1, 1] (N, D)"""
        return (-1 + (2 * bins.astype(np.float32) + 1) / NUM_BINS).astype(np.float32)

    def normalized_to_bins(self, normalized: np.ndarray) -> np.ndarray:
        """[-1, 1] (N, D) -> bin indices (N, D)"""
        return np.clip(np.floor((normalized + 1) / 2 * NUM_BINS), 0, NUM_BINS - 1).astype(np.int64)

    def tokens_to_actions(self, tokens: torch.Tensor | np.ndarray) -> np.ndarray:
        """token ids (N, D) -> env actions (N, D)"""
        bins = np.asarray(tokens) - self.first_bin_id
        if bins.min() < 0:
            raise ValueError("action tokens must be bin ids at the vocabulary tail.")
        return self.unnormalize(self.bins_to_normalized(bins))

    def actions_to_tokens(self, actions: np.ndarray) -> np.ndarray:
        """env actions (N, D) -> token ids (N, D)"""
        return self.normalized_to_bins(self.normalize(actions)) + self.first_bin_id
