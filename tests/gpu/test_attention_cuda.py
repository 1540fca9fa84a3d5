"""FlashAttention-2 and SDPA give the learner the same log-probs on CUDA (bfloat16 tolerance), for
the tiny token VLA and the OpenVLA layout. Skipped without CUDA or without the flash-attn package."""

import importlib.util

import numpy as np
import pytest
import torch

from vlarl.config import load_config
from vlarl.envs.toy import ToyEnv, ToySpec
from vlarl.models.attention import attention_of, set_attention
from vlarl.models.registry import build_tiny_model, load_model, save_model
from vlarl.rollout.flow_engine import make_engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs the flash-attn package")]


def folder_of(family: str, out) -> list[str]:
    if family == "openvla":
        from vlarl.models.openvla.tiny import write_tiny_openvla

        write_tiny_openvla(out, seed=3)
        return ["model=openvla", "model.unnorm_key=libero_spatial_no_noops"]
    cfg = load_config(["env=toy"])
    save_model(out, build_tiny_model(cfg.model, 16, ToyEnv(1).instructions(), seed=3))
    return []


@pytest.mark.parametrize("family", ["tiny_token", "openvla"])
def test_flash_attention_matches_sdpa(family, tmp_path):
    settings = folder_of(family, tmp_path / "model")
    cfg = load_config(["env=toy", "cluster.device=cuda", "model.dtype=bfloat16", *settings])
    model, tokenizer, action_tokenizer = load_model(tmp_path / "model", cfg.model)
    model = model.to("cuda")
    engine = make_engine(model, tokenizer, action_tokenizer, "cuda")
    env = ToyEnv(4, ToySpec(image_size=model.image_size), 0)
    obs = env.reset(np.arange(4) % env.num_tasks, np.arange(4))
    obs["instruction"] = ["move to the red block", "red", "go to the blue block now", "blue"]  # left padding
    out = engine.generate(obs, temperature=1.0, generator=torch.Generator().manual_seed(0))
    actions = torch.as_tensor(out.record()["action_tokens"])
    scores = {}
    for kernel in ("sdpa", "flash_attention_2"):
        assert set_attention(model, kernel, "cuda") == kernel and attention_of(model) == {kernel}
        with torch.no_grad():
            scores[kernel] = model(*engine.model_inputs(obs), actions, temperature=1.0)[0].float().cpu().numpy()
    np.testing.assert_allclose(scores["flash_attention_2"], scores["sdpa"], atol=5e-2, rtol=0)
    assert set_attention(model, "auto", "cuda") == "flash_attention_2"
