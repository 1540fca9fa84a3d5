"""Supervised warm starts: `python -m vlarl.sft data.path=DEMOS [model=tiny_token|tiny_flow] [key=value ...]`.

Trains a vlarl policy on demonstrations (LIBERO/robomimic HDF5 files, LeRobot v3 folders; vlarl/datasets)
with its family's own supervised loss (the family's `supervised` entry: the token VLA's negative log-likelihood
of the expert's action bins, the flow VLA's flow matching) and writes model folders that
`python -m vlarl.main model.path=<sft.out_dir>/final` continues with RL. The model is `model.path`, or a
tiny model built from config for `env` (its image size and action chunk) with a tokenizer over the
dataset's instructions and q01/q99 action statistics of the training episodes (OpenVLA's recipe).

Output, in sft.out_dir:
    final/                     the model after sft.steps: config.json, model.safetensors, tokenizer, action_stats.json,
                               sft_state.json (step, losses)
    best/                      the same for the lowest validation loss so far
    checkpoints/step_NNNNNN/   periodic: the model folder plus optimizer.pt; a rerun resumes from the latest
    metrics.jsonl, tensorboard/
Every folder is written to a hidden sibling and renamed into place, so an interrupted run leaves the
previous ones whole (Ctrl-C writes a checkpoint first).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from vlarl.config import ConfigError, DataConfig, SFTConfig
from vlarl.datasets import DatasetError, Episode, ReadOptions, action_chunks, read_episodes, split_episodes
from vlarl.data.spec import ACTION_DIM
from vlarl.metrics import MetricsLogger
from vlarl.models.action_tokenizer import ActionStats, ActionTokenizer
from vlarl.models.family import DTYPES, Loaded
from vlarl.models.registry import build_tiny_model, load_model, save_model
from vlarl.preflight import load_run_config
from vlarl.rollout.hf_engine import InstructionCache
from vlarl.workers.checkpoint import _fsync_path, _replace_dir

FINAL, BEST, CHECKPOINTS = "final", "best", "checkpoints"  # sub-folders of sft.out_dir
STATE_FILE, OPTIMIZER_FILE = "sft_state.json", "optimizer.pt"


class SFTError(RuntimeError):
    """The output folder or the model cannot be used as asked; the message says what to do."""


@dataclass
class DemoSteps:
    """Demonstration steps, flattened over episodes."""

    images: np.ndarray  # (S, H, W, 3) uint8
    proprio: np.ndarray  # (S, P) float32
    instructions: list  # (S,) str
    actions: np.ndarray  # (S, 7 * chunk) float32 expert targets: the next `chunk` actions, in env units

    @classmethod
    def from_episodes(cls, episodes: list[Episode], chunk: int) -> "DemoSteps":
        return cls(np.concatenate([e.images for e in episodes]), np.concatenate([e.proprio for e in episodes]),
                   [e.instruction for e in episodes for _ in range(len(e))],
                   np.concatenate([action_chunks(e.actions, chunk) for e in episodes]))

    def __len__(self) -> int:
        return len(self.actions)


# ---- configuration ------------------------------------------------------------------------------------
def check_sft(cfg: DictConfig) -> None:
    """The data/sft settings fit together (the rest of cfg is checked by load_run_config)."""
    d, s = cfg.data, cfg.sft
    if d.path is None:
        raise ConfigError("data.path is not set; point it at a LIBERO/robomimic HDF5 file or folder, or a LeRobot v3 "
                          "dataset folder.")
    for key in ("steps", "batch_size", "log_every", "keep_last", "val_max_samples", "max_grad_norm"):
        if not s[key] > 0:
            raise ConfigError(f"sft.{key} must be positive, got {s[key]}.")
    for key in ("val_every", "save_every"):
        if s[key] < 0:
            raise ConfigError(f"sft.{key} must be >= 0 (0: at the end only), got {s[key]}.")
    if s.lr is not None and not s.lr > 0:
        raise ConfigError(f"sft.lr must be positive, or null for the policy family's default; got {s.lr}.")
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must lie in [0, 1), got {d.val_fraction}.")
    if d.max_episodes < 0:
        raise ConfigError(f"data.max_episodes must be >= 0 (0 reads all), got {d.max_episodes}.")
    if cfg.model.lora_rank > 0:
        raise ConfigError("vlarl.sft trains all weights; leave model.lora_rank=0 here (RL adds LoRA adapters on top "
                          "when it continues from the SFT folder).")


def dataset_stats(actions: np.ndarray, chunk: int) -> ActionStats:
    """q01/q99 of each of the 7 action dimensions over the training steps (OpenVLA's normalisation), tiled
    over the chunk; the gripper is left unnormalised, as OpenVLA does (it is already -1/+1)."""
    q01, q99 = np.quantile(actions, 0.01, axis=0), np.quantile(actions, 0.99, axis=0)
    mask = [True] * (ACTION_DIM - 1) + [False]
    return ActionStats(q01.tolist() * chunk, q99.tolist() * chunk, mask * chunk)


# ---- output folders ------------------------------------------------------------------------------------
def write_folder(final: Path, loaded: Loaded, state: dict, optimizer=None) -> None:
    """A model folder (its family's layout + sft_state.json, + optimizer.pt when given), atomically."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, loaded)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    for f in tmp.iterdir():
        _fsync_path(str(f))
    _replace_dir(str(tmp), str(final), str(final.parent / f".trash-{final.name}-{os.getpid()}"))


def recover(out: Path) -> None:
    """Put back a folder stranded as .trash-<name>-<pid> by a crash mid-swap; drop unfinished .tmp-* folders."""
    for parent in (out, out / CHECKPOINTS):
        if not parent.is_dir():
            continue
        for path in sorted(parent.iterdir()):
            if path.name.startswith(".trash-"):
                target = parent / path.name[len(".trash-"):].rsplit("-", 1)[0]
                if not target.exists() and (path / STATE_FILE).is_file():
                    os.replace(path, target)
                    continue
            if path.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)


def checkpoints(out: Path) -> list[Path]:
    """Complete periodic checkpoints, oldest first."""
    folder = out / CHECKPOINTS
    found = [p for p in folder.glob("step_*") if (p / STATE_FILE).is_file() and (p / OPTIMIZER_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


# ---- the run -------------------------------------------------------------------------------------------
class Run:
    """One supervised run: data, model, optimizer and the output folder."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out = Path(cfg.sft.out_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        recover(self.out)
        resume_from = checkpoints(self.out)[-1] if cfg.sft.resume and checkpoints(self.out) else None
        if not cfg.sft.resume and any((self.out / p).exists() for p in (FINAL, BEST, CHECKPOINTS, "metrics.jsonl")):
            raise SFTError(f"sft.resume=false but {self.out} already holds a run; choose a new sft.out_dir or delete "
                           "that folder (nothing there was touched).")
        self.device = self._device()
        self.state = {"step": 0, "best_val_loss": None}
        folder = resume_from or cfg.model.path  # None: a fresh tiny model, built once the instructions are read
        if folder is not None:
            self.loaded = load_model(folder, cfg.model)
            self.model, self.tokenizer, self.action_tokenizer = self.loaded
            image_size, self.chunk = self.model.image_size, self.model.config.action_dim // ACTION_DIM
        else:
            image_size, self.chunk = cfg.env.image_size, cfg.env.action_chunk
        if resume_from is not None:
            self.state = json.loads((resume_from / STATE_FILE).read_text())
        d = cfg.data
        opts = ReadOptions(image_size=image_size, camera=d.camera, instruction=d.instruction,
                           state_keys=None if d.state_keys is None else tuple(d.state_keys),
                           max_episodes=d.max_episodes, upright=d.upright)
        episodes = read_episodes(d.path, d.format, opts)
        train_ids, val_ids = split_episodes(len(episodes), d.val_fraction, cfg.sft.seed)
        self.episodes = (len(train_ids), len(val_ids))
        self.train = DemoSteps.from_episodes([episodes[i] for i in train_ids], self.chunk)
        self.val = DemoSteps.from_episodes([episodes[i] for i in val_ids], self.chunk) if len(val_ids) else None
        instructions = sorted({e.instruction for e in episodes})
        del episodes
        if folder is None:
            built = build_tiny_model(cfg.model, image_size, instructions, cfg.sft.seed, self.chunk)
            self.model, self.tokenizer = built.model.to(DTYPES[cfg.model.dtype]), built.tokenizer
            stats = dataset_stats(self.train.actions[:, :ACTION_DIM], self.chunk)
            self.action_tokenizer = ActionTokenizer(self.model.vocab_size, stats)
            self.loaded = Loaded(self.model, self.tokenizer, self.action_tokenizer, built.family)
        self.supervised = self.loaded.family.supervised
        self.model.to(self.device)
        self.lr = cfg.sft.lr if cfg.sft.lr is not None else self.supervised.lr
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.lr,
                                           weight_decay=0.0, foreach=True)
        if resume_from is not None:
            self.optimizer.load_state_dict(torch.load(resume_from / OPTIMIZER_FILE, map_location=self.device,
                                                      weights_only=True))
        self.instructions = InstructionCache(self.tokenizer, self.model)
        self.resumed_from = resume_from
        self.unknown_words = self._unknown_words(instructions)

    def _device(self) -> str:
        if self.cfg.cluster.device == "cuda" and not torch.cuda.is_available():
            raise SFTError("cluster.device=cuda but no CUDA device is visible; use cluster.device=cpu.")
        torch.set_num_threads(self.cfg.cluster.torch_threads)  # as in the RL actors: small CPUs oversubscribe quickly
        return self.cfg.cluster.device

    def _unknown_words(self, instructions: list[str]) -> list[str]:
        """Instruction words the tokenizer maps to <unk> (a loaded tiny model's word list may lack them)."""
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return []
        return sorted({w for t in instructions for w in t.split()
                       if unk in self.tokenizer(w, add_special_tokens=False)["input_ids"]})

    # ---- one step -----------------------------------------------------------------------------------
    def inputs(self, steps: DemoSteps, idx: np.ndarray) -> tuple:
        """-> images (B, H, W, 3) uint8, proprio (B, P), input_ids (B, Li), text_mask (B, Li) on the device"""
        ids, mask = self.instructions.encode([steps.instructions[i] for i in idx])
        to = lambda x: torch.as_tensor(x).to(self.device)  # noqa: E731
        return to(steps.images[idx]), to(steps.proprio[idx]), to(ids), to(mask)

    def losses(self, steps: DemoSteps, idx: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """(B,) supervised losses of steps idx."""
        return self.supervised.loss(self.model, self.inputs(steps, idx), steps.actions[idx], self.action_tokenizer,
                                generator)

    def train_step(self, step: int) -> float:
        """One gradient step; its minibatch and flow noise are drawn from (seed, step), so a resumed run
        takes the same steps as an uninterrupted one."""
        s = self.cfg.sft
        idx = np.sort(np.random.default_rng((s.seed, step)).choice(len(self.train), min(s.batch_size, len(self.train)),
                                                                     replace=False))
        noise = torch.Generator().manual_seed(int(np.random.SeedSequence((s.seed, step)).generate_state(1)[0]))
        self.model.train()
        loss = self.losses(self.train, idx, noise).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], s.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over a fixed subset of the validation steps, with fixed flow noise (comparable over time)."""
        s = self.cfg.sft
        n = min(s.val_max_samples, len(self.val))
        idx = np.sort(np.random.default_rng((s.seed, 0x7A1)).choice(len(self.val), n, replace=False))
        noise = torch.Generator().manual_seed(s.seed + 7919)
        self.model.eval()
        parts = np.array_split(idx, -(-n // s.batch_size))
        total = sum(float(self.losses(self.val, part, noise).sum()) for part in parts)
        return total / n

    # ---- output ----------------------------------------------------------------------------------------
    def save(self, name: str, step: int, optimizer: bool = False) -> Path:
        folder = self.out / CHECKPOINTS / f"step_{step:06d}" if name == CHECKPOINTS else self.out / name
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_folder(folder, self.loaded, {**self.state, "step": step},
                     self.optimizer if optimizer else None)
        if name == CHECKPOINTS:
            for old in checkpoints(self.out)[:-self.cfg.sft.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return folder

    def summary(self) -> str:
        m, t, v = self.model, self.train, self.val
        params = sum(p.numel() for p in m.parameters())
        return (f"vlarl sft: {params:,} parameters ({self.loaded.family.name}), {self.episodes[0]} train / "
                f"{self.episodes[1]} val episodes ({len(t):,} / {len(v) if v else 0:,} steps), "
                f"image {t.images.shape[1]} px, {self.chunk} action(s) per call, lr {self.lr:g}; writing {self.out}")


def train_sft(cfg: DictConfig, stream=sys.stdout) -> dict:
    """Run cfg.sft.steps supervised steps (resuming from sft.out_dir when possible); returns the last metrics."""
    threads = torch.get_num_threads()
    try:
        return _train(Run(cfg), stream)
    finally:
        torch.set_num_threads(threads)  # Run sets cluster.torch_threads for its own work only


def _train(run: Run, stream) -> dict:
    cfg = run.cfg
    s, start = cfg.sft, int(run.state["step"])
    logger = MetricsLogger(run.out, OmegaConf.to_container(cfg), s.steps, stream=stream)
    logger.info(run.summary())
    if run.unknown_words:
        logger.info(f"vlarl sft: the model's tokenizer does not know {', '.join(run.unknown_words)} (read as <unk>).")
    if run.resumed_from is not None:
        logger.info(f"vlarl sft: resumed from {run.resumed_from} at step {start}")
    metrics: dict = {}
    try:
        metrics = loop(run, logger, start)
        if run.state["step"] > start or not (run.out / FINAL).is_dir():
            run.save(CHECKPOINTS, s.steps, optimizer=True)
            run.save(FINAL, s.steps)
        logger.info(f"vlarl sft: done; continue with RL: python -m vlarl.main model.path={run.out / FINAL}")
    except KeyboardInterrupt:
        done = int(run.state["step"])
        if done > start:
            logger.info(f"vlarl sft: interrupted; checkpoint {run.save(CHECKPOINTS, done, optimizer=True)} written, "
                        "rerun the same command to resume.")
        raise
    finally:
        logger.close()
    return {**metrics, "final": str(run.out / FINAL)}


def loop(run: Run, logger: MetricsLogger, start: int) -> dict:
    s, metrics = run.cfg.sft, {}
    if start >= s.steps:
        logger.info(f"vlarl sft: {run.out} already finished {start} steps; raise sft.steps to continue it.")
        return metrics
    if start == 0 and run.val is not None:  # the starting policy's validation loss: what training lowers
        metrics = {"sft/val_loss": run.validate()}
        logger.record(0, metrics)
        logger.info(f"[sft 0/{s.steps}]  val {metrics['sft/val_loss']:.4f} before training")
    clock, recent = time.perf_counter(), []
    for step in range(start, s.steps):
        recent.append(run.train_step(step))
        done = step + 1
        run.state["step"] = done
        metrics = {}
        if run.val is not None and ((s.val_every and done % s.val_every == 0) or done == s.steps):
            metrics["sft/val_loss"] = val = run.validate()
            if run.state["best_val_loss"] is None or val < run.state["best_val_loss"]:
                run.state.update(best_val_loss=val, best_step=done)
                run.save(BEST, done)
        if done % s.log_every == 0 or done == s.steps or metrics:
            rate = (done - start) / max(time.perf_counter() - clock, 1e-9)
            metrics.update({"sft/loss": float(np.mean(recent)), "perf/steps_per_s": rate})
            run.state["loss"] = metrics["sft/loss"]
            recent = []
            logger.record(done, metrics)
            logger.info(progress_line(done, s.steps, metrics, run.state.get("best_val_loss"), rate))
        if s.save_every and done % s.save_every == 0 and done < s.steps:
            run.save(CHECKPOINTS, done, optimizer=True)
    return metrics


def progress_line(done: int, total: int, m: dict, best: float | None, rate: float) -> str:
    eta = (total - done) / max(rate, 1e-9)
    parts = [f"[sft {done}/{total}]", f"loss {m['sft/loss']:.4f}"]
    if "sft/val_loss" in m:
        parts.append(f"val {m['sft/val_loss']:.4f}")
    if best is not None:
        parts.append(f"best {best:.4f}")
    parts += [f"{rate:.1f} steps/s", f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"]
    return "  ".join(parts)


# ---- command line --------------------------------------------------------------------------------------
def help_text() -> str:
    lines = ["usage: python -m vlarl.sft data.path=DEMOS [model=tiny_token|tiny_flow] [env=...] [key=value ...]", "",
             "Trains model.path (or a tiny model sized for env: env.image_size, env.action_chunk) on demonstrations",
             f"and writes sft.out_dir/{FINAL}, /{BEST} and /{CHECKPOINTS}; continue with RL:",
             f"  python -m vlarl.main model.path=<sft.out_dir>/{FINAL} [the same model= and env=]", "", "options:"]
    for section, schema in (("data", DataConfig), ("sft", SFTConfig)):
        for key, value in OmegaConf.to_container(OmegaConf.structured(schema)).items():
            lines.append(f"  {section}.{key}={'null' if value is None else value}")
    lines.append("  (and every model.*, env.* and cluster.device option of python -m vlarl.main --help)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        cfg = load_run_config(argv)
        check_sft(cfg)
    except ConfigError as e:
        print(f"vlarl: config error: {e}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        train_sft(cfg)
    except (DatasetError, SFTError) as e:
        print(f"vlarl: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
