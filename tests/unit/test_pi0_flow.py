"""pi0, pi0.5 and SmolVLA under vlarl's RL samplers: log-probs recomputed by the learner's forward equal the rollout's,
a transition's log-prob is the density of the transitions the sampler draws (Monte Carlo), and flow
matching on one-call demonstrations trains the executed elements only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.distributions import Normal

from vlarl.algo import sampling
from vlarl.models.family import FamilyError
from vlarl.models.flow_policy import pack_chains
from vlarl.models.pi0.tiny import write_tiny_pi0, write_tiny_tokenizer
from vlarl.models.registry import default_model_cfg, family_of_folder
from vlarl.models.smolvla.tiny import write_tiny_smolvla
from vlarl.models.tiny_flow.family import flow_matching

torch.set_num_threads(1)
B = 3


@pytest.fixture(scope="module", params=["pi0", "pi05", "smolvla"])
def folders(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("pi0flow")
    if request.param == "smolvla":
        model = write_tiny_smolvla(root / "model", seed=2, chunk_size=6)
    else:
        model = write_tiny_pi0(root / "model", "lerobot", seed=2, chunk_size=6, kind=request.param)
    return model, write_tiny_tokenizer(root / "tok")


def load(folders, method: str, value_from: str = "prefix"):
    cfg = default_model_cfg()
    OmegaConf.set_struct(cfg, False)
    cfg.tokenizer_path = str(folders[1])
    cfg.flow.method = method
    cfg.value_from = value_from
    return family_of_folder(folders[0]).load(folders[0], cfg)


def inputs(model, tokenizer):
    g = torch.Generator().manual_seed(0)
    s = model.image_size
    images = torch.randint(0, 256, (B, s, 2 * s, 3), generator=g, dtype=torch.uint8)
    ids = torch.tensor([model.encode_instruction(tokenizer, "pick up the red bowl")] * B)
    return images, torch.randn(B, 8, generator=g), ids, torch.ones_like(ids)


@pytest.mark.parametrize("method", ["sde", "sde_all", "noise"])
def test_forward_recomputes_the_sampled_logprobs(folders, method):
    model, tok, _ = load(folders, method)
    model.eval()
    obs = inputs(model, tok)
    generators = [torch.Generator().manual_seed(i) for i in range(B)]
    chains, sde_steps, logprobs, executed = model.sample(*obs, generator=generators)
    assert chains.shape == (B, model.num_steps + 1, model.flow_width)
    assert logprobs.shape == (B, model.logprob_width) and executed.shape == (B, model.config.action_dim)
    assert model.logprob_width == model.config.action_dim * (1 if method == "sde" else model.num_steps)
    assert torch.isfinite(logprobs).all() and not torch.all(logprobs == 0)
    with torch.no_grad():
        recomputed, entropy, values, _ = model(*obs, pack_chains(chains, sde_steps))
    assert (recomputed - logprobs).abs().max() < 1e-4
    assert entropy.shape == recomputed.shape and values.shape == (B,)


def test_transition_logprob_is_the_density_the_sampler_draws_from(folders, monkeypatch):
    """N chains of one observation from one x_0 (the sampler's first draw pinned, every later draw
    fresh): the first Flow-SDE transition's executed elements, fitted by their sample mean and std,
    give the log-density the rollout recorded for them (within Monte-Carlo error, N = 2000)."""
    model, tok, _ = load(folders, "sde_all")
    model.eval()
    n, width = 2000, model.config.action_dim
    obs = tuple(x[:1].repeat(n, *[1] * (x.dim() - 1)) for x in inputs(model, tok))
    x0, draws, real = torch.randn(1, model.flow_width, generator=torch.Generator().manual_seed(9)), [], sampling.randn

    def pinned_first(generator, rows, cols):
        draws.append(rows)
        return x0.expand(rows, cols).clone() if len(draws) == 1 else real(generator, rows, cols)

    monkeypatch.setattr(sampling, "randn", pinned_first)
    chains, _, logprobs, _ = model.sample(*obs, generator=torch.Generator().manual_seed(7))
    assert torch.equal(chains[:, 0], x0.expand(n, -1))
    x1 = model.executed(chains[:, 1])  # (N, executed elements) after the first transition
    fitted = Normal(x1.mean(0), x1.std(0))
    recorded = logprobs[:20, :width]  # step-major: the first step's elements
    z = (x1[:20] - fitted.loc) / fitted.scale
    mc_error = torch.sqrt(z**2 / n + (z**2 - 1) ** 2 / (2 * n))  # of the fitted log-density (delta method)
    assert ((fitted.log_prob(x1[:20]) - recorded).abs() < 5 * mc_error + 1e-3).all()
    assert recorded.std() > 0.3  # the points differ, so agreement is not one constant


@pytest.mark.parametrize("value_from", ["prefix", "expert"])
def test_value_head_reads_the_prefix_or_the_expert(folders, value_from, tmp_path):
    """model.value_from=expert: values come from the action expert (gradients reach it, not the sampled
    noise: two different chains of one observation get the same value); prefix: the expert gets none."""
    model, tok, _ = load(folders, "sde_all", value_from)
    torch.nn.init.normal_(model.value_head[2].weight)  # the seeded head starts at zero output
    obs = inputs(model, tok)
    chains = [model.sample(*obs, generator=torch.Generator().manual_seed(i))[:2] for i in range(2)]
    values = [model(*obs, pack_chains(*c))[2] for c in chains]
    assert torch.equal(values[0], values[1]) and values[0].abs().sum() > 0
    values[0].sum().backward()
    expert = [p for n, p in model.named_parameters()
              if n.startswith(("backbone.model.dit.layers.", "backbone.lm_expert.layers."))]
    reached = [p.grad is not None and p.grad.abs().sum() > 0 for p in expert]
    assert any(reached) == (value_from == "expert")


def test_a_value_head_of_the_other_width_stops_the_load(folders, tmp_path):
    family = family_of_folder(folders[0])
    family.save(tmp_path / "model", load(folders, "sde_all", "expert"))
    with pytest.raises(FamilyError, match="value head of another input width.*model.value_from"):
        load((tmp_path / "model", folders[1]), "sde_all", "prefix")


def test_flow_matching_on_one_call_demonstrations_trains_the_expert(folders):
    model, tok, actions = load(folders, "sde_all")
    obs = inputs(model, tok)
    demo = np.random.default_rng(0).normal(size=(B, model.config.action_dim)).astype(np.float32)
    loss = flow_matching(model, obs, demo, actions, torch.Generator().manual_seed(0))
    assert loss.shape == (B,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.backbone.action_out_proj.weight.grad.abs().sum() > 0
    np.testing.assert_allclose(actions.unnormalize(actions.normalize(demo)), demo, atol=1e-5)
