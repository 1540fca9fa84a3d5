"""pi0-style flow policy: the token VLA's prefix encoder + an action expert that denoises a chunk.

The prefix is the token VLA's (instruction, proprio token, image patches through the vision encoder,
projector and decoder). The action expert is a small transformer whose H action tokens (one per
step of the chunk, D values each) attend to each other and, by cross-attention, to the decoder's
last hidden states over the prefix; it predicts the flow-matching velocity v(x_t, t). The prefix is
encoded once per call and the expert runs K times on it.

Sampling, log-probs and flow matching come from `vlarl.models.flow_policy.FlowPolicy`; this model provides
its `encode_context` (prefix -> projected memory and padding) and `velocity` (the expert).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from vlarl.models.flow_policy import FlowPolicy
from vlarl.models.tiny_token.modeling import TokenVLA, TokenVLAConfig


class FlowVLAConfig(TokenVLAConfig):
    model_type = "vlarl_flow_vla"

    def __init__(self, step_dim: int = 7, horizon: int = 1, expert_hidden: int = 64, expert_layers: int = 2,
                 expert_heads: int = 4, method: str = "sde_all", num_steps: int = 4, noise_level: float = 0.5,
                 noise_min: float = 0.08, noise_max: float = 0.16, std_floor: float = 0.05, **kwargs):
        self.step_dim = step_dim  # D: values per action (7 for LIBERO and the toy)
        self.horizon = horizon  # H: actions per chunk (= env.action_chunk)
        self.expert_hidden = expert_hidden  # action expert width
        self.expert_layers = expert_layers  # action expert depth (self- + cross-attention blocks)
        self.expert_heads = expert_heads  # action expert attention heads
        self.method = method  # RL sampler: sde (Flow-SDE, one step) | sde_all (Flow-SDE, every step) | noise (Flow-Noise)
        self.num_steps = num_steps  # K denoising steps
        self.noise_level = noise_level  # Flow-SDE a
        self.noise_min = noise_min  # Flow-Noise std range, low end
        self.noise_max = noise_max  # Flow-Noise std range, high end
        self.std_floor = std_floor  # no Gaussian step has a std below this
        kwargs["action_dim"] = step_dim * horizon  # values per policy call, as for the token VLA
        super().__init__(**kwargs)


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1]: (B,) -> (B, dim)."""
    freqs = torch.exp(torch.arange(dim // 2, device=t.device, dtype=torch.float32) * (-math.log(1000.0) / (dim // 2)))
    angles = t.float()[:, None] * 1000.0 * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


class ActionExpert(nn.Module):
    """H action tokens (noisy action + time + position) -> self-attention, cross-attention to the
    prefix -> velocity (and, for Flow-Noise, the raw std) per action value."""

    def __init__(self, cfg: FlowVLAConfig, prefix_hidden: int):
        super().__init__()
        e = cfg.expert_hidden
        self.action_in = nn.Linear(cfg.step_dim, e)
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.position = nn.Parameter(torch.zeros(cfg.horizon, e))
        self.memory_proj = nn.Linear(prefix_hidden, e)
        layer = nn.TransformerDecoderLayer(e, cfg.expert_heads, 2 * e, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(layer, cfg.expert_layers)
        self.norm = nn.LayerNorm(e)
        self.velocity_out = nn.Linear(e, cfg.step_dim)
        # Flow-Noise's noise network: a small head on the expert's features, so the std can depend
        # on the observation, the step and the action value being denoised.
        self.noise_out = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, cfg.step_dim))
        self.horizon, self.step_dim, self.width = cfg.horizon, cfg.step_dim, e

    def forward(self, memory, pad, x, t):
        """memory (B, L, E) projected prefix, pad (B, L) bool True on padding, x (B, H*D), t (B,)
        -> velocity (B, H*D), raw std (B, H*D)"""
        b = x.shape[0]
        h = self.action_in(x.view(b, self.horizon, self.step_dim)) + self.position
        h = h + self.time_mlp(time_embedding(t, self.width))[:, None]
        h = self.norm(self.blocks(h, memory, memory_key_padding_mask=pad))
        return self.velocity_out(h).reshape(b, -1), self.noise_out(h).reshape(b, -1)


class FlowVLA(FlowPolicy, TokenVLA):
    """Same vision encoder, projector, decoder and value head as the token VLA, plus the expert."""

    config_class = FlowVLAConfig

    def __init__(self, config: FlowVLAConfig):
        super().__init__(config)
        self.expert = ActionExpert(config, self.language_model.config.hidden_size)
        for m in self.expert.modules():
            if isinstance(m, nn.Linear):
                self._init_weights(m)

    def encode(self, images, proprio, input_ids, text_mask):
        """Prefix -> memory (B, L, E_expert), pad (B, L) bool, values (B,) float32."""
        embeds, mask, positions = self.prefix(images, proprio, input_ids, text_mask)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]  # (B, L, E)
        values = self.value_head(hidden[:, -1])[:, 0].float()
        return self.expert.memory_proj(hidden), mask == 0, values

    def encode_context(self, images, proprio, input_ids, text_mask):
        """-> context (memory (B, L, E_expert), pad (B, L) bool), values (B,) float32 (FlowPolicy)."""
        memory, pad, values = self.encode(images, proprio, input_ids, text_mask)
        return (memory, pad), values

    def velocity(self, context, x, t):
        """The expert on x (B, H*D) at t (B,) against the prefix -> velocity, raw std (B, H*D) (FlowPolicy)."""
        return self.expert(*context, x, t)


AutoConfig.register(FlowVLAConfig.model_type, FlowVLAConfig, exist_ok=True)
AutoModel.register(FlowVLAConfig, FlowVLA, exist_ok=True)
