"""Learner throughput per attention kernel, in one run: tokens/s of the policy's scoring forward +
backward (what a PPO minibatch step costs) for each model.attn_implementation the machine has
(eager and sdpa everywhere; flash_attention_2 on CUDA with the flash-attn package).

    .venv/bin/python bench/attention.py [--device cuda] [--batch 32] [--repeats 5] [--out bench/results/attention.json]

The model is the tiny token VLA with a LLaMA-shaped 12 x 768 decoder and 16 px patches (~115M
parameters; bfloat16 on CUDA, float32 on CPU; `--small` keeps the 2 x 64 test size with 4 px
patches), on toy-task observations at --image-size (224: 196 image tokens); a "token" is one
position of the scored sequence (image, proprio, instruction and action tokens).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlarl.config import load_config  # noqa: E402
from vlarl.envs.toy import ToyEnv, ToySpec  # noqa: E402
from vlarl.models.attention import set_attention  # noqa: E402
from vlarl.models.registry import build_tiny_model  # noqa: E402
from vlarl.rollout.flow_engine import make_engine  # noqa: E402

BIG = ["model.tiny.hidden=768", "model.tiny.layers=12", "model.tiny.heads=12", "model.tiny.intermediate=3072",
       "model.tiny.patch_size=16"]


def kernels(device: str) -> list[str]:
    found = ["eager", "sdpa"]
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        found.append("flash_attention_2")
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small", action="store_true", help="the 2 x 64 test model (a quick CPU check)")
    p.add_argument("--out", default="bench/results/attention.json")
    args = p.parse_args()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    cfg = load_config(["env=toy", f"model.dtype={dtype}", *([] if args.small else BIG)])
    env = ToyEnv(args.batch, ToySpec(image_size=args.image_size), 0)
    loaded = build_tiny_model(cfg.model, args.image_size, env.instructions(), 0)
    model = loaded.model.to(args.device, getattr(torch, dtype))
    engine = make_engine(model, loaded.tokenizer, loaded.action_tokenizer, args.device)
    obs = env.reset(np.arange(args.batch) % env.num_tasks, np.arange(args.batch))
    out = engine.generate(obs, temperature=1.0, generator=torch.Generator().manual_seed(0))
    actions = torch.as_tensor(out.record()["action_tokens"])
    inputs = engine.model_inputs(obs)
    with torch.no_grad():
        length = model.prefix(*inputs)[0].shape[1] + actions.shape[1]  # positions of one scored sequence
    tokens = args.batch * length
    report = {"machine": platform.platform(), "device": args.device, "dtype": dtype, "batch": args.batch,
              "image_size": args.image_size, "sequence_length": length, "params": sum(p.numel() for p in model.parameters()), "kernels": {}}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for kernel in kernels(args.device):
        set_attention(model, kernel, args.device)
        logprobs = model(*inputs, actions, temperature=1.0)[0]  # warm-up (and the sequence length)
        logprobs.sum().backward()
        model.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        for _ in range(args.repeats):
            model(*inputs, actions, temperature=1.0)[0].sum().backward()
            model.zero_grad(set_to_none=True)
        sync()
        seconds = (time.perf_counter() - start) / args.repeats
        row = {"step_s": seconds, "sequences_per_s": args.batch / seconds, "tokens_per_s": tokens / seconds}
        if args.device == "cuda":
            row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
        report["kernels"][kernel] = row
        print(f"{kernel:18s} {seconds * 1e3:8.1f} ms per forward+backward of {args.batch} x {length} tokens "
              f"({row['tokens_per_s']:.0f} tokens/s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
