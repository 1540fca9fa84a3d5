"""What supervised training (`python -m vlarl.sft`) needs to know of each policy family.

A family's loss takes the model, its observation inputs and the expert's actions in environment units,
and returns one loss per example; its geometry says which frames and action chunks the model takes.
SUPERVISED maps a model folder's `model_type` (config.json) to its entry: a new family adds one line
here and nothing changes in the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from vlarl.envs.base import ACTION_DIM
from vlarl.models.action_tokenizer import ActionTokenizer
from vlarl.models.flow import FlowVLAConfig, pack_chains
from vlarl.models.token_vla import TokenVLAConfig


def token_nll(model, inputs: tuple, actions: np.ndarray, action_tokenizer: ActionTokenizer,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Negative log-likelihood of the expert's action bins, averaged over the A tokens of each example.

    inputs   # (images (B, H, W, 3) uint8, proprio (B, P), input_ids (B, Li), text_mask (B, Li)) on the model's device
    actions  # (B, A) expert actions in environment units
    returns  # (B,) float32
    """
    tokens = torch.as_tensor(action_tokenizer.actions_to_tokens(actions), device=inputs[0].device)  # (B, A)
    logprobs = model(*inputs, tokens, temperature=1.0)[0]  # (B, A)
    return -logprobs.mean(-1)


def flow_matching(model, inputs: tuple, actions: np.ndarray, action_tokenizer: ActionTokenizer,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The flow VLA's flow-matching loss towards the expert's normalised action chunk (its time and noise
    drawn from `generator`, a CPU generator). Same inputs as `token_nll`; returns (B,) float32."""
    normalized = torch.from_numpy(action_tokenizer.normalize(actions))  # (B, A) in [-1, 1]
    chains = torch.zeros(len(actions), model.num_steps + 1, normalized.shape[1])  # (B, K+1, A): only x_0 is read
    chains[:, -1] = normalized
    packed = pack_chains(chains, torch.full((len(actions),), -1)).to(inputs[0].device)
    return model.flow_matching_loss(*inputs, packed, generator=generator).float()


def vla_geometry(model) -> tuple[int, int]:
    """(image side, 7-D actions per call) of a token or flow VLA."""
    return int(model.config.vision_config["image_size"]), model.config.action_dim // ACTION_DIM


@dataclass(frozen=True)
class Supervised:
    loss: Callable[..., torch.Tensor]  # (model, inputs, actions (B, A), action_tokenizer, generator) -> (B,)
    lr: float  # default learning rate (README, Flow policies: flow matching stalls near 0.2 at 2e-3)
    geometry: Callable[..., tuple[int, int]]  # model -> (image side, actions per call)


SUPERVISED = {  # config.json model_type -> what supervised training needs of the family
    TokenVLAConfig.model_type: Supervised(token_nll, 2e-3, vla_geometry),
    FlowVLAConfig.model_type: Supervised(flow_matching, 5e-4, vla_geometry),
}


def family_of(model) -> Supervised:
    model_type = model.config.model_type
    if model_type not in SUPERVISED:
        raise ValueError(f"no supervised training for model type {model_type!r}; add it to "
                         "vlarl.models.supervised.SUPERVISED.")
    return SUPERVISED[model_type]
