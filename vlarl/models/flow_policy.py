"""Sampling and log-probs shared by every flow policy (the tiny flow VLA, pi0, ...).

A flow family's nn.Module mixes in `FlowPolicy` and provides two methods:

| method | returns |
|---|---|
| `encode_context(images, proprio, input_ids, text_mask)` | `(context, values (B,) float32)`: whatever the velocity needs (a memory, a KV cache, ...), computed once per call |
| `velocity(context, x, t)` | `(v (B, A), raw_std (B, A))` for the flattened chunk x (B, A) at times t (B,) |

and a config with the sampler settings `method`, `num_steps`, `noise_level`, `noise_min`,
`noise_max`, `std_floor` and `action_dim` (A, values per policy call). `context` is a tensor or a
nest of tuples/lists/dicts of tensors with the batch first (so the learner can repeat it per
denoising step); a model whose context is not may override `repeat_context`.

The flow state x may be wider than what the environment executes (pi0 denoises a padded 50 x 32
chunk and executes a few 7-D actions of it): such a model overrides `flow_width` (values in x),
`executed(x)` (flow state (B, flow_width) -> executed values (B, action_dim)) and `embed_executed`
(the inverse for demonstrations, with a mask of the elements known). Log-probs and actions are
those of the executed elements; chains hold the whole flow state.

Sampling for RL (formulas in vlarl/algo/flow.py and ANCHORS.md): `sde` makes one randomly chosen
denoising step Gaussian and the rest Euler ODE steps, the action's log-prob being that step's
density; `sde_all` makes every step a Flow-SDE Gaussian (RLinf's joint log-prob); `noise` adds a
learned std (squashed into [noise_min, noise_max]) to every step instead. Log-probs stay per element
(each action value of each Gaussian step), so PPO clips one ratio per element as it clips one per
token for the token VLA (a single ratio of the whole density swings with every dimension at once:
on the toy task its updates moved the policy 5-10x further per minibatch). With `sde` the Euler
steps around the Gaussian one depend on the weights too but carry no density, so PPO's gradient
leaves their change out; the other two credit every step. `sde_all` is the default: its noise is
largest at the first steps (std 0.5 at t = 1), where the chain picks its mode, and its
score-corrected mean keeps the sampled chain's marginals close to the ODE's that evaluation runs
(README, Flow policies). Evaluation is the plain ODE. A sampled chain x_1 (noise) .. x_0 (action)
and the SDE step index are all the learner needs to recompute the log-prob under new parameters:
`pack_chains` flattens them into one float row per policy call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlarl.algo import sampling
from vlarl.algo.flow import (
    floor_std,
    gaussian_entropy,
    gaussian_logprob,
    sde_mean,
    sde_sigma,
    squash_std,
    step_times,
)

METHODS = ("sde", "sde_all", "noise")


def pack_chains(chains: torch.Tensor, sde_steps: torch.Tensor) -> torch.Tensor:
    """chains (S, K+1, A), sde_steps (S,) -> one float32 row per call (S, (K+1) * A + 1)."""
    return torch.cat([chains.flatten(1).float(), sde_steps.float()[:, None]], 1)


def unpack_chains(packed: torch.Tensor, num_steps: int, action_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_chains`: -> chains (S, K+1, A), sde_steps (S,) long."""
    return packed[:, :-1].reshape(len(packed), num_steps + 1, action_dim), packed[:, -1].round().long()


def repeat_rows(nest, repeats: int):
    """Every tensor of a nest (tensor, tuple, list, dict) with each batch row repeated `repeats` times."""
    if isinstance(nest, torch.Tensor):
        return nest.repeat_interleave(repeats, 0)
    if isinstance(nest, (tuple, list)):
        return type(nest)(repeat_rows(x, repeats) for x in nest)
    if isinstance(nest, dict):
        return {k: repeat_rows(v, repeats) for k, v in nest.items()}
    return nest


class FlowPolicy:
    """Flow-SDE / Flow-Noise sampler and log-prob recomputation over `encode_context` and `velocity`."""

    action_kind = "flow"  # the rollout engine records denoising chains (vlarl/rollout/flow_engine.py)
    bounded_actions = True  # normalised actions live in [-1, 1] (q01/q99 statistics): the engine clips x_0
    # FSDP2 wraps forward(); the learner registers these methods too so they see gathered weights.
    fsdp_forward_methods = ("flow_matching_loss",)

    def encode_context(self, images, proprio, input_ids, text_mask):
        """-> context (what `velocity` reads), values (B,) float32."""
        raise NotImplementedError

    def velocity(self, context, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, A), t (B,) -> velocity (B, A), raw std (B, A) (Flow-Noise's, before squashing)."""
        raise NotImplementedError

    @property
    def flow_width(self) -> int:
        """Values in the flow state x (the chain's width)."""
        return self.config.action_dim

    def executed(self, x: torch.Tensor) -> torch.Tensor:
        """Flow state (N, flow_width) -> the values the environment executes (N, action_dim)."""
        return x

    def embed_executed(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Executed values (N, action_dim) -> flow state (N, flow_width), mask of known elements (None: all)."""
        return actions, None

    def repeat_context(self, context, repeats: int):
        """The context with each row repeated `repeats` times (the learner scores K steps as one batch)."""
        return repeat_rows(context, repeats)

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
           logprobs (B, logprob_width) per element (zeros when greedy), executed x_0 (B, action_dim);
           A = flow_width"""
        k_total = self.config.num_steps
        context, values = self.encode_context(images, proprio, input_ids, text_mask)
        b, a, dev = values.shape[0], self.flow_width, values.device
        randn = lambda: sampling.randn(generator, b, a).to(dev)  # noqa: E731
        x = randn()
        chain, step_logprobs = [x], []
        sde_steps = torch.full((b,), -1, dtype=torch.long)
        if not greedy and self.single_gaussian_step:
            sde_steps = sampling.randint(generator, k_total, b)
        times = step_times(k_total).to(dev)
        for k in range(k_total):
            t = times[k].expand(b)
            v, raw = self.velocity(context, x, t)
            ode = x - v / k_total
            if greedy:
                x = ode
            else:
                mean, std, _ = self.gaussian_step(x, v, raw, t)
                noisy = mean + std * randn()
                take = ((sde_steps.to(dev) == k)[:, None] if self.single_gaussian_step
                        else torch.ones_like(ode[:, :1], dtype=torch.bool))
                lp = gaussian_logprob(self.executed(noisy), self.executed(mean), self.executed(std))
                step_logprobs.append(torch.where(take, lp, 0.0))
                x = torch.where(take, noisy, ode)
            chain.append(x)
        if greedy:
            logprob = x.new_zeros(b, self.logprob_width)
        elif self.single_gaussian_step:  # the one Gaussian step's elements; the other steps contributed zeros
            logprob = torch.stack(step_logprobs).sum(0)
        else:
            logprob = torch.cat(step_logprobs, 1)
        return torch.stack(chain, 1), sde_steps, logprob, self.executed(x)

    # ---- learner -------------------------------------------------------------------------------
    def forward(self, images, proprio, input_ids, text_mask, action_tokens, temperature: float = 1.0):
        """Log-prob of stored chains under the current parameters, for the learner.

        action_tokens  # (B, (K+1)*A + 1) packed chains and SDE step indices (`pack_chains`)
        temperature    # unused: a flow policy's noise is set by its sampler, not a temperature
        returns logprobs (B, W), entropy (B, W), values (B,), stats {name: scalar tensor}, with
        W = `logprob_width` Gaussian elements (see `logprob_width`)
        """
        k_total = self.config.num_steps
        chains, sde_steps = unpack_chains(action_tokens.float(), k_total, self.flow_width)
        context, values = self.encode_context(images, proprio, input_ids, text_mask)
        b, times = chains.shape[0], step_times(k_total).to(chains.device)
        if self.single_gaussian_step:  # one Gaussian step per chain: only its velocity is needed
            k = sde_steps.clamp(min=0)
            rows = torch.arange(b, device=chains.device)
            x, x_next, t = chains[rows, k], chains[rows, k + 1], times[k]
            v, raw = self.velocity(context, x, t)
        else:  # every step is Gaussian: run the K steps as one batch of B*K
            x, x_next = chains[:, :-1].reshape(b * k_total, -1), chains[:, 1:].reshape(b * k_total, -1)
            t = times.repeat(b)
            v, raw = self.velocity(self.repeat_context(context, k_total), x, t)
        mean, std, at_floor = self.gaussian_step(x, v, raw, t)
        std = self.executed(std)
        logprobs = gaussian_logprob(self.executed(x_next), self.executed(mean), std).reshape(b, -1)  # (B, W) step-major
        entropy = gaussian_entropy(std).reshape(b, -1)
        stats = {"actor/std_at_floor": at_floor.detach(), "actor/std_mean": std.detach().mean()}
        # Fresh tensors, not views: FSDP2 hooks the outputs for backward and warns on views.
        return logprobs.float().clone(), entropy.float().clone(), values.clone(), stats

    def flow_matching_loss(self, images, proprio, input_ids, text_mask, action_tokens,
                           generator: torch.Generator | None = None):
        """Supervised flow matching on demonstrations (the warm start), per example (B,).

        action_tokens  # (B, (K+1)*W + 1) packed chains whose last element x_0 is the demo action, W
                       # flow_width, or action_dim (executed values only: the rest of x_0 is unknown)
        x_t = t * eps + (1 - t) * x_0 with t ~ U(0, 1); the target velocity is eps - x_0, compared on
        the known elements. t and eps come from `generator` (a CPU generator, so one seed gives the
        same warm start on any device).
        """
        k_total = self.config.num_steps
        width = (action_tokens.shape[1] - 1) // (k_total + 1)
        chains, _ = unpack_chains(action_tokens.float(), k_total, width)
        x0, known = chains[:, -1], None
        if width != self.flow_width:
            x0, known = self.embed_executed(x0)
        context, _ = self.encode_context(images, proprio, input_ids, text_mask)
        t = torch.rand(x0.shape[0], generator=generator).to(x0.device)
        eps = sampling.randn(generator, *x0.shape).to(x0.device, x0.dtype)
        v, _ = self.velocity(context, t[:, None] * eps + (1 - t[:, None]) * x0, t)
        err = F.mse_loss(v, eps - x0, reduction="none")
        if known is None:
            return err.mean(-1)
        return (err * known).sum(-1) / known.sum(-1).clamp(min=1)
