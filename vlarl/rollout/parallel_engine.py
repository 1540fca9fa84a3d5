"""Inference for OpenVLA-OFT: the whole action chunk from one forward pass (parallel decoding).

vLLM decodes one token at a time under a causal mask, so it cannot serve the bidirectional
placeholders; these engines run the forward in PyTorch on batched prefixes. With `compile`
(rollout.compile) the decoder pass goes through torch.compile (CUDA graphs on a GPU, mode
reduce-overhead); the prefix (image preprocessing, towers) stays eager. Weight pushes update the
parameters the compiled graph reads in place.

ParallelEngine (discrete head): each placeholder's 256 bin logits at the temperature, one token
sampled per placeholder independently (or the argmax), its log-prob recorded: what the learner's
`forward` recomputes. GaussianEngine (L1 head): a draw from N(head output, exp(log_std)^2) per
element, recorded as `sampled_actions` with its exact log-density; the environment gets the draw
clipped to [-1, 1] and un-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vlarl.algo import sampling
from vlarl.models.openvla_oft.modeling import gaussian_logprob
from vlarl.rollout.hf_engine import ActionOutput, HFEngine


@dataclass
class GaussianOutput:
    samples: np.ndarray  # (B, n) float32 draws in the head's normalised units
    logprobs: np.ndarray  # (B, n) float32 their log-densities
    actions: np.ndarray  # (B, n) float32 actions in environment units

    def record(self) -> dict:
        return {"sampled_actions": self.samples}


class ParallelEngine(HFEngine):
    def __init__(self, model, tokenizer, action_tokenizer, device: str = "cpu", compile: bool = False):
        super().__init__(model, tokenizer, action_tokenizer, device)
        self.outputs = model.outputs
        if compile:
            self.outputs = torch.compile(model.outputs, mode="reduce-overhead" if device == "cuda" else None)

    def forward(self, obs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the head's outputs for the batch (bin logits (B, n, 256) or Gaussian means (B, n)), last prefix state."""
        return self.outputs(*self.model.prefix(*self.model_inputs(obs)))

    @torch.no_grad()
    def generate(self, obs: dict, temperature: float, greedy: bool = False,
                 generator: sampling.Generators = None) -> ActionOutput:
        m = self.model
        logits = self.forward(obs)[0] / temperature  # (B, n, 256)
        logp = F.log_softmax(logits.float(), -1)
        b, n, k = logp.shape
        if greedy:
            bins = logp.argmax(-1)
        else:
            rows = generator if not isinstance(generator, list) else [g for g in generator for _ in range(n)]
            bins = sampling.multinomial(logp.exp().reshape(b * n, k), rows).reshape(b, n).to(logp.device)
        tokens = (bins + m.first_bin_id).cpu().numpy()
        chosen = logp.gather(-1, bins[..., None])[..., 0]
        return ActionOutput(tokens, chosen.cpu().numpy(), self.action_tokenizer.tokens_to_actions(tokens))


class GaussianEngine(ParallelEngine):
    @torch.no_grad()
    def generate(self, obs: dict, temperature: float, greedy: bool = False,
                 generator: sampling.Generators = None) -> GaussianOutput:
        """`temperature` is unused: the spread is the policy's learned log-std."""
        mean = self.forward(obs)[0].float()  # (B, n)
        log_std = self.model.log_std().to(mean.device).expand_as(mean)
        if greedy:
            x = mean
        else:
            x = mean + log_std.exp() * sampling.randn(generator, *mean.shape).to(mean.device)
        samples = x.cpu().numpy()
        return GaussianOutput(samples, gaussian_logprob(x, mean, log_std).cpu().numpy(),
                              self.action_tokenizer.normalized_to_actions(samples))

    def demonstration(self, actions: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
        """Expert actions (B, n) in env units -> their normalised values as the record, zero
        log-probs, and what the environment then executes."""
        normalized = self.action_tokenizer.actions_to_normalized(actions)
        return {"sampled_actions": normalized}, np.zeros(normalized.shape, np.float32), \
            self.action_tokenizer.normalized_to_actions(normalized)
