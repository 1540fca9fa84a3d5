"""pi0 under vlarl's RL samplers: log-probs recomputed by the learner's forward equal the rollout's,
and flow matching on one-call demonstrations trains the executed elements only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from vlarl.models.flow_policy import pack_chains
from vlarl.models.pi0.family import Pi0
from vlarl.models.pi0.tiny import write_tiny_pi0, write_tiny_tokenizer
from vlarl.models.registry import default_model_cfg
from vlarl.models.tiny_flow.family import flow_matching

torch.set_num_threads(1)
B = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pi0flow")
    return write_tiny_pi0(root / "model", "lerobot", seed=2, chunk_size=6), write_tiny_tokenizer(root / "tok")


def load(folders, method: str):
    cfg = default_model_cfg()
    OmegaConf.set_struct(cfg, False)
    cfg.tokenizer_path = str(folders[1])
    cfg.flow.method = method
    return Pi0().load(folders[0], cfg)


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


def test_flow_matching_on_one_call_demonstrations_trains_the_expert(folders):
    model, tok, actions = load(folders, "sde_all")
    obs = inputs(model, tok)
    demo = np.random.default_rng(0).normal(size=(B, model.config.action_dim)).astype(np.float32)
    loss = flow_matching(model, obs, demo, actions, torch.Generator().manual_seed(0))
    assert loss.shape == (B,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.backbone.action_out_proj.weight.grad.abs().sum() > 0
    np.testing.assert_allclose(actions.unnormalize(actions.normalize(demo)), demo, atol=1e-5)
