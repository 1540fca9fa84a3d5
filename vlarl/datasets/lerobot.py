"""LeRobot v3 datasets (parquet through pyarrow, MP4 through PyAV), and a tiny-folder writer.

The layout (huggingface/lerobot, src/lerobot/datasets/utils.py and dataset_metadata.py, codebase v3.0):

    meta/info.json        codebase_version, fps, features {name: {dtype, shape, names, info}}, data_path and
                          video_path templates ("data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                          "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"), chunks_size
    meta/stats.json       per-feature min / max / mean / std
    meta/tasks.parquet    one row per task: the task string (the pandas index, column "task") and task_index
    meta/episodes/chunk-000/file-000.parquet   one row per episode: episode_index, tasks, length,
                          data/chunk_index, data/file_index, dataset_from_index, dataset_to_index, and per camera
                          videos/<key>/chunk_index, file_index, from_timestamp, to_timestamp
    data/chunk-000/file-000.parquet            one row per frame: index, episode_index, frame_index, timestamp,
                          task_index, action, observation.state, ...
    videos/<key>/chunk-000/file-000.mp4        many episodes back to back; an episode's frame at `timestamp`
                          sits at from_timestamp + timestamp in its file

Cameras stored as `image` features (PNG bytes in the parquet rows) are read with Pillow.
"""

from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path

import numpy as np

from vlarl.datasets.common import (DatasetError, Episode, ReadOptions, check_actions, check_frames, check_rows,
                                   fit_proprio, resize_images)

INFO = "meta/info.json"
TASKS = "meta/tasks.parquet"
EPISODES = "meta/episodes"
STATE = "observation.state"


def is_lerobot(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / INFO).is_file()


def read_lerobot(path: str | Path, opts: ReadOptions = ReadOptions()) -> list[Episode]:
    """Every episode of the dataset folder, in episode_index order."""
    root = Path(path)
    info = _info(root)
    features, fps = info["features"], float(info["fps"])
    camera = _camera(features, root / INFO, opts.camera)
    if features[camera]["dtype"] == "video" and "video_path" not in info:
        raise DatasetError(f"{root / INFO}: key 'video_path' is missing, and camera '{camera}' is stored as video.")
    state_keys = _state_keys(features, root / INFO, opts.state_keys)
    tasks = _tasks(root)
    meta = _episode_rows(root, camera if features[camera]["dtype"] == "video" else None)
    order = np.argsort(meta["episode_index"], kind="stable")
    if opts.max_episodes:
        order = order[:opts.max_episodes]
    frame_columns = ["episode_index", "frame_index", "timestamp", "task_index", "action", *state_keys]
    if features[camera]["dtype"] == "image":
        frame_columns.append(camera)
    rows = {}  # (chunk, file) -> {column: array}
    episodes, video_requests = [], {}  # video (chunk, file) -> [(episode number, seconds (T,))]
    for n, i in enumerate(order):
        ep = int(meta["episode_index"][i])
        where = f"{root}: episode {ep}"
        key = (int(meta["data/chunk_index"][i]), int(meta["data/file_index"][i]))
        if key not in rows:
            rows[key] = _read_parquet(root / info["data_path"].format(chunk_index=key[0], file_index=key[1]),
                                      frame_columns)
        table = rows[key]
        sel = np.nonzero(table["episode_index"] == ep)[0]
        sel = sel[np.argsort(table["frame_index"][sel], kind="stable")]
        length = int(meta["length"][i])
        if len(sel) != length:
            raise DatasetError(f"{where}: meta/episodes says length {length} but the data file has {len(sel)} frames "
                               "of it; the dataset is inconsistent.")
        actions = check_actions(table["action"][sel], where, "action")
        parts = [check_rows(table[k][sel].reshape(length, -1), length, where, k) for k in state_keys]
        proprio = fit_proprio(parts or [np.zeros((length, 0), np.float32)])
        instruction = opts.instruction or tasks.get(int(table["task_index"][sel[0]]))
        if instruction is None:
            task = int(table["task_index"][sel[0]])
            raise DatasetError(f"{root / TASKS}: task_index {task} (episode {ep}) is missing.")
        if features[camera]["dtype"] == "image":
            images = resize_images(np.stack([_png(b, where, camera) for b in table[camera][sel]]), opts.image_size)
        else:
            images = None  # filled from the video below
            vkey = (int(meta[f"videos/{camera}/chunk_index"][i]), int(meta[f"videos/{camera}/file_index"][i]))
            seconds = float(meta[f"videos/{camera}/from_timestamp"][i]) + table["timestamp"][sel].astype(np.float64)
            video_requests.setdefault(vkey, []).append((n, seconds))
        episodes.append(Episode(images, proprio, actions, instruction, where))
    for (chunk, file), requests in video_requests.items():
        video = root / info["video_path"].format(video_key=camera, chunk_index=chunk, file_index=file)
        frames = decode_frames(video, np.concatenate([s for _, s in requests]), fps, opts.image_size)
        start = 0
        for n, seconds in requests:
            episodes[n].images = frames[start:start + len(seconds)]
            start += len(seconds)
    return episodes


def _json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path} is missing; a LeRobot v3 dataset folder has meta/info.json.")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}).") from None


def _info(root: Path) -> dict:
    info = _json(root / INFO)
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3"):
        raise DatasetError(f"{root / INFO}: codebase_version is {version!r}; vlarl reads LeRobot v3.0 datasets, "
                           "convert older ones with LeRobot's v2.1 -> v3.0 converter.")
    for key in ("features", "fps", "data_path"):
        if key not in info:
            raise DatasetError(f"{root / INFO}: key '{key}' is missing.")
    if "action" not in info["features"]:
        raise DatasetError(f"{root / INFO}: features has no key 'action'; vlarl trains on the dataset's actions.")
    return info


def _camera(features: dict, where: Path, camera: str | None) -> str:
    cameras = [k for k, f in features.items() if f.get("dtype") in ("video", "image")]
    if camera is not None:
        if camera not in cameras:
            raise DatasetError(f"{where}: features has no camera '{camera}' (data.camera); cameras there: "
                               f"{', '.join(cameras) or 'none'}.")
        return camera
    if not cameras:
        raise DatasetError(f"{where}: features has no camera (dtype video or image); vlarl policies need images.")
    return cameras[0]


def _state_keys(features: dict, where: Path, keys: tuple[str, ...] | None) -> tuple[str, ...]:
    if keys is None:
        if STATE not in features:
            raise DatasetError(f"{where}: features has no key '{STATE}'; name the state features with "
                               "data.state_keys=[...], or data.state_keys=[] for none.")
        return (STATE,)
    for key in keys:
        if key not in features:
            raise DatasetError(f"{where}: features has no key '{key}' (data.state_keys).")
    return tuple(keys)


def _tasks(root: Path) -> dict[int, str]:
    """task_index -> task string; the strings are the pandas index LeRobot writes (column "task")."""
    table = _read_parquet(root / TASKS, None)
    text = next((c for c in ("task", "__index_level_0__") if c in table), None)
    if text is None or "task_index" not in table:
        raise DatasetError(f"{root / TASKS}: key '{'task_index' if text else 'task'}' is missing.")
    return {int(i): str(t) for i, t in zip(table["task_index"], table[text])}


def _episode_rows(root: Path, video_camera: str | None) -> dict[str, np.ndarray]:
    files = sorted((root / EPISODES).rglob("*.parquet"))
    if not files:
        raise DatasetError(f"{root / EPISODES} holds no parquet files; a LeRobot v3 dataset lists its episodes there.")
    columns = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    if video_camera is not None:
        columns += [f"videos/{video_camera}/{k}" for k in ("chunk_index", "file_index", "from_timestamp")]
    parts = [_read_parquet(f, columns) for f in files]
    return {c: np.concatenate([p[c] for p in parts]) for c in columns}


def _read_parquet(path: Path, columns: list[str] | None) -> dict[str, np.ndarray]:
    """Named columns as numpy: scalars (N,), fixed-length lists (N, D), other objects as lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DatasetError(f"{path} is missing.")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path} is not a readable parquet file ({e}).") from None
    out = {}
    for name in columns or table.column_names:
        if name not in table.column_names:
            raise DatasetError(f"{path}: column '{name}' is missing.")
        column = table.column(name).combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) \
                or pa.types.is_large_list(column.type):
            if pa.types.is_string(column.type.value_type) or pa.types.is_large_string(column.type.value_type):
                out[name] = np.array(column.to_pylist(), dtype=object)
                continue
            flat = column.flatten().to_numpy(zero_copy_only=False)
            out[name] = flat.reshape(len(column), -1) if len(column) else flat.reshape(0, 0)
        elif pa.types.is_struct(column.type):  # images: {bytes, path}
            out[name] = np.array([row["bytes"] for row in column.to_pylist()], dtype=object)
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def _png(data: bytes, where: str, camera: str) -> np.ndarray:
    from PIL import Image

    if data is None:
        raise DatasetError(f"{where}: camera '{camera}' has a frame without image bytes.")
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_frames(path: Path, seconds: np.ndarray, fps: float, image_size: int | None) -> np.ndarray:
    """The video frames shown at `seconds` (N,), any order, each the frame within half a frame period;
    -> (N, size, size, 3) uint8. The file is decoded once, front to back (episodes sit back to back)."""
    import av

    if not path.is_file():
        raise DatasetError(f"{path} is missing; the dataset's episodes metadata points at it.")
    order = np.argsort(seconds, kind="stable")
    wanted = seconds[order]
    tolerance = 0.5 / fps
    out: np.ndarray | None = None
    k = 0
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                if k == len(wanted):
                    break
                if frame.time is None:
                    raise DatasetError(f"{path} has frames without timestamps; re-encode the video.")
                t = float(frame.time)
                if wanted[k] < t - tolerance:
                    break  # a frame was skipped: reported below
                if abs(wanted[k] - t) > tolerance:
                    continue
                image = resize_images(frame.to_ndarray(format="rgb24")[None], image_size)[0]
                if out is None:
                    out = np.zeros((len(wanted), *image.shape), np.uint8)
                while k < len(wanted) and abs(wanted[k] - t) <= tolerance:
                    out[order[k]] = image
                    k += 1
    except av.error.FFmpegError as e:
        raise DatasetError(f"{path} could not be decoded ({e}).") from None
    if k < len(wanted):
        raise DatasetError(f"{path}: no frame at {wanted[k]:.3f} s (within {tolerance:.3f} s) for the episodes "
                           "metadata's timestamps; the video and the data files disagree.")
    return check_frames(out, str(path), "video")


# ---- the tiny-folder writer ---------------------------------------------------------------------------
def write_lerobot(folder: str | Path, episodes: list[Episode], fps: int = 10,
                  camera: str = "observation.images.image", episodes_per_file: int = 0, codec: str = "h264") -> Path:
    """Episodes -> a LeRobot v3 dataset folder that `read_lerobot` (and LeRobot) reads: frames as MP4
    (`codec`, yuv420p, episodes back to back, `episodes_per_file` per data and video file, 0 = all in one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(folder)
    task_of = {t: i for i, t in enumerate(dict.fromkeys(e.instruction for e in episodes))}
    per_file = episodes_per_file or len(episodes)
    h, w = episodes[0].images.shape[1:3]
    data_path = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    video_path = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    meta_rows: dict[str, list] = {}
    index = 0
    for file_index, start in enumerate(range(0, len(episodes), per_file)):
        group = episodes[start:start + per_file]
        frames: dict[str, list] = {k: [] for k in ("index", "episode_index", "frame_index", "timestamp", "task_index")}
        frames.update(action=[], **{STATE: []})
        offset = 0.0
        for n, e in enumerate(group, start):
            t = len(e)
            frames["index"] += range(index, index + t)
            frames["episode_index"] += [n] * t
            frames["frame_index"] += range(t)
            frames["timestamp"] += [i / fps for i in range(t)]
            frames["task_index"] += [task_of[e.instruction]] * t
            frames["action"] += e.actions.astype(np.float32).tolist()
            frames[STATE] += e.proprio.astype(np.float32).tolist()
            row = {"episode_index": n, "tasks": [e.instruction], "length": t, "data/chunk_index": 0,
                   "data/file_index": file_index, "dataset_from_index": index, "dataset_to_index": index + t,
                   f"videos/{camera}/chunk_index": 0, f"videos/{camera}/file_index": file_index,
                   f"videos/{camera}/from_timestamp": offset, f"videos/{camera}/to_timestamp": offset + t / fps,
                   "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
            for k, v in row.items():
                meta_rows.setdefault(k, []).append(v)
            index += t
            offset += t / fps
        path = root / data_path.format(chunk_index=0, file_index=file_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            **{k: pa.array(frames[k], pa.int64()) for k in ("index", "episode_index", "frame_index", "task_index")},
            "timestamp": pa.array(frames["timestamp"], pa.float32()),
            "action": pa.array(frames["action"], pa.list_(pa.float32(), 7)),
            STATE: pa.array(frames[STATE], pa.list_(pa.float32(), episodes[0].proprio.shape[1]))}), path)
        encode_video(root / video_path.format(video_key=camera, chunk_index=0, file_index=file_index),
                     np.concatenate([e.images for e in group]), fps, codec)
    (root / EPISODES / "chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(meta_rows), root / EPISODES / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.table({"task": list(task_of), "task_index": pa.array(list(task_of.values()), pa.int64())}),
                   root / TASKS)
    scalar = {"dtype": "int64", "shape": [1], "names": None}
    info = {"codebase_version": "v3.0", "robot_type": "vlarl_toy", "total_episodes": len(episodes),
            "total_frames": index, "total_tasks": len(task_of), "chunks_size": 1000, "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 500, "fps": fps, "splits": {"train": f"0:{len(episodes)}"},
            "data_path": data_path, "video_path": video_path,
            "features": {
                camera: {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
                         "info": {"video.height": h, "video.width": w, "video.codec": codec, "video.pix_fmt": "yuv420p",
                                  "video.is_depth_map": False, "video.fps": fps, "video.channels": 3,
                                  "has_audio": False}},
                STATE: {"dtype": "float32", "shape": [episodes[0].proprio.shape[1]], "names": None},
                "action": {"dtype": "float32", "shape": [7], "names": None},
                "timestamp": {"dtype": "float32", "shape": [1], "names": None},
                **{k: scalar for k in ("frame_index", "episode_index", "index", "task_index")}}}
    (root / INFO).write_text(json.dumps(info, indent=4))
    stats = {k: {"min": v.min(0).tolist(), "max": v.max(0).tolist(), "mean": v.mean(0).tolist(),
                 "std": v.std(0).tolist(), "count": [len(v)]}
             for k, v in (("action", np.concatenate([e.actions for e in episodes])),
                          (STATE, np.concatenate([e.proprio for e in episodes])))}
    (root / "meta" / "stats.json").write_text(json.dumps(stats, indent=4))
    return root


def encode_video(path: Path, frames: np.ndarray, fps: int, codec: str = "h264") -> None:
    """(N, H, W, 3) uint8 -> an MP4 whose frame i shows at i / fps seconds."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.time_base = Fraction(1, fps)
        if codec in ("h264", "libx264"):
            stream.options = {"crf": "4"}  # near-lossless: the tests compare decoded frames with what was written
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
