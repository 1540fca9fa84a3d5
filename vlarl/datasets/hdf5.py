"""LIBERO and robomimic HDF5 demonstrations (read with h5py), and a tiny-file writer for tests and demos.

The layout (LIBERO's scripts/create_dataset.py; robomimic's files share the data/demo_N skeleton):

    data                         attrs: problem_info (JSON; LIBERO's language_instruction), env_args (JSON),
                                        macros_image_convention (LIBERO: opengl | opencv), num_demos, total
    data/demo_N                  attrs: num_samples
    data/demo_N/actions          (T, 7) float: xyz and rotation deltas, gripper (-1 open, +1 close)
    data/demo_N/obs/agentview_rgb, eye_in_hand_rgb          (T, H, W, 3) uint8   robomimic: agentview_image, ...
    data/demo_N/obs/ee_pos (T, 3), ee_ori (T, 3) axis-angle, gripper_states (T, 2), joint_states (T, 7)
                                 robomimic: robot0_eef_pos, robot0_eef_quat (xyzw), robot0_gripper_qpos

One file per task is LIBERO's convention; a folder is read file by file in path order. State features
named `*quat` with 4 values become axis-angle (3), the layout vlarl's LIBERO env reports. Frames:
robosuite renders with OpenGL's bottom-left origin and vlarl's LIBERO env turns them 180 degrees (the
convention of OpenVLA's and pi0's LIBERO data), so with `upright` the reader does the same (a file marked
macros_image_convention=opencv is already flipped vertically, and is only mirrored).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlarl.datasets.common import (DatasetError, Episode, ReadOptions, check_actions, check_frames, check_rows,
                                   fit_proprio, resize_images)
from vlarl.envs.libero_sim import quat_to_axis_angle

CAMERAS = ("agentview_rgb", "agentview_image")  # main camera: LIBERO's name, robomimic's
STATE_LAYOUTS = (("ee_pos", "ee_ori", "gripper_states"),  # LIBERO
                 ("ee_states", "gripper_states"),  # LIBERO, position and axis-angle in one array
                 ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"))  # robomimic
SUFFIXES = (".hdf5", ".h5")


def hdf5_files(path: str | Path) -> list[Path]:
    """A file, or every HDF5 file under a folder (recursively, in path order)."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"{path} holds no .hdf5 files; point data.path at a LIBERO/robomimic file or a folder "
                           "of them.")
    return files


def read_hdf5(path: str | Path, opts: ReadOptions = ReadOptions()) -> list[Episode]:
    """Every demo of every file under `path`, in file then demo-number order."""
    import h5py

    episodes: list[Episode] = []
    for file in hdf5_files(path):
        try:
            handle = h5py.File(file, "r")
        except OSError as e:
            raise DatasetError(f"{file} is not a readable HDF5 file ({e}); check data.path.") from None
        with handle:
            if "data" not in handle:
                raise DatasetError(f"{file}: key 'data' is missing; vlarl reads LIBERO/robomimic files "
                                   "(data/demo_N/...).")
            data = handle["data"]
            instruction = opts.instruction or _instruction(data, file)
            turn = _frame_turn(data, file, opts.upright)
            demos = sorted((k for k in data if k.startswith("demo_")), key=_demo_number)
            if not demos:
                raise DatasetError(f"{file}: 'data' holds no demo_N groups; is this a LIBERO/robomimic file?")
            for key in demos:
                episodes.append(_read_demo(data[key], f"{file}:data/{key}", instruction, turn, opts))
                if opts.max_episodes and len(episodes) >= opts.max_episodes:
                    return episodes
    return episodes


def _demo_number(key: str):
    tail = key.split("_", 1)[1]
    return (0, int(tail), "") if tail.isdigit() else (1, 0, tail)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _instruction(data, file: Path) -> str:
    """LIBERO's problem_info.language_instruction."""
    if "problem_info" not in data.attrs:
        raise DatasetError(f"{file}: data attribute 'problem_info' (LIBERO's language_instruction) is missing; "
                           "for files without language (robomimic) set data.instruction='...'.")
    try:
        text = json.loads(_text(data.attrs["problem_info"]))["language_instruction"]
    except (ValueError, KeyError, TypeError):
        raise DatasetError(f"{file}: data attribute 'problem_info' has no 'language_instruction'; "
                           "set data.instruction='...' to give one.") from None
    return " ".join(text) if isinstance(text, list) else str(text)


def _frame_turn(data, file: Path, upright: bool):
    """frames (T, H, W, 3) -> the view vlarl's LIBERO env shows (see the module docstring)."""
    if not upright:
        return lambda frames: frames
    convention = _text(data.attrs.get("macros_image_convention", "opengl"))
    if convention == "opengl":
        return lambda frames: frames[:, ::-1, ::-1]
    if convention == "opencv":
        return lambda frames: frames[:, :, ::-1]
    raise DatasetError(f"{file}: data attribute 'macros_image_convention' is {convention!r}, not opengl or opencv; "
                       "set data.upright=false to take the frames as stored.")


def _read_demo(group, where: str, instruction: str, turn, opts: ReadOptions) -> Episode:
    if "actions" not in group:
        raise DatasetError(f"{where}: key 'actions' is missing.")
    actions = check_actions(group["actions"][()], where, "actions")
    if "obs" not in group:
        raise DatasetError(f"{where}: key 'obs' is missing.")
    obs = group["obs"]
    if "num_samples" in group.attrs and int(group.attrs["num_samples"]) != len(actions):
        raise DatasetError(f"{where}: attribute 'num_samples' is {int(group.attrs['num_samples'])} but 'actions' has "
                           f"{len(actions)} rows; the file is inconsistent, re-export it.")
    camera = _camera(obs, where, opts.camera)
    frames = check_rows(check_frames(obs[camera][()], where, f"obs/{camera}"), len(actions), where, f"obs/{camera}")
    images = resize_images(np.ascontiguousarray(turn(frames)), opts.image_size)
    parts = [check_rows(_state(obs, key, where), len(actions), where, f"obs/{key}")
             for key in _state_keys(obs, where, opts.state_keys)]
    proprio = fit_proprio(parts or [np.zeros((len(actions), 0), np.float32)])
    return Episode(images, proprio, actions, instruction, where)


def _camera(obs, where: str, camera: str | None) -> str:
    if camera is not None:
        if camera not in obs:
            raise DatasetError(f"{where}/obs: key '{camera}' (data.camera) is missing; keys there: {', '.join(obs)}.")
        return camera
    for name in CAMERAS:
        if name in obs:
            return name
    raise DatasetError(f"{where}/obs: key '{CAMERAS[0]}' is missing (nor '{CAMERAS[1]}'); choose the camera with "
                       f"data.camera, keys there: {', '.join(obs)}.")


def _state_keys(obs, where: str, keys: tuple[str, ...] | None) -> tuple[str, ...]:
    if keys is not None:
        for key in keys:
            if key not in obs:
                raise DatasetError(f"{where}/obs: key '{key}' (data.state_keys) is missing; keys there: "
                                   f"{', '.join(obs)}.")
        return tuple(keys)
    for layout in STATE_LAYOUTS:
        if all(k in obs for k in layout):
            return layout
    missing = [k for k in STATE_LAYOUTS[0] if k not in obs]
    raise DatasetError(f"{where}/obs: key '{missing[0]}' is missing (LIBERO's state is {', '.join(STATE_LAYOUTS[0])}); "
                       "name the state keys with data.state_keys=[...], or data.state_keys=[] for none.")


def _state(obs, key: str, where: str) -> np.ndarray:
    value = np.asarray(obs[key][()], np.float32)
    value = value.reshape(len(value), -1)
    if key.endswith("quat") and value.shape[1] == 4:
        return np.stack([quat_to_axis_angle(q) for q in value]) if len(value) else np.zeros((0, 3), np.float32)
    return value


# ---- the tiny-file writer ---------------------------------------------------------------------------
def axis_angle_to_quat(axis_angle: np.ndarray) -> np.ndarray:
    """(T, 3) axis * angle -> (T, 4) xyzw quaternions (robosuite's order)."""
    angle = np.linalg.norm(axis_angle, axis=-1, keepdims=True)  # (T, 1)
    axis = np.divide(axis_angle, angle, out=np.zeros_like(axis_angle), where=angle > 1e-12)
    return np.concatenate([axis * np.sin(angle / 2), np.cos(angle / 2)], -1).astype(np.float32)


def write_hdf5(path: str | Path, episodes: list[Episode], layout: str = "libero", convention: str = "opengl") -> Path:
    """One task's episodes -> a LIBERO-layout (or robomimic-layout) file that `read_hdf5` reads back.
    Frames are stored in robosuite's `convention` (turned back from the upright view), the proprio split
    into the layout's state keys (eef position, orientation, gripper joints)."""
    import h5py

    if layout not in ("libero", "robomimic"):
        raise ValueError(f"layout must be libero or robomimic, got {layout!r}.")
    if len({e.instruction for e in episodes}) != 1:
        raise ValueError("one HDF5 file holds one task (LIBERO's convention): give episodes of one instruction.")
    turn = {"opengl": lambda f: f[:, ::-1, ::-1], "opencv": lambda f: f[:, :, ::-1]}[convention]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "vlarl_toy", "type": 1, "env_kwargs": {}})
        data.attrs["total"] = sum(len(e) for e in episodes)
        if layout == "libero":
            data.attrs["problem_info"] = json.dumps({"problem_name": "vlarl_toy", "domain_name": "vlarl",
                                                     "language_instruction": episodes[0].instruction})
            data.attrs["macros_image_convention"] = convention
            data.attrs["env_name"] = "vlarl_toy"
            data.attrs["num_demos"] = len(episodes)
        for i, e in enumerate(episodes):
            demo = data.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = len(e)
            demo.create_dataset("actions", data=e.actions.astype(np.float64))
            rewards = np.zeros(len(e), np.uint8)
            rewards[-1] = 1
            demo.create_dataset("rewards", data=rewards)
            demo.create_dataset("dones", data=rewards)
            obs = demo.create_group("obs")
            frames = np.ascontiguousarray(turn(e.images))
            pos, ori, grip = e.proprio[:, :3], e.proprio[:, 3:6], e.proprio[:, 6:8]
            if layout == "libero":
                obs.create_dataset("agentview_rgb", data=frames)
                obs.create_dataset("eye_in_hand_rgb", data=np.zeros_like(frames))
                obs.create_dataset("ee_pos", data=pos.astype(np.float64))
                obs.create_dataset("ee_ori", data=ori.astype(np.float64))
                obs.create_dataset("ee_states", data=e.proprio[:, :6].astype(np.float64))
                obs.create_dataset("gripper_states", data=grip.astype(np.float64))
                obs.create_dataset("joint_states", data=np.zeros((len(e), 7)))
            else:
                obs.create_dataset("agentview_image", data=frames)
                obs.create_dataset("robot0_eye_in_hand_image", data=np.zeros_like(frames))
                obs.create_dataset("robot0_eef_pos", data=pos.astype(np.float64))
                obs.create_dataset("robot0_eef_quat", data=axis_angle_to_quat(ori).astype(np.float64))
                obs.create_dataset("robot0_gripper_qpos", data=grip.astype(np.float64))
    return path
