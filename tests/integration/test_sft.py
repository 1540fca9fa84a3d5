"""Supervised warm starts end to end: `vlarl.sft` on toy demonstrations in each format lowers the
validation loss, writes its model folders, resumes exactly, and its output continues into RL."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import load_file

from vlarl.config import load_config
from vlarl.datasets.toy import toy_episodes, write_toy
from vlarl.models.registry import load_model
from vlarl.models.tiny_flow.modeling import FlowVLA
from vlarl.sft import main, train_sft
from vlarl.trainer import train

from test_train import saved_state  # tests/integration is on sys.path (rootdir-relative imports)

pytestmark = pytest.mark.integration

SMALL_SFT = ["env=toy", "sft.batch_size=32", "sft.log_every=25", "sft.val_every=50", "data.val_fraction=0.15"]
SMALL_RL = ["env=toy", "rollout.num_envs=16", "algo.minibatch_size=64", "algo.epochs=1", "rollout.eval_every=0",
            "cluster.dashboard=false", "trainer.iterations=1"]


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """160 scripted toy episodes (about 320 steps) as LIBERO HDF5 files and as a LeRobot v3 folder."""
    root = tmp_path_factory.mktemp("demos")
    episodes = toy_episodes(160, seed=5)
    write_toy(root / "hdf5", "hdf5", episodes)
    write_toy(root / "lerobot", "lerobot", episodes)
    return root


def sft(out, data, *extra):
    stream = io.StringIO()
    cfg = load_config([*SMALL_SFT, f"data.path={data}", f"sft.out_dir={out}", *extra])
    metrics = train_sft(cfg, stream)
    return metrics, stream.getvalue()


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_token_policy_on_libero_hdf5_then_rl(demos, ray_local, tmp_path):
    out = tmp_path / "sft"
    metrics, log = sft(out, demos / "hdf5", "sft.steps=150", "sft.save_every=50", "sft.keep_last=2")
    initial = rows(out)[0]
    assert initial["iteration"] == 0 and "sft/val_loss" in initial
    best = json.loads((out / "best" / "sft_state.json").read_text())
    assert best["best_val_loss"] < 0.5 * initial["sft/val_loss"], (best, initial)  # ln(256) = 5.5 at the start
    assert "[sft 150/150]" in log and "steps/s" in log and "ETA" in log and "val" in log
    for folder in ("final", "best", "checkpoints/step_000100", "checkpoints/step_000150"):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "action_stats.json", "sft_state.json"):
            assert (out / folder / name).is_file(), f"{folder}/{name}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000100", "step_000150"]  # keep_last
    assert (out / "checkpoints/step_000150/optimizer.pt").is_file() and not (out / "final/optimizer.pt").exists()
    stats = json.loads((out / "final" / "action_stats.json").read_text())
    assert stats["q01"][0] < 0 < stats["q99"][0]  # from the demonstrations, not the identity
    assert metrics["final"] == str(out / "final")

    run_dir = tmp_path / "rl"
    last = train(load_config([*SMALL_RL, f"trainer.run_dir={run_dir}", f"model.path={out / 'final'}"]))
    assert last["rollout/logprob_abs_diff"] < 1e-3  # the engine and the learner hold the SFT weights
    assert not (run_dir / "base_model").exists()  # RL started from the SFT folder, not a fresh model
    start = load_file(out / "final" / "model.safetensors")
    after = saved_state(run_dir / "checkpoints" / "step_000001")[0]
    assert set(start) == set(after)
    assert max((start[k] - after[k]).abs().max().item() for k in start) > 0  # and PPO moved them


def test_flow_policy_on_lerobot_with_chunks(demos, tmp_path):
    out = tmp_path / "sft"
    sft(out, demos / "lerobot", "model=tiny_flow", "env.action_chunk=2", "sft.steps=100", "sft.save_every=0")
    val = [r["sft/val_loss"] for r in rows(out) if "sft/val_loss" in r]
    assert val[-1] < 0.8 * val[0], val
    model, _, action_tokenizer = load_model(out / "final")
    assert isinstance(model, FlowVLA) and model.config.horizon == 2 and action_tokenizer.action_dim == 14
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000100"]  # save_every=0: the end only


def test_resume_matches_an_uninterrupted_run(demos, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    sft(a, demos / "hdf5", "sft.steps=40", "sft.save_every=20")
    sft(b, demos / "hdf5", "sft.steps=20", "sft.save_every=20")
    _, log = sft(b, demos / "hdf5", "sft.steps=40", "sft.save_every=20")
    assert "resumed from" in log and "step_000020" in log
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6), k
    assert [r["iteration"] for r in rows(b)] == [0, 20, 25, 40]  # appended across the two runs


def test_cli_errors_are_one_line(demos, tmp_path, capsys):
    assert main(["env=toy", f"sft.out_dir={tmp_path}", "data.path=/nonexistent/demos"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/nonexistent/demos" in err[0], err
    assert main(["env=toy"]) == 2
    assert "data.path is not set" in capsys.readouterr().err
    assert main(["env=toy", f"data.path={demos / 'hdf5'}", "model.lora_rank=4"]) == 2
    assert "model.lora_rank" in capsys.readouterr().err


def test_openvla_checkpoint_learns_and_keeps_its_layout(demos, tmp_path):
    """An OpenVLA-layout folder trains with its own tokenizer and statistics and is written back in its layout."""
    from vlarl.models.openvla.tiny import write_tiny_openvla
    from vlarl.models.registry import family_of_folder

    base = write_tiny_openvla(tmp_path / "base", seed=0)
    out = tmp_path / "sft"
    sft(out, demos / "hdf5", "model=openvla", f"model.path={base}", "model.unnorm_key=libero_spatial_no_noops",
        "sft.steps=30", "sft.val_every=15", "sft.log_every=15", "sft.lr=1e-3")
    best = json.loads((out / "best" / "sft_state.json").read_text())
    assert best["best_val_loss"] < rows(out)[0]["sft/val_loss"]
    assert family_of_folder(out / "final").name == "openvla"
    assert (out / "final" / "config.json").read_text() == (base / "config.json").read_text()
    trained, original = load_file(out / "final" / "model.safetensors"), load_file(base / "model.safetensors")
    assert trained.keys() == original.keys()
    assert any(not torch.equal(trained[k], original[k]) for k in original)
