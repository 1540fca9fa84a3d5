"""OpenVLA-OFT's rollout engine: chunk actions/s of parallel decoding, eager vs compiled (rollout.compile),
against decoding the same 56 action tokens one at a time with a KV cache (OpenVLA's way), at batch 1 and 64.

    .venv/bin/python bench/oft_decode.py [--shape tiny|7b] [--device cpu|cuda] [--out bench/results/oft_decode.json]

The model is a random folder in the OFT layout (two 224-px cameras, proprio, chunk 8 x 7 = 56
placeholders, discrete head): tiny by default, openvla-7b-shaped (bf16, GPU) with --shape 7b. Each
engine is timed on the same observations after warm-up calls (which compile); the report gives the
median seconds per call, actions/s (batch x chunk / seconds), the compile time, and whether the
compiled engine's greedy tokens equal the eager one's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlarl.config import load_config  # noqa: E402
from vlarl.models.openvla_oft.tiny import write_7b_shaped_oft, write_tiny_oft  # noqa: E402
from vlarl.models.registry import load_model  # noqa: E402
from vlarl.rollout.hf_engine import HFEngine  # noqa: E402
from vlarl.rollout.parallel_engine import ParallelEngine  # noqa: E402


def observations(n: int) -> dict:
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 256, (n, 224, 448, 3), dtype=np.uint8),
            "proprio": rng.normal(0, 0.1, (n, 8)).astype(np.float32),
            "instruction": [f"put the bowl number {i} on the plate" for i in range(n)]}


def timed(engine, obs: dict, repeats: int, device: str) -> tuple[float, float, np.ndarray]:
    """-> (seconds of the first call, median seconds of the rest, greedy tokens)"""
    def call():
        out = engine.generate(obs, 1.0, greedy=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    start = time.perf_counter()
    first = call()
    first_s = time.perf_counter() - start
    call()  # a second warm-up: CUDA graphs record on the call after compilation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first_s, statistics.median(times), first.tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "7b"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/oft_decode.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    report = {"shape": args.shape, "device": args.device, "torch": torch.__version__, "machine": platform.machine(),
              "threads": torch.get_num_threads(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = (write_7b_shaped_oft if args.shape == "7b" else write_tiny_oft)(Path(tmp) / "oft", "discrete")
        settings = ["env=toy", "model=openvla_oft", "model.unnorm_key=libero_spatial_no_noops",
                    f"model.dtype={'bfloat16' if args.shape == '7b' else 'float32'}"]
        cfg = load_config(settings).model
        loaded = load_model(folder, cfg, args.device)
        chunk = loaded.model.spec.chunk
        report["parameters"] = sum(p.numel() for p in loaded.model.parameters())
        engines = {"parallel_eager": ParallelEngine(*loaded, args.device),
                   "parallel_compiled": ParallelEngine(*loaded, args.device, compile=True),
                   "autoregressive_kv_cache": HFEngine(*loaded, args.device)}
        for batch in args.batches:
            obs = observations(batch)
            row, tokens = {"batch": batch}, {}
            for name, engine in engines.items():
                first, median, tokens[name] = timed(engine, obs, args.repeats, args.device)
                row[name] = {"first_call_s": round(first, 3), "seconds": round(median, 4),
                             "actions_per_s": round(batch * chunk / median, 1)}
                print(json.dumps({"batch": batch, name: row[name]}), flush=True)
            row["compiled_equals_eager"] = bool(np.array_equal(tokens["parallel_compiled"], tokens["parallel_eager"]))
            row["compiled_speedup"] = round(row["parallel_eager"]["seconds"] / row["parallel_compiled"]["seconds"], 2)
            row["parallel_vs_autoregressive"] = round(row["autoregressive_kv_cache"]["seconds"]
                                                      / row["parallel_eager"]["seconds"], 2)
            report["rows"].append(row)
        if args.device == "cuda":
            report["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
