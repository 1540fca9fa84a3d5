"""The OpenVLA family on CUDA in bfloat16 (tiny folder in the real layout). Skipped without CUDA."""

import numpy as np
import pytest
import torch

from vlarl.config import load_config
from vlarl.envs.toy import ToyEnv, ToySpec
from vlarl.models.lora import apply_lora
from vlarl.models.openvla.tiny import write_tiny_openvla
from vlarl.models.registry import load_model
from vlarl.rollout.hf_engine import HFEngine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def settings(dtype: str):
    return load_config(["env=toy", "model=openvla", "model.unnorm_key=libero_spatial_no_noops",
                        f"model.dtype={dtype}"]).model


def test_bf16_on_cuda_rolls_out_scores_and_trains_with_lora(tmp_path):
    folder = write_tiny_openvla(tmp_path / "openvla", seed=0)
    obs = ToyEnv(8, ToySpec(image_size=224)).reset(np.arange(8) % 4, np.arange(8))
    cpu = HFEngine(*load_model(folder, settings("float32")), "cpu").generate(obs, 1.0, greedy=True)
    loaded = load_model(folder, settings("bfloat16"))
    engine = HFEngine(*loaded, "cuda")
    gpu = engine.generate(obs, 1.0, greedy=True)
    assert (gpu.tokens == cpu.tokens).mean() > 0.9  # bf16 may flip near-ties
    sampled = engine.generate(obs, 1.0, generator=torch.Generator().manual_seed(0))
    model = apply_lora(loaded.model, 4, 8).train()
    logprobs, _, values = model(*engine.model_inputs(obs), torch.as_tensor(sampled.tokens, device="cuda"))
    np.testing.assert_allclose(logprobs.detach().cpu().numpy(), sampled.logprobs, atol=5e-2)
    (-logprobs.mean() + values.square().mean()).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
