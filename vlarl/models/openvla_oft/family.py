"""The OpenVLA-OFT family (vlarl/models/family.py): OFT folders in, the same layout out.

An OFT folder is an OpenVLA folder (config.json `model_type: openvla`) with OFT's component files
beside it (checkpoint.py); a discrete-token OFT fine-tune without them (SimpleVLA-RL's) is selected
with `model=openvla_oft` (model.family=openvla_oft). Settings read from `model`: everything the
openvla family reads, plus `model.oft` (chunk, num_images, head, attention, init_log_std).

Environment side: the cameras the model reads (third-person, then wrist; env.wrist_camera=true for
two) each get the benchmark transform (LIBERO: OpenVLA's resize, and the centre crop run_libero_eval
applies by default), side by side in one frame; the 8-D LIBERO proprio state goes in raw and is
normalised by the model with the checkpoint's statistics. Actions: OpenVLA's un-normalisation and
gripper convention per 7-D action of the chunk (so LIBERO runs need env.invert_gripper=true, and
env.action_chunk equal to model.oft.chunk).

FiLM fine-tunes (a vision_backbone--*checkpoint* file; film.py) are detected from the folder: their
scale/shift layers train fully beside the heads (`lora_trainable`), the towers follow model.train_vision.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlarl.models.family import FamilyError, Loaded, Supervised
from vlarl.models.openvla.config import OpenVLAConfigError, read_config, select_unnorm_key
from vlarl.models.openvla.family import GripperActions, OpenVLA, shard_bytes
from vlarl.models.openvla.processing import benchmark_image_transform
from vlarl.models.openvla_oft import film
from vlarl.models.openvla_oft.checkpoint import COMPONENTS, RUN_CONFIG, component_file, load_oft, read_spec, save_oft
from vlarl.models.supervised import token_nll


class ChunkActions:
    """The 7-D action mapping (GripperActions) applied to each action of a chunk; arrays are (N, chunk * 7)."""

    def __init__(self, inner: GripperActions, chunk: int):
        self.inner, self.chunk = inner, chunk
        self.first_bin_id, self.stats = inner.first_bin_id, inner.stats

    @property
    def action_dim(self) -> int:
        return self.chunk * self.inner.action_dim

    def _each(self, fn, x) -> np.ndarray:
        x = np.asarray(x)
        return fn(x.reshape(len(x), self.chunk, -1)).reshape(len(x), -1)

    def tokens_to_actions(self, tokens) -> np.ndarray:
        return self._each(self.inner.tokens_to_actions, tokens)

    def actions_to_tokens(self, actions) -> np.ndarray:
        return self._each(self.inner.actions_to_tokens, actions)

    def normalize(self, actions) -> np.ndarray:
        return self._each(self.inner.normalize, actions)

    def unnormalize(self, normalized) -> np.ndarray:
        return self._each(self.inner.unnormalize, normalized)

    def normalized_to_actions(self, normalized) -> np.ndarray:
        """The L1 head's values (N, chunk * 7) -> env actions: clipped to [-1, 1], un-normalised,
        gripper [0, 1] -> {-1, +1} (run_libero_eval's `normalize_gripper_action(binarize=True)`)."""
        def one(x):
            a = self.inner.unnormalize(np.clip(x, -1, 1))
            a[..., -1] = np.sign(2 * a[..., -1] - 1)
            return a
        return self._each(one, normalized)

    def actions_to_normalized(self, actions) -> np.ndarray:
        """Env actions (N, chunk * 7), gripper in [-1, 1] -> what the L1 head regresses to."""
        def one(a):
            up = np.array(a, np.float32)
            up[..., -1] = (up[..., -1] + 1) / 2
            return self.inner.normalize(up)
        return self._each(one, actions)


def oft_supervised(model, inputs: tuple, actions: np.ndarray, action_tokenizer, generator=None):
    """Upstream's fine-tuning losses: token NLL for the discrete head, L1 on the normalised chunk for
    the L1 head (vla-scripts/finetune.py), averaged per example (B,)."""
    if model.action_head is None:
        return token_nll(model, inputs, actions, action_tokenizer, generator)
    import torch

    target = torch.as_tensor(action_tokenizer.actions_to_normalized(actions), device=inputs[0].device)
    return (model.predicted_actions(*inputs) - target.float()).abs().mean(-1)


def recorded_chunk(folder: Path, oft_cfg) -> int:
    """Actions per call without loading tensors: vlarl_oft.json's chunk, else model.oft.chunk."""
    path = Path(folder) / RUN_CONFIG
    return int(json.loads(path.read_text()).get("chunk", oft_cfg.chunk)) if path.is_file() else int(oft_cfg.chunk)


class OpenVLAOFT(OpenVLA):
    name = "openvla_oft"
    serves_vllm = False  # vLLM cannot decode bidirectional placeholders; the parallel engine runs in PyTorch
    supervised = Supervised(oft_supervised, 5e-4)  # upstream's LoRA fine-tuning learning rate

    def recognises(self, config: dict, folder: Path | None = None) -> bool:
        if not super().recognises(config, folder) or folder is None:
            return False
        return (folder / RUN_CONFIG).is_file() or any(component_file(folder, c) for c in (*COMPONENTS, film.FILE))

    def check(self, folder: Path, model_cfg) -> None:
        try:
            select_unnorm_key(read_config(folder).norm_stats, model_cfg.unnorm_key)
            read_spec(folder, model_cfg.oft, model_cfg.unnorm_key)
        except OpenVLAConfigError as e:
            raise FamilyError(str(e)) from None

    def actions_per_call(self, folder: Path, model_cfg) -> int:
        return recorded_chunk(folder, model_cfg.oft)

    def load(self, folder: Path, model_cfg) -> Loaded:
        try:
            model, tokenizer, action_tokenizer = load_oft(folder, model_cfg)
        except OpenVLAConfigError as e:
            raise FamilyError(str(e)) from None
        if model_cfg.train_vision:
            model.lora_trainable = (*model.lora_trainable, "vision_backbone")
        else:
            model.vision_backbone.requires_grad_(False)
        return Loaded(model, tokenizer, ChunkActions(GripperActions(action_tokenizer), model.spec.chunk), self)

    def frame_transform(self, env_name: str, model_cfg):
        """Each camera the model reads through the benchmark transform, side by side (third-person, wrist)."""
        cameras = int(model_cfg.oft.num_images)
        one = benchmark_image_transform(env_name, model_cfg.center_crop) if env_name.startswith("libero") else None

        def transform(obs: dict) -> np.ndarray:
            frames = [obs["image"]]
            if cameras > 1:
                if "wrist_image" not in obs:
                    raise FamilyError(f"model.oft.num_images={cameras} reads the wrist camera too; set "
                                      "env.wrist_camera=true (or model.oft.num_images=1).")
                frames.append(obs["wrist_image"])
            if one is not None:
                frames = [np.stack([one(f) for f in batch]) for batch in frames]
            return np.ascontiguousarray(np.concatenate(frames, axis=2))
        return transform

    def save(self, folder: Path, loaded: Loaded, state_dict: dict | None = None) -> None:
        save_oft(folder, loaded.model, loaded.tokenizer, state_dict=state_dict)

    def export(self, folder: Path, loaded: Loaded, base: Path, max_shard_size: str) -> None:
        save_oft(folder, loaded.model, loaded.tokenizer, base, shard_bytes=shard_bytes(max_shard_size))
