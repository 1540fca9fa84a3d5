"""Flow VLA: exact Gaussian log-probs of stored chains, ratio 1 on recompute, gradients, guard rails."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from vlarl.algo.flow import gaussian_logprob, sde_mean, sde_sigma, step_times
from vlarl.algo.guards import clip_log_ratio, kl_to_reference
from vlarl.config import load_config
from vlarl.envs import make_env
from vlarl.models.registry import build_tiny_model, load_model, save_model
from vlarl.models.flow_policy import pack_chains, unpack_chains
from vlarl.models.tiny_flow.modeling import FlowVLA

B = 6


def tiny(method: str = "sde", chunk: int = 1) -> tuple[FlowVLA, tuple]:
    cfg = load_config(["env=toy", "model=tiny_flow", f"model.flow.method={method}", "model.tiny.hidden=32",
                       "model.tiny.vision_hidden=32", "model.flow.expert_hidden=32", f"env.action_chunk={chunk}"])
    env = make_env(cfg.env, B, 0)
    model, tok, _ = build_tiny_model(cfg.model, cfg.env.image_size, env.instructions(), 0, chunk)
    obs = env.reset(list(range(B)) if B <= 4 else [i % 4 for i in range(B)], list(range(B)))
    enc = tok(obs["instruction"], add_special_tokens=False, padding=True, return_tensors="pt")
    inputs = (torch.as_tensor(obs["image"]), torch.as_tensor(obs["proprio"]), enc["input_ids"], enc["attention_mask"])
    return model.eval(), inputs


def test_sde_step_logprob_equals_torch_normal():
    """One Flow-SDE transition, by hand from ANCHORS.md, scored by torch.distributions.Normal."""
    g = torch.Generator().manual_seed(0)
    k_total, a, delta = 4, 0.5, 0.25
    x, v, x_next = (torch.randn(B, 7, generator=g) for _ in range(3))
    for k, t in enumerate(step_times(k_total).tolist()):
        sigma = a * math.sqrt(t / (1 - t)) if t < 1 else a * math.sqrt(1 / delta)  # 1 - t_1 = delta at t = 1
        assert sde_sigma(torch.tensor(t), k_total, a).item() == pytest.approx(sigma, rel=1e-6)
        mu = x - delta * v - (sigma**2 * delta / (2 * t)) * (x + (1 - t) * v)
        tt = torch.full((B, 1), t)
        assert torch.allclose(sde_mean(x, v, tt, torch.full((B, 1), sigma), delta), mu, atol=1e-6)
        expected = Normal(mu, sigma * math.sqrt(delta)).log_prob(x_next)
        got = gaussian_logprob(x_next, mu, torch.full((B, 7), sigma * math.sqrt(delta)))
        assert got.shape == (B, 7)
        assert torch.allclose(got, expected, atol=1e-5), k


@pytest.mark.parametrize("method", ["sde", "sde_all", "noise"])
def test_stored_transition_logprob_matches_normal(method):
    """The model's log-prob of a stored chain equals Normal's on the same mean and std, element by
    element: Flow-SDE, the 7 values of its one Gaussian step; Flow-SDE on every step and Flow-Noise,
    7 per step, step-major."""
    model, inputs = tiny(method)
    chains, sde_steps, logprobs, _ = model.sample(*inputs, generator=torch.Generator().manual_seed(1))
    memory, pad, _ = model.encode(*inputs)
    per_step = []
    for k, t in enumerate(step_times(model.num_steps).tolist()):
        tt = torch.full((B,), t)
        v, raw = model.expert(memory, pad, chains[:, k], tt)
        mean, std, _ = model.gaussian_step(chains[:, k], v, raw, tt)
        per_step.append(Normal(mean, std).log_prob(chains[:, k + 1]))
    if method == "sde":
        assert ((sde_steps >= 0) & (sde_steps < model.num_steps)).all()
        expected = torch.stack(per_step, 1)[torch.arange(B), sde_steps]
    else:
        assert (sde_steps == -1).all()
        expected = torch.cat(per_step, 1)
    assert logprobs.shape == expected.shape == (B, model.logprob_width)
    assert torch.allclose(logprobs, expected.detach(), atol=1e-4)
    with torch.no_grad():
        recomputed = model(*inputs, pack_chains(chains, sde_steps))[0]
    assert torch.allclose(recomputed, expected, atol=1e-4)


@pytest.mark.parametrize("method", ["sde", "sde_all", "noise"])
def test_recompute_with_unchanged_parameters_gives_ratio_one(method):
    model, inputs = tiny(method, chunk=2)
    chains, sde_steps, logprobs, x0 = model.sample(*inputs, generator=torch.Generator().manual_seed(2))
    assert chains.shape == (B, model.num_steps + 1, 14) and x0.shape == (B, 14)
    # The stored record goes through numpy (the TrajectoryBatch) and back, as in a real update.
    packed = torch.from_numpy(pack_chains(chains, sde_steps).numpy())
    with torch.no_grad():
        new = model(*inputs, packed)[0]
    ratio = torch.exp(new - logprobs)
    assert ratio.shape == (B, model.logprob_width)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-6), ratio
    # The stochastic chains differ from the plain ODE, which the greedy mode runs.
    greedy = model.sample(*inputs, greedy=True, generator=torch.Generator().manual_seed(2))
    assert (greedy[1] == -1).all() and not torch.allclose(greedy[0], chains)


def test_pack_roundtrip():
    chains, steps = torch.randn(3, 5, 7), torch.tensor([0, 3, -1])
    c, s = unpack_chains(pack_chains(chains, steps), 4, 7)
    assert torch.equal(c, chains) and torch.equal(s, steps)


@pytest.mark.parametrize("method, noise_net", [("sde", False), ("sde_all", False), ("noise", True)])
def test_gradients_reach_expert_and_noise_network(method, noise_net):
    model, inputs = tiny(method)
    model.train()
    chains, sde_steps, _, _ = model.sample(*inputs, generator=torch.Generator().manual_seed(3))
    logprobs, entropy, values, stats = model(*inputs, pack_chains(chains, sde_steps))
    (logprobs.sum() + entropy.sum() + values.sum()).backward()
    grad = lambda prefix: sum(p.grad.abs().sum().item() for n, p in model.named_parameters()  # noqa: E731
                              if n.startswith(prefix) and p.grad is not None)
    assert grad("expert.velocity_out") > 0 and grad("expert.blocks") > 0 and grad("vision") > 0
    assert grad("value_head") > 0
    assert (grad("expert.noise_out") > 0) == noise_net  # Flow-SDE's std is fixed by a and t
    assert 0.0 <= float(stats["actor/std_at_floor"]) <= 1.0
    if method == "noise":  # the entropy comes from the learned std, within [0.08, 0.16]
        assert 0.08 <= float(stats["actor/std_mean"]) <= 0.16
        model.zero_grad()
        model(*inputs, pack_chains(chains, sde_steps))[1].sum().backward()
        assert grad("expert.noise_out") > 0


def test_std_floor_binds_and_is_reported():
    model, inputs = tiny("noise")
    model.config.std_floor = 0.12  # inside the squashed range [0.08, 0.16]: some stds hit it
    chains, sde_steps, _, _ = model.sample(*inputs, generator=torch.Generator().manual_seed(4))
    _, _, _, stats = model(*inputs, pack_chains(chains, sde_steps))
    assert 0.0 < float(stats["actor/std_at_floor"]) < 1.0
    assert float(stats["actor/std_mean"]) >= 0.12


def test_flow_matching_loss_trains_towards_demo_actions():
    model, inputs = tiny("sde")
    model.train()
    target = torch.zeros(B, model.num_steps + 1, 7)
    target[:, -1, :2] = torch.tensor([0.5, -0.5])
    packed = pack_chains(target, torch.full((B,), -1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(150):
        loss = model.flow_matching_loss(*inputs, packed).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    model.eval()
    x0 = model.sample(*inputs, greedy=True, generator=torch.Generator().manual_seed(0))[3]
    assert (x0[:, :2] - torch.tensor([0.5, -0.5])).abs().mean() < 0.3


def test_flow_matching_draws_come_from_the_generator():
    """The warm start's times and noise follow the learner's seeded generator, not torch's global RNG."""
    model, inputs = tiny("noise")
    packed = pack_chains(torch.randn(B, model.num_steps + 1, 7, generator=torch.Generator().manual_seed(0)),
                         torch.full((B,), -1))
    with torch.no_grad():
        loss = lambda seed: model.flow_matching_loss(*inputs, packed, generator=torch.Generator().manual_seed(seed))  # noqa: E731
        torch.manual_seed(1)
        first = loss(0)
        torch.manual_seed(2)
        assert torch.equal(loss(0), first)
        assert not torch.allclose(loss(1), first)


def test_save_load_roundtrip_keeps_logprobs(tmp_path):
    cfg = load_config(["env=toy", "model=tiny_flow", "model.flow.method=sde"])  # the run's sampler wins on load
    model, inputs = tiny("sde")
    from vlarl.models.action_tokenizer import ActionStats, ActionTokenizer
    from vlarl.models.family import Loaded
    from vlarl.models.tiny_flow.family import TinyFlow

    tok = build_tiny_model(cfg.model, 16, make_env(cfg.env, 1, 0).instructions()).tokenizer
    save_model(tmp_path, Loaded(model, tok, ActionTokenizer(model.vocab_size, ActionStats.identity(7)), TinyFlow()))
    loaded, _, at = load_model(tmp_path, cfg.model)
    assert isinstance(loaded, FlowVLA) and at.action_dim == 7
    chains, steps, lp, _ = model.sample(*inputs, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(*inputs, pack_chains(chains, steps))[0], lp, atol=1e-5)


def test_log_ratio_clip_and_kl_penalty():
    old = torch.zeros(4, 1)
    new = torch.tensor([[0.5], [-8.0], [9.0], [0.0]], requires_grad=True)
    clipped, m = clip_log_ratio(new, old, torch.ones(4, 1), 5.0)
    assert torch.allclose(clipped.detach()[:, 0], torch.tensor([0.5, -5.0, 5.0, 0.0]))
    assert m["actor/log_ratio_clipfrac"] == pytest.approx(0.5)
    clipped.sum().backward()
    assert new.grad[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0]  # clipped entries send no gradient
    kl, km = kl_to_reference(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.0]]), torch.ones(2, 1))
    assert kl.item() == pytest.approx((math.exp(-1) - 1 + 1) / 2, rel=1e-6) and km["actor/kl_ref"] > 0
