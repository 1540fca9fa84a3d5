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
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import SiglipVisionConfig, SiglipVisionModel

from vlarl.algo.losses import entropy_from_logits
from vlarl.models.action_tokenizer import NUM_BINS


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

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def vocab_size(self) -> int:
        return self.config.text_config["vocab_size"]

    @property
    def first_bin_id(self) -> int:
        return self.vocab_size - NUM_BINS

    @property
    def decoder(self) -> LlamaForCausalLM:
        return self.language_model

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
        return logits[..., self.first_bin_id:].float() / temperature

    def forward(self, images, proprio, input_ids, text_mask, action_tokens, temperature: float = 1.0):
        """Teacher-forced scores of given action tokens, for the learner.

        action_tokens  # (B, D) token ids of the sampled actions
        returns logprobs (B, D), entropy (B, D), values (B,), all float32
        """
        embeds, mask, positions = self.prefix(images, proprio, input_ids, text_mask)
        d = action_tokens.shape[1]
        act = self.embed_tokens(action_tokens[:, :-1])  # the last action token predicts nothing
        act_pos = positions[:, -1:] + torch.arange(1, d, device=positions.device)
        out = self.language_model(
            inputs_embeds=torch.cat([embeds, act], 1),
            attention_mask=torch.cat([mask, mask.new_ones(mask.shape[0], d - 1)], 1),
            position_ids=torch.cat([positions, act_pos], 1),
            output_hidden_states=True,
            logits_to_keep=d,  # positions L-1 .. L+D-2 predict action tokens 0 .. D-1
        )
        logits = self.bin_logits(out.logits, temperature)  # (B, D, 256)
        logp_all = F.log_softmax(logits, -1)
        bins = (action_tokens - self.first_bin_id).long()
        logprobs = logp_all.gather(-1, bins[..., None])[..., 0]
        entropy = entropy_from_logits(logits)
        last_prefix = out.hidden_states[-1][:, embeds.shape[1] - 1]  # (B, E)
        values = self.value_head(last_prefix)[:, 0].float()
        # Fresh tensors, not views: FSDP2 hooks the outputs for backward and warns on views.
        return logprobs.clone(), entropy, values.clone()


# Exported folders (tools/merge_adapters.py) then load with AutoConfig / AutoModel.from_pretrained(folder)
# after `import vlarl.models`, with no trust_remote_code: the classes come from this module.
AutoConfig.register(TokenVLAConfig.model_type, TokenVLAConfig, exist_ok=True)
AutoModel.register(TokenVLAConfig, TokenVLA, exist_ok=True)
