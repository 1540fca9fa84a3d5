"""Supervised losses shared by families (`Family.supervised`, used by `python -m vlarl.sft`)."""

from __future__ import annotations

import numpy as np
import torch


def token_nll(model, inputs: tuple, actions: np.ndarray, action_tokenizer, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """Negative log-likelihood of the expert's action tokens, averaged over the A tokens of each example.

    inputs   # (images (B, H, W, 3) uint8, proprio (B, P), input_ids (B, Li), text_mask (B, Li)) on the model's device
    actions  # (B, A) expert actions in environment units
    returns  # (B,) float32
    """
    tokens = torch.as_tensor(action_tokenizer.actions_to_tokens(actions), device=inputs[0].device)  # (B, A)
    logprobs = model(*inputs, tokens, temperature=1.0)[0]  # (B, A)
    return -logprobs.mean(-1)
