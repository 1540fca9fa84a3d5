"""The OpenVLA family (vlarl/models/family.py): upstream-layout folders in, the same layout out.

Registering it is one line in vlarl/models/registry.py (`OpenVLA()` in FAMILIES). Settings read from
`model`: dtype, unnorm_key (which norm_stats dataset un-normalises actions; required when the folder
holds several), train_vision (the towers stay frozen unless set; the projector and decoder train),
center_crop (part of the frame transform the rollout worker applies on LIBERO, `frame_transform`).

Environment actions: OpenVLA's gripper dimension is not normalised and lives in [0, 1] (1 = open);
`GripperActions` maps it to {-1, +1} as the published LIBERO evaluation does (2a - 1, then the
sign). robosuite's gripper is -1 = open, so LIBERO runs need env.invert_gripper=true.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from vlarl.models.family import Family, FamilyError, Loaded, Supervised
from vlarl.models.openvla.checkpoint import SHARD_BYTES, load_openvla, save_openvla
from vlarl.models.openvla.config import OpenVLAConfigError, read_config, select_unnorm_key
from vlarl.models.openvla.processing import benchmark_image_transform
from vlarl.models.supervised import token_nll

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def shard_bytes(size: str | int | None) -> int:
    """transformers-style max_shard_size ("5GB", "500MB", "2GiB" or bytes) -> bytes."""
    if size is None:
        return SHARD_BYTES
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    if not match or match.group(2).upper() not in UNITS:
        raise ValueError(f"max_shard_size={size!r} is not a size like '5GB' or '500MB'.")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


class GripperActions:
    """OpenVLA's action tokenizer with the gripper convention applied for the environment: the last
    dimension [0, 1] (1 = open) <-> {-1, +1} (+1 = open). The rest is the upstream mapping."""

    def __init__(self, tokenizer):
        self.inner = tokenizer
        self.first_bin_id, self.stats = tokenizer.first_bin_id, tokenizer.stats

    @property
    def action_dim(self) -> int:
        return self.inner.action_dim

    def tokens_to_actions(self, tokens) -> np.ndarray:
        """token ids (N, D) -> env actions (N, D), the gripper in {-1, 0, +1}"""
        actions = self.inner.tokens_to_actions(tokens)
        actions[..., -1] = np.sign(2 * actions[..., -1] - 1)
        return actions

    def actions_to_tokens(self, actions: np.ndarray) -> np.ndarray:
        """env actions (N, D), the gripper in [-1, 1] -> token ids (N, D)"""
        upstream = np.array(actions, np.float32)
        upstream[..., -1] = (upstream[..., -1] + 1) / 2
        return self.inner.actions_to_tokens(upstream)

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        return self.inner.normalize(actions)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        return self.inner.unnormalize(normalized)


class OpenVLA(Family):
    name = "openvla"
    supervised = Supervised(token_nll, 5e-4)  # upstream's LoRA fine-tuning learning rate (vla-scripts/finetune.py)

    def recognises(self, config: dict, folder: Path | None = None) -> bool:
        architectures = config.get("architectures") or []
        return config.get("model_type") == "openvla" or "OpenVLAForActionPrediction" in architectures

    def check(self, folder: Path, model_cfg) -> None:
        try:
            select_unnorm_key(read_config(folder).norm_stats, model_cfg.unnorm_key)
        except OpenVLAConfigError as e:
            raise FamilyError(str(e)) from None

    def load(self, folder: Path, model_cfg) -> Loaded:
        try:
            model, tokenizer, action_tokenizer = load_openvla(folder, model_cfg.dtype, model_cfg.unnorm_key)
        except OpenVLAConfigError as e:
            raise FamilyError(str(e)) from None
        if model_cfg.train_vision:
            model.lora_trainable = (*model.lora_trainable, "vision_backbone")
        else:  # upstream fine-tunes keep the towers frozen; so does full-weight RL unless asked otherwise
            model.vision_backbone.requires_grad_(False)
        return Loaded(model, tokenizer, GripperActions(action_tokenizer), self)

    def frame_transform(self, env_name: str, model_cfg):
        """LIBERO: the published evaluation's resize to 224 (and 0.9 centre crop with model.center_crop)."""
        if not env_name.startswith("libero"):
            return None
        one = benchmark_image_transform(env_name, model_cfg.center_crop)
        return lambda obs: np.stack([one(frame) for frame in obs["image"]])

    def save(self, folder: Path, loaded: Loaded, state_dict: dict | None = None) -> None:
        """The upstream layout, base files taken from the folder the model was loaded from."""
        save_openvla(folder, loaded.model, loaded.tokenizer, state_dict=state_dict)

    def export(self, folder: Path, loaded: Loaded, base: Path, max_shard_size: str) -> None:
        save_openvla(folder, loaded.model, loaded.tokenizer, base, shard_bytes=shard_bytes(max_shard_size))
