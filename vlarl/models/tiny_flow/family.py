"""The tiny flow VLA as a family. Same folder layout as the tiny token VLA (config.json,
model.safetensors, tokenizer, action_stats.json); the run's `model.flow` sampler settings replace the
saved ones at load, because they define the log-probs RL optimises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlarl.data.spec import ACTION_DIM
from vlarl.models.action_tokenizer import ActionStats, ActionTokenizer
from vlarl.models.family import Loaded, Supervised
from vlarl.models.flow_policy import pack_chains
from vlarl.models.tiny_flow.modeling import FlowVLA, FlowVLAConfig
from vlarl.models.tiny_token.family import (TinyToken, build_text_tokenizer, save_hf_folder, tiny_backbone,
                                            write_image_processor)


def flow_matching(model, inputs: tuple, actions: np.ndarray, action_tokenizer: ActionTokenizer,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The flow VLA's flow-matching loss towards the expert's normalised action chunk (its time and noise
    drawn from `generator`, a CPU generator). inputs as vlarl.models.supervised.token_nll; returns (B,) float32."""
    normalized = torch.from_numpy(action_tokenizer.normalize(actions))  # (B, A) in [-1, 1]
    chains = torch.zeros(len(actions), model.num_steps + 1, normalized.shape[1])  # (B, K+1, A): only x_0 is read
    chains[:, -1] = normalized
    packed = pack_chains(chains, torch.full((len(actions),), -1)).to(inputs[0].device)
    return model.flow_matching_loss(*inputs, packed, generator=generator).float()


def sampler_settings(flow_cfg) -> dict:
    """The flow sampler fields of `model.flow` (they define the log-probs, so the run's config wins
    over what a loaded folder was saved with)."""
    return {k: flow_cfg[k] for k in ("method", "num_steps", "noise_level", "noise_min", "noise_max", "std_floor")}


class TinyFlow(TinyToken):
    name = "tiny_flow"
    model_class = FlowVLA
    serves_vllm = False  # its actions come from the action expert, in PyTorch
    supervised = Supervised(flow_matching, 5e-4)  # README, Flow policies: flow matching stalls near 0.2 at 2e-3

    def load(self, folder: Path, model_cfg) -> Loaded:
        loaded = super().load(folder, model_cfg)
        for key, value in sampler_settings(model_cfg.flow).items():
            setattr(loaded.model.config, key, value)
        return loaded

    def export(self, folder: Path, loaded: Loaded, base: Path, max_shard_size: str) -> None:
        """The folder and its image processor config; no decoder/ (a flow VLA's actions come from its
        expert's ODE, which the decoder alone cannot give)."""
        save_hf_folder(folder, loaded, max_shard_size=max_shard_size)
        write_image_processor(folder, loaded.model.image_size)

    def build_tiny(self, model_cfg, image_size: int, instructions: list[str], seed: int = 0,
                   action_chunk: int = 1) -> Loaded:
        """A tiny flow VLA (same backbone as the token VLA + action expert) denoising chunks of
        `action_chunk` 7-D actions, with the sampler settings of `model_cfg.flow`."""
        tokenizer = build_text_tokenizer(instructions)
        f = model_cfg.flow
        config = FlowVLAConfig(**tiny_backbone(model_cfg, image_size, tokenizer), step_dim=ACTION_DIM,
                               horizon=action_chunk, expert_hidden=f.expert_hidden, expert_layers=f.expert_layers,
                               expert_heads=f.expert_heads, **sampler_settings(f))
        torch.manual_seed(seed)
        model = FlowVLA(config)
        model.scale_token_embeddings(model_cfg.tiny.embed_std)
        return Loaded(model, tokenizer, ActionTokenizer(model.vocab_size, ActionStats.identity(ACTION_DIM * action_chunk)), self)
