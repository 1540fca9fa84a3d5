"""Inference for flow VLAs: one prefix encoding, K expert calls, a stochastic chain per observation.

Same interface as the token engine (`generate`, `demonstration`, `load_state_dict`); the per-step
record it hands the rollout worker is the denoising chain and its SDE step index, which is what
the learner needs to recompute the action's log-prob (vlarl/models/tiny_flow/modeling.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlarl.algo import sampling
from vlarl.rollout.hf_engine import HFEngine
from vlarl.rollout.parallel_engine import GaussianEngine, ParallelEngine


@dataclass
class FlowActionOutput:
    chains: np.ndarray  # (B, K+1, A) float32 denoising chain x_1 (noise) .. x_0 (normalised action)
    sde_steps: np.ndarray  # (B,) int64 index of the Gaussian step (Flow-SDE), -1 otherwise
    logprobs: np.ndarray  # (B, W) float32 per-element log-densities of the Gaussian step(s) (FlowVLA.logprob_width)
    actions: np.ndarray  # (B, A) float32 actions in environment units

    def record(self) -> dict:
        """Per-step arrays for the TrajectoryBatch, keyed by field name."""
        return {"chains": self.chains, "sde_steps": self.sde_steps}


class FlowEngine(HFEngine):
    def __init__(self, model, tokenizer, action_tokenizer, device: str = "cpu", compile: bool = False):
        """compile: the model's velocity (its per-step work: the expert against the prefix cache) through
        torch.compile, with CUDA graphs on a GPU; the prefix encoding and the sampler stay eager. The
        first calls compile (tens of seconds); weight pushes update the parameters it reads in place."""
        super().__init__(model, tokenizer, action_tokenizer, device)
        if compile:
            self.model.velocity = torch.compile(self.model.velocity, dynamic=False,
                                                mode="reduce-overhead" if device == "cuda" else None)

    @torch.no_grad()
    def generate(self, obs: dict, temperature: float, greedy: bool = False,
                 generator: sampling.Generators = None) -> FlowActionOutput:
        """obs: image (B, H, W, 3) uint8, proprio (B, P), instruction list of B str -> FlowActionOutput.
        `temperature` is unused: the sampler's noise is set by model.flow; greedy is the plain ODE.
        With one generator per row, each row's noise comes from its own (vlarl/algo/sampling.py)."""
        chains, sde_steps, logprobs, x0 = self.model.sample(*self.model_inputs(obs), greedy=greedy, generator=generator)
        normalized = x0.float().cpu().numpy()
        if self.model.bounded_actions:  # q01/q99-normalised policies; mean/std ones (pi0) are not bounded
            normalized = np.clip(normalized, -1, 1)
        return FlowActionOutput(chains.float().cpu().numpy(), sde_steps.cpu().numpy(),
                                logprobs.float().cpu().numpy(),
                                self.action_tokenizer.unnormalize(normalized))

    def demonstration(self, actions: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
        """Expert actions (B, A) in env units -> (record, logprobs (B, W) zeros, executed actions). The
        chain holds only x_0 (the normalised action), all the flow-matching warm start reads."""
        normalized = self.action_tokenizer.normalize(actions)
        chains = np.zeros((len(actions), self.model.num_steps + 1, normalized.shape[1]), np.float32)
        chains[:, -1] = normalized
        record = {"chains": chains, "sde_steps": np.full(len(actions), -1, np.int64)}
        return record, np.zeros((len(actions), self.model.logprob_width), np.float32), \
            self.action_tokenizer.unnormalize(normalized)


# the model's `action_kind` -> its PyTorch engine
ENGINES = {"token": HFEngine, "flow": FlowEngine, "parallel": ParallelEngine, "gaussian": GaussianEngine}


def make_engine(model, tokenizer, action_tokenizer, device: str, compile: bool = False) -> HFEngine:
    """The PyTorch engine that fits the model's `action_kind`; `compile` (rollout.compile) compiles a
    flow policy's denoising step or a parallel decoder's forward."""
    if not compile:
        return ENGINES[model.action_kind](model, tokenizer, action_tokenizer, device)
    if model.action_kind == "token":
        raise ValueError("rollout.compile compiles a flow policy's denoising step or a parallel decoder's forward; "
                         "this model decodes tokens one by one: set rollout.compile=false (or rollout.engine=vllm "
                         "for a fast token engine).")
    return ENGINES[model.action_kind](model, tokenizer, action_tokenizer, device, compile=True)
