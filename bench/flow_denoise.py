"""The flow engine's denoising, eager vs compiled (rollout.compile), in one run: chunks/s at batch 1 and 32
for the tiny flow VLA and tiny pi0 / pi0.5, and with --real the pi0- and pi0.5-shaped models (PaliGemma
3B + 300M expert, 224 px, two cameras, chunk 50; random weights) in bf16 on a GPU, with peak memory.

    .venv/bin/python bench/flow_denoise.py [--real] [--repeats 5] [--out bench/results/flow_denoise.json]

A "chunk" is one policy call of one observation (prefix encoding + K Flow-SDE denoising steps). Each
row also records the compile time and the largest difference between the compiled and eager greedy
chunks from the same noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlarl.config import load_config  # noqa: E402
from vlarl.envs.toy import ToyEnv  # noqa: E402
from vlarl.models.pi0.config import PALIGEMMA_VOCAB, SO400M, VARIANTS  # noqa: E402
from vlarl.models.pi0.modeling import Pi0Policy, Pi0Settings  # noqa: E402
from vlarl.models.pi0.tiny import tiny_spec, write_tiny_tokenizer  # noqa: E402
from vlarl.models.pi05.modeling import Pi05Policy  # noqa: E402
from vlarl.models.registry import build_tiny_model  # noqa: E402


def pi_model(kind: str, real: bool, tokenizer, device: str, dtype: torch.dtype):
    spec = tiny_spec("lerobot", kind=kind)
    if real:
        spec = replace(spec, paligemma=VARIANTS["gemma_2b"], action_expert=VARIANTS["gemma_300m"], vision=SO400M,
                       vocab_size=PALIGEMMA_VOCAB, image_size=224, chunk_size=50, executed_steps=5)
    settings = Pi0Settings(action_dim=spec.action_dim * spec.executed_steps)
    with torch.device(device):
        model = Pi05Policy(spec, settings, tokenizer=tokenizer) if kind == "pi05" else Pi0Policy(spec, settings)
    return model.to(dtype).eval(), tokenizer


def inputs(model, tokenizer, batch: int, device: str) -> tuple:
    s = model.image_size
    cameras = getattr(getattr(model, "spec", None), "num_cameras", 1)
    ids = torch.tensor([model.encode_instruction(tokenizer, "move to the red block")] * batch)
    return (torch.randint(0, 256, (batch, s, cameras * s, 3), dtype=torch.uint8, device=device),
            torch.randn(batch, 8, device=device), ids.to(device), torch.ones_like(ids).to(device))


def chunks_per_second(model, obs, repeats: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(repeats):
        model.sample(*obs, generator=torch.Generator().manual_seed(i))
    sync()
    return obs[0].shape[0] * repeats / (time.perf_counter() - start)


@torch.no_grad()
def measure(name: str, model, tokenizer, device: str, repeats: int) -> list[dict]:
    rows, eager = [], model.velocity
    for batch in (1, 32):
        obs = inputs(model, tokenizer, batch, device)
        model.velocity = eager
        model.sample(*obs, generator=torch.Generator().manual_seed(0))  # warm-up
        base = chunks_per_second(model, obs, repeats, device)
        reference = model.sample(*obs, greedy=True, generator=torch.Generator().manual_seed(1))[3]
        model.velocity = torch.compile(eager, dynamic=False, mode="reduce-overhead" if device == "cuda" else None)
        start = time.perf_counter()
        for i in range(2):  # compiles, then (CUDA graphs) records
            model.sample(*obs, generator=torch.Generator().manual_seed(i))
        compile_s = time.perf_counter() - start
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        fast = chunks_per_second(model, obs, repeats, device)
        compiled = model.sample(*obs, greedy=True, generator=torch.Generator().manual_seed(1))[3]
        row = {"model": name, "batch": batch, "eager_chunks_per_s": round(base, 2),
               "compiled_chunks_per_s": round(fast, 2), "speedup": round(fast / base, 3),
               "compile_s": round(compile_s, 1), "max_abs_diff": float((compiled - reference).abs().max())}
        if device == "cuda":
            row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    model.velocity = eager
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="also the pi0/pi0.5-shaped models (GPU, bf16)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/flow_denoise.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = write_tiny_tokenizer(tempfile.mkdtemp())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    cfg = load_config(["env=toy", "model=tiny_flow"])
    loaded = build_tiny_model(cfg.model, cfg.env.image_size, ToyEnv(1).instructions(), seed=0)
    rows = measure("tiny_flow", loaded.model.to(device).eval(), loaded.tokenizer, device, args.repeats)
    for kind in ("pi0", "pi05"):
        rows += measure(f"{kind} tiny", *pi_model(kind, False, tokenizer, device, torch.float32), device, args.repeats)
    if args.real:
        for kind in ("pi0", "pi05"):
            model, tok = pi_model(kind, True, tokenizer, device, torch.bfloat16)
            rows += measure(f"{kind}-shaped bf16", model, tok, device, args.repeats)
            del model
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cpu = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else cpu,
                               "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
