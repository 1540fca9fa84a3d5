"""A 7B-shaped OpenVLA in bf16 on one GPU, measured in one run: rollout actions/s at batch 1 and 64 for
the hf and vLLM engines, LoRA forward + backward tokens/s, weight push seconds, peak GPU memory.

    python bench/openvla_7b.py [--folder /tmp/openvla-7b-random] [--out bench/results/openvla_7b.json] [--skip-vllm]

The checkpoint has openvla-7b's exact shapes and layout (DINOv2 ViT-L/14 + SigLIP so400m/14 named by
timm id, fused projector, LLaMA-2-7B decoder, sharded safetensors) with random weights, written once
to --folder (about 15 GB; nothing is downloaded). An "action" is one 7-token action of one
environment, from a 224 px image and a LIBERO instruction. The report is rewritten after every stage,
so a stage that fails (it is recorded under "errors") leaves the others' figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlarl.config import load_config  # noqa: E402
from vlarl.models.lora import apply_lora, merge_lora_state_dict  # noqa: E402
from vlarl.models.openvla.tiny import write_7b_shaped  # noqa: E402
from vlarl.models.registry import load_model  # noqa: E402
from vlarl.rollout.hf_engine import HFEngine  # noqa: E402

INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def observations(batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8),
            "proprio": np.zeros((batch, 8), np.float32), "instruction": [INSTRUCTION] * batch}


def actions_per_s(engine, batch: int, repeats: int) -> float:
    obs = observations(batch)
    engine.generate(obs, 1.0, False, torch.Generator().manual_seed(0))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        engine.generate(obs, 1.0, False, torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9


def lora_step(loaded, batch: int, repeats: int) -> dict:
    """LoRA r32 on every decoder linear, bf16: forward + backward of the learner's loss on `batch` steps."""
    model = apply_lora(loaded.model, 32, 16).train()
    engine = HFEngine(model, loaded.tokenizer, loaded.action_tokenizer, "cuda")
    inputs = engine.model_inputs(observations(batch))
    tokens = torch.full((batch, 7), model.first_bin_id + 128, device="cuda")
    prefix_len = model.prefix(*inputs)[0].shape[1]
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        logprobs, _, values = model(*inputs, tokens, temperature=1.0)
        (-logprobs.mean() + values.square().mean()).backward()
        torch.cuda.synchronize()
        if i:  # the first step is the warm-up
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    seconds = float(np.median(times))
    return {"batch": batch, "tokens_per_step": batch * (prefix_len + 7), "seconds": seconds,
            "tokens_per_s": batch * (prefix_len + 7) / seconds, "peak_gb": peak_gb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", default="/tmp/openvla-7b-random")
    p.add_argument("--out", default="bench/results/openvla_7b.json")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-vllm", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/openvla_7b.py needs a CUDA GPU.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "errors": {}}

    def stage(name, fn):
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:  # record and go on: the other stages' figures still count
            report["errors"][name] = traceback.format_exc(limit=5)
        print(f"{name}: {time.perf_counter() - start:.1f} s {json.dumps(report.get(name))[:300]}", flush=True)
        out.write_text(json.dumps(report, indent=2))

    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        def write():
            start = time.perf_counter()
            write_7b_shaped(folder)
            return {"seconds": time.perf_counter() - start}

        stage("write_folder", write)
    cfg = load_config(["env=toy", "model=openvla", "model.unnorm_key=libero_spatial_no_noops",
                       "model.dtype=bfloat16"]).model

    def load():
        start = time.perf_counter()
        loaded = load_model(folder, cfg)
        return loaded, time.perf_counter() - start

    def hf():
        loaded, seconds = load()
        engine = HFEngine(*loaded, "cuda")
        row = {"load_seconds": seconds, "params": sum(p.numel() for p in loaded.model.parameters())}
        row.update({f"actions_per_s_b{b}": actions_per_s(engine, b, args.repeats) for b in (1, 64)})
        row["peak_gb"] = peak_gb()
        return row

    stage("hf_engine", hf)
    stage("lora_fwd_bwd", lambda: lora_step(load()[0], 8, args.repeats))
    torch.cuda.empty_cache()
    if not args.skip_vllm:
        def vllm():
            from vlarl.rollout.vllm_engine import VLLMEngine
            from vlarl.rollout.weight_sync import decoder_weights, export_ipc, gpu_uuid, prefix_weights

            loaded, _ = load()
            state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
            start = time.perf_counter()
            engine = VLLMEngine(*loaded, "cuda", gpu_memory_utilization=0.5)
            row = {"start_seconds": time.perf_counter() - start}
            row.update({f"actions_per_s_b{b}": actions_per_s(engine, b, args.repeats) for b in (1, 64)})
            merged = merge_lora_state_dict(state, 1.0)
            for transport in ("object_store", "cuda_ipc"):
                start = time.perf_counter()
                if transport == "object_store":
                    engine.load_state_dict({k: v.cpu() for k, v in merged.items()})
                else:
                    payload, buffers = export_ipc(decoder_weights({k: v.cuda() for k, v in merged.items()}),
                                                  engine.bucket_bytes)
                    engine.receive_ipc({k: v.cpu() for k, v in prefix_weights(merged).items()}, payload, gpu_uuid(0))
                    del buffers
                torch.cuda.synchronize()
                row[f"push_seconds_{transport}"] = time.perf_counter() - start
            row["greedy_equals_hf"] = bool(np.array_equal(
                engine.generate(observations(4), 1.0, True).tokens,
                HFEngine(*load()[0], "cuda").generate(observations(4), 1.0, True).tokens))
            engine.close()
            return row

        stage("vllm_engine", vllm)
    print(f"report: {out}")


if __name__ == "__main__":
    main()
