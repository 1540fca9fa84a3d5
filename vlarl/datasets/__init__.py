"""Demonstration datasets for supervised warm starts (`python -m vlarl.sft`).

`read_episodes(path, format, opts)` reads LIBERO/robomimic HDF5 files (a file or a folder of them) or a
LeRobot v3 dataset folder into `Episode` records in vlarl's observation schema (vlarl/datasets/common.py).
Each format is one module with a reader and a tiny writer (tests and demos need no downloads); a new
format is a new module plus one line in READERS. Readers import their libraries (h5py, pyarrow, PyAV)
when called, so `import vlarl` stays light.
"""

from __future__ import annotations

from pathlib import Path

from vlarl.datasets.common import (DatasetError, Episode, ReadOptions, action_chunks, fit_proprio, resize_images,
                                   split_episodes)
from vlarl.datasets.hdf5 import read_hdf5, write_hdf5
from vlarl.datasets.lerobot import is_lerobot, read_lerobot, write_lerobot

READERS = {"hdf5": read_hdf5, "lerobot": read_lerobot}  # data.format -> reader(path, ReadOptions)

__all__ = ["READERS", "DatasetError", "Episode", "ReadOptions", "action_chunks", "detect_format", "fit_proprio",
           "read_episodes", "resize_images", "split_episodes", "write_hdf5", "write_lerobot"]


def detect_format(path: str | Path) -> str:
    """lerobot for a folder with meta/info.json, hdf5 otherwise."""
    if not Path(path).exists():
        raise DatasetError(f"data.path={path} does not exist; point it at a LIBERO/robomimic HDF5 file or folder, "
                           "or a LeRobot v3 dataset folder.")
    return "lerobot" if is_lerobot(path) else "hdf5"


def read_episodes(path: str | Path, format: str = "auto", opts: ReadOptions = ReadOptions()) -> list[Episode]:
    """Every episode under `path` (format auto: see `detect_format`), frames at opts.image_size."""
    detected = detect_format(path)  # also the one-sentence error for a missing path
    fmt = detected if format == "auto" else format
    if fmt not in READERS:
        raise DatasetError(f"data.format={fmt} is unknown; choose auto or one of {', '.join(READERS)}.")
    episodes = READERS[fmt](path, opts)
    if not episodes:
        raise DatasetError(f"{path} holds no episodes.")
    return episodes
