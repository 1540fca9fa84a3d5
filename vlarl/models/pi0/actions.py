"""pi0's actions <-> the model's normalised values: mean/std per action dimension, tiled over the
executed steps of a call. Same surface as vlarl/models/action_tokenizer.py's ActionTokenizer for what
flow engines use (`normalize`, `unnormalize`, `stats`, `action_dim`).

LeRobot (processor/normalize_processor.py, MEAN_STD): x_n = (x - mean) / (std + 1e-8), x = x_n * std
+ mean. openpi (transforms.py Normalize/Unnormalize): eps 1e-6 on both sides. Normalised values are
not confined to [-1, 1].
"""

from __future__ import annotations

import numpy as np

from vlarl.models.pi0.config import Pi0Stats


class Pi0Actions:
    def __init__(self, stats: Pi0Stats, steps: int):
        self.stats, self.steps = stats, steps
        self._mean = np.tile(np.asarray(stats.action_mean, np.float32), steps)
        self._std = np.tile(np.asarray(stats.action_std, np.float32), steps)

    @property
    def action_dim(self) -> int:
        """Values per policy call (steps x action dims)."""
        return len(self._mean)

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        """env units (N, A) -> normalised (N, A)"""
        return ((actions - self._mean) / (self._std + self.stats.norm_eps)).astype(np.float32)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        """normalised (N, A) -> env units (N, A)"""
        return (normalized * (self._std + self.stats.unnorm_eps) + self._mean).astype(np.float32)
