"""Checkpoint cost, full gather vs sharded, in one run: seconds and peak host memory of saving a
~100M-parameter policy (the tiny token VLA with a LLaMA-shaped 12 x 768 decoder) with its AdamW
state from a group of FSDP2 learner ranks (gloo).

    .venv/bin/python bench/checkpoint_save.py [--ranks 2] [--repeats 2] [--out bench/results/checkpoint_save.json]

full (trainer.checkpoint_format=full): every rank joins the gather, rank 0 holds the whole model
and optimizer state in host memory and the CheckpointActor writes model.safetensors + optimizer.pt.
Here rank 0 writes in its own process; in a run the state also travels through Ray's object store
to the checkpoint actor (one more full copy), so the full row is a lower bound.
sharded (the default): each rank copies its shard to host memory and writes it in the background
(`blocking_s` is what the training loop waits for, `durable_s` until every shard is on disk), then
the CheckpointActor commits the step.

Each path runs in fresh processes (so one does not reuse memory the other freed); peak host memory
is the highest resident set each rank reached during the save minus its resident set before it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlarl.config import load_config  # noqa: E402
from vlarl.envs import make_env  # noqa: E402
from vlarl.models.registry import build_tiny_model, save_model  # noqa: E402
from vlarl.workers.checkpoint import CheckpointActor  # noqa: E402
from vlarl.workers.learner import LearnerWorker, free_port  # noqa: E402

BIG = ["model.tiny.hidden=768", "model.tiny.layers=12", "model.tiny.heads=12", "model.tiny.intermediate=3072"]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples this process's resident set every 2 ms while active."""

    def __enter__(self):
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def rank_main(rank: int, world: int, port: int, cfg: dict, folder: str, kind: str, target: str, out: str) -> None:
    worker = LearnerWorker(cfg, rank, world, folder)
    worker.setup("127.0.0.1", port)
    for p in worker.model.parameters():  # a run in progress: AdamW moments exist for every parameter
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    worker.optimizer.step()
    worker.optimizer.zero_grad(set_to_none=True)
    dist.barrier()
    row = {}
    with PeakRSS() as mem:
        start = time.perf_counter()
        if kind == "full":
            model_state, optimizer_state = worker.checkpoint_state()
            if rank == 0:
                CheckpointActor(target).save(1, model_state, optimizer_state, {}, {})
            del model_state, optimizer_state
            row["blocking_s"] = time.perf_counter() - start
        else:
            worker.save_shards(target)
            row["blocking_s"] = time.perf_counter() - start
            worker.shards_written()
        dist.barrier()
        row["durable_s"] = time.perf_counter() - start
    row["peak_host_mb"] = mem.mb
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    worker.shutdown()


def measure(kind: str, world: int, cfg: dict, folder: str, scratch: Path, repeat: int) -> dict:
    run = scratch / f"{kind}_{repeat}"
    keeper = CheckpointActor(str(run))
    target = str(run) if kind == "full" else keeper.begin_shards(1)
    out = scratch / "rows.json"
    mp.spawn(rank_main, args=(world, free_port(), cfg, folder, kind, target, str(out)), nprocs=world)
    per_rank = json.loads(out.read_text())
    commit_s = 0.0
    if kind == "sharded":
        start = time.perf_counter()
        keeper.commit(1, target, 0.0, {}, {}, *range(world))
        commit_s = time.perf_counter() - start
    files = [p for p in (run / "checkpoints").rglob("*") if p.is_file()]
    return {"blocking_s": max(r["blocking_s"] for r in per_rank),
            "durable_s": max(r["durable_s"] for r in per_rank) + commit_s,
            "commit_s": commit_s,
            "peak_host_mb_per_rank": [round(r["peak_host_mb"], 1) for r in per_rank],
            "peak_host_mb_total": round(sum(r["peak_host_mb"] for r in per_rank), 1),
            "bytes_on_disk": sum(p.stat().st_size for p in files), "files": len(files)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/checkpoint_save.json")
    args = parser.parse_args()
    cfg = load_config(["env=toy", *BIG, "cluster.torch_threads=1"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    report = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "ranks": args.ranks}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        loaded = build_tiny_model(cfg.model, cfg.env.image_size, make_env(cfg.env, 1, 0).instructions(), 0)
        report["params"] = sum(p.numel() for p in loaded.model.parameters())
        save_model(scratch / "model", loaded)
        del loaded
        runs = {kind: [measure(kind, args.ranks, plain, str(scratch / "model"), scratch, r)
                       for r in range(args.repeats)] for kind in ("full", "sharded")}
    for kind, rows in runs.items():
        best = min(rows, key=lambda r: r["durable_s"])
        report[kind] = {**best, "repeats": rows}
        print(f"{kind:8s} {report['params'] / 1e6:.0f}M params, {args.ranks} ranks: training waits "
              f"{best['blocking_s']:.2f} s, on disk after {best['durable_s']:.2f} s, peak host memory "
              f"{best['peak_host_mb_total']:.0f} MB ({' + '.join(f'{m:.0f}' for m in best['peak_host_mb_per_rank'])})",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
