"""pi0 as a vlarl flow policy, on transformers' PI0ForConditionalGeneration.

The backbone is transformers' module as is (PaliGemma = SigLIP + Gemma 2B; a Gemma 300M action
expert, "dit", whose layers attend to the PaliGemma layers' KV cache). `encode_context` runs the
prefix (camera patches, then `<bos>` instruction `\\n`) once through PaliGemma into that cache, as
transformers' `sample_actions` does; `velocity` runs only the expert on (state, x_t, t) against it.
The state enters as the first suffix token (pi0, not pi0.5). Denoising convention, as transformers,
LeRobot and openpi: t = 1 noise, t = 0 action, x_t = t * noise + (1 - t) * action, v = noise -
action, Euler x_{t + dt} = x_t + dt * v with dt = -1/K (vlarl/algo/flow.py writes x_t - v / K).

The flow state x is the whole padded chunk (chunk_size x max_action_dim, 50 x 32 = 1600 values),
since the expert reads all of it; the environment executes the first `executed_steps` actions of the
chunk, each cut to the statistics' action dims (7 on LIBERO), so `config.action_dim` = 7 x
executed_steps (= vlarl's env.action_chunk x 7). Log-probs are taken on those executed elements only
(RLinf's pi-RL does the same), so `logprob_width` is action_dim (x K for sde_all / noise).

Images: vlarl's batch holds one uint8 array per step; pi0's cameras lie side by side in it,
(B, H, n * W, 3) [agentview | wrist | ...]. Fewer cameras than the checkpoint reads (e.g. the toy
environment's one) are left out of the prefix, which is what pi0's masked empty cameras amount to.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PI0Config, PI0ForConditionalGeneration
from transformers.cache_utils import DynamicCache
from transformers.initialization import no_init_weights

from vlarl.models.flow_policy import FlowPolicy
from vlarl.models.pi0.config import GemmaSize, Pi0Spec

HEAD_SEED = 0  # the value and noise heads are created from this seed, identically in every process


@dataclass
class Pi0Settings:
    """What FlowPolicy reads from `model.config`: the run's sampler settings and the values per call."""

    action_dim: int  # values the environment executes per call (executed_steps x action dims)
    method: str = "sde_all"
    num_steps: int = 4
    noise_level: float = 0.5
    noise_min: float = 0.08
    noise_max: float = 0.16
    std_floor: float = 0.05
    value_from: str = "prefix"  # prefix: the VLM's last prefix token; expert: the action expert at t = 1


def _gemma(size: GemmaSize, vocab: int) -> dict:
    return dict(model_type="gemma", hidden_size=size.width, num_hidden_layers=size.depth, intermediate_size=size.mlp_dim,
                num_attention_heads=size.num_heads, num_key_value_heads=size.num_kv_heads, head_dim=size.head_dim,
                vocab_size=vocab, hidden_act="gelu_pytorch_tanh")


def transformers_config(spec: Pi0Spec) -> PI0Config:
    """transformers' PI0Config for a folder's sizes (image token id = vocab size, as PaliGemma's 257152)."""
    v = spec.vision
    vision = dict(model_type="siglip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                  patch_size=v.patch_size, image_size=spec.image_size, vision_use_head=False,
                  projection_dim=spec.paligemma.width)
    vlm = dict(model_type="paligemma", text_config=_gemma(spec.paligemma, spec.vocab_size), vision_config=vision,
               projection_dim=spec.paligemma.width, image_token_id=spec.vocab_size)
    return PI0Config(vlm_config=vlm, dit_config=_gemma(spec.action_expert, spec.vocab_size),
                     chunk_size=spec.chunk_size, max_state_dim=spec.max_state_dim, max_action_dim=spec.max_action_dim,
                     num_inference_steps=spec.num_inference_steps, min_period=spec.min_period,
                     max_period=spec.max_period)


def _seeded_head(width: int, out: int, act: nn.Module) -> nn.Sequential:
    """Linear(width, width), act, Linear(width, out) with the last layer zero and the first drawn from
    HEAD_SEED, so every process that loads a folder without saved heads creates the same ones."""
    head = nn.Sequential(nn.Linear(width, width), act, nn.Linear(width, out))
    g = torch.Generator().manual_seed(HEAD_SEED)
    with torch.no_grad():
        head[0].weight.copy_(torch.randn(width, width, generator=g) * 0.02)
        head[0].bias.zero_()
        head[2].weight.zero_()
        head[2].bias.zero_()
    return head


class Pi0Policy(FlowPolicy, nn.Module):
    bounded_actions = False  # mean/std-normalised actions: x_0 is not clipped to [-1, 1]
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # PaliGemma's Gemma
    expert_name = "backbone.model.dit"  # the action expert (model.expert_lora_rank puts adapters here)
    # Trained beside the adapters: vlarl's heads, pi0's action projections and the 300M action expert.
    lora_trainable = ("value_head", "noise_head", "backbone.embed_action_time", "backbone.action_out_proj",
                      "backbone.model.dit")

    def __init__(self, spec: Pi0Spec, settings: Pi0Settings, init_weights: bool = True):
        """init_weights=False skips the backbone's random initialisation (minutes for 3.3B parameters on a
        CPU) when every backbone weight is about to be loaded from a checkpoint."""
        nn.Module.__init__(self)
        self.spec, self.config = spec, settings
        with contextlib.nullcontext() if init_weights else no_init_weights():
            self.backbone = self.build_backbone(spec)
        prefix_width, expert_width = self.head_widths(spec)
        self.value_head = _seeded_head(expert_width if settings.value_from == "expert" else prefix_width, 1, nn.Tanh())
        # Flow-Noise's learned std, per action value, from the expert's output features.
        self.noise_head = _seeded_head(expert_width, spec.max_action_dim, nn.SiLU())
        offset, scale = spec.stats.affine("state")
        self.register_buffer("state_offset", torch.from_numpy(offset), persistent=False)
        self.register_buffer("state_scale", torch.from_numpy(scale), persistent=False)

    @staticmethod
    def build_backbone(spec: Pi0Spec) -> nn.Module:
        return PI0ForConditionalGeneration(transformers_config(spec))

    @staticmethod
    def head_widths(spec: Pi0Spec) -> tuple[int, int]:
        """(width the value head reads: the VLM's, width the noise head reads: the expert's)"""
        return spec.paligemma.width, spec.action_expert.width

    # ---- the policy interface (vlarl/models/family.py) ------------------------------------------
    def __setattr__(self, name, value):
        if name == "language_model":  # vlarl.models.lora re-assigns the decoder it wrapped
            self.backbone.model.vlm.language_model = value
            return
        super().__setattr__(name, value)

    @property
    def language_model(self) -> nn.Module:
        """PaliGemma's Gemma decoder (LoRA targets live here)."""
        return self.backbone.model.vlm.language_model

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def flow_width(self) -> int:
        return self.spec.chunk_size * self.spec.max_action_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.action_out_proj.weight.dtype

    def encode_instruction(self, tokenizer, instruction: str) -> list[int]:
        """`<bos>` + the instruction + "\\n" (LeRobot's Pi0NewLineProcessor + the PaliGemma tokenizer;
        transformers' PI0Processor builds the same), at most tokenizer_max_length ids."""
        ids = tokenizer(instruction.strip() + "\n", add_special_tokens=False)["input_ids"]
        return ([tokenizer.bos_token_id] + ids)[: self.spec.tokenizer_max_length]

    def fsdp_units(self) -> list[nn.Module]:
        m = self.backbone.model
        return [*m.vlm.vision_tower.encoder.layers, *m.vlm.language_model.layers, *m.dit.layers]

    # ---- inputs ----------------------------------------------------------------------------------
    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, n*W, 3), cameras side by side -> (B, n, 3, S, S) in [-1, 1] (SigLIP's range)."""
        b, h, w, _ = images.shape
        n = w // h
        if w % h or not 1 <= n <= self.spec.num_cameras:
            raise ValueError(f"pi0 reads up to {self.spec.num_cameras} square cameras side by side; got images "
                             f"{tuple(images.shape)}.")
        x = images.float().div(255).reshape(b, h, n, h, 3).permute(0, 2, 4, 1, 3)  # (B, n, 3, H, W)
        if h != self.image_size:  # square cameras: LeRobot/openpi resize_with_pad_torch is this (no padding)
            x = F.interpolate(x.flatten(0, 1), size=(self.image_size,) * 2, mode="bilinear",
                              align_corners=False).clamp(0, 1).reshape(b, n, 3, self.image_size, self.image_size)
        return (x * 2 - 1).to(self.dtype)

    def normalised_state(self, proprio: torch.Tensor) -> torch.Tensor:
        """Environment proprio (B, S) -> normalised (B, S) float32."""
        if proprio.shape[-1] != self.spec.state_dim:
            raise ValueError(f"{self.spec.kind}'s statistics describe a {self.spec.state_dim}-D state; got "
                             f"{proprio.shape[-1]}-D.")
        return (proprio.float() - self.state_offset) / self.state_scale

    def state(self, proprio: torch.Tensor) -> torch.Tensor:
        """Environment proprio (B, S) -> normalised and zero-padded to max_state_dim (B, 32)."""
        s = self.normalised_state(proprio)
        return F.pad(s, (0, self.spec.max_state_dim - s.shape[-1])).to(self.dtype)

    def prefix_inputs(self, images, input_ids, text_mask):
        """-> transformers' prefix inputs: input_ids with image placeholders (B, L), attention mask (B, L),
        pixel_values (B, n, 3, S, S), pixel_attention_mask (B, n)."""
        pixels = self.pixel_values(images)
        b, n = pixels.shape[:2]
        per_camera = (self.image_size // self.spec.vision.patch_size) ** 2
        image_ids = input_ids.new_full((b, n * per_camera), self.backbone.config.vlm_config.image_token_id)
        ids = torch.cat([image_ids, input_ids], 1)
        mask = torch.cat([torch.ones_like(image_ids), text_mask.to(image_ids.dtype)], 1)
        return ids, mask, pixels, torch.ones(b, n, dtype=torch.bool, device=pixels.device)

    # ---- FlowPolicy ------------------------------------------------------------------------------
    def encode_context(self, images, proprio, input_ids, text_mask):
        """The prefix once (`encode_prefix`); with model.value_from=expert the value comes from the action
        expert instead: its mean output over a zero chunk at t = 1, which depends on the observation only."""
        context, features = self.encode_prefix(images, proprio, input_ids, text_mask)
        if self.config.value_from == "expert":
            b, dev = features.shape[0], features.device
            features = self.expert_hidden(context, torch.zeros(b, self.flow_width, device=dev),
                                          torch.ones(b, device=dev)).mean(1)
        return context, self.value_head(features).squeeze(-1).float()

    def velocity(self, context, x, t):
        """The action expert on the chunk x (B, chunk*32) at t (B,) against the prefix cache
        -> velocity (B, chunk*32), raw Flow-Noise std (B, chunk*32), float32."""
        hidden = self.expert_hidden(context, x, t)
        v = self.backbone.action_out_proj(hidden)
        raw = self.noise_head(hidden) if self.config.method == "noise" else torch.zeros_like(v)
        return v.float().reshape(x.shape[0], -1), raw.float().reshape(x.shape[0], -1)

    def encode_prefix(self, images, proprio, input_ids, text_mask):
        """The prefix through PaliGemma once, as transformers' `sample_actions` runs it.
        -> context (keys, values per layer (B, kv, L, hd), mask (B, L), state (B, 32)), the last real
        prefix token's features (B, W) (the value head's input with model.value_from=prefix)"""
        m = self.backbone.model
        ids, mask, pixels, pixel_mask = self.prefix_inputs(images, input_ids, text_mask)
        embeds = m.embed_prefix(ids, pixels, pixel_mask)
        out = m.vlm(inputs_embeds=embeds, attention_mask=mask, position_ids=mask.cumsum(-1) - 1,
                    token_type_ids=torch.zeros_like(mask), use_cache=True, return_dict=True)
        rows = torch.arange(mask.shape[0], device=mask.device)
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # last real prefix token (text may be padded either side)
        features = out.last_hidden_state[rows, last]
        cache = out.past_key_values
        keys = tuple(layer.keys for layer in cache.layers)
        vals = tuple(layer.values for layer in cache.layers)
        return (keys, vals, mask, self.state(proprio)), features

    def expert_hidden(self, context, x, t):
        """The action expert on the chunk x (B, chunk*32) at t (B,) against the prefix cache
        -> its output features per action (B, chunk, W)."""
        keys, vals, mask, state = context
        cache = DynamicCache(ddp_cache_data=list(zip(keys, vals)))  # fresh: the expert appends its own KV
        b, bb = x.shape[0], self.backbone
        noisy = x.reshape(b, self.spec.chunk_size, self.spec.max_action_dim).to(self.dtype)
        out = bb.model(action_embeds=bb.embed_action_time(state, noisy, t), attention_mask=mask, past_key_values=cache)
        return out.last_hidden_state[:, -self.spec.chunk_size:]

    def executed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, chunk*32) -> the executed actions' real dims (B, executed_steps * D), step-major."""
        s = self.spec
        return x.reshape(x.shape[0], s.chunk_size, s.max_action_dim)[:, :s.executed_steps, :s.action_dim].flatten(1)

    def embed_executed(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Executed actions (B, executed_steps * D) -> the padded chunk (B, chunk*32) and its mask of
        supervised elements (the rest of the chunk is unknown to a one-call demonstration)."""
        s = self.spec
        chunk = actions.new_zeros(actions.shape[0], s.chunk_size, s.max_action_dim)
        known = torch.zeros_like(chunk, dtype=torch.bool)
        chunk[:, :s.executed_steps, :s.action_dim] = actions.reshape(-1, s.executed_steps, s.action_dim)
        known[:, :s.executed_steps, :s.action_dim] = True
        return chunk.flatten(1), known.flatten(1)
