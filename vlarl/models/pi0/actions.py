"""pi0 / pi0.5 actions <-> the model's normalised values, per action dimension, tiled over the executed
steps of a call. Same surface as vlarl/models/action_tokenizer.py's ActionTokenizer for what flow
engines use (`normalize`, `unnormalize`, `stats`, `action_dim`).

pi0 normalises by mean/std, pi0.5 by quantiles (vlarl/models/pi0/config.py Pi0Stats has the formulas of
LeRobot's normalize_processor.py and openpi's transforms.py). Normalised values are not confined to
[-1, 1].
"""

from __future__ import annotations

import numpy as np

from vlarl.models.pi0.config import Pi0Stats


class Pi0Actions:
    def __init__(self, stats: Pi0Stats, steps: int):
        self.stats, self.steps = stats, steps
        self._offset, self._scale = (np.tile(a, steps) for a in stats.affine("action"))
        self._unoffset, self._unscale = (np.tile(a, steps) for a in stats.affine("action", unnormalise=True))

    @property
    def action_dim(self) -> int:
        """Values per policy call (steps x action dims)."""
        return len(self._offset)

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        """env units (N, A) -> normalised (N, A)"""
        return ((actions - self._offset) / self._scale).astype(np.float32)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        """normalised (N, A) -> env units (N, A)"""
        return (normalized * self._unscale + self._unoffset).astype(np.float32)
