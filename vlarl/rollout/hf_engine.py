"""The plain PyTorch inference engine: batched action-token generation with a KV cache.

The reference engine (CPU or GPU). One call encodes the prefix once, then generates the D action
tokens one at a time from the cache, sampling from the 256 bin logits at the temperature (or
taking the argmax in greedy mode) and recording each token's log-probability at that temperature,
exactly what the learner recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vlarl.algo import sampling


@dataclass
class ActionOutput:
    tokens: np.ndarray  # (B, D) int64 action token ids
    logprobs: np.ndarray  # (B, D) float32 rollout log-probs of the tokens at the temperature
    actions: np.ndarray  # (B, D) float32 actions in environment units

    def record(self) -> dict:
        """Per-step arrays for the TrajectoryBatch, keyed by field name."""
        return {"action_tokens": self.tokens}


class InstructionCache:
    """Tokenises each distinct instruction once, in the model's own prompt (`encode_instruction`);
    batches are left-padded to the longest."""

    def __init__(self, tokenizer, model):
        self.tokenizer = tokenizer
        self.encode_instruction = model.encode_instruction
        self._ids: dict[str, list[int]] = {}

    def encode(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids (B, Li), text_mask (B, Li)"""
        for text in set(instructions) - self._ids.keys():
            self._ids[text] = self.encode_instruction(self.tokenizer, text)
        rows = [self._ids[t] for t in instructions]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return ids, mask


class HFEngine:
    def __init__(self, model, tokenizer, action_tokenizer, device: str = "cpu"):
        """model: a token policy (vlarl/models/family.py, model level); action_tokenizer: its family's."""
        self.model = model.to(device).eval()
        self.instructions = InstructionCache(tokenizer, model)
        self.action_tokenizer = action_tokenizer
        self.device = device

    def model_inputs(self, obs: dict) -> tuple[torch.Tensor, ...]:
        """Observation batch -> (images, proprio, input_ids, text_mask) tensors on the device."""
        ids, mask = self.instructions.encode(obs["instruction"])
        t = lambda x: torch.as_tensor(x).to(self.device)  # noqa: E731
        return t(obs["image"]), t(obs["proprio"]), t(ids), t(mask)

    @torch.no_grad()
    def generate(self, obs: dict, temperature: float, greedy: bool = False,
                 generator: sampling.Generators = None) -> ActionOutput:
        """obs: image (B, H, W, 3) uint8, proprio (B, P), instruction list of B str -> ActionOutput.
        `generator`: one for the batch or one per row (vlarl/algo/sampling.py)."""
        m = self.model
        embeds, mask, positions = m.prefix(*self.model_inputs(obs))
        out = m.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                               use_cache=True, logits_to_keep=1)
        cache, pos = out.past_key_values, positions[:, -1:]
        tokens, logprobs = [], []
        for d in range(m.config.action_dim):
            logp = F.log_softmax(m.bin_logits(out.logits[:, -1], temperature), -1)  # (B, 256)
            if greedy:
                bins = logp.argmax(-1)
            else:
                bins = sampling.multinomial(logp.exp(), generator).to(logp.device)
            tokens.append(bins + m.first_bin_id)
            logprobs.append(logp.gather(-1, bins[:, None]).squeeze(-1))
            if d + 1 == m.config.action_dim:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            pos = pos + 1
            out = m.language_model(inputs_embeds=m.embed_tokens(tokens[-1][:, None]), attention_mask=mask,
                                   position_ids=pos, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        tok = torch.stack(tokens, 1).cpu().numpy()
        return ActionOutput(tok, torch.stack(logprobs, 1).float().cpu().numpy(),
                            self.action_tokenizer.tokens_to_actions(tok))

    def demonstration(self, actions: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
        """Expert actions (B, D) in env units -> (record, logprobs, executed actions): the actions'
        bin tokens, zero log-probs, and the bin centres the environment then executes."""
        at = self.action_tokenizer
        tokens = at.actions_to_tokens(actions)
        return {"action_tokens": tokens}, np.zeros(tokens.shape, np.float32), at.tokens_to_actions(tokens)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """In-place weight update from the learner (full, merged parameter names)."""
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if unexpected or [k for k in missing if not k.startswith("value_head")]:
            raise RuntimeError(f"weight push does not fit the rollout model: missing {missing[:3]}, unexpected {unexpected[:3]}.")
