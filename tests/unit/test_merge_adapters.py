"""tools/merge_adapters.py and vlarl.export: merged folders load with plain transformers and act like the
adapter model; bad input is refused in one sentence; an interrupted export publishes nothing.

Checkpoints here are written by the real CheckpointActor from a tiny LoRA model whose adapters and
trainable layers were moved by hand (training itself is covered in tests/integration/test_merge_export.py).
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

import vlarl.models  # noqa: F401  registers the token and flow VLAs with the Auto classes
from vlarl.config import load_config
from vlarl.envs.toy import ToyEnv
from vlarl.export import ExportError, export, sha256
from vlarl.models.action_tokenizer import ActionStats, ActionTokenizer
from vlarl.models.lora import apply_lora
from vlarl.models.registry import build_tiny_model, save_model
from vlarl.models.tiny_flow.modeling import FlowVLA
from vlarl.models.tiny_token.modeling import TokenVLA
from vlarl.rollout.flow_engine import FlowEngine
from vlarl.rollout.hf_engine import HFEngine
from vlarl.workers.checkpoint import CheckpointActor, save_shards

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "merge_adapters.py"
IMAGE_SIZE = 16


def tiny(cfg, seed: int = 0):
    return build_tiny_model(cfg.model, IMAGE_SIZE, ToyEnv(1).instructions(), seed)


def write_run(run_dir: Path, lora_rank: int, base_seed: int = 0, model_preset: str = "tiny_token",
              sharded: bool = False) -> TokenVLA:
    """A run folder as the trainer leaves it: base_model/ and best_return/ with moved weights, in the
    full format or (sharded) as torch.distributed.checkpoint shards with an optimizer state.
    Returns the trained model (with live LoRA layers when lora_rank > 0)."""
    cfg = load_config(["env=toy", f"model={model_preset}", f"model.lora_rank={lora_rank}", f"trainer.run_dir={run_dir}"])
    loaded = build_tiny_model(cfg.model, IMAGE_SIZE, ToyEnv(1).instructions(), base_seed)
    save_model(run_dir / "base_model", loaded)
    model = loaded.model
    if lora_rank:
        model = apply_lora(model, lora_rank, cfg.model.lora_alpha)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # what training moves: the adapters (or everything) and the small trained layers
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith(("projector", "value_head")) or not lora_rank:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    keeper = CheckpointActor(str(run_dir), config=OmegaConf.to_container(cfg, resolve=True))
    if sharded:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        state_dir = keeper.begin_shards(3)
        save_shards(model, optimizer, state_dir, None).result()
        keeper.commit(3, state_dir, 0.5, {"iteration": 3}, {}, 0)
        return model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    keeper.update_best(3, 0.5, state, {}, {"iteration": 3}, {})
    return model.eval()


def observations(n: int = 8, seed: int = 3) -> dict:
    env = ToyEnv(n, seed=seed)
    return env.reset(list(np.arange(n) % 4), list(range(seed, seed + n)))


def greedy(model: TokenVLA, folder: Path, obs: dict):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    engine = HFEngine(model, tokenizer, ActionTokenizer(model.vocab_size, ActionStats.load(folder)))
    return engine.generate(obs, temperature=1.0, greedy=True)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora_run")
    return run_dir, write_run(run_dir, lora_rank=4)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full_run")
    return run_dir, write_run(run_dir, lora_rank=0)


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("flow_run")
    return run_dir, write_run(run_dir, lora_rank=0, model_preset="tiny_flow")


def cli(*args: str, limit_bytes: int | None = None, die_on_limit: bool = False) -> subprocess.CompletedProcess:
    """Run the tool. limit_bytes: files may not grow past it (a real write failure, EFBIG, since
    Python ignores SIGXFSZ); die_on_limit restores SIGXFSZ's default, so the kernel kills the
    process mid-write as in a crash."""
    command = [sys.executable, str(TOOL), *args]
    if die_on_limit:
        command = [sys.executable, "-c", "import runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
                   f"sys.argv = sys.argv[1:]; runpy.run_path({str(TOOL)!r}, run_name='__main__')", str(TOOL), *args]
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))) if limit_bytes else None
    return subprocess.run(command, capture_output=True, text=True, timeout=120, preexec_fn=limit)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((".tmp-", ".trash-")))


# ---- the export -----------------------------------------------------------------------------------
def test_lora_export_loads_with_plain_transformers_and_acts_like_the_adapter_model(lora_run, tmp_path):
    run_dir, adapter_model = lora_run
    out = export(run_dir / "best_return", tmp_path / "policy", max_shard_size="200KB")

    merged = AutoModel.from_pretrained(out).eval()  # no trust_remote_code, no vlarl loader
    assert isinstance(merged, TokenVLA)
    assert not any("lora" in k for k in merged.state_dict())
    obs = observations()
    want, got = greedy(adapter_model, run_dir / "base_model", obs), greedy(merged, out, obs)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    np.testing.assert_array_equal(got.actions, want.actions)

    # Sharded above the limit, and every weight file is listed with its hash.
    meta = json.loads((out / "merge_metadata.json").read_text())
    shards = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert (out / "model.safetensors.index.json").is_file() and len(shards) > 3
    assert sorted(meta["sha256"]) == shards
    assert all(meta["sha256"][s] == sha256(out / s) for s in shards)
    assert meta["step"] == 3 and meta["ema_return"] == 0.5 and meta["lora"]["rank"] == 4
    assert meta["base_model"] == str((run_dir / "base_model").resolve())
    assert meta["adapter"] == str((run_dir / "best_return").resolve())
    assert {"timestamp", "vlarl_version"} <= set(meta)

    # The settings users need outside vlarl: generation, image processing, action statistics.
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == merged.config.action_dim
    assert ActionStats.load(out) == ActionStats.load(run_dir / "base_model")
    processor = AutoImageProcessor.from_pretrained(out)
    pixels = processor(list(obs["image"]), return_tensors="pt")["pixel_values"]
    ours = torch.as_tensor(obs["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # TokenVLA.prefix
    torch.testing.assert_close(pixels, ours, atol=1e-5, rtol=0)

    # The decoder alone is a plain LLaMA that scores prefix embeddings exactly as the VLA does.
    assert AutoConfig.from_pretrained(out / "decoder").model_type == "llama"
    decoder = AutoModelForCausalLM.from_pretrained(out / "decoder").eval()
    with torch.no_grad():
        embeds = torch.randn(2, 9, merged.config.text_config["hidden_size"])
        torch.testing.assert_close(decoder(inputs_embeds=embeds).logits, merged.language_model(inputs_embeds=embeds).logits)


def test_full_checkpoint_is_copied_and_dtype_is_applied(full_run, tmp_path):
    run_dir, _ = full_run
    out = export(run_dir / "best_return", tmp_path / "policy", dtype="bfloat16")
    saved = load_file(run_dir / "best_return" / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert set(exported) == set(saved)
    assert all(torch.equal(exported[k], saved[k].to(torch.bfloat16)) for k in saved)
    assert json.loads((out / "merge_metadata.json").read_text())["lora"] is None
    assert AutoModel.from_pretrained(out).dtype == torch.bfloat16


def test_flow_export_loads_with_plain_transformers_and_acts_like_the_checkpoint(flow_run, tmp_path):
    """A flow VLA's checkpoint exports as one folder (no decoder/ or generation config: its actions come
    from the action expert's ODE) that AutoModel loads with the run's sampler settings."""
    run_dir, trained = flow_run
    proc = cli("--checkpoint", str(run_dir / "best_return"), "--out", str(tmp_path / "policy"))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "policy"
    assert not (out / "decoder").exists() and not (out / "generation_config.json").exists()
    loaded = AutoModel.from_pretrained(out).eval()
    assert isinstance(loaded, FlowVLA) and loaded.config.method == trained.config.method
    assert ActionStats.load(out) == ActionStats.load(run_dir / "base_model")

    obs = observations()
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.padding_side = "left"

    def act(model, greedy: bool):
        engine = FlowEngine(model, tokenizer, ActionTokenizer(model.vocab_size, ActionStats.load(out)))
        return engine.generate(obs, 1.0, greedy=greedy, generator=torch.Generator().manual_seed(0))

    want, got = act(trained, True), act(loaded, True)
    np.testing.assert_allclose(got.actions, want.actions, atol=1e-6)
    sampled_want, sampled_got = act(trained, False), act(loaded, False)
    np.testing.assert_allclose(sampled_got.logprobs, sampled_want.logprobs, atol=1e-4)
    base = AutoModel.from_pretrained(run_dir / "base_model").eval()
    assert np.abs(act(base, True).actions - want.actions).max() > 1e-3  # the export carries the moved weights
    meta = json.loads((out / "merge_metadata.json").read_text())
    assert meta["lora"] is None and sorted(meta["sha256"]) == ["model.safetensors"]


# ---- refusals ---------------------------------------------------------------------------------------
def test_existing_output_needs_force(lora_run, tmp_path):
    run_dir, _ = lora_run
    out = tmp_path / "policy"
    out.mkdir()
    (out / "old.txt").write_text("keep me unless --force")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export(run_dir / "best_return", out)
    assert (out / "old.txt").is_file()
    export(run_dir / "best_return", out, force=True)
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert leftovers(out) == []


def test_output_may_not_hold_the_inputs(lora_run):
    run_dir, _ = lora_run
    with pytest.raises(ExportError, match="which the export reads"):
        export(run_dir / "best_return", run_dir, force=True)
    assert (run_dir / "best_return" / "model.safetensors").is_file()


def test_missing_base_model_is_refused(lora_run, tmp_path):
    run_dir, _ = lora_run
    moved = tmp_path / "run"
    shutil.copytree(run_dir / "best_return", moved / "best_return")  # a run copied without its base_model
    with pytest.raises(ExportError, match=r"base model .*base_model \(from the run folder\) is missing; .*--base-model"):
        export(moved / "best_return", tmp_path / "policy")
    out = export(moved / "best_return", tmp_path / "policy", base_model=str(run_dir / "base_model"))
    assert (out / "config.json").is_file()


def test_base_model_with_other_weights_is_refused(lora_run, tmp_path):
    run_dir, _ = lora_run
    cfg = load_config([])
    other = tmp_path / "other_base"
    save_model(other, tiny(cfg, seed=7))  # same architecture, different initial weights
    with pytest.raises(ExportError, match="trained from a different base model"):
        export(run_dir / "best_return", tmp_path / "policy", base_model=str(other))
    assert not (tmp_path / "policy").exists()


def test_base_model_that_is_no_token_vla_is_refused(lora_run, tmp_path):
    run_dir, _ = lora_run
    out = export(run_dir / "best_return", tmp_path / "policy")
    with pytest.raises(ExportError, match="holds a 'llama' model, which no family recognises"):
        export(run_dir / "best_return", tmp_path / "again", base_model=str(out / "decoder"))


def test_base_model_of_another_size_is_refused(full_run, tmp_path):
    run_dir, _ = full_run
    other = tmp_path / "wider_base"
    save_model(other, tiny(load_config(["model.tiny.hidden=32"])))
    with pytest.raises(ExportError, match="does not match the base model"):
        export(run_dir / "best_return", tmp_path / "policy", base_model=str(other))


def test_adapter_that_does_not_fit_the_base_is_refused(lora_run, tmp_path):
    run_dir, _ = lora_run
    other = tmp_path / "wider_base"
    save_model(other, tiny(load_config(["model.tiny.intermediate=96"])))  # MLP projections of another size
    with pytest.raises(ExportError, match=r"the adapter on .*mlp.* does not fit the base model"):
        export(run_dir / "best_return", tmp_path / "policy", base_model=str(other))


def test_cli_refusal_is_one_sentence_with_exit_code_2(lora_run, tmp_path):
    run_dir, _ = lora_run
    proc = cli("--checkpoint", str(run_dir / "best_return"), "--out", str(tmp_path / "p"),
               "--base-model", str(tmp_path / "nowhere"))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "nowhere" in lines[0] and "is missing" in lines[0]
    assert not (tmp_path / "p").exists()


# ---- interrupted exports ------------------------------------------------------------------------------
def test_failed_write_leaves_no_output(lora_run, tmp_path):
    """Files may not grow past 100 kB: config.json is written, the weights are not (EFBIG)."""
    run_dir, _ = lora_run
    out = tmp_path / "policy"
    proc = cli("--checkpoint", str(run_dir / "best_return"), "--out", str(out), limit_bytes=100_000)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "could not write" in lines[0] and "File too large" in lines[0], proc.stderr
    assert not out.exists()
    assert leftovers(out) == []


def test_killed_export_leaves_no_output_and_the_next_run_cleans_up(lora_run, tmp_path):
    """The same limit, but the kernel kills the process mid-write, as in a crash."""
    run_dir, _ = lora_run
    out = tmp_path / "policy"
    proc = cli("--checkpoint", str(run_dir / "best_return"), "--out", str(out), limit_bytes=100_000,
               die_on_limit=True)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr
    assert not out.exists()
    stale = leftovers(out)
    assert len(stale) == 1 and stale[0].startswith(".tmp-policy-")
    assert (out.parent / stale[0] / "config.json").is_file()  # it did die partway through

    export(run_dir / "best_return", out)
    assert (out / "merge_metadata.json").is_file()
    assert leftovers(out) == []


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_sharded_checkpoint_exports_exactly_like_the_full_one(tmp_path, lora_rank):
    """The export gathers a sharded checkpoint into the same folder a full one gives."""
    outs = []
    for fmt in ("full", "sharded"):
        write_run(tmp_path / fmt, lora_rank=lora_rank, sharded=fmt == "sharded")
        assert (tmp_path / fmt / "best_return" / ("state" if fmt == "sharded" else "model.safetensors")).exists()
        outs.append(export(tmp_path / fmt / "best_return", tmp_path / f"{fmt}_policy"))
    full, sharded = (load_file(out / "model.safetensors") for out in outs)
    assert set(full) == set(sharded) and all(torch.equal(full[k], sharded[k]) for k in full)
