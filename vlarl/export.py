"""Export a training checkpoint as Hugging Face folders that load with no vlarl-specific steps.

`export(checkpoint, out)` (CLI: tools/merge_adapters.py) reads a checkpoint directory written by
the CheckpointActor (run_dir/best_return or run_dir/checkpoints/step_NNNNNN), folds LoRA adapters
into their base weights (a full checkpoint is taken as it is), and writes the folder the base
model's family exports (`Family.export`): an OpenVLA base gives an OpenVLA folder (its layout, key
names and remote-code files, the value head in a separate file). For vlarl's tiny families::

    out/config.json, model*.safetensors    the token or flow VLA; AutoModel.from_pretrained(out)
                                            after `import vlarl.models`
    out/tokenizer*, special_tokens_map...  the text tokenizer (bins at the vocabulary tail)
    out/preprocessor_config.json           image size and the [-1, 1] normalisation the model applies
    out/action_stats.json                  q01/q99 statistics that turn bins into env actions
    out/generation_config.json             greedy decoding of action_dim tokens (token VLA)
    out/merge_metadata.json                provenance and the sha256 of every weight file
    out/decoder/                           the decoder alone as a LlamaForCausalLM folder (vLLM
                                            serves it with prompt_embeds = the VLA's prefix);
                                            token VLA only: a flow VLA's actions come from its
                                            action expert, which the decoder alone cannot give

The base model folder (model.path of the run, or run_dir/base_model) supplies config, tokenizer
and action statistics; it must be the model the checkpoint was trained from, which is checked
(parameter names and shapes always, and for LoRA runs the frozen weights value for value).
Everything is written into a hidden sibling `.tmp-<name>-<pid>` and renamed into place at the
end, so an interrupted export never leaves a half-written folder under the output name.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from vlarl.models.family import DTYPES, FamilyError, Loaded
from vlarl.models.lora import merge_lora_state_dict
from vlarl.models.registry import family_of_folder, load_model
from vlarl.workers.checkpoint import CONFIG_FILE, MODEL_FILE, STATE_DIR, TRAINER_STATE_FILE, is_sharded, read_model_state

METADATA_FILE = "merge_metadata.json"
_TMP_PREFIX, _TRASH_PREFIX = ".tmp-", ".trash-"
USE_RUN_BASE = "pass the model the run started from with --base-model DIR."  # the fix for every base mismatch


class ExportError(ValueError):
    """Bad input (a missing or mismatched base model, an existing output, ...), in one sentence."""


class ExportWriteError(RuntimeError):
    """The output could not be written (disk full, no permission, ...); nothing was published."""


@dataclass
class Checkpoint:
    path: Path  # the checkpoint directory
    state: dict[str, torch.Tensor]  # model state as saved, LoRA keys included
    run_config: dict  # the resolved run config the checkpoint carries
    trainer_state: dict  # step, ema_return, ...


# ---- reading ------------------------------------------------------------------------------------
def read_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint of either format (sharded shards are gathered into one state here)."""
    if not path.is_dir():
        raise ExportError(f"checkpoint {path} does not exist; pass a run's best_return or checkpoints/step_NNNNNN folder.")
    weights = [] if is_sharded(str(path)) or (path / MODEL_FILE).is_file() else [f"{MODEL_FILE} or {STATE_DIR}/"]
    missing = weights + [f for f in (CONFIG_FILE, TRAINER_STATE_FILE) if not (path / f).is_file()]
    if missing:
        raise ExportError(f"{path} is not a vlarl checkpoint (no {', '.join(missing)}); pass a run's best_return "
                          f"or checkpoints/step_NNNNNN folder.")
    return Checkpoint(path, read_model_state(str(path)), json.loads((path / CONFIG_FILE).read_text()),
                      json.loads((path / TRAINER_STATE_FILE).read_text()))


def find_base_model(ckpt: Checkpoint, base_model: str | None) -> Path:
    """--base-model, else the run's model.path, else run_dir/base_model (run_dir found from the checkpoint's place)."""
    if base_model is not None:
        folder, source = Path(base_model), "--base-model"
    elif ckpt.run_config.get("model", {}).get("path"):
        folder, source = Path(ckpt.run_config["model"]["path"]), "the run's model.path"
    else:
        run_dir = ckpt.path.parent.parent if ckpt.path.parent.name == "checkpoints" else ckpt.path.parent
        folder, source = run_dir / "base_model", "the run folder"
    if not (folder / "config.json").is_file():
        raise ExportError(f"base model {folder} (from {source}) is missing; pass the model the run started from "
                          f"with --base-model DIR.")
    try:
        family_of_folder(folder, ckpt.run_config.get("model", {}).get("family"))
    except FamilyError as e:
        raise ExportError(f"base model {folder} cannot be exported ({e}); {USE_RUN_BASE}") from None
    return folder.resolve()


def load_base(base: Path, ckpt: Checkpoint) -> Loaded:
    """The base model through its family, with the run's model settings (family override, unnorm_key...)."""
    from omegaconf import OmegaConf

    from vlarl.models.registry import default_model_cfg

    run_model = {k: v for k, v in ckpt.run_config.get("model", {}).items() if k in default_model_cfg()}
    model_cfg = OmegaConf.merge(default_model_cfg(), run_model, {"path": str(base)})
    try:
        return load_model(base, model_cfg)
    except (FileNotFoundError, FamilyError) as e:
        raise ExportError(f"base model {base} does not load ({e}); {USE_RUN_BASE}") from None


# ---- checks and the merge -----------------------------------------------------------------------
def lora_prefixes(state: dict) -> list[str]:
    return sorted(k.split(".lora_A.")[0] for k in state if ".lora_A." in k)


def lora_settings(ckpt: Checkpoint) -> dict:
    """Rank (from the adapter shapes; a list when the decoder's and an action expert's differ), alpha (from
    the run config) and peft's scaling alpha / rank (None with several ranks: each pair scales by its own)."""
    alpha = ckpt.run_config.get("model", {}).get("lora_alpha")
    if alpha is None:
        raise ExportError(f"{ckpt.path / CONFIG_FILE} has no model.lora_alpha, so the adapters' scale is unknown; "
                          f"export a checkpoint written by vlarl's trainer.")
    prefixes = lora_prefixes(ckpt.state)
    ranks = sorted({int(ckpt.state[f"{p}.lora_A.default.weight"].shape[0]) for p in prefixes})
    rank = ranks[0] if len(ranks) == 1 else ranks  # the decoder's and an action expert's may differ
    return {"rank": rank, "alpha": alpha, "scaling": float(alpha) / ranks[0] if len(ranks) == 1 else None,
            "modules": len(prefixes)}


def check_adapters_fit(state: dict, shapes: dict, base: Path) -> None:
    """Every adapter pair must sit on a base weight of the base model with matching in/out sizes."""
    for prefix in lora_prefixes(state):
        a, b = state[f"{prefix}.lora_A.default.weight"], state.get(f"{prefix}.lora_B.default.weight")
        target = shapes.get(f"{prefix}.weight")
        if b is None or target is None or len(target) != 2 or a.shape[0] != b.shape[1] \
                or (b.shape[0], a.shape[1]) != target:
            found = "no such weight" if target is None else f"a {'x'.join(map(str, target))} weight"
            raise ExportError(f"the adapter on {prefix} (A {tuple(a.shape)}, B {None if b is None else tuple(b.shape)}) "
                              f"does not fit the base model {base} ({found}); export with the base model the run "
                              f"trained (--base-model DIR).")


def check_base_matches(merged: dict, base_state: dict, base: Path, frozen: dict) -> None:
    """Same parameter names and shapes as the base (its state in vlarl's names); the `frozen` tensors
    (name -> value the checkpoint holds) must equal the base's exactly."""
    shapes = {k: tuple(v.shape) for k, v in base_state.items()}
    if set(merged) != set(shapes):
        extra, lacking = sorted(set(merged) - set(shapes)), sorted(set(shapes) - set(merged))
        raise ExportError(f"the checkpoint does not match the base model {base} (checkpoint-only parameters "
                          f"{extra[:2]}, base-only {lacking[:2]}); {USE_RUN_BASE}")
    for k, v in merged.items():
        if tuple(v.shape) != shapes[k]:
            raise ExportError(f"the checkpoint does not match the base model {base} ({k} is {tuple(v.shape)} in the "
                              f"checkpoint, {shapes[k]} in the base); {USE_RUN_BASE}")
    for k in frozen.keys() & base_state.keys():
        if not torch.equal(base_state[k].to(frozen[k].dtype), frozen[k]):
            raise ExportError(f"the checkpoint was trained from a different base model than {base} (the frozen "
                              f"weight {k} differs); {USE_RUN_BASE}")


def merged_state(ckpt: Checkpoint, base: Path, base_model) -> tuple[dict, dict | None]:
    """Full parameter state with adapters folded in, and the LoRA settings (None for a full checkpoint).
    `base_model` is the base folder loaded by its family (its parameters under vlarl's names)."""
    base_state = base_model.state_dict()
    if not lora_prefixes(ckpt.state):
        check_base_matches(ckpt.state, base_state, base, frozen={})
        return ckpt.state, None
    check_adapters_fit(ckpt.state, {k: tuple(v.shape) for k, v in base_state.items()}, base)
    lora = lora_settings(ckpt)
    merged = merge_lora_state_dict(ckpt.state, alpha=lora["alpha"])
    frozen = {k.replace(".base_layer.", "."): v for k, v in ckpt.state.items()
              if ".lora_" not in k and not k.startswith(tuple(base_model.lora_trainable))}
    check_base_matches(merged, base_state, base, frozen)
    return merged, lora


# ---- writing ------------------------------------------------------------------------------------
def write_folders(tmp: Path, loaded: Loaded, state: dict, base: Path, dtype: str, max_shard_size: str) -> None:
    """The base's family writes its export of `state` in `dtype` (everything but merge_metadata.json)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a tool's stderr carries its one-line result, not shard bars
    loaded.model.to(DTYPES[dtype]).load_state_dict({k: v.to(DTYPES[dtype]) for k, v in state.items()}, strict=True)
    loaded.family.export(tmp, loaded, base, max_shard_size)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root, so the final rename publishes complete data."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in [*files, "."]:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def remove_stale_leftovers(out: Path) -> None:
    """Delete `.tmp-<name>-<pid>` / `.trash-<name>-<pid>` siblings left by exports that died."""
    for prefix in (_TMP_PREFIX, _TRASH_PREFIX):
        for path in out.parent.glob(f"{prefix}{out.name}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output(out: Path, force: bool, protected: list[Path]) -> None:
    for p in protected:
        if p == out or out in p.parents:
            raise ExportError(f"--out {out} would replace {p}, which the export reads; choose another output folder.")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it or choose another --out.")


# ---- the export ---------------------------------------------------------------------------------
def export(checkpoint: str | Path, out: str | Path, dtype: str | None = None, force: bool = False,
           base_model: str | None = None, max_shard_size: str = "5GB") -> Path:
    """Write the export of `checkpoint` to `out` atomically; returns the output path.

    dtype: float32 | bfloat16, default the run's model.dtype. Raises ExportError on bad input.
    """
    checkpoint, out = Path(checkpoint).resolve(), Path(out).resolve()
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype} is not supported; choose one of {', '.join(DTYPES)}.")
    ckpt = read_checkpoint(checkpoint)
    base = find_base_model(ckpt, base_model)
    check_output(out, force, [checkpoint, base])
    dtype = dtype or ckpt.run_config.get("model", {}).get("dtype", "float32")
    loaded = load_base(base, ckpt)  # in the run's dtype: the frozen weights compare value for value
    state, lora = merged_state(ckpt, base, loaded.model)

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(out)
    tmp, trash = (out.with_name(f"{p}{out.name}-{os.getpid()}") for p in (_TMP_PREFIX, _TRASH_PREFIX))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_folders(tmp, loaded, state, base, dtype, max_shard_size)
        write_metadata(tmp, ckpt, base, lora, dtype)
        fsync_tree(tmp)
        if out.exists():  # --force: the old folder stays whole until the new one is complete
            os.replace(out, trash)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):  # safetensors reports I/O errors as its own type
            raise ExportWriteError(f"could not write {out} ({e}); nothing was published there, so free space or "
                                   f"fix permissions and run again.") from e
        raise
    shutil.rmtree(trash, ignore_errors=True)
    return out


def write_metadata(tmp: Path, ckpt: Checkpoint, base: Path, lora: dict | None, dtype: str) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        vlarl_version = version("vlarl")
    except PackageNotFoundError:  # running from a source tree that was never installed
        vlarl_version = "unknown"
    files = sorted(p for p in tmp.rglob("*.safetensors"))
    meta = {
        "base_model": str(base),
        "adapter": str(ckpt.path),
        "lora": lora,  # null: the checkpoint held full weights, copied as they are
        "step": ckpt.trainer_state.get("step"),
        "ema_return": ckpt.trainer_state.get("ema_return"),
        "dtype": dtype,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "vlarl_version": vlarl_version,
        "sha256": {str(p.relative_to(tmp)): sha256(p) for p in files},
    }
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2))
