"""The pi0 family (vlarl/models/family.py): LeRobot or openpi folders in, the same layout out.

Settings read from `model`: dtype, flow (the run's sampler settings replace pi0's plain ODE, as for
the tiny flow VLA), unnorm_key (openpi: which assets/<asset_id> statistics; needed if several),
tokenizer_path (a folder with the PaliGemma tokenizer; else the id the folder names, from the local
Hugging Face cache), executed_steps (actions executed per call; else LeRobot's n_action_steps, or the
whole openpi chunk). vlarl's value head (and Flow-Noise head) live in value_head.safetensors beside
the weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlarl.models.family import DTYPES, Family, FamilyError, Loaded, Supervised
from vlarl.models.pi0.actions import Pi0Actions
from vlarl.models.pi0.checkpoint import (
    PI05_KEYS,
    VALUE_HEAD,
    WEIGHTS,
    prefix_of,
    read_weights,
    side_files,
    write_side_files,
    write_weights,
)
from vlarl.models.pi0.config import Pi0Spec, kind_of, read_spec
from vlarl.models.pi0.modeling import Pi0Policy, Pi0Settings
from vlarl.models.tiny_flow.family import flow_matching, sampler_settings

HEADS = ("value_head.", "noise_head.")


def load_tokenizer(spec: Pi0Spec, model_cfg):
    """model.tokenizer_path, else the tokenizer the folder names from the local Hugging Face cache."""
    what = NAMES[spec.kind]
    from transformers import AutoTokenizer

    path = getattr(model_cfg, "tokenizer_path", None)
    if path:
        return AutoTokenizer.from_pretrained(path)
    try:
        return AutoTokenizer.from_pretrained(spec.tokenizer_name, local_files_only=True)
    except (OSError, ValueError):
        raise FamilyError(f"{what} needs the {spec.tokenizer_name} tokenizer, which is not in the local Hugging Face "
                          f"cache; download it there or set model.tokenizer_path=DIR to a folder holding it.") from None


def _check_weights(folder: Path, spec: Pi0Spec, kind: str) -> None:
    path = folder / WEIGHTS
    if not path.is_file():
        raise FamilyError(f"{path} is missing; copy the whole {kind} folder.")
    with safe_open(path, "pt") as f:
        names = set(f.keys())
    found = "pi05" if {prefix_of(spec.layout) + k for k in PI05_KEYS} & names else "pi0"
    if found != kind:
        raise FamilyError(f"{folder} holds a {NAMES[found]} model, not {NAMES[kind]}; set model.family={found} "
                          "(or leave model.family unset to detect it).")


NAMES = {"pi0": "pi0", "pi05": "pi0.5", "smolvla": "SmolVLA"}


def load_pi0(folder: Path, model_cfg, family: "Pi0") -> Loaded:
    spec = read_spec(folder, model_cfg)
    _check_weights(folder, spec, family.name)
    settings = Pi0Settings(action_dim=spec.action_dim * spec.executed_steps, value_from=model_cfg.value_from,
                           **sampler_settings(model_cfg.flow))
    tokenizer = load_tokenizer(spec, model_cfg)
    model = family.policy(spec, settings, init_weights=False, **family.policy_args(tokenizer))  # weights follow
    state, record = read_weights(folder, spec.layout, spec.kind)
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    missing = set(missing) - {"model.dit.embed_tokens.weight"}  # unused by the expert; upstream keeps it as lm_head
    if missing or unexpected:
        raise FamilyError(f"{folder / WEIGHTS} does not fit {NAMES[family.name]} at the folder's sizes "
                          f"(missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}); the folder is damaged or not {NAMES[family.name]}.")
    if "model.dit.embed_tokens.weight" not in state:
        torch.nn.init.zeros_(model.backbone.model.dit.embed_tokens.weight)  # the same in every process
    load_heads(model, folder)
    model.source_record, model.source_files = record, side_files(folder)
    model.to(DTYPES[model_cfg.dtype])
    return Loaded(model, tokenizer, Pi0Actions(spec.stats, spec.executed_steps), family)


def load_heads(model, folder: Path) -> None:
    """vlarl's heads from value_head.safetensors, when the folder has them (else the seeded fresh ones)."""
    if not (folder / VALUE_HEAD).is_file():
        return
    heads, own = load_file(folder / VALUE_HEAD), model.state_dict()
    for name, tensor in heads.items():
        if name in own and own[name].shape != tensor.shape:
            raise FamilyError(f"{folder / VALUE_HEAD} holds a value head of another input width ({name} "
                              f"{tuple(tensor.shape)}, this run needs {tuple(own[name].shape)}): keep the "
                              "model.value_from it was trained with, or delete the file to start a fresh head.")
    model.load_state_dict(heads, strict=False)


def save_pi0(folder: Path, model: Pi0Policy, state_dict: dict | None = None) -> None:
    """The folder the model came from: its side files as read, the weights under their upstream names
    and dtypes, vlarl's heads in value_head.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    write_side_files(folder, model.source_files)
    write_weights(folder, {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
                  model.source_record)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(HEADS)},
              folder / VALUE_HEAD)


def camera_strip(obs: dict, cameras: int) -> np.ndarray:
    """obs["image"] (N, H, W, 3) [+ obs["wrist_image"]] -> (N, H, cameras * W, 3) uint8, side by side."""
    frames = [obs["image"]]
    if cameras > 1:
        if "wrist_image" not in obs:
            raise FamilyError("This checkpoint reads the wrist camera too; set env.wrist_camera=true.")
        frames.append(obs["wrist_image"])
    return np.ascontiguousarray(np.concatenate(frames, axis=2))


class Pi0(Family):
    name = "pi0"
    policy = Pi0Policy
    serves_vllm = False  # its actions come from the action expert, in PyTorch
    action_expert = True
    supervised = Supervised(flow_matching, 2.5e-5)  # LeRobot configuration_pi0.py optimizer_lr

    def policy_args(self, tokenizer) -> dict:
        return {}

    def recognises(self, config: dict, folder: Path | None = None) -> bool:
        return kind_of(folder, config) == self.name

    def check(self, folder: Path, model_cfg) -> None:
        spec = read_spec(folder, model_cfg)
        _check_weights(Path(folder), spec, self.name)
        load_tokenizer(spec, model_cfg)

    def actions_per_call(self, folder: Path, model_cfg) -> int:
        return read_spec(folder, model_cfg).executed_steps

    def load(self, folder: Path, model_cfg) -> Loaded:
        return load_pi0(Path(folder), model_cfg, self)

    def save(self, folder: Path, loaded: Loaded, state_dict: dict | None = None) -> None:
        save_pi0(folder, loaded.model, state_dict)

    def frame_transform(self, env_name: str, model_cfg):
        """LIBERO: agentview | wrist side by side (vlarl's LIBERO frames are already upright, as openpi's
        example rotates them); the model resizes each camera to its image size. Other envs: None."""
        return libero_cameras(env_name, model_cfg, read_spec)


def libero_cameras(env_name: str, model_cfg, read_spec):
    """On LIBERO, the folder's cameras (`read_spec(...).num_cameras`; agentview + wrist without a folder)
    side by side; None elsewhere."""
    if not env_name.startswith("libero"):
        return None
    cameras = read_spec(model_cfg.path, model_cfg).num_cameras if model_cfg.path else 2
    return lambda obs: camera_strip(obs, cameras)
