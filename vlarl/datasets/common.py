"""The episode record every dataset reader returns, and the mapping rules shared by the formats.

Readers map an upstream layout onto the observation schema vlarl's policies take (vlarl/envs/base.py):
`image` uint8 (H, W, 3) at the model's image size, `proprio` float32 (PROPRIO_DIM,), `instruction`
str, and 7-D actions (ACTION_DIM) in the dataset's own units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlarl.data.spec import ACTION_DIM, PROPRIO_DIM


class DatasetError(ValueError):
    """A dataset vlarl cannot read as asked; the one-sentence message names the file and the key."""


@dataclass
class Episode:
    images: np.ndarray  # (T, H, W, 3) uint8 frames of the main camera, as the policy sees them
    proprio: np.ndarray  # (T, PROPRIO_DIM) float32 robot state (see `fit_proprio`)
    actions: np.ndarray  # (T, ACTION_DIM) float32 expert actions in the dataset's units
    instruction: str  # the task in words
    source: str  # where it came from ("tasks.hdf5:data/demo_3"), for messages

    def __len__(self) -> int:
        return len(self.actions)


@dataclass(frozen=True)
class ReadOptions:
    image_size: int | None = None  # frames resized to this square side; None keeps the stored size
    camera: str | None = None  # camera key (HDF5 obs key, LeRobot feature); None: the format's main camera
    state_keys: tuple[str, ...] | None = None  # state features concatenated into proprio; None: the format's default
    instruction: str | None = None  # overrides every episode's instruction (files without language)
    max_episodes: int = 0  # stop after this many episodes; 0 reads all
    upright: bool = True  # HDF5: turn robosuite frames the way vlarl's LIBERO env shows them


def fit_proprio(parts: list[np.ndarray]) -> np.ndarray:
    """State features (T, d_i) -> proprio (T, PROPRIO_DIM): concatenated in the given order, then cut
    after PROPRIO_DIM values or padded with zeros at the end. LIBERO's own layout (eef position 3,
    axis-angle 3, gripper joints 2) fills the 8 values exactly, as vlarl's LIBERO env does. No parts
    (state_keys=[]) gives zeros."""
    if not parts:
        raise ValueError("fit_proprio needs at least one part; pass zeros of shape (T, 0) for no state.")
    state = np.concatenate([np.asarray(p, np.float32).reshape(len(p), -1) for p in parts], 1)
    out = np.zeros((len(state), PROPRIO_DIM), np.float32)
    width = min(PROPRIO_DIM, state.shape[1])
    out[:, :width] = state[:, :width]
    return out


def check_actions(actions: np.ndarray, where: str, key: str) -> np.ndarray:
    """(T, 7) float32, or a DatasetError naming the file and key."""
    actions = np.asarray(actions, np.float32)
    if actions.ndim != 2 or actions.shape[1] != ACTION_DIM or len(actions) == 0:
        raise DatasetError(f"{where}: '{key}' has shape {actions.shape} but vlarl policies take {ACTION_DIM}-D actions "
                           "(xyz, rotation, gripper) for at least one step; convert the dataset's actions to that "
                           "layout.")
    return actions


def check_rows(array: np.ndarray, rows: int, where: str, key: str) -> np.ndarray:
    """A per-step array must have one row per action, or a DatasetError names it."""
    if len(array) != rows:
        raise DatasetError(f"{where}: '{key}' has {len(array)} rows but the episode has {rows} actions; "
                           "the file is inconsistent, re-export it.")
    return array


def check_frames(frames: np.ndarray, where: str, key: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise DatasetError(f"{where}: camera '{key}' has shape {frames.shape}, not (T, H, W, 3) RGB frames; "
                           "choose an RGB camera with data.camera.")
    return frames.astype(np.uint8, copy=False)


def resize_images(images: np.ndarray, size: int | None) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size, size, 3) uint8 (unchanged when already that size or size is None).
    Area averaging when shrinking, like vlarl's LIBERO env (OpenCV's INTER_AREA); bilinear when growing."""
    images = np.asarray(images)
    if size is None or images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images, np.uint8)
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    if images.shape[1] >= size and images.shape[2] >= size:
        y = F.interpolate(x, size=(size, size), mode="area")
    else:
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def action_chunks(actions: np.ndarray, chunk: int) -> np.ndarray:
    """(T, A) actions -> (T, chunk * A) targets: row t holds actions t .. t+chunk-1, the episode's last
    action repeated past its end (a policy that emits `chunk` actions per call learns to hold still)."""
    idx = np.minimum(np.arange(len(actions))[:, None] + np.arange(chunk)[None], len(actions) - 1)  # (T, chunk)
    return actions[idx].reshape(len(actions), -1)


def split_episodes(num_episodes: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Episode ids for training and validation: round(val_fraction x N) episodes (at least one when the
    fraction is positive) drawn with `seed`; the rest train. Whole episodes, so no validation step has a
    neighbour in training."""
    if val_fraction <= 0:
        return np.arange(num_episodes), np.arange(0)
    n_val = max(1, int(round(val_fraction * num_episodes)))
    if n_val >= num_episodes:
        raise DatasetError(f"the dataset has {num_episodes} episode(s), too few to hold out {val_fraction:g} of them "
                           "for validation; add episodes or set data.val_fraction=0.")
    order = np.random.default_rng((seed, 0x5F7)).permutation(num_episodes)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
