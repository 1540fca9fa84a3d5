"""The whole loop on a local Ray cluster: tiny token VLA, toy env, real actors, real files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlarl.config import load_config
from vlarl.trainer import train

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SMALL = ["env=toy", "rollout.num_envs=16", "algo.minibatch_size=64", "algo.epochs=2", "rollout.eval_every=0",
         "cluster.dashboard=false"]


def run(run_dir: Path, iterations: int, *extra: str) -> dict:
    cfg = load_config([f"trainer.run_dir={run_dir}", f"trainer.iterations={iterations}", *SMALL, *extra])
    return train(cfg)


def metric_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_same(a, b, path: str = "") -> None:
    """Recursive equality of (optimizer) state: tensors within 1e-6, everything else exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, path
        assert torch.allclose(a.float(), b.float(), rtol=0, atol=1e-6), f"{path}: max diff {(a.float() - b.float()).abs().max()}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def saved_state(step: Path) -> tuple[dict, dict]:
    """(model state, optimizer state) of a checkpoint directory, full tensors, in either format; the
    sharded one read by torch's own consolidation (not vlarl's reader)."""
    if not (step / "state").is_dir():
        return (load_file(step / "model.safetensors"),
                torch.load(step / "optimizer.pt", map_location="cpu", weights_only=True))
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = step.parent / f"{step.name}.consolidated.pt"
    dcp_to_torch_save(step / "state", out)
    state = torch.load(out, map_location="cpu", weights_only=False)
    out.unlink()
    return state["model"], state["optim"]


def test_train_end_to_end(ray_local, tmp_path):
    last = run(tmp_path, 2)

    rows = metric_rows(tmp_path)
    assert [r["iteration"] for r in rows] == [0, 1]
    for key in ("rollout/success_rate", "rollout/return", "actor/pg_loss", "critic/vf_loss",
                "rollout/logprob_abs_diff", "timing/collect", "timing/update", "timing/sync",
                "timing/checkpoint", "rollout/weights_version", "env/steps"):
        assert all(key in r and math.isfinite(r[key]) for r in rows), key
    assert rows[1]["rollout/weights_version"] == rows[0]["rollout/weights_version"] + 1
    assert rows[1]["env/steps"] > rows[0]["env/steps"] > 0
    # The rollout engine samples with the weights the learner holds: a missed or stale push would
    # show as a large learner-vs-rollout log-prob gap on the second iteration.
    assert all(r["rollout/logprob_abs_diff"] < 1e-3 for r in rows)
    assert last["rollout/weights_version"] == rows[1]["rollout/weights_version"]

    step = tmp_path / "checkpoints" / "step_000002"
    for name in ("state/.metadata", "state/__0_0.distcp", "trainer_state.json", "curriculum.json"):
        assert (step / name).is_file(), name
    assert json.loads((step / "trainer_state.json").read_text())["iteration"] == 2
    assert len(json.loads((step / "curriculum.json").read_text())["ema"]) == 4  # env.num_tasks

    meta = json.loads((tmp_path / "best_return" / "metadata.json").read_text())
    assert {"timestamp", "ema_return", "current_return", "step", "config"} <= set(meta)
    assert meta["step"] in (1, 2)

    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "actor/pg_loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("rollout/success_rate")] == [0, 1]

    base = tmp_path / "base_model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "action_stats.json"):
        assert (base / name).is_file(), name
    # Two PPO iterations must have moved the weights away from the base model.
    before, after = load_file(base / "model.safetensors"), saved_state(step)[0]
    assert set(before) == set(after)
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 1e-4


def test_resume_matches_uninterrupted_run(ray_local, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(a, 4)
    run(b, 2)
    run(b, 4)  # resumes from checkpoints/step_000002

    assert json.loads((b / "checkpoints" / "step_000004" / "trainer_state.json").read_text())["iteration"] == 4
    ca, cb = a / "checkpoints" / "step_000004", b / "checkpoints" / "step_000004"
    (ma, oa), (mb, ob) = saved_state(ca), saved_state(cb)
    assert set(ma) == set(mb)
    for k in ma:
        assert torch.allclose(ma[k], mb[k], rtol=0, atol=1e-6), f"{k}: max diff {(ma[k] - mb[k]).abs().max()}"
    assert json.loads((ca / "curriculum.json").read_text()) == json.loads((cb / "curriculum.json").read_text())
    assert oa["state"], "the optimizer state is empty"
    assert_same(oa, ob, "optimizer")

    rows_a = {r["iteration"]: r for r in metric_rows(a)}
    rows_b = metric_rows(b)
    assert [r["iteration"] for r in rows_b] == [0, 1, 2, 3]  # appended across the two runs
    for r in rows_b[2:]:
        ra = rows_a[r["iteration"]]
        assert r["rollout/success_rate"] == ra["rollout/success_rate"]
        assert r["env/steps"] == ra["env/steps"]
        assert r["actor/pg_loss"] == pytest.approx(ra["actor/pg_loss"], rel=0, abs=1e-6)
        assert r["critic/vf_loss"] == pytest.approx(ra["critic/vf_loss"], rel=0, abs=1e-6)


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_sharded_resume_onto_another_rank_count_continues_exactly(ray_local, tmp_path, first, then):
    """Two iterations on `first` learner ranks, two more resumed on `then`: the sharded checkpoint
    (resharded on load) gives the same run as the full one (gathered on rank 0, loaded whole)."""
    def shards(step: int) -> int:
        return len(list((tmp_path / "sharded" / "checkpoints" / f"step_{step:06d}" / "state").glob("*.distcp")))

    for fmt in ("sharded", "full"):
        run(tmp_path / fmt, 2, f"cluster.num_learners={first}", f"trainer.checkpoint_format={fmt}")
        if fmt == "sharded":
            assert shards(2) == first
        run(tmp_path / fmt, 4, f"cluster.num_learners={then}", f"trainer.checkpoint_format={fmt}")
    assert (tmp_path / "full" / "checkpoints" / "step_000004" / "model.safetensors").is_file()
    assert shards(4) == then
    (ms, os_), (mf, of) = (saved_state(tmp_path / fmt / "checkpoints" / "step_000004") for fmt in ("sharded", "full"))
    assert_same(ms, mf, "model")
    assert_same(os_, of, "optimizer")
    rows_s, rows_f = metric_rows(tmp_path / "sharded"), metric_rows(tmp_path / "full")
    assert [r["iteration"] for r in rows_s] == [0, 1, 2, 3]
    for rs, rf in zip(rows_s, rows_f):
        assert rs["rollout/success_rate"] == rf["rollout/success_rate"] and rs["env/steps"] == rf["env/steps"]
        assert rs["actor/pg_loss"] == pytest.approx(rf["actor/pg_loss"], rel=0, abs=1e-6)


def test_grpo_one_iteration(ray_local, tmp_path):
    last = run(tmp_path, 1, "algo=grpo", "algo.group_size=4")
    rows = metric_rows(tmp_path)
    assert [r["iteration"] for r in rows] == [0]
    assert math.isfinite(rows[0]["actor/pg_loss"])
    assert last["actor/kept_steps"] > 0
    assert (tmp_path / "checkpoints" / "step_000001" / "state" / ".metadata").is_file()


def test_lora_run_pushes_merged_weights(ray_local, tmp_path):
    """With LoRA the learner trains adapters; the push merges them, so the rollout engine (a plain
    model, strict about names) takes the weights and its log-probs match the learner's."""
    run(tmp_path, 2, "model.lora_rank=4")
    row = metric_rows(tmp_path)[1]  # collected with the merged weights pushed after update 1
    assert row["rollout/weights_version"] == 3
    assert row["rollout/logprob_abs_diff"] < 1e-3
    state = saved_state(tmp_path / "checkpoints" / "step_000002")[0]
    assert any(".lora_A." in k for k in state) and any(".lora_B." in k for k in state)
    base = load_file(tmp_path / "base_model" / "model.safetensors")
    frozen = "language_model.model.layers.0.self_attn.q_proj"
    assert torch.equal(state[f"{frozen}.base_layer.weight"], base[f"{frozen}.weight"])  # base weights frozen
    assert max(state[k].abs().max().item() for k in state if ".lora_B." in k) > 0  # adapters moved


def test_cli_bad_model_path_stops_before_ray():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "vlarl.main", "model.path=/nonexistent"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "model.path" in lines[0]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr  # stopped before any cluster


def test_sigterm_finishes_the_iteration_checkpoints_it_and_resumes(tmp_path):
    """A pre-empted job (SIGTERM, as from Slurm or `ray job stop`) ends after the iteration it is in,
    with that iteration checkpointed although trainer.save_every would have skipped it; the same
    command then resumes from it."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [sys.executable, "-m", "vlarl.main", *SMALL, f"trainer.run_dir={tmp_path}", "trainer.save_every=50"]
    proc = subprocess.Popen([*args, "trainer.iterations=200"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((tmp_path / "metrics.jsonl").is_file() and len(metric_rows(tmp_path)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach iteration 2"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    done = len(metric_rows(tmp_path))
    assert f"vlarl: stopping after iteration {done} on SIGTERM" in out
    step = tmp_path / "checkpoints" / f"step_{done:06d}"
    assert json.loads((step / "trainer_state.json").read_text())["iteration"] == done
    assert (step / "state" / ".metadata").is_file()
    again = subprocess.run([*args, f"trainer.iterations={done + 1}"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {step} at iteration {done + 1}" in again.stdout
    assert [r["iteration"] for r in metric_rows(tmp_path)] == list(range(done + 1))
