"""OpenVLA-style token policy: vision encoder -> MLP projector -> LLaMA-style decoder -> action bins.

The decoder reads the prefix [instruction tokens][proprio token][image patches] and emits one
token per action dimension. Action log-probabilities are the log-softmax restricted to the 256 bin
ids at the sampling temperature, so the learner's numbers match what the rollout engine sampled.
A value head reads the decoder's hidden state at the last prefix position (before any action
token), as in VLA-RL. The instruction comes first so every image patch can attend to it: a patch
can then tell locally whether it shows the named object, which makes grounding far easier to learn
than matching at the last position. Instructions are left-padded; the attention mask hides the
padding and position ids count only real tokens, so padded and unpadded prefixes agree.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import SiglipVisionConfig, SiglipVisionModel

from vlarl.models.action_tokenizer import NUM_BINS
from vlarl.models.token_scoring import score_action_tokens


INIT_STD = 0.02  # std of every Linear and Embedding weight at build (LLaMA's initializer_range)


class TokenVLAConfig(PretrainedConfig):
    model_type = "vlarl_token_vla"

    def __init__(self, vision_config: dict | None = None, text_config: dict | None = None,
                 proprio_dim: int = 8, use_proprio: bool = True, action_dim: int = 7, **kwargs):
        self.vision_config = vision_config or {}  # SiglipVisionConfig fields
        self.text_config = text_config or {}  # LlamaConfig fields; vocab ends with the 256 bins
        self.proprio_dim = proprio_dim  # length of the proprio vector
        self.use_proprio = use_proprio  # whether a proprio token joins the prefix
        self.action_dim = action_dim  # action tokens per step
        super().__init__(**kwargs)


class TokenVLA(PreTrainedModel):
    config_class = TokenVLAConfig
    base_model_prefix = "vla"
    main_input_name = "images"
    # The policy interface (vlarl/models/family.py) besides prefix/forward/bin_logits:
    action_kind = "token"  # what the rollout engine records per step: action token ids
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # decoder linears
    lora_trainable = ("value_head", "projector", "proprio_proj")  # trained beside the adapters (small, from scratch)

    def __init__(self, config: TokenVLAConfig):
        super().__init__(config)
        vcfg, tcfg = SiglipVisionConfig(**config.vision_config), LlamaConfig(**config.text_config)
        hidden = tcfg.hidden_size
        self.vision = SiglipVisionModel(vcfg)
        self.projector = nn.Sequential(nn.Linear(vcfg.hidden_size, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.proprio_proj = nn.Linear(config.proprio_dim, hidden) if config.use_proprio else None
        self.language_model = LlamaForCausalLM(tcfg)
        self.value_head = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.post_init()
        # A zero last layer starts the critic at V = 0, so early GAE is not dominated by noise.
        nn.init.zeros_(self.value_head[-1].weight)
        nn.init.zeros_(self.value_head[-1].bias)

    def scale_token_embeddings(self, std: float) -> None:
        """Rescale the decoder's token embeddings from their init std (INIT_STD) to `std`, leaving
        every other weight and the random draw itself as built."""
        with torch.no_grad():
            self.language_model.get_input_embeddings().weight.mul_(std / INIT_STD)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=INIT_STD)

    @property
    def vocab_size(self) -> int:
        return self.config.text_config["vocab_size"]

    @property
    def image_size(self) -> int:
        """Side of the square images the model was built for (datasets are resized to it)."""
        return int(self.config.vision_config["image_size"])

    @property
    def first_bin_id(self) -> int:
        return self.vocab_size - NUM_BINS

    @property
    def decoder(self) -> LlamaForCausalLM:
        return self.language_model

    @staticmethod
    def encode_instruction(tokenizer, instruction: str) -> list[int]:
        """The instruction's token ids as `prefix` reads them: the words alone, no special tokens."""
        return tokenizer(instruction, add_special_tokens=False)["input_ids"]

    def fsdp_units(self) -> list[nn.Module]:
        """Modules FSDP shards one by one (each gathered only while it runs): the transformer layers."""
        return [*self.vision.encoder.layers, *self.language_model.model.layers]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(ids)

    def prefix(self, images, proprio, input_ids, text_mask):
        """Build the decoder input for a batch of observations.

        images     # (B, H, W, 3) uint8
        proprio    # (B, P) float
        input_ids  # (B, Li) instruction token ids, padded
        text_mask  # (B, Li) 1 for real instruction tokens
        returns embeds (B, L, E), mask (B, L) long, positions (B, L) long
        """
        pixels = images.permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0  # SigLIP's [-1, 1]
        patches = self.projector(self.vision(pixel_values=pixels).last_hidden_state)  # (B, P, E)
        parts = [self.embed_tokens(input_ids)]
        if self.proprio_proj is not None:
            parts.append(self.proprio_proj(proprio.to(self.dtype))[:, None])
        parts.append(patches)
        embeds = torch.cat(parts, 1)
        tail = embeds.shape[1] - input_ids.shape[1]
        mask = torch.cat([text_mask.long(), text_mask.new_ones(text_mask.shape[0], tail)], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return embeds, mask, positions

    def bin_logits(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Vocabulary logits (..., V) -> logits over the 256 action bins at `temperature` (..., 256)."""
        return logits[..., self.first_bin_id:self.first_bin_id + NUM_BINS].float() / temperature

    def forward(self, images, proprio, input_ids, text_mask, action_tokens, temperature: float = 1.0):
        """Teacher-forced scores of given action tokens, for the learner.

        action_tokens  # (B, D) token ids of the sampled actions
        returns logprobs (B, D), entropy (B, D), values (B,), all float32
        """
        embeds, mask, positions = self.prefix(images, proprio, input_ids, text_mask)
        return score_action_tokens(self, embeds, mask, positions, action_tokens, temperature)


# Exported folders (tools/merge_adapters.py) then load with AutoConfig / AutoModel.from_pretrained(folder)
# after `import vlarl.models`, with no trust_remote_code: the classes come from this module.
AutoConfig.register(TokenVLAConfig.model_type, TokenVLAConfig, exist_ok=True)
AutoModel.register(TokenVLAConfig, TokenVLA, exist_ok=True)
