"""OpenVLA-OFT on CUDA (tiny folders in the upstream layout): the GPU engines decode the CPU's chunk,
the compiled engine (torch.compile, CUDA graphs) the eager GPU engine's, and the learner's forward on
the GPU rescored the GPU rollout's log-probs; also with FiLM-conditioned towers. Skipped without CUDA."""

import numpy as np
import pytest
import torch

from vlarl.config import load_config
from vlarl.models.openvla_oft.tiny import write_tiny_oft
from vlarl.models.registry import load_model
from vlarl.rollout.flow_engine import make_engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("head,film", [("discrete", False), ("l1", False), ("discrete", True)])
def test_gpu_and_compiled_engines_match_the_cpu(tmp_path, head, film):
    folder = write_tiny_oft(tmp_path / head, head, seed=0, film=film)
    cfg = load_config(["env=toy", "model=openvla_oft"]).model
    engines = {"cpu": make_engine(*load_model(folder, cfg, "cpu"), "cpu"),
               "cuda": make_engine(*load_model(folder, cfg, "cuda"), "cuda"),
               "compiled": make_engine(*load_model(folder, cfg, "cuda"), "cuda", compile=True)}
    rng = np.random.default_rng(0)
    obs = {"image": rng.integers(0, 256, (4, 224, 448, 3), dtype=np.uint8),
           "proprio": rng.normal(0, 0.1, (4, 8)).astype(np.float32),
           "instruction": ["pick up the bowl", "open the top drawer of the cabinet", "stack", "put it down"]}
    greedy = {k: e.generate(obs, 1.0, greedy=True) for k, e in engines.items()}
    for k in ("cuda", "compiled"):
        np.testing.assert_allclose(greedy[k].actions, greedy["cpu"].actions, atol=2e-2, rtol=0)
    seeds = [torch.Generator().manual_seed(i) for i in range(4)]
    out = engines["cuda"].generate(obs, 1.0, generator=seeds)
    scored = torch.as_tensor(next(iter(out.record().values()))).cuda()
    model = engines["cuda"].model
    with torch.no_grad():
        logprobs = model(*engines["cuda"].model_inputs(obs), scored)[0]
    assert np.abs(logprobs.cpu().numpy() - out.logprobs).max() < 1e-4
