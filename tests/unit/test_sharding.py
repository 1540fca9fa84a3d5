"""The learner's FSDP2 wrapping (vlarl.workers.learner.shard): activation checkpointing recomputes the
same gradients, and bf16 mixed precision computes in bf16 over float32 parameters. One gloo rank."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from vlarl.config import load_config
from vlarl.envs.toy import ToyEnv
from vlarl.models.registry import build_tiny_model
from vlarl.rollout.hf_engine import HFEngine
from vlarl.workers.learner import free_port, shard


@pytest.fixture(scope="module")
def group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def loss_and_grads(model, inputs, tokens) -> tuple[float, dict]:
    logprobs, _, values = model(*inputs, tokens)
    loss = -logprobs.mean() + values.square().mean()
    loss.backward()
    return loss.item(), {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_and_mixed_precision(group):
    cfg = load_config(["env=toy"]).model
    model, tokenizer, action_tokenizer = build_tiny_model(cfg, 16, ToyEnv(1).instructions(), seed=0)
    with torch.no_grad():  # a value head that depends on its input (its last layer starts at zero)
        model.value_head[-1].weight.normal_(0, 0.1)
    engine = HFEngine(copy.deepcopy(model), tokenizer, action_tokenizer)
    obs = ToyEnv(4).reset(np.arange(4), np.arange(4))
    inputs = engine.model_inputs(obs)
    tokens = torch.as_tensor(engine.generate(obs, 1.0, generator=torch.Generator().manual_seed(0)).tokens)

    plain = shard(copy.deepcopy(model), group, OmegaConf.merge(cfg, {"activation_checkpointing": False}))
    checkpointed = shard(copy.deepcopy(model), group, OmegaConf.merge(cfg, {"activation_checkpointing": True}))
    mixed = shard(copy.deepcopy(model), group, OmegaConf.merge(cfg, {"mixed_precision": True}))
    loss, grads = loss_and_grads(plain, inputs, tokens)
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed, inputs, tokens)
    assert loss_ckpt == pytest.approx(loss, abs=1e-6) and grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)

    loss_mixed, grads_mixed = loss_and_grads(mixed, inputs, tokens)
    assert all(p.dtype == torch.float32 for p in mixed.parameters())  # float32 master weights
    assert loss_mixed != loss and loss_mixed == pytest.approx(loss, rel=0.05)  # bf16 compute: close, not equal
    assert all(g.dtype == torch.float32 for g in grads_mixed.values())
