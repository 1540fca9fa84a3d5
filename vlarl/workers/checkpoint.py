"""Checkpoint keeper: owns the run directory's checkpoints and the best-return snapshot.

Layout (trainer.checkpoint_format=sharded, the default)::

    run_dir/checkpoints/step_000012/   state/ (torch.distributed.checkpoint: .metadata and one
                                       __<rank>_0.distcp shard per learner rank, model under
                                       "model.", optimizer under "optim."), trainer_state.json,
                                       curriculum.json, config.json
    run_dir/best_return/               the same files (hard links) plus metadata.json

and with trainer.checkpoint_format=full, model.safetensors + optimizer.pt in place of state/, the
whole state gathered on learner rank 0 and written by this actor.

Every write is atomic at the directory level: files go into a hidden temporary sibling, are
fsynced, and the directory is renamed into place. A crash or exception at any point leaves the
previous checkpoints complete and loadable; leftovers are hidden `.tmp-*` / `.trash-*` dirs that
`latest()` ignores and the next start removes. For a sharded save, `begin_shards` names the hidden
directory, every learner rank writes its shard into it in the background (`save_shards`), and
`commit` (which Ray runs only once every rank reports its shard written) adds the JSON files and
renames it into place: this actor stays the only writer of metadata, retention and best_return.
Shards load onto any number of ranks (`load_shards` reshards); `read_model_state` gathers a full
model state in one process, for export and evaluation only.

Best-checkpoint selection follows an EMA of the training return (alpha 0.99), so one lucky batch
does not replace a genuinely better policy. The EMA is part of the saved trainer state; on resume
pass `load(path)["ema_state"]` to `load_ema_state` so the EMA continues instead of restarting.

This is a plain Python class, testable without Ray. The trainer makes it an actor at the call
site: `ray.remote(num_cpus=0)(CheckpointActor).remote(run_dir, ...)`.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil

import safetensors.torch
import torch

CHECKPOINTS_DIR = "checkpoints"  # sub-directory of run_dir holding the step_NNNNNN dirs
BEST_DIR = "best_return"  # sub-directory of run_dir holding the best-EMA-return snapshot
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.json"
CURRICULUM_FILE = "curriculum.json"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"  # only in best_return
STATE_DIR = "state"  # sharded format: the torch.distributed.checkpoint directory
DCP_METADATA = ".metadata"  # written by DCP after every rank's shard, so its presence means all are there
# A directory counts as a checkpoint only if all of these exist, and the state in one of the formats.
REQUIRED_FILES = (TRAINER_STATE_FILE, CURRICULUM_FILE, CONFIG_FILE)
FULL_FILES = (MODEL_FILE, OPTIMIZER_FILE)
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"  # in-progress writes
_TRASH_PREFIX = ".trash-"  # a replaced checkpoint dir awaiting deletion
# Leftover names this class may create; _recover touches nothing else in run_dir.
_LEFTOVER_PREFIXES = tuple(p + t for p in (_TMP_PREFIX, _TRASH_PREFIX) for t in ("step_", BEST_DIR))


def step_dir_name(step: int) -> str:
    """Directory name of a step checkpoint; zero-padded so names sort like steps."""
    return f"step_{step:06d}"


def _fsync_path(path: str) -> None:
    """fsync a file or directory by path (directories too, so renames inside it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, obj: object) -> None:
    """Write obj as indented JSON and fsync it."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _write_torch(path: str, obj: object) -> None:
    """torch.save obj and fsync it."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Save tensors with safetensors and fsync the file."""
    safetensors.torch.save_file(tensors, path)
    _fsync_path(path)


def _to_saveable(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors with no two sharing storage.

    safetensors refuses non-contiguous tensors and tensors that share storage (tied embeddings,
    views); clone only those, so an ordinary state dict is not copied twice in host memory.
    """
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in model_state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(tensor).__name__}; pass a state dict of tensors only.")
        t = tensor.detach().cpu()
        storage = t.untyped_storage()
        owns_storage = t.numel() * t.element_size() == storage.nbytes()  # not a view into a bigger buffer
        if not t.is_contiguous() or not owns_storage or storage.data_ptr() in seen_storages:
            t = t.contiguous().clone()
        ptr = t.untyped_storage().data_ptr()
        seen_storages.add(ptr)
        out[name] = t
    return out


def is_sharded(path: str) -> bool:
    """True if the checkpoint at path holds its state as torch.distributed.checkpoint shards."""
    return os.path.isfile(os.path.join(path, STATE_DIR, DCP_METADATA))


def is_complete(path: str) -> bool:
    """True if path is a directory holding every required checkpoint file, in either format."""
    def has(*names: str) -> bool:
        return all(os.path.isfile(os.path.join(path, f)) for f in names)

    return os.path.isdir(path) and has(*REQUIRED_FILES) and (has(*FULL_FILES) or is_sharded(path))


def _link_tree(src: str, dst: str) -> None:
    """dst: a copy of directory src made of hard links (a plain copy where the filesystem has none)."""
    for root, dirs, files in os.walk(src):
        here = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(here, exist_ok=True)
        for name in files:
            try:
                os.link(os.path.join(root, name), os.path.join(here, name))
            except OSError:
                shutil.copy2(os.path.join(root, name), os.path.join(here, name))


def _replace_dir(tmp: str, final: str, trash: str) -> None:
    """Move tmp to final, replacing an existing final via trash.

    At every instant either the old final (as final or as trash) or the new one is complete;
    the constructor restores a stranded trash dir if the process died between the two renames.
    """
    parent = os.path.dirname(final)
    if os.path.exists(final):
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_path(parent)
    shutil.rmtree(trash, ignore_errors=True)


class CheckpointActor:
    """Writes, prunes, finds and loads the checkpoints of one run directory."""

    def __init__(self, run_dir: str, keep_last: int = 2, ema_alpha: float = 0.99, config: dict | None = None) -> None:
        """Create the layout, recover from an interrupted write, and read the best EMA on disk."""
        if keep_last < 1:
            raise ValueError(f"keep_last is {keep_last}; keep at least 1 step checkpoint so the run can resume.")
        if not 0.0 <= ema_alpha < 1.0:
            raise ValueError(f"ema_alpha is {ema_alpha}; choose a value in [0, 1) (0.99 is the default).")
        config = {} if config is None else config
        try:
            json.dumps(config)
        except TypeError as err:
            raise TypeError(
                f"config is not JSON-serialisable ({err}); pass a plain dict, e.g. OmegaConf.to_container(cfg, resolve=True)."
            ) from None
        self.run_dir = os.path.abspath(run_dir)  # root of this run's outputs
        self.checkpoints_dir = os.path.join(self.run_dir, CHECKPOINTS_DIR)  # parent of step_NNNNNN dirs
        self.best_dir = os.path.join(self.run_dir, BEST_DIR)  # best-EMA-return snapshot
        self.keep_last = int(keep_last)  # how many step checkpoints survive pruning
        self.ema_alpha = float(ema_alpha)  # EMA weight on the previous value of the return EMA
        self.config = config  # resolved run config, copied into every checkpoint
        self._ema: float | None = None  # EMA of the training return; None before the first update_best
        self._best_ema: float | None = None  # highest EMA that was written to best_return
        self._best_step: int | None = None  # step of the best_return snapshot
        os.makedirs(self.checkpoints_dir, exist_ok=True)
        self._recover()
        # Never let a restarted run overwrite a better snapshot with a worse one, even before the
        # trainer restores the full EMA state with load_ema_state.
        meta_path = os.path.join(self.best_dir, METADATA_FILE)
        if is_complete(self.best_dir) and os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            self._best_ema, self._best_step = float(meta["ema_return"]), int(meta["step"])

    def _recover(self) -> None:
        """Put back a checkpoint stranded in trash by a crash mid-swap; delete other leftovers.

        Only names this class creates are touched, so other files kept in run_dir are safe.
        """
        for parent in (self.run_dir, self.checkpoints_dir):
            for name in sorted(os.listdir(parent)):
                if not name.startswith(_LEFTOVER_PREFIXES):
                    continue
                path = os.path.join(parent, name)
                if name.startswith(_TRASH_PREFIX):
                    # ".trash-<target>-<pid>": the old copy of <target>, complete by construction.
                    target = os.path.join(parent, name[len(_TRASH_PREFIX) :].rsplit("-", 1)[0])
                    if not os.path.exists(target) and is_complete(path):
                        os.replace(path, target)
                        continue
                shutil.rmtree(path, ignore_errors=True)

    def _write_checkpoint_dir(
        self,
        path: str,
        step: int,
        model_state: dict[str, torch.Tensor],
        optimizer_state: dict,
        trainer_state: dict,
        curriculum_state: dict,
    ) -> None:
        """Write every checkpoint file of the full format into the (new, empty) directory path."""
        os.makedirs(path)
        _write_safetensors(os.path.join(path, MODEL_FILE), _to_saveable(model_state))
        _write_torch(os.path.join(path, OPTIMIZER_FILE), optimizer_state)
        self._write_json_files(path, step, trainer_state, curriculum_state)

    def _write_json_files(self, path: str, step: int, trainer_state: dict, curriculum_state: dict) -> None:
        """trainer_state.json (with the EMA state load_ema_state needs on resume), curriculum.json, config.json."""
        full_trainer_state = dict(trainer_state)
        full_trainer_state["step"] = int(step)
        full_trainer_state.setdefault("ema_return", self._ema)
        full_trainer_state["checkpoint_ema"] = self.ema_state()
        _write_json(os.path.join(path, TRAINER_STATE_FILE), full_trainer_state)
        _write_json(os.path.join(path, CURRICULUM_FILE), curriculum_state)
        _write_json(os.path.join(path, CONFIG_FILE), self.config)

    def _step_paths(self, step: int) -> tuple[str, str, str]:
        """(final, hidden temporary, trash) paths of step checkpoint `step`."""
        if step < 0:
            raise ValueError(f"step is {step}; pass the trainer's non-negative iteration counter.")
        name = step_dir_name(step)
        return (os.path.join(self.checkpoints_dir, name),
                os.path.join(self.checkpoints_dir, f"{_TMP_PREFIX}{name}-{os.getpid()}"),
                os.path.join(self.checkpoints_dir, f"{_TRASH_PREFIX}{name}-{os.getpid()}"))

    def save(
        self,
        step: int,
        model_state: dict[str, torch.Tensor],
        optimizer_state: dict,
        trainer_state: dict,
        curriculum_state: dict,
    ) -> str:
        """Atomically write checkpoints/step_NNNNNN (full format), prune to keep_last, and return its path.

        Call update_best (if used) before save at the same step, so the saved EMA includes it.
        """
        final, tmp, trash = self._step_paths(step)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._write_checkpoint_dir(tmp, step, model_state, optimizer_state, trainer_state, curriculum_state)
            _fsync_path(tmp)
            # Re-saving an existing step (e.g. right after a resume) swaps it like best_return.
            _replace_dir(tmp, final, trash)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    def begin_shards(self, step: int) -> str:
        """The directory the learner ranks write step `step`'s shards into (save_shards): state/ of a
        hidden directory that only commit turns into a checkpoint. Removes any earlier save that
        never committed (a rank was lost while writing)."""
        _, tmp, _ = self._step_paths(step)
        for name in os.listdir(self.checkpoints_dir):
            if name.startswith(_TMP_PREFIX + "step_"):
                shutil.rmtree(os.path.join(self.checkpoints_dir, name), ignore_errors=True)
        os.makedirs(os.path.join(tmp, STATE_DIR))
        return os.path.join(tmp, STATE_DIR)

    def commit(self, step: int, state_dir: str, current_return: float, trainer_state: dict,
               curriculum_state: dict, *written: object) -> str:
        """Turn the shards in state_dir (from begin_shards) into checkpoints/step_NNNNNN: update the
        return EMA, add the JSON files, rename the directory into place, prune to keep_last, and
        refresh best_return (hard links) when the EMA beats the best. Ray runs this call only once
        every object in `written` (one per learner rank: its shard is on disk) is ready; a lost rank
        fails it, and the previous checkpoints stay as they were. Returns the checkpoint's path."""
        final, tmp, trash = self._step_paths(step)
        if os.path.dirname(os.path.abspath(state_dir)) != tmp or not os.path.isfile(os.path.join(state_dir, DCP_METADATA)):
            raise FileNotFoundError(f"no complete sharded save of step {step} at {state_dir} (no {DCP_METADATA}); "
                                    "commit the directory begin_shards returned, after every rank's save_shards.")
        previous = (self._ema, self._best_ema, self._best_step)
        try:
            better = self._advance_ema(current_return)
            if better:  # set first, so the checkpoint's own checkpoint_ema records it as the best
                self._best_ema, self._best_step = self._ema, int(step)
            self._write_json_files(tmp, step, trainer_state, curriculum_state)
            _fsync_path(tmp)
            _replace_dir(tmp, final, trash)
        except BaseException:
            self._ema, self._best_ema, self._best_step = previous
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        if better:
            self._write_best(step, current_return, lambda path: _link_tree(final, path), previous[1:])
        return final

    def _step_dirs(self) -> list[tuple[int, str]]:
        """(step, path) of every complete step checkpoint, oldest first."""
        found = []
        for name in os.listdir(self.checkpoints_dir):
            match = _STEP_RE.match(name)
            path = os.path.join(self.checkpoints_dir, name)
            if match and is_complete(path):
                found.append((int(match.group(1)), path))
        return sorted(found)

    def _prune(self) -> None:
        """Delete all but the newest keep_last step checkpoints (best_return lives elsewhere)."""
        for _, path in self._step_dirs()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def _advance_ema(self, current_return: float) -> bool:
        """Fold current_return into the return EMA; True when the EMA beats the best so far."""
        current_return = float(current_return)
        if self._ema is None:
            self._ema = current_return
        else:
            self._ema = self.ema_alpha * self._ema + (1.0 - self.ema_alpha) * current_return
        return self._best_ema is None or self._ema > self._best_ema

    def _write_best(self, step: int, current_return: float, fill, previous_best: tuple) -> None:
        """Atomically replace best_return with a directory `fill(path)` creates, plus metadata.json;
        on failure the best EMA goes back to `previous_best` (best EMA, step)."""
        tmp = os.path.join(self.run_dir, f"{_TMP_PREFIX}{BEST_DIR}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            fill(tmp)
            metadata = {
                "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "ema_return": self._ema,
                "current_return": float(current_return),
                "step": int(step),
                "config": self.config,
            }
            _write_json(os.path.join(tmp, METADATA_FILE), metadata)
            _fsync_path(tmp)
            _replace_dir(tmp, self.best_dir, os.path.join(self.run_dir, f"{_TRASH_PREFIX}{BEST_DIR}-{os.getpid()}"))
        except BaseException:
            self._best_ema, self._best_step = previous_best
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def update_best(
        self,
        step: int,
        current_return: float,
        model_state: dict[str, torch.Tensor],
        optimizer_state: dict,
        trainer_state: dict,
        curriculum_state: dict,
    ) -> bool:
        """Update the return EMA; if it beats the best so far, atomically replace best_return (full
        format). Returns True when best_return was rewritten."""
        if not self._advance_ema(current_return):
            return False
        previous_best = (self._best_ema, self._best_step)
        # Set before writing so the snapshot's own checkpoint_ema records itself as the best.
        self._best_ema, self._best_step = self._ema, int(step)
        self._write_best(step, current_return, lambda path: self._write_checkpoint_dir(
            path, step, model_state, optimizer_state, trainer_state, curriculum_state), previous_best)
        return True

    def ema_state(self) -> dict:
        """JSON-able EMA state: current return EMA, best EMA and its step (None when unset)."""
        return {"ema_return": self._ema, "best_ema_return": self._best_ema, "best_step": self._best_step}

    def load_ema_state(self, state: dict) -> None:
        """Restore the EMA state saved in a checkpoint, so best selection continues across resumes."""
        self._ema = None if state.get("ema_return") is None else float(state["ema_return"])
        if state.get("best_ema_return") is not None:
            best = float(state["best_ema_return"])
            # best_return on disk may be newer than the checkpoint being resumed; keep the higher.
            if self._best_ema is None or best > self._best_ema:
                self._best_ema = best
                self._best_step = None if state.get("best_step") is None else int(state["best_step"])

    def latest(self) -> str | None:
        """Path of the newest complete step checkpoint, or None if there is none."""
        dirs = self._step_dirs()
        return dirs[-1][1] if dirs else None

    def best(self) -> str | None:
        """Path of the best_return snapshot, or None if none was written."""
        return self.best_dir if is_complete(self.best_dir) else None

    def load(self, path: str) -> dict:
        """Read a checkpoint directory (a step dir or best_return).

        Returns trainer_state, curriculum_state, config, ema_state, for best_return metadata, and
        the state: state_dir (sharded format; the learner ranks read it with load_shards) or
        model_state and optimizer_state (full format; CPU tensors).
        """
        if not is_complete(path):
            raise FileNotFoundError(
                f"No complete checkpoint at {path}; pass a directory written by CheckpointActor.save "
                f"(run_dir/{CHECKPOINTS_DIR}/step_NNNNNN or run_dir/{BEST_DIR}), or start without resuming."
            )

        def read_json(name: str) -> object:
            """Parse one JSON file of the checkpoint."""
            with open(os.path.join(path, name)) as f:
                return json.load(f)

        trainer_state = read_json(TRAINER_STATE_FILE)
        if is_sharded(path):
            state = {"state_dir": os.path.join(path, STATE_DIR)}
        else:
            state = {"model_state": safetensors.torch.load_file(os.path.join(path, MODEL_FILE), device="cpu"),
                     # weights_only: an optimizer state dict is tensors and plain containers; refuse pickled code.
                     "optimizer_state": torch.load(os.path.join(path, OPTIMIZER_FILE), map_location="cpu",
                                                   weights_only=True)}
        result = {
            **state,
            "trainer_state": trainer_state,
            "curriculum_state": read_json(CURRICULUM_FILE),
            "config": read_json(CONFIG_FILE),
            "ema_state": trainer_state.get("checkpoint_ema", {}),
        }
        if os.path.isfile(os.path.join(path, METADATA_FILE)):
            result["metadata"] = read_json(METADATA_FILE)
        return result


# ---- sharded state: written and read by the learner ranks ------------------------------------------
def save_shards(model, optimizer, state_dir: str, group):
    """Start writing this rank's shard of the model and optimizer state into state_dir (from
    CheckpointActor.begin_shards); collective over `group`, a gloo group of the learner ranks kept
    for checkpoints (the background writes must not share a group with training collectives).
    Returns once the shard is copied to host memory; the returned future completes when it is on
    disk (on rank 0: with the .metadata file naming every shard)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if not os.path.isdir(state_dir):
        raise FileNotFoundError(f"{state_dir} does not exist on this node; sharded checkpoints need trainer.run_dir on "
                                "a filesystem every node mounts (NFS, Lustre, a cloud bucket mount), or "
                                "trainer.checkpoint_format=full.")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return dcp.async_save({"model": model_state, "optim": optimizer_state}, checkpoint_id=state_dir,
                          process_group=group)


def load_shards(model, optimizer, state_dir: str, group) -> None:
    """Load the sharded state in state_dir into this rank's shards; collective over `group`. Works for
    any number of ranks, whatever number wrote it (torch.distributed.checkpoint reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # initialises empty optimizer state
    state = {"model": model_state, "optim": optimizer_state}
    dcp.load(state, checkpoint_id=state_dir, process_group=group)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def read_model_state(path: str) -> dict[str, torch.Tensor]:
    """The full model state dict of a checkpoint (either format) in this process, on CPU: for export
    and evaluation, never for training."""
    if not is_sharded(path):
        return safetensors.torch.load_file(os.path.join(path, MODEL_FILE), device="cpu")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(os.path.join(path, STATE_DIR))
    entries = reader.read_metadata().state_dict_metadata
    model = {key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in entries.items() if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    if not model:
        raise FileNotFoundError(f"{path}/{STATE_DIR} holds no model tensors; pass a checkpoint written by vlarl's trainer.")
    dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model
