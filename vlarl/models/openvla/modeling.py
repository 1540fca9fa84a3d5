"""OpenVLA as a vlarl token policy: two ViT towers -> fused MLP projector -> LLaMA -> 256 action bins.

Same module names as the upstream checkpoint (vision_backbone.featurizer / fused_featurizer,
projector.fc1..fc3, language_model.model.*, language_model.lm_head), built from transformers' own
classes, so nothing runs remote code. The policy interface is vlarl's (vlarl/models/family.py; the
tiny token VLA is the reference): `prefix` builds the decoder input, engines decode action tokens
from it with a KV cache, `forward` scores given tokens for the learner. A value head (not part of
the upstream weights; saved beside them) reads the decoder's last hidden state at the last prefix
position, as VLA-RL does.

Prefix layout (upstream splices the patches right after `<s>`):
    [<s>] [256 projected patches] [prompt ids, LEFT-padded]      mask 0 on padding
Padding therefore sits between the patches and the prompt; positions = cumsum(mask) - 1 count only
real tokens, so a padded row sees exactly the positions and keys it would see alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from vlarl.models.openvla import processing
from vlarl.models.openvla.config import OpenVLAConfig
from vlarl.models.openvla.vision import Tower
from vlarl.models.token_scoring import score_action_tokens

TOWER_NAMES = ("featurizer", "fused_featurizer")


@dataclass
class PolicyConfig:
    """What vlarl reads from `model.config`."""

    action_dim: int = 7  # action tokens per call (len of the chosen dataset's q01)
    unnorm_key: str | None = None  # which norm_stats entry un-normalises actions


class VisionBackbone(nn.Module):
    """featurizer (+ fused_featurizer): per-tower patch features concatenated along channels."""

    def __init__(self, cfg: OpenVLAConfig, mlp_widths: list[int]):
        super().__init__()
        for name, spec, mlp in zip(TOWER_NAMES, cfg.towers, mlp_widths):
            setattr(self, name, Tower(spec, mlp))
        self.names = TOWER_NAMES[:len(cfg.towers)]
        self.embed_dim = sum(t.width for t in cfg.towers)

    def towers(self) -> list[Tower]:
        return [getattr(self, n) for n in self.names]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels  # (B, 3 * towers, S, S), tower i in channels 3i..3i+2 -> features (B, N, sum of widths)"""
        chunks = pixels.split(3, dim=1)
        return torch.cat([tower(x) for tower, x in zip(self.towers(), chunks)], dim=2)


class Projector(nn.Module):
    """Upstream's PrismaticProjector: fused = fc1 (V -> 4V), GELU, fc2 (-> E), GELU, fc3 (E -> E);
    single tower = fc1 (V -> E), GELU, fc2. GELU is exact (nn.GELU())."""

    def __init__(self, fused: bool, vision_dim: int, llm_dim: int, hidden: int | None = None):
        super().__init__()
        self.fused = fused
        if fused:
            hidden = hidden or 4 * vision_dim
            self.fc1, self.fc2 = nn.Linear(vision_dim, hidden), nn.Linear(hidden, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
        else:
            self.fc1, self.fc2 = nn.Linear(vision_dim, llm_dim), nn.Linear(llm_dim, llm_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x  # (B, N, V) -> (B, N, E)"""
        x = self.fc2(self.act(self.fc1(x)))
        return self.fc3(self.act(x)) if self.fused else x


def value_head(hidden: int, seed: int = 0) -> nn.Sequential:
    """Critic on the last prefix state; a zero last layer starts it at V = 0 so early GAE is not noise.
    The first layer's draw is seeded: every process that creates a fresh head (learner ranks, rollout
    workers, a resumed run) must create the same one."""
    head = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    with torch.no_grad():
        head[0].weight.copy_(0.02 * torch.randn(head[0].weight.shape, generator=torch.Generator().manual_seed(seed),
                                                device="cpu"))
    nn.init.zeros_(head[0].bias)
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


class OpenVLAPolicy(nn.Module):
    action_kind = "token"  # the rollout engine records action token ids
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # decoder linears
    lora_trainable = ("value_head",)  # trained beside the adapters (fresh, small)

    def __init__(self, cfg: OpenVLAConfig, mlp_widths: list[int], projector_hidden: int | None = None,
                 pixel_spec: processing.PixelSpec | None = None, action_dim: int = 7):
        super().__init__()
        self.openvla = cfg  # parsed config.json
        self.config = PolicyConfig(action_dim=action_dim)
        self.pixel_spec = pixel_spec or processing.PixelSpec.for_towers([t.kind for t in cfg.towers], cfg.image_size)
        self.vision_backbone = VisionBackbone(cfg, mlp_widths)
        hidden = cfg.text.hidden_size
        self.projector = Projector(cfg.fused, self.vision_backbone.embed_dim, hidden, projector_hidden)
        self.language_model = LlamaForCausalLM(cfg.text)
        self.value_head = value_head(hidden)
        self.passthrough: dict[str, torch.Tensor] = {}  # upstream tensors no module reads (see vision.py)
        self.source_folder: Path | None = None  # the folder it was loaded from (save's default base)
        self.tokenizer = None  # set by load_openvla; reference_actions' default

    # --- the policy interface -----------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding and lm_head (padded: 32064 for openvla-7b)."""
        return self.openvla.padded_vocab_size

    @property
    def first_bin_id(self) -> int:
        """Token of action slot 0: base vocabulary (32000) - 256 = 31744, not padded vocab - 256."""
        return self.openvla.first_bin_id

    @property
    def num_bins(self) -> int:
        return self.openvla.n_action_bins

    @property
    def image_size(self) -> int:
        return self.openvla.image_size

    @property
    def bos_token_id(self) -> int:
        return self.openvla.text.bos_token_id if self.openvla.text.bos_token_id is not None else 1

    @property
    def decoder(self) -> LlamaForCausalLM:
        return self.language_model

    @staticmethod
    def encode_instruction(tokenizer, instruction: str) -> list[int]:
        """Prompt ids after `<s>`, ending in 29871 (vlarl/models/openvla/processing.py)."""
        return processing.encode_instruction(tokenizer, instruction)

    def fsdp_units(self) -> list[nn.Module]:
        """Modules FSDP shards one by one: the ViT layers and the decoder layers."""
        vit_layers = [layer for tower in self.vision_backbone.towers() for layer in tower.layers]
        return [*vit_layers, *self.language_model.model.layers]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(ids)

    def patch_embeddings(self, images) -> torch.Tensor:
        """images  # (B, H, W, 3) uint8, any size -> projected patches (B, N, E) in the model dtype.
        The processor's resize + normalisation (processing.pixel_values), shared with the reference."""
        pixels = processing.pixel_values(images, self.pixel_spec).to(self.device, self.dtype)
        return self.projector(self.vision_backbone(pixels))

    def prefix(self, images, proprio, input_ids, text_mask):
        """Build the decoder input for a batch of observations.

        images     # (B, H, W, 3) uint8 as the environment gives them
        proprio    # (B, P) float, ignored (OpenVLA reads no proprioception)
        input_ids  # (B, Li) encode_instruction ids (no <s>), LEFT-padded
        text_mask  # (B, Li) 1 for real tokens
        returns embeds (B, L, E), mask (B, L) long, positions (B, L) long; L = 1 + N + Li
        """
        patches = self.patch_embeddings(images)  # (B, N, E)
        b = input_ids.shape[0]
        bos = self.embed_tokens(torch.full((b, 1), self.bos_token_id, dtype=torch.long, device=input_ids.device))
        embeds = torch.cat([bos, patches, self.embed_tokens(input_ids)], 1)
        mask = torch.cat([text_mask.new_ones(b, 1 + patches.shape[1]), text_mask], 1).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return embeds, mask, positions

    def bin_logits(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Vocabulary logits (..., V) -> float32 logits of the 256 action ids at `temperature` (..., 256);
        slot i is token first_bin_id + i."""
        return logits[..., self.first_bin_id:self.first_bin_id + self.num_bins].float() / temperature

    def action_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Decoder states (..., E) -> float32 logits of the 256 action ids at T = 1 (..., 256), from the
        language head's 256 action rows only: the same numbers as bin_logits(lm_head(states), 1) without
        the other vocabulary rows (for a narrow decoder those rows are nearly all of the cost)."""
        head = self.language_model.lm_head
        rows = head.weight[self.first_bin_id:self.first_bin_id + self.num_bins]
        bias = None if head.bias is None else head.bias[self.first_bin_id:self.first_bin_id + self.num_bins]
        return F.linear(states, rows, bias).float()

    def forward(self, images, proprio, input_ids, text_mask, action_tokens, temperature: float = 1.0):
        """Teacher-forced scores of given action tokens, for the learner.

        action_tokens  # (B, D) token ids of the sampled actions
        returns logprobs (B, D), entropy (B, D), values (B,), all float32
        """
        embeds, mask, positions = self.prefix(images, proprio, input_ids, text_mask)
        return score_action_tokens(self, embeds, mask, positions, action_tokens, temperature)

    # --- the slow reference -------------------------------------------------------------------
    @torch.no_grad()
    def reference_actions(self, image, instruction: str, tokenizer=None, restrict_to_bins: bool = True) -> torch.Tensor:
        """Greedy action tokens (D,) for one observation, the plain upstream way (no padding, no mask,
        default positions, no KV cache: the whole sequence is re-run for each token).

        image  # (H, W, 3) uint8
        Upstream (`predict_action` -> `generate`) takes the argmax over the WHOLE vocabulary (32064
        rows), so it can emit non-action tokens, which its decoding clips into the bin range. vlarl's
        engines pick among the 256 action ids only; `restrict_to_bins=True` (default) does the same,
        False reproduces upstream's unrestricted argmax.
        """
        tokenizer = tokenizer or self.tokenizer
        ids = list(tokenizer(processing.build_prompt(instruction))["input_ids"])  # starts with <s>
        if ids[-1] != processing.EMPTY_TOKEN_ID:
            ids.append(processing.EMPTY_TOKEN_ID)
        image = torch.as_tensor(image)[None]
        patches = self.patch_embeddings(image)  # (1, N, E)
        text = self.embed_tokens(torch.tensor([ids], device=self.device))
        seq = torch.cat([text[:, :1], patches, text[:, 1:]], 1)
        tokens = []
        for _ in range(self.config.action_dim):
            logits = self.language_model(inputs_embeds=seq, use_cache=False).logits[0, -1]  # (V,)
            if restrict_to_bins:
                token = self.first_bin_id + int(logits[self.first_bin_id:self.first_bin_id + self.num_bins].argmax())
            else:
                token = int(logits.argmax())
            tokens.append(token)
            seq = torch.cat([seq, self.embed_tokens(torch.tensor([[token]], device=self.device))], 1)
        return torch.tensor(tokens, dtype=torch.long)
