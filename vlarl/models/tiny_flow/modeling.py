"""pi0-style flow policy: the token VLA's prefix encoder + an action expert that denoises a chunk.

The prefix is the token VLA's (instruction, proprio token, image patches through the vision encoder,
projector and decoder). The action expert is a small transformer whose H action tokens (one per
step of the chunk, D values each) attend to each other and, by cross-attention, to the decoder's
last hidden states over the prefix; it predicts the flow-matching velocity v(x_t, t). The prefix is
encoded once per call and the expert runs K times on it.

Sampling for RL (formulas in vlarl/algo/flow.py and ANCHORS.md): `sde` makes one randomly chosen
denoising step Gaussian and the rest Euler ODE steps, the action's log-prob being that step's
density; `sde_all` makes every step a Flow-SDE Gaussian (RLinf's joint log-prob), the log-prob
being the chain's joint density; `noise` adds a learned std (squashed into [noise_min, noise_max])
to every step instead. Log-probs stay per element (each action value of each Gaussian step), so PPO
clips one ratio per element as it clips one per token for the token VLA (a single ratio of the
whole 7-D, or K x 7-D, density swings with every dimension at once: on the toy task its updates
moved the policy 5-10x further per minibatch). With `sde` the Euler steps around the Gaussian one
depend on the weights too but carry no density, so PPO's gradient leaves their change out. The
other two credit every step; `sde_all` is the default: its noise is largest at the first steps
(std 0.5 at t = 1), where the chain picks its mode, and its score-corrected mean keeps the
sampled chain's marginals close to the ODE's that evaluation runs (README, Flow policies, has the
measurements).
Evaluation is the plain ODE. A sampled chain x_1 (noise) .. x_0 (action) and the SDE step index
are all the learner needs to recompute the log-prob under new parameters: `pack_chains` flattens
them into one float row per policy call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel

from vlarl.algo.flow import (floor_std, gaussian_entropy, gaussian_logprob, sde_mean, sde_sigma, squash_std,
                             step_times)
from vlarl.models.tiny_token.modeling import TokenVLA, TokenVLAConfig
from vlarl.algo import sampling

METHODS = ("sde", "sde_all", "noise")


class FlowVLAConfig(TokenVLAConfig):
    model_type = "vlarl_flow_vla"

    def __init__(self, step_dim: int = 7, horizon: int = 1, expert_hidden: int = 64, expert_layers: int = 2,
                 expert_heads: int = 4, method: str = "sde_all", num_steps: int = 4, noise_level: float = 0.5,
                 noise_min: float = 0.08, noise_max: float = 0.16, std_floor: float = 0.05, **kwargs):
        self.step_dim = step_dim  # D: values per action (7 for LIBERO and the toy)
        self.horizon = horizon  # H: actions per chunk (= env.action_chunk)
        self.expert_hidden = expert_hidden  # action expert width
        self.expert_layers = expert_layers  # action expert depth (self- + cross-attention blocks)
        self.expert_heads = expert_heads  # action expert attention heads
        self.method = method  # RL sampler: sde (Flow-SDE, one step) | sde_all (Flow-SDE, every step) | noise (Flow-Noise)
        self.num_steps = num_steps  # K denoising steps
        self.noise_level = noise_level  # Flow-SDE a
        self.noise_min = noise_min  # Flow-Noise std range, low end
        self.noise_max = noise_max  # Flow-Noise std range, high end
        self.std_floor = std_floor  # no Gaussian step has a std below this
        kwargs["action_dim"] = step_dim * horizon  # values per policy call, as for the token VLA
        super().__init__(**kwargs)


def pack_chains(chains: torch.Tensor, sde_steps: torch.Tensor) -> torch.Tensor:
    """chains (S, K+1, A), sde_steps (S,) -> one float32 row per call (S, (K+1) * A + 1)."""
    return torch.cat([chains.flatten(1).float(), sde_steps.float()[:, None]], 1)


def unpack_chains(packed: torch.Tensor, num_steps: int, action_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_chains`: -> chains (S, K+1, A), sde_steps (S,) long."""
    return packed[:, :-1].reshape(len(packed), num_steps + 1, action_dim), packed[:, -1].round().long()


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1]: (B,) -> (B, dim)."""
    freqs = torch.exp(torch.arange(dim // 2, device=t.device, dtype=torch.float32) * (-math.log(1000.0) / (dim // 2)))
    angles = t.float()[:, None] * 1000.0 * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


class ActionExpert(nn.Module):
    """H action tokens (noisy action + time + position) -> self-attention, cross-attention to the
    prefix -> velocity (and, for Flow-Noise, the raw std) per action value."""

    def __init__(self, cfg: FlowVLAConfig, prefix_hidden: int):
        super().__init__()
        e = cfg.expert_hidden
        self.action_in = nn.Linear(cfg.step_dim, e)
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.position = nn.Parameter(torch.zeros(cfg.horizon, e))
        self.memory_proj = nn.Linear(prefix_hidden, e)
        layer = nn.TransformerDecoderLayer(e, cfg.expert_heads, 2 * e, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(layer, cfg.expert_layers)
        self.norm = nn.LayerNorm(e)
        self.velocity_out = nn.Linear(e, cfg.step_dim)
        # Flow-Noise's noise network: a small head on the expert's features, so the std can depend
        # on the observation, the step and the action value being denoised.
        self.noise_out = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, cfg.step_dim))
        self.horizon, self.step_dim, self.width = cfg.horizon, cfg.step_dim, e

    def forward(self, memory, pad, x, t):
        """memory (B, L, E) projected prefix, pad (B, L) bool True on padding, x (B, H*D), t (B,)
        -> velocity (B, H*D), raw std (B, H*D)"""
        b = x.shape[0]
        h = self.action_in(x.view(b, self.horizon, self.step_dim)) + self.position
        h = h + self.time_mlp(time_embedding(t, self.width))[:, None]
        h = self.norm(self.blocks(h, memory, memory_key_padding_mask=pad))
        return self.velocity_out(h).reshape(b, -1), self.noise_out(h).reshape(b, -1)


class FlowVLA(TokenVLA):
    """Same vision encoder, projector, decoder and value head as the token VLA, plus the expert."""

    config_class = FlowVLAConfig
    action_kind = "flow"  # the rollout engine records denoising chains (vlarl/rollout/flow_engine.py)
    # FSDP2 wraps forward(); the learner registers these methods too so they see gathered weights.
    fsdp_forward_methods = ("flow_matching_loss",)

    def __init__(self, config: FlowVLAConfig):
        super().__init__(config)
        self.expert = ActionExpert(config, self.language_model.config.hidden_size)
        for m in self.expert.modules():
            if isinstance(m, nn.Linear):
                self._init_weights(m)

    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    @property
    def logprob_width(self) -> int:
        """Log-prob elements per policy call, each with its own PPO ratio (as the token VLA has one per
        token): `sde`, the A values of its one Gaussian step; `sde_all` and `noise`, the K*A values of
        their K steps. Their sum is the chain's log-density (for the latter two up to log N(x_1; 0, I),
        which no parameter changes and which is left out)."""
        return self.config.action_dim * (1 if self.single_gaussian_step else self.config.num_steps)

    @property
    def single_gaussian_step(self) -> bool:
        """Flow-SDE proper: one random step per chain is Gaussian. sde_all and noise make every step one."""
        return self.config.method == "sde"

    # ---- shared pieces -----------------------------------------------------------------------
    def encode(self, images, proprio, input_ids, text_mask):
        """Prefix -> memory (B, L, E_expert), pad (B, L) bool, values (B,) float32."""
        embeds, mask, positions = self.prefix(images, proprio, input_ids, text_mask)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]  # (B, L, E)
        values = self.value_head(hidden[:, -1])[:, 0].float()
        return self.expert.memory_proj(hidden), mask == 0, values

    def step_std(self, t: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Std of the Gaussian step from time t (B,): Flow-SDE sigma_t sqrt(delta), Flow-Noise the
        squashed learned std (B, A); before the floor."""
        c = self.config
        if c.method != "noise":
            return (sde_sigma(t, c.num_steps, c.noise_level) * math.sqrt(1.0 / c.num_steps))[:, None].expand_as(raw)
        return squash_std(raw, c.noise_min, c.noise_max)

    def gaussian_step(self, x, v, raw, t):
        """Mean and floored std of the stochastic step from x at time t; -> mean, std (B, A), floor fraction."""
        c, delta = self.config, 1.0 / self.config.num_steps
        std, at_floor = floor_std(self.step_std(t, raw), c.std_floor)
        if c.method != "noise":
            sigma = sde_sigma(t, c.num_steps, c.noise_level)[:, None]
            return sde_mean(x, v, t[:, None], sigma, delta), std, at_floor
        return x - delta * v, std, at_floor

    # ---- rollout -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, images, proprio, input_ids, text_mask, greedy: bool = False,
               generator: sampling.Generators = None):
        """Denoise one chunk per observation. Noise comes from `generator` on the CPU (one per row, or
        one for the batch: vlarl/algo/sampling.py), so one seed gives the same draws on any device
        and a row's draws do not depend on its batch-mates. Greedy runs the plain ODE (evaluation).
        -> chains (B, K+1, A), sde_steps (B,) long (-1 when no single SDE step),
           logprobs (B, logprob_width) per element (zeros when greedy), x_0 (B, A)"""
        c, k_total = self.config, self.config.num_steps
        memory, pad, _ = self.encode(images, proprio, input_ids, text_mask)
        b, a, dev = memory.shape[0], c.action_dim, memory.device
        randn = lambda: sampling.randn(generator, b, a).to(dev)  # noqa: E731
        x = randn()
        chain, step_logprobs = [x], []
        sde_steps = torch.full((b,), -1, dtype=torch.long)
        if not greedy and self.single_gaussian_step:
            sde_steps = sampling.randint(generator, k_total, b)
        times = step_times(k_total).to(dev)
        for k in range(k_total):
            t = times[k].expand(b)
            v, raw = self.expert(memory, pad, x, t)
            ode = x - v / k_total
            if greedy:
                x = ode
            else:
                mean, std, _ = self.gaussian_step(x, v, raw, t)
                noisy = mean + std * randn()
                take = ((sde_steps.to(dev) == k)[:, None] if self.single_gaussian_step
                        else torch.ones_like(ode[:, :1], dtype=torch.bool))
                step_logprobs.append(torch.where(take, gaussian_logprob(noisy, mean, std), 0.0))
                x = torch.where(take, noisy, ode)
            chain.append(x)
        if greedy:
            logprob = x.new_zeros(b, self.logprob_width)
        elif self.single_gaussian_step:  # the one Gaussian step's elements; the other steps contributed zeros
            logprob = torch.stack(step_logprobs).sum(0)
        else:
            logprob = torch.cat(step_logprobs, 1)
        return torch.stack(chain, 1), sde_steps, logprob, x

    # ---- learner -------------------------------------------------------------------------------
    def forward(self, images, proprio, input_ids, text_mask, action_tokens, temperature: float = 1.0):
        """Log-prob of stored chains under the current parameters, for the learner.

        action_tokens  # (B, (K+1)*A + 1) packed chains and SDE step indices (`pack_chains`)
        temperature    # unused: a flow policy's noise is set by its sampler, not a temperature
        returns logprobs (B, W), entropy (B, W), values (B,), stats {name: scalar tensor}, with
        W = `logprob_width` Gaussian elements (see `logprob_width`)
        """
        c, k_total = self.config, self.config.num_steps
        chains, sde_steps = unpack_chains(action_tokens.float(), k_total, c.action_dim)
        memory, pad, values = self.encode(images, proprio, input_ids, text_mask)
        b, times = chains.shape[0], step_times(k_total).to(chains.device)
        if self.single_gaussian_step:  # one Gaussian step per chain: only its velocity is needed
            k = sde_steps.clamp(min=0)
            rows = torch.arange(b, device=chains.device)
            x, x_next, t = chains[rows, k], chains[rows, k + 1], times[k]
            v, raw = self.expert(memory, pad, x, t)
            mean, std, at_floor = self.gaussian_step(x, v, raw, t)
        else:  # every step is Gaussian: run the K steps as one batch of B*K
            x, x_next = chains[:, :-1].reshape(b * k_total, -1), chains[:, 1:].reshape(b * k_total, -1)
            t = times.repeat(b)
            v, raw = self.expert(memory.repeat_interleave(k_total, 0), pad.repeat_interleave(k_total, 0), x, t)
            mean, std, at_floor = self.gaussian_step(x, v, raw, t)
        logprobs = gaussian_logprob(x_next, mean, std).reshape(b, -1)  # (B, A) or (B, K*A), step-major
        entropy = gaussian_entropy(std).reshape(b, -1)
        stats = {"actor/std_at_floor": at_floor.detach(), "actor/std_mean": std.detach().mean()}
        # Fresh tensors, not views: FSDP2 hooks the outputs for backward and warns on views.
        return logprobs.float().clone(), entropy.float().clone(), values.clone(), stats

    def flow_matching_loss(self, images, proprio, input_ids, text_mask, action_tokens,
                           generator: torch.Generator | None = None):
        """Supervised flow matching on demonstrations (the warm start), per example (B,).

        action_tokens  # (B, (K+1)*A + 1) packed chains whose last element x_0 is the demo action
        x_t = t * eps + (1 - t) * x_0 with t ~ U(0, 1); the target velocity is eps - x_0. t and eps
        come from `generator` (a CPU generator, so one seed gives the same warm start on any device).
        """
        chains, _ = unpack_chains(action_tokens.float(), self.config.num_steps, self.config.action_dim)
        x0 = chains[:, -1]
        memory, pad, _ = self.encode(images, proprio, input_ids, text_mask)
        t = torch.rand(x0.shape[0], generator=generator).to(x0.device)
        eps = sampling.randn(generator, *x0.shape).to(x0.device, x0.dtype)
        v, _ = self.expert(memory, pad, t[:, None] * eps + (1 - t[:, None]) * x0, t)
        return F.mse_loss(v, eps - x0, reduction="none").mean(-1)


AutoConfig.register(FlowVLAConfig.model_type, FlowVLAConfig, exist_ok=True)
AutoModel.register(FlowVLAConfig, FlowVLA, exist_ok=True)
