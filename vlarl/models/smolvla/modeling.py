"""SmolVLA as a vlarl flow policy: transformers' SmolVLM (cut to its first layers) reads the prefix once;
an action expert, half self-attention and half cross-attention layers, denoises the chunk against it.

What LeRobot's SmolVLA computes (src/lerobot/policies/smolvla/modeling_smolvla.py, smolvlm_with_expert.py):
- Prefix: each camera through the SigLIP tower and the pixel-shuffle connector, the instruction
  (`task + "\\n"`), both scaled by sqrt(width), then one state token (state_proj of the padded state).
  With add_image_special_tokens, each camera's tokens are preceded by the embeddings (unscaled) of the
  tokenizer's fake_image_token and global_image_token and followed by another fake_image_token; the three
  are never padding, so an empty camera slot keeps them (its image tokens are masked, which is leaving them out).
  Cameras and instruction attend to each other bidirectionally; only the state token sees everything
  (it alone opens a new attention block). RoPE with base 10000 for both towers, whatever the VLM's own.
- Expert: a Llama with 0.75x the VLM's width and num_expert_layers layers; expert layer j pairs with VLM
  layer i = j * stride (stride = num_vlm_layers // num_expert_layers; other VLM layers leave the actions
  as they are). It attends jointly when i % self_attn_every_n_layers == 0: its queries, keys and values
  over the actions, keys and values of the VLM layer i's prefix cache before them. Otherwise it
  cross-attends: keys and values are the VLM layer i's cached (rotated) prefix keys and values through the
  expert's own k_proj and v_proj (VLM kv width -> expert kv width), queries rotated from position 0.
  Actions attend causally to each other.
  Suffix: action_time_mlp_out(silu(action_time_mlp_in([action_in_proj(x_t), sinusoid(t)]))).
  LeRobot's cached sampler fails on a VLM layer without an expert layer that it would run jointly (an
  empty concatenation); vlarl passes the actions through it, as LeRobot's training forward does.
Denoising conventions and the flow state are pi0's (vlarl/models/pi0/modeling.py).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaModel, SmolVLMForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb

from vlarl.models.pi0.modeling import Pi0Policy
from vlarl.models.smolvla.config import SmolVLASpec, is_cross


def expert_width(spec: SmolVLASpec) -> int:
    return int(spec.vlm["text_config"]["hidden_size"] * spec.expert_width_multiplier)


def intermediate_size(width: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    """smolvlm_with_expert.py get_intermediate_size: 2/3 of 4x the width, rounded up to 256."""
    hidden = int(multiplier * int(2 * width / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def sinusoid(t: torch.Tensor, width: int, min_period: float, max_period: float) -> torch.Tensor:
    """t (B,) -> (B, width) [sin | cos] over periods geometric in [min_period, max_period] (float64, as upstream)."""
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64, device=t.device)
    angle = (2 * math.pi / (min_period * (max_period / min_period) ** fraction))[None] * t.double()[:, None]
    return torch.cat([angle.sin(), angle.cos()], 1).float()


class ExpertLayer(LlamaDecoderLayer):
    """transformers' Llama layer whose attention reads the VLM layer's prefix cache: jointly (self) or,
    with k_proj/v_proj re-sized to the VLM's kv width, across (cross)."""

    def __init__(self, config, layer_idx: int, cross: bool, vlm_kv_width: int):
        super().__init__(config, layer_idx)
        self.cross = cross
        if cross:
            out, bias = config.num_key_value_heads * config.head_dim, config.attention_bias
            self.self_attn.k_proj = nn.Linear(vlm_kv_width, out, bias=bias)
            self.self_attn.v_proj = nn.Linear(vlm_kv_width, out, bias=bias)

    def forward(self, hidden, prefix_keys, prefix_values, masks, rotaries):
        """hidden (B, C, W); prefix keys/values (B, kv, P, hd) as cached (keys rotated); masks/rotaries:
        {"self": ..., "cross": ...} additive (B, 1, C, keys) masks and (cos, sin) for the actions."""
        a, (b, c, _) = self.self_attn, hidden.shape
        kind = "cross" if self.cross else "self"
        x = self.input_layernorm(hidden)
        q = a.q_proj(x).view(b, c, -1, a.head_dim).transpose(1, 2)
        cos, sin = rotaries[kind]
        if self.cross:
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            flat = lambda t: t.transpose(1, 2).reshape(b, t.shape[2], -1)  # noqa: E731  (B, P, kv * hd)
            k = a.k_proj(flat(prefix_keys)).view(b, prefix_keys.shape[2], -1, a.head_dim).transpose(1, 2)
            v = a.v_proj(flat(prefix_values)).view(b, prefix_keys.shape[2], -1, a.head_dim).transpose(1, 2)
        else:
            k = a.k_proj(x).view(b, c, -1, a.head_dim).transpose(1, 2)
            v = a.v_proj(x).view(b, c, -1, a.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k, v = torch.cat([prefix_keys, k], 2), torch.cat([prefix_values, v], 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[kind], scale=a.scaling, enable_gqa=True)
        hidden = hidden + a.o_proj(out.transpose(1, 2).reshape(b, c, -1))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class SmolVLABackbone(nn.Module):
    """Parameter names follow LeRobot's VLAFlowMatching without `vlm_with_expert.` (vlarl/models/pi0/checkpoint.py)."""

    def __init__(self, spec: SmolVLASpec):
        super().__init__()
        config = spec.vlm_config()
        self.vlm = SmolVLMForConditionalGeneration(config)
        text = config.text_config
        expert = copy.deepcopy(text)
        expert.hidden_size = expert_width(spec)
        expert.intermediate_size = intermediate_size(expert.hidden_size)
        expert.num_hidden_layers = spec.num_expert_layers
        self.lm_expert = LlamaModel(expert)
        kv_width = text.num_key_value_heads * text.head_dim
        # Expert layer j attends as its VLM layer j * stride does (config.py checks LeRobot shapes it so).
        self.lm_expert.layers = nn.ModuleList(
            ExpertLayer(expert, j, is_cross(spec, j * spec.expert_stride), kv_width)
            for j in range(spec.num_expert_layers))
        self.lm_expert.embed_tokens = None  # upstream removes it (the expert reads embeddings)
        width = expert.hidden_size
        self.state_proj = nn.Linear(spec.max_state_dim, text.hidden_size)
        self.action_in_proj = nn.Linear(spec.max_action_dim, width)
        self.action_out_proj = nn.Linear(width, spec.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)


class SmolVLAPolicy(Pi0Policy):
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the SmolVLM decoder
    expert_name = "backbone.lm_expert"
    lora_trainable = ("value_head", "noise_head", "backbone.lm_expert", "backbone.state_proj",
                      "backbone.action_in_proj", "backbone.action_out_proj", "backbone.action_time_mlp_in",
                      "backbone.action_time_mlp_out")

    def __init__(self, spec: SmolVLASpec, settings, init_weights: bool = True,
                 image_token_ids: tuple[int, int] | None = None):
        """image_token_ids: the tokenizer's (fake_image_token_id, global_image_token_id), which the prefix
        needs when spec.add_image_special_tokens (vlarl/models/smolvla/family.py reads them)."""
        super().__init__(spec, settings, init_weights)
        self.image_token_ids = image_token_ids

    @staticmethod
    def build_backbone(spec: SmolVLASpec) -> nn.Module:
        return SmolVLABackbone(spec)

    @staticmethod
    def head_widths(spec: SmolVLASpec) -> tuple[int, int]:
        return spec.vlm["text_config"]["hidden_size"], expert_width(spec)

    def __setattr__(self, name, value):
        if name == "language_model":  # vlarl.models.lora re-assigns the decoder it wrapped
            self.backbone.vlm.model.text_model = value
            return
        nn.Module.__setattr__(self, name, value)

    @property
    def language_model(self) -> nn.Module:
        return self.backbone.vlm.model.text_model

    def fsdp_units(self) -> list[nn.Module]:
        vlm = self.backbone.vlm.model
        return [*vlm.vision_model.encoder.layers, *vlm.text_model.layers, *self.backbone.lm_expert.layers]

    def encode_instruction(self, tokenizer, instruction: str) -> list[int]:
        """The task with a trailing newline (SmolVLANewLineProcessor), tokenised as LeRobot's tokenizer
        step does, at most tokenizer_max_length ids."""
        text = instruction if instruction.endswith("\n") else instruction + "\n"
        return tokenizer(text)["input_ids"][: self.spec.tokenizer_max_length]

    def encode_prefix(self, images, proprio, input_ids, text_mask):
        """Cameras, instruction and state token through the cut SmolVLM once.
        -> context (keys, values per layer (B, kv, P, hd), prefix mask (B, P)), the state token's features (B, W)"""
        vlm, bb = self.backbone.vlm.model, self.backbone
        pixels = self.pixel_values(images)  # (B, n, 3, S, S) in [-1, 1]
        b, n = pixels.shape[:2]
        feats = vlm.connector(vlm.vision_model(pixel_values=pixels.flatten(0, 1)).last_hidden_state)
        width = feats.shape[-1]
        scale = math.sqrt(width)
        feats = self.camera_tokens(feats.reshape(b, n, -1, width) * scale)
        lang = vlm.text_model.embed_tokens(input_ids) * scale
        state = bb.state_proj(self.state(proprio))[:, None]
        embeds = torch.cat([feats, lang.to(feats.dtype), state.to(feats.dtype)], 1)
        pad = torch.cat([text_mask.new_ones(b, feats.shape[1]), text_mask, text_mask.new_ones(b, 1)], 1).bool()
        # Cameras and words attend to each other (block 0); the state token (block 1) sees everything.
        block = torch.zeros(pad.shape[1], dtype=torch.long, device=pad.device)
        block[-1] = 1
        allowed = (block[None, :] <= block[:, None])[None] & pad[:, None, :] & pad[:, :, None]
        out = vlm.text_model(inputs_embeds=embeds, attention_mask=self.additive(allowed, embeds.dtype),
                             position_ids=pad.long().cumsum(-1) - 1, use_cache=True)
        cache = out.past_key_values
        keys, vals = tuple(layer.keys for layer in cache.layers), tuple(layer.values for layer in cache.layers)
        return (keys, vals, pad), out.last_hidden_state[:, -1]

    def camera_tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """Scaled camera features (B, n, T, W) -> the prefix's image tokens (B, I, W): the cameras one after
        another, each between the image special tokens when the folder adds them (plus the three of each
        empty camera slot LeRobot would fill)."""
        b, n = feats.shape[:2]
        if not self.spec.add_image_special_tokens:
            return feats.flatten(1, 2)
        if self.image_token_ids is None:
            raise ValueError("This SmolVLA adds image special tokens; build SmolVLAPolicy with image_token_ids.")
        fake, global_image = self.image_token_ids
        marks = self.backbone.vlm.model.text_model.embed_tokens(
            torch.tensor([fake, global_image, fake], device=feats.device)).to(feats.dtype)  # (3, W), not scaled
        around = torch.cat([marks[:2].expand(b, n, 2, -1), feats, marks[2:].expand(b, n, 1, -1)], 2)
        empty = min(self.spec.num_cameras - n, self.spec.empty_cameras)
        return torch.cat([around.flatten(1, 2), marks.repeat(empty, 1).expand(b, -1, -1)], 1)

    @staticmethod
    def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """bool (B, Q, K) -> additive (B, 1, Q, K): 0 where allowed, the dtype's minimum elsewhere."""
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]

    def expert_hidden(self, context, x, t):
        """The interleaved expert on the chunk x (B, chunk*32) at t (B,) against the prefix cache
        -> its output features per action (B, chunk, W)."""
        keys, vals, pad = context
        bb, spec, b = self.backbone, self.spec, x.shape[0]
        chunk = spec.chunk_size
        actions = bb.action_in_proj(x.reshape(b, chunk, spec.max_action_dim).to(self.dtype))
        time = sinusoid(t, actions.shape[-1], spec.min_period, spec.max_period).to(actions.dtype)
        h = bb.action_time_mlp_out(F.silu(bb.action_time_mlp_in(
            torch.cat([actions, time[:, None].expand_as(actions)], 2))))
        steps = torch.arange(chunk, device=x.device)
        rotary = bb.lm_expert.rotary_emb
        rotaries = {"self": rotary(h, pad.sum(-1, keepdim=True) + steps), "cross": rotary(h, steps[None].expand(b, -1))}
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
        sees_prefix = pad[:, None, :].expand(b, chunk, pad.shape[1])
        masks = {"self": self.additive(torch.cat([sees_prefix, causal.expand(b, -1, -1)], 2), h.dtype),
                 "cross": self.additive(sees_prefix, h.dtype)}
        stride = spec.expert_stride
        for j, layer in enumerate(bb.lm_expert.layers):
            h = layer(h, keys[j * stride], vals[j * stride], masks, rotaries)
        return bb.lm_expert.norm(h)
