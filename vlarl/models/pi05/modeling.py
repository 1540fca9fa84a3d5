"""pi0.5 as a vlarl flow policy: pi0's PaliGemma prefix, an action expert conditioned on time by adaRMS.

What differs from pi0 (LeRobot src/lerobot/policies/pi05/modeling_pi05.py, openpi pi0_pytorch.py with
pi05=True and its Gemma with adaRMS):
- The state is not a suffix token: it is normalised by quantiles, discretised into 256 bins over
  [-1, 1] and written into the prompt, `<bos>Task: {instruction}, State: {b1 b2 ...};\\nAction: `
  (LeRobot pads the state to max_state_dim first; openpi's transforms tokenize before padding).
- The suffix is the chunk's actions only (`action_in_proj`), attending to each other and to the prefix.
- Time enters through adaRMS: cond = silu(time_mlp_out(silu(time_mlp_in(sinusoid(t))))); every
  expert norm (both per layer and the final one) is RMSNorm with a `dense` Linear(W, 3W) giving
  (scale, shift, gate): h_n = rms(h) * (1 + scale) + shift, and each residual adds `gate * branch`.

transformers' PI0Model holds PaliGemma and the Gemma expert; the expert's layers become
`AdaRMSDecoderLayer`s (same attention and MLP modules, adaRMS norms), the only part written here.
Conventions and the flow state are pi0's (vlarl/models/pi0/modeling.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer
from transformers.models.pi0.modeling_pi0 import PI0Model, PI0TimestepEmbeddings

from vlarl.models.pi0.config import Pi0Spec
from vlarl.models.pi0.modeling import Pi0Policy, transformers_config

STATE_BINS = np.linspace(-1, 1, 256 + 1)[:-1]  # openpi PaligemmaTokenizer / LeRobot Pi05PrepareStateTokenizer


class AdaRMSNorm(nn.Module):
    """RMSNorm whose scale, shift and residual gate come from a conditioning vector (adaRMS)."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)
        nn.init.zeros_(self.dense.weight)  # upstream's initialisation: scale = shift = 0, gate = bias

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, D), cond (B, C) -> normalised x (B, L, D), gate (B, 1, D)"""
        normed = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        scale, shift, gate = self.dense(cond.to(self.dense.weight.dtype))[:, None].chunk(3, dim=-1)
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)


class AdaRMSDecoderLayer(GemmaDecoderLayer):
    """transformers' Gemma decoder layer with adaRMS norms and gated residuals."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        width = config.hidden_size
        self.input_layernorm = AdaRMSNorm(width, width, config.rms_norm_eps)
        self.post_attention_layernorm = AdaRMSNorm(width, width, config.rms_norm_eps)

    def forward(self, hidden_states, cond, attention_mask=None, position_ids=None, past_key_values=None,
                position_embeddings=None, **kwargs):
        x, gate = self.input_layernorm(hidden_states, cond)
        x, _ = self.self_attn(hidden_states=x, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=past_key_values, position_embeddings=position_embeddings, **kwargs)
        hidden_states = hidden_states + x * gate
        x, gate = self.post_attention_layernorm(hidden_states, cond)
        return hidden_states + self.mlp(x) * gate


class Pi05Backbone(nn.Module):
    """transformers' PI0Model (PaliGemma + Gemma expert) with pi0.5's expert norms and projections;
    parameter names follow vlarl/models/pi0/checkpoint.py RULES["pi05"]."""

    def __init__(self, spec: Pi0Spec):
        super().__init__()
        self.config = transformers_config(spec)
        self.model = PI0Model(self.config)
        dit, width = self.model.dit, spec.action_expert.width
        dit.layers = nn.ModuleList(AdaRMSDecoderLayer(dit.config, i) for i in range(len(dit.layers)))
        dit.norm = AdaRMSNorm(width, width, dit.config.rms_norm_eps)
        self.time_embed = PI0TimestepEmbeddings(self.config)  # sinusoid over the expert width (no weights)
        self.action_in_proj = nn.Linear(spec.max_action_dim, width)
        self.time_mlp_in = nn.Linear(width, width)
        self.time_mlp_out = nn.Linear(width, width)
        self.action_out_proj = nn.Linear(width, spec.max_action_dim)

    def time_condition(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) -> adaRMS condition (B, W)"""
        emb = self.time_embed(t.float()).to(self.time_mlp_in.weight.dtype)
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(emb))))


class Pi05Policy(Pi0Policy):
    # Trained beside the adapters: vlarl's heads, pi0.5's action/time projections and the action expert.
    lora_trainable = ("value_head", "noise_head", "backbone.action_in_proj", "backbone.time_mlp_in",
                      "backbone.time_mlp_out", "backbone.action_out_proj", "backbone.model.dit")

    def __init__(self, spec: Pi0Spec, settings, init_weights: bool = True, tokenizer=None):
        super().__init__(spec, settings, init_weights)
        self.tokenizer = tokenizer  # the prompt holds the state, so it is tokenised per call
        self._instructions: dict[tuple[int, ...], str] = {}

    @staticmethod
    def build_backbone(spec: Pi0Spec) -> nn.Module:
        return Pi05Backbone(spec)

    # ---- the prompt ----------------------------------------------------------------------------------
    def encode_instruction(self, tokenizer, instruction: str) -> list[int]:
        """The instruction's ids, standing for it in batches; `prompt` writes the state-bearing prompt
        from the text they stand for."""
        text = instruction.strip().replace("_", " ").replace("\n", " ")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id]
        self._instructions[tuple(ids)] = text
        return ids

    def state_bins(self, proprio: torch.Tensor) -> np.ndarray:
        """proprio (B, S) -> the prompt's state bins (B, S or max_state_dim) int, in [-1, 255]."""
        state = self.normalised_state(proprio).cpu().numpy()
        if self.spec.layout == "lerobot":  # LeRobot pads before discretising; openpi tokenizes the raw dims
            state = np.pad(state, ((0, 0), (0, self.spec.max_state_dim - state.shape[1])))
        return np.digitize(state, STATE_BINS) - 1

    def prompt(self, input_ids, text_mask, proprio) -> tuple[torch.Tensor, torch.Tensor]:
        """Instruction ids (B, Li) (left-padded), proprio (B, S) -> prompt ids (B, Lp), mask (B, Lp), left-padded."""
        if self.tokenizer is None:
            raise RuntimeError("pi0.5 tokenises its prompt per call; load it through its family.")
        tok, rows = self.tokenizer, []
        for ids, keep, bins in zip(input_ids.tolist(), text_mask.bool().tolist(), self.state_bins(proprio)):
            key = tuple(i for i, k in zip(ids, keep) if k)
            if key not in self._instructions:
                raise KeyError("pi0.5 was given instruction ids it did not encode; use model.encode_instruction.")
            text = f"Task: {self._instructions[key]}, State: {' '.join(map(str, bins))};\nAction: "
            rows.append(([tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"])
                        [: self.spec.tokenizer_max_length])
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
        return ids.to(input_ids.device), mask.to(input_ids.device)

    # ---- FlowPolicy ------------------------------------------------------------------------------
    def encode_prefix(self, images, proprio, input_ids, text_mask):
        """The prefix (cameras, then the prompt with the state) through PaliGemma once.
        -> context (keys, values per layer (B, kv, L, hd), mask (B, L)), last prefix token's features (B, W)"""
        (keys, vals, mask, _), features = super().encode_prefix(images, proprio, *self.prompt(input_ids, text_mask,
                                                                                              proprio))
        return (keys, vals, mask), features

    def expert_hidden(self, context, x, t):
        """The adaRMS expert on the chunk x (B, chunk*32) at t (B,) against the prefix cache
        -> its output features per action (B, chunk, W)."""
        keys, vals, mask = context
        cache = DynamicCache(ddp_cache_data=list(zip(keys, vals)))  # fresh: the expert appends its own KV
        b, bb, chunk = x.shape[0], self.backbone, self.spec.chunk_size
        dit = bb.model.dit
        h = bb.action_in_proj(x.reshape(b, chunk, self.spec.max_action_dim).to(self.dtype))
        cond = bb.time_condition(t)
        # Actions see every real prefix token and each other; positions continue after the prefix.
        positions = mask.sum(-1, keepdim=True) + torch.arange(chunk, device=mask.device)
        visible = torch.cat([mask.bool(), mask.new_ones(b, chunk, dtype=torch.bool)], 1)
        blocked = torch.zeros(visible.shape, dtype=h.dtype, device=h.device)
        blocked = blocked.masked_fill(~visible, torch.finfo(h.dtype).min)
        attention = blocked[:, None, None, :].expand(b, 1, chunk, visible.shape[1])
        rotary = dit.rotary_emb(h, position_ids=positions)
        for layer in dit.layers:
            h = layer(h, cond, attention_mask=attention, position_ids=positions, past_key_values=cache,
                      position_embeddings=rotary)
        return dit.norm(h, cond)[0]
