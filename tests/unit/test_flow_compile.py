"""rollout.compile: the flow engine with a compiled denoising step gives the eager engine's chunks and
log-probs from the same noise; a token policy refuses the option with the setting to change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlarl.config import load_config
from vlarl.envs.toy import ToyEnv, ToySpec
from vlarl.models.pi0.tiny import write_tiny_pi0, write_tiny_tokenizer
from vlarl.models.registry import build_tiny_model, default_model_cfg, load_model
from vlarl.rollout.flow_engine import make_engine

torch.set_num_threads(1)


def test_compiled_engine_gives_the_eager_chunks_and_logprobs(tmp_path):
    folder, tokenizer = write_tiny_pi0(tmp_path / "pi0", seed=4), write_tiny_tokenizer(tmp_path / "tok")
    cfg = default_model_cfg()
    cfg.tokenizer_path = str(tokenizer)
    eager, compiled = (make_engine(*load_model(folder, cfg), "cpu", compile=c) for c in (False, True))
    env = ToyEnv(3, ToySpec(image_size=eager.model.image_size), seed=0)
    obs = env.reset(np.arange(3) % env.num_tasks, np.arange(3))
    seeds = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    for greedy in (True, False):
        a = eager.generate(obs, 1.0, greedy=greedy, generator=seeds())
        b = compiled.generate(obs, 1.0, greedy=greedy, generator=seeds())
        np.testing.assert_allclose(b.chains, a.chains, atol=1e-5, rtol=0)
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4, rtol=0)
    assert compiled.model.velocity is not eager.model.velocity  # the compiled one ran


def test_a_token_policy_refuses_compile_with_the_setting_to_change():
    cfg = load_config(["env=toy"])
    loaded = build_tiny_model(cfg.model, cfg.env.image_size, ToyEnv(1).instructions(), seed=0)
    with pytest.raises(ValueError, match="set rollout.compile=false"):
        make_engine(*loaded, "cpu", compile=True)
