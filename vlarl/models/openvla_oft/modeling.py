"""OpenVLA-OFT as a vlarl policy: OpenVLA plus parallel decoding of a whole action chunk.

Sequence (moojink/openvla-oft, modeling_prismatic.py `predict_action`):
    [<s>] [256 patches per camera, cameras in order] [proprio token] [prompt ids, LEFT-padded]
    [chunk * 7 placeholders, ZERO embeddings] [</s>]
The prompt is OpenVLA's and ends in 29871. Upstream reads the decoder's last hidden states at the
placeholder positions SHIFTED back by one: the states at positions p0 - 1 .. p0 + n - 2 (p0 = the
first placeholder, so the first is the last prompt token's), the positions a causal LM would predict
the n action tokens from. The discrete head takes the logits there (the 256 action ids, OpenVLA's
bins); the L1 head (heads.py) maps each action's 7 states to 7 normalised values.

Attention (model.oft.attention): `full`, as upstream's Llama fork (every position sees every real
position, the prefix included: its states therefore depend on the placeholders' fixed zero inputs);
or `prefix_causal`: the prefix causal, the placeholders and </s> bidirectional among themselves and
seeing the whole prefix. Both go to the decoder as one additive 4-D mask (SDPA or eager).

FiLM checkpoints (use_film, film.py): every ViT layer of both towers is scaled and shifted by the
mean embedding of <s>, the prompt and </s> (`instruction_embedding`; padding left out), for every camera.

RL: the discrete head samples the n tokens independently from one forward (action_kind "parallel",
the SimpleVLA-RL policy); the L1 head is the mean of a Gaussian with a learned per-dimension log-std
(`action_log_std`, action_kind "gaussian"), scored exactly. The value head reads the last prefix state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlarl.algo.losses import entropy_from_logits
from vlarl.models.openvla import processing
from vlarl.models.openvla.config import OpenVLAConfig
from vlarl.models.openvla.modeling import OpenVLAPolicy
from vlarl.models.openvla.processing import PixelSpec
from vlarl.models.openvla_oft.film import film_layers
from vlarl.models.openvla_oft.heads import L1Head, ProprioProjector

STOP_TOKEN_ID = 2  # </s>, appended after the placeholders as at training time
LOG_STD_RANGE = (-5.0, 1.0)  # the Gaussian policy's log-std is clamped here


@dataclass(frozen=True)
class OFTSpec:
    """The run configuration upstream checkpoints do not store (model.oft), checked against the tensors."""

    chunk: int = 8  # actions per call
    action_dim: int = 7
    proprio_dim: int = 8  # 0: no proprio token (no proprio_projector file)
    num_images: int = 2  # cameras, side by side in the model's image
    head: str = "discrete"  # discrete | l1
    attention: str = "full"  # full | prefix_causal
    head_hidden: int = 0  # L1 head MLP width (the decoder's hidden size upstream)
    init_log_std: float = -1.6  # L1 head: initial log-std of the Gaussian policy
    film: bool = False  # FiLM-conditioned towers (a vision_backbone--*checkpoint* file in the folder)

    @property
    def num_actions(self) -> int:
        """Placeholder positions: chunk x action_dim (56 on LIBERO)."""
        return self.chunk * self.action_dim


def attention_mask_4d(mask: torch.Tensor, prefix_len: int, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """mask (B, L) 1 for real positions -> additive (B, 1, L, L): 0 where query i may see key j, the
    dtype's minimum elsewhere. `full`: every real key; `prefix_causal`: key j <= i inside the prefix
    (the first prefix_len positions), and every real key from the positions after it."""
    b, length = mask.shape
    allowed = mask[:, None, None, :].bool().expand(b, 1, length, length)
    if mode == "prefix_causal":
        i = torch.arange(length, device=mask.device)[:, None]
        j = torch.arange(length, device=mask.device)[None, :]
        allowed = allowed & ((j <= i) | (i >= prefix_len))
    elif mode != "full":
        raise ValueError(f"model.oft.attention={mode!r} is not full or prefix_causal.")
    out = torch.zeros((b, 1, length, length), dtype=dtype, device=mask.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Per-element log-density of N(mean, exp(log_std)^2) at x, float32."""
    return -0.5 * ((x - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)


class OFTPolicy(OpenVLAPolicy):
    # trained fully beside the adapters (FiLM's scale/shift as upstream trains them: new, small)
    lora_trainable = ("value_head", "proprio_projector", "action_head", "action_log_std", "film")

    def __init__(self, cfg: OpenVLAConfig, mlp_widths: list[int], projector_hidden: int | None,
                 pixel_spec: PixelSpec | None, spec: OFTSpec, proprio_stats: dict | None = None):
        super().__init__(cfg, mlp_widths, projector_hidden, pixel_spec, action_dim=spec.num_actions)
        self.spec = spec
        self.action_kind = "gaussian" if spec.head == "l1" else "parallel"
        e = cfg.text.hidden_size
        self.proprio_projector = ProprioProjector(spec.proprio_dim, e) if spec.proprio_dim else None
        if spec.head == "l1":
            self.action_head = L1Head(e, spec.head_hidden or e, spec.action_dim)
            self.action_log_std = nn.Parameter(torch.full((spec.action_dim,), float(spec.init_log_std)))
        else:
            self.action_head, self.action_log_std = None, None
        self.film = film_layers(cfg) if spec.film else None  # {tower: one FiLM per layer}
        stats = proprio_stats or {}
        self.proprio_bounds = None  # (q01, q99, mask) of the proprio state (bounds_q99), numpy
        if spec.proprio_dim:
            q01 = np.asarray(stats.get("q01", [-1.0] * spec.proprio_dim), np.float64)
            q99 = np.asarray(stats.get("q99", [1.0] * spec.proprio_dim), np.float64)
            self.proprio_bounds = (q01, q99, np.asarray(stats.get("mask", [True] * len(q01)), bool))

    # --- inputs ---------------------------------------------------------------------------------
    def normalize_proprio(self, proprio: torch.Tensor) -> torch.Tensor:
        """(B, P) raw state -> bounds_q99 normalised, clipped to [-1, 1] (openvla_utils `normalize_proprio`)."""
        q01, q99, mask = self.proprio_bounds
        if proprio.shape[-1] != len(q01):
            raise ValueError(f"the checkpoint's proprio projector reads {len(q01)} values; the environment gives "
                             f"{proprio.shape[-1]}.")
        x = proprio.double()
        lo, hi = torch.as_tensor(q01, device=x.device), torch.as_tensor(q99, device=x.device)
        scaled = 2 * (x - lo) / (hi - lo + 1e-8) - 1
        out = torch.where(torch.as_tensor(mask, device=x.device), scaled, x).clamp(-1, 1)
        return out.to(self.dtype)

    def camera_tiles(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, H, n * W, 3): the cameras side by side -> n images (B, H, W, 3)."""
        n = self.spec.num_images
        if images.shape[2] % n or images.shape[2] // n != images.shape[1]:
            raise ValueError(f"model.oft.num_images={n} needs {n} square camera images side by side; got frames of "
                             f"{images.shape[1]} x {images.shape[2]}. Set env.wrist_camera=true for two cameras, or "
                             "model.oft.num_images to the number the environment renders.")
        return list(images.chunk(n, dim=2)) if n > 1 else [images]

    def fsdp_units(self) -> list[nn.Module]:
        """OpenVLA's units; with FiLM the ViT layers stay in the root unit: FiLM runs each layer's two
        halves itself (vision.py, Tower.forward `between`), which a unit's forward hooks would not see,
        so the layer would run on its sharded parameters."""
        units = super().fsdp_units()
        if self.film is None:
            return units
        vit = {id(layer) for tower in self.vision_backbone.towers() for layer in tower.layers}
        return [u for u in units if id(u) not in vit]

    def instruction_embedding(self, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """FiLM's condition (B, E) in the model dtype: the mean input embedding of <s>, the real prompt ids
        and </s>, upstream's non-action tokens; padding is left out, so a row gets what it gets alone.

        input_ids  # (B, Li) prompt ids (no <s>), LEFT-padded; text_mask  # (B, Li) 1 for real ones"""
        ends = torch.tensor([self.bos_token_id, STOP_TOKEN_ID], device=input_ids.device)
        total = (self.embed_tokens(input_ids).float() * text_mask[..., None]).sum(1)
        total = total + self.embed_tokens(ends).float().sum(0)
        return (total / (text_mask.sum(1, keepdim=True) + 2)).to(self.dtype)

    def vision_features(self, pixels: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """pixels  # (B, 3 * towers, S, S), lang  # (B, E) -> FiLM-conditioned features (B, N, V)."""
        features = []
        for name, tower, x in zip(self.vision_backbone.names, self.vision_backbone.towers(), pixels.split(3, dim=1)):
            features.append(tower(x, between=[lambda h, f=f: f(h, lang) for f in self.film[name]]))
        return torch.cat(features, dim=2)

    def patch_embeddings(self, images, lang: torch.Tensor | None = None) -> torch.Tensor:
        """images  # (B, H, W, 3) uint8 -> projected patches (B, N, E); lang  # (B, E) the instruction
        embedding, read by FiLM checkpoints (required there)."""
        if self.film is None:
            return super().patch_embeddings(images)
        pixels = processing.pixel_values(images, self.pixel_spec).to(self.device, self.dtype)
        return self.projector(self.vision_features(pixels, lang))

    def prefix(self, images, proprio, input_ids, text_mask):
        """[<s>] [patches of every camera] [proprio token] [prompt ids] -> embeds (B, L, E), mask, positions."""
        lang = self.instruction_embedding(input_ids, text_mask) if self.film is not None else None
        patches = torch.cat([self.patch_embeddings(tile, lang) for tile in self.camera_tiles(images)], 1)
        b = input_ids.shape[0]
        bos = self.embed_tokens(torch.full((b, 1), self.bos_token_id, dtype=torch.long, device=input_ids.device))
        parts = [bos, patches]
        if self.proprio_projector is not None:
            parts.append(self.proprio_projector(self.normalize_proprio(proprio.to(self.device)))[:, None])
        parts.append(self.embed_tokens(input_ids))
        embeds = torch.cat(parts, 1)
        fixed = embeds.shape[1] - input_ids.shape[1]
        mask = torch.cat([text_mask.new_ones(b, fixed), text_mask], 1).long()
        return embeds, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    # --- decoding -------------------------------------------------------------------------------
    def decode(self, embeds, mask, positions, placeholders: torch.Tensor | None = None):
        """The prefix followed by the placeholders and </s> through the decoder in one pass.

        placeholders  # (B, n, E) the placeholder inputs; None: zeros, as upstream always feeds
        returns the states the heads read (B, n, E) (positions p0 - 1 .. p0 + n - 2) and the last
        prefix state (B, E)."""
        b, lp = mask.shape
        n = self.spec.num_actions
        if placeholders is None:
            placeholders = embeds.new_zeros(b, n, embeds.shape[-1])
        stop = self.embed_tokens(torch.full((b, 1), STOP_TOKEN_ID, dtype=torch.long, device=mask.device))
        seq = torch.cat([embeds, placeholders.to(embeds.dtype), stop], 1)
        seq_mask = torch.cat([mask, mask.new_ones(b, n + 1)], 1)
        seq_pos = torch.cat([positions, positions[:, -1:] + torch.arange(1, n + 2, device=mask.device)], 1)
        hidden = self.language_model.model(
            inputs_embeds=seq, attention_mask=attention_mask_4d(seq_mask, lp, self.spec.attention, seq.dtype),
            position_ids=seq_pos, use_cache=False).last_hidden_state
        return hidden[:, lp - 1:lp - 1 + n], hidden[:, lp - 1]

    def outputs(self, embeds, mask, positions):
        """What a policy call needs from one forward: the 256 bin logits at T = 1 per placeholder
        (B, n, 256) for the discrete head, or the Gaussian mean (B, n) for the L1 head, float32; and
        the last prefix state (B, E)."""
        states, last = self.decode(embeds, mask, positions)
        if self.action_head is not None:
            return self.action_head(states).flatten(1).float(), last
        return self.action_logits(states), last

    def log_std(self) -> torch.Tensor:
        """The Gaussian policy's log-std per placeholder (n,), float32."""
        return self.action_log_std.float().clamp(*LOG_STD_RANGE).repeat(self.spec.chunk)

    def value(self, last: torch.Tensor) -> torch.Tensor:
        return self.value_head(last.to(self.value_head[0].weight.dtype))[:, 0].float()

    def forward(self, images, proprio, input_ids, text_mask, actions, temperature: float = 1.0):
        """Scores of a stored chunk for the learner.

        actions  # (B, n): token ids (discrete head) or the sampled normalised values (L1 head)
        returns logprobs (B, n), entropy (B, n), values (B,), float32. The Gaussian ignores
        `temperature` (its spread is the learned log-std)."""
        out, last = self.outputs(*self.prefix(images, proprio, input_ids, text_mask))
        if self.action_head is not None:
            log_std = self.log_std().expand_as(out)
            logprobs = gaussian_logprob(actions.float(), out, log_std)
            entropy = log_std + 0.5 * math.log(2 * math.pi * math.e)
        else:
            logits = out / temperature
            logprobs = F.log_softmax(logits, -1).gather(-1, (actions - self.first_bin_id).long()[..., None])[..., 0]
            entropy = entropy_from_logits(logits)
        return logprobs.clone(), entropy, self.value(last).clone()

    def predicted_actions(self, images, proprio, input_ids, text_mask) -> torch.Tensor:
        """The L1 head's normalised chunk (B, n), float32 (its supervised loss; the Gaussian's mean)."""
        return self.outputs(*self.prefix(images, proprio, input_ids, text_mask))[0]

    # --- the slow reference -------------------------------------------------------------------
    @torch.no_grad()
    def reference_chunk(self, image, proprio, instruction: str, tokenizer=None) -> np.ndarray:
        """The greedy normalised chunk (chunk, 7) for one observation, built the upstream way: the
        tokenised prompt with <s> (29871 appended), n placeholder ids and </s>, placeholder embeddings
        zeroed, the patches (+ proprio token) spliced after <s>, no padding, an all-real mask; FiLM's
        condition is the mean embedding of the non-placeholder ids, as predict_action computes it.

        image  # (H, n * W, 3) uint8, the cameras side by side; proprio (P,) raw"""
        tokenizer = tokenizer or self.tokenizer
        ids = list(tokenizer(processing.build_prompt(instruction))["input_ids"])
        if ids[-1] != processing.EMPTY_TOKEN_ID:
            ids.append(processing.EMPTY_TOKEN_ID)
        n = self.spec.num_actions
        full_ids = torch.tensor([ids + [self.first_bin_id] * n + [STOP_TOKEN_ID]], device=self.device)
        text = self.embed_tokens(full_ids)
        is_action = torch.zeros(full_ids.shape, dtype=torch.bool, device=self.device)
        is_action[:, len(ids):len(ids) + n] = True
        lang = text[~is_action].reshape(1, -1, text.shape[-1]).mean(1) if self.film is not None else None
        text = text * ~is_action[..., None]
        images = torch.as_tensor(image)[None]
        vision = [self.patch_embeddings(tile, lang) for tile in self.camera_tiles(images)]
        if self.proprio_projector is not None:
            vision.append(self.proprio_projector(self.normalize_proprio(torch.as_tensor(proprio)[None]))[:, None])
        seq = torch.cat([text[:, :1], *vision, text[:, 1:]], 1)
        num_vision = sum(v.shape[1] for v in vision)
        lp = 1 + num_vision + len(ids) - 1  # the prefix: <s>, vision, prompt after <s>
        mask = attention_mask_4d(torch.ones(seq.shape[:2], dtype=torch.long, device=self.device), lp,
                                 self.spec.attention, seq.dtype)
        hidden = self.language_model.model(inputs_embeds=seq, attention_mask=mask, use_cache=False).last_hidden_state
        start = num_vision + len(ids) - 1  # upstream's NUM_PATCHES + NUM_PROMPT_TOKENS
        states = hidden[:, start:start + n]
        if self.action_head is not None:
            return self.action_head(states)[0].float().cpu().numpy()
        logits = self.language_model.lm_head(states)[0, :, self.first_bin_id:self.first_bin_id + self.num_bins]
        token_ids = self.first_bin_id + logits.argmax(-1).cpu().numpy()  # among the action ids, as the engines
        bins = np.clip(self.openvla.base_vocab_size - token_ids - 1, 0, self.num_bins - 2)
        centres = np.linspace(-1, 1, self.num_bins)
        centres = (centres[:-1] + centres[1:]) / 2
        return centres[bins].reshape(self.spec.chunk, self.spec.action_dim)
