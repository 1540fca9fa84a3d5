"""pi0 and pi0.5 on CUDA (tiny folders in LeRobot's layout): the engine on the GPU gives the CPU's chunks
from the same noise, and rollout.compile (CUDA graphs) gives the eager GPU engine's. Skipped without CUDA."""

import numpy as np
import pytest
import torch

from vlarl.envs.toy import ToyEnv, ToySpec
from vlarl.models.pi0.tiny import write_tiny_pi0, write_tiny_tokenizer
from vlarl.models.registry import default_model_cfg, load_model
from vlarl.rollout.flow_engine import make_engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_gpu_and_compiled_engines_match_the_cpu(tmp_path, kind):
    folder, tokenizer = write_tiny_pi0(tmp_path / kind, seed=0, kind=kind), write_tiny_tokenizer(tmp_path / "tok")
    cfg = default_model_cfg()
    cfg.tokenizer_path = str(tokenizer)
    engines = {"cpu": make_engine(*load_model(folder, cfg), "cpu"),
               "cuda": make_engine(*load_model(folder, cfg), "cuda"),
               "compiled": make_engine(*load_model(folder, cfg), "cuda", compile=True)}
    model = engines["cpu"].model
    obs = ToyEnv(8, ToySpec(image_size=model.image_size)).reset(np.arange(8) % 4, np.arange(8))
    seeds = lambda: [torch.Generator().manual_seed(i) for i in range(8)]  # noqa: E731
    out = {k: e.generate(obs, 1.0, generator=seeds()) for k, e in engines.items()}
    for k in ("cuda", "compiled"):
        np.testing.assert_allclose(out[k].chains, out["cpu"].chains, atol=1e-3, rtol=0)
        np.testing.assert_allclose(out[k].logprobs, out["cpu"].logprobs, atol=1e-2, rtol=0)
