"""Demonstration datasets: toy episodes written in each format read back field for field; the shared
mapping rules (proprio, action chunks, split, resizing); one-sentence errors naming file and key."""

from __future__ import annotations

import io
import json

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlarl.config import ConfigError, load_config
from vlarl.datasets import (DatasetError, ReadOptions, action_chunks, fit_proprio, read_episodes, resize_images,
                            split_episodes, write_hdf5, write_lerobot)
from vlarl.datasets.toy import toy_episodes, write_toy
from vlarl.envs.toy import ToySpec


@pytest.fixture(scope="module")
def episodes():
    eps = toy_episodes(12, seed=3)
    rng = np.random.default_rng(0)
    for e in eps:  # non-trivial orientations, so the quaternion round trip of robomimic files is exercised
        e.proprio[:, 3:6] = rng.uniform(-1.5, 1.5, (len(e), 3)).astype(np.float32)
    return eps


def by_file(eps):
    """Episodes in the order a folder of per-task files is read: file name, then demo number."""
    tasks = sorted({e.instruction for e in eps}, key=lambda t: t.replace(" ", "_"))
    return [e for t in tasks for e in eps if e.instruction == t]


def assert_same_episode(want, got, exact_images=True):
    assert got.instruction == want.instruction
    np.testing.assert_array_equal(got.actions, want.actions)
    np.testing.assert_allclose(got.proprio, want.proprio, rtol=0, atol=1e-5)
    assert got.images.shape == want.images.shape and got.images.dtype == np.uint8
    if exact_images:
        np.testing.assert_array_equal(got.images, want.images)


def test_libero_hdf5_round_trip(episodes, tmp_path):
    write_toy(tmp_path, "hdf5", episodes)
    files = sorted(tmp_path.glob("*.hdf5"))
    assert len(files) == len({e.instruction for e in episodes})  # one file per task, LIBERO's convention
    got = read_episodes(tmp_path)
    want = by_file(episodes)
    assert len(got) == len(want)
    for w, g in zip(want, got):
        assert_same_episode(w, g)
    assert got[0].source == f"{files[0]}:data/demo_0"
    # The file itself has LIBERO's layout, frames in robosuite's OpenGL convention (upside down).
    with h5py.File(files[0]) as f:
        data = f["data"]
        assert json.loads(data.attrs["problem_info"])["language_instruction"] == want[0].instruction
        assert data.attrs["macros_image_convention"] == "opengl"
        demo = data["demo_0"]
        assert demo.attrs["num_samples"] == len(want[0])
        assert demo["actions"].shape == (len(want[0]), 7)
        np.testing.assert_array_equal(demo["obs/agentview_rgb"][()], want[0].images[:, ::-1, ::-1])
        for key, width in (("ee_pos", 3), ("ee_ori", 3), ("gripper_states", 2), ("joint_states", 7)):
            assert demo["obs"][key].shape == (len(want[0]), width), key


def test_robomimic_and_opencv_files(episodes, tmp_path):
    task = [e for e in episodes if e.instruction == episodes[0].instruction]
    write_hdf5(tmp_path / "robomimic.hdf5", task, layout="robomimic")
    with pytest.raises(DatasetError, match="problem_info"):  # robomimic files carry no language
        read_episodes(tmp_path / "robomimic.hdf5")
    got = read_episodes(tmp_path / "robomimic.hdf5", opts=ReadOptions(instruction=task[0].instruction))
    for w, g in zip(task, got):  # eef quaternion -> axis-angle, as vlarl's LIBERO env reports it
        assert_same_episode(w, g)
    write_hdf5(tmp_path / "cv" / "opencv.hdf5", task, convention="opencv")
    for w, g in zip(task, read_episodes(tmp_path / "cv")):
        assert_same_episode(w, g)
    raw = read_episodes(tmp_path / "cv", opts=ReadOptions(upright=False, max_episodes=1))
    assert len(raw) == 1
    np.testing.assert_array_equal(raw[0].images, task[0].images[:, :, ::-1])


def test_lerobot_round_trip(episodes, tmp_path):
    write_lerobot(tmp_path, episodes, fps=10, episodes_per_file=5)  # 3 data and video files
    info = json.loads((tmp_path / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["features"]["action"]["shape"] == [7]
    assert sorted(p.name for p in (tmp_path / "videos/observation.images.image/chunk-000").iterdir()) == \
        ["file-000.mp4", "file-001.mp4", "file-002.mp4"]
    meta = pq.read_table(tmp_path / "meta/episodes/chunk-000/file-000.parquet").to_pydict()
    assert meta["videos/observation.images.image/from_timestamp"][5] == 0.0  # the second file starts over
    got = read_episodes(tmp_path)
    assert len(got) == len(episodes)
    for w, g in zip(episodes, got):
        assert_same_episode(w, g, exact_images=False)
        diff = np.abs(g.images.astype(int) - w.images.astype(int))
        assert diff.mean() < 8, diff.mean()  # MP4 (yuv420p) is lossy: colours bleed at sharp edges
        for t in range(len(w)):  # each decoded frame is the one written at its timestamp, not a neighbour
            errors = [np.abs(g.images[t].astype(int) - x.astype(int)).mean() for x in w.images]
            assert int(np.argmin(errors)) == t or errors[t] == min(errors)


def test_lerobot_image_features_and_resize(episodes, tmp_path):
    """Cameras stored as PNG bytes in the frames' parquet rows (dtype image) read like videos."""
    write_lerobot(tmp_path, episodes)
    data_file = tmp_path / "data/chunk-000/file-000.parquet"
    table = pq.read_table(data_file)
    pngs = []
    for e in episodes:
        for image in e.images:
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            pngs.append({"bytes": buf.getvalue(), "path": None})
    pq.write_table(table.append_column("observation.images.png", pa.array(pngs)), data_file)
    info = json.loads((tmp_path / "meta/info.json").read_text())
    info["features"]["observation.images.png"] = {"dtype": "image", "shape": [16, 16, 3], "names": None}
    (tmp_path / "meta/info.json").write_text(json.dumps(info))
    got = read_episodes(tmp_path, "lerobot", ReadOptions(camera="observation.images.png"))
    for w, g in zip(episodes, got):
        assert_same_episode(w, g)  # PNG is lossless
    small = read_episodes(tmp_path, opts=ReadOptions(camera="observation.images.png", image_size=8))
    want = episodes[0].images.reshape(-1, 8, 2, 8, 2, 3).mean((2, 4))  # area averaging over 2x2 pixels
    np.testing.assert_allclose(small[0].images, want, atol=0.51)


def test_mapping_rules():
    parts = [np.ones((2, 3)), 2 * np.ones((2, 7))]
    np.testing.assert_array_equal(fit_proprio(parts)[0], [1, 1, 1, 2, 2, 2, 2, 2])  # cut after 8 values
    np.testing.assert_array_equal(fit_proprio([np.ones((2, 3))])[0], [1, 1, 1, 0, 0, 0, 0, 0])  # zero-padded
    assert fit_proprio([np.zeros((4, 0))]).shape == (4, 8)
    actions = np.arange(3 * 7, dtype=np.float32).reshape(3, 7)
    chunks = action_chunks(actions, 2)
    assert chunks.shape == (3, 14)
    np.testing.assert_array_equal(chunks[0], np.concatenate([actions[0], actions[1]]))
    np.testing.assert_array_equal(chunks[2], np.concatenate([actions[2], actions[2]]))  # the end repeats
    image = np.random.default_rng(0).integers(0, 256, (1, 4, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_images(image, 4), image)  # already the size: unchanged
    assert resize_images(image, 8).shape == (1, 8, 8, 3)  # growing: bilinear


def test_split_is_by_episode_and_seeded():
    train, val = split_episodes(50, 0.2, seed=1)
    assert len(val) == 10 and sorted([*train, *val]) == list(range(50))
    np.testing.assert_array_equal(split_episodes(50, 0.2, seed=1)[1], val)
    assert not np.array_equal(split_episodes(50, 0.2, seed=2)[1], val)
    assert len(split_episodes(3, 0.0, seed=0)[1]) == 0
    with pytest.raises(DatasetError, match="val_fraction"):
        split_episodes(1, 0.1, seed=0)


def test_errors_name_the_file_and_key(episodes, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_episodes(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no .hdf5 files"):
        read_episodes(tmp_path / "empty")
    path = write_hdf5(tmp_path / "task.hdf5", [e for e in episodes if e.instruction == episodes[0].instruction])
    with h5py.File(path, "a") as f:
        del f["data/demo_1/actions"]
    with pytest.raises(DatasetError) as err:
        read_episodes(path)
    assert str(path) in str(err.value) and "demo_1" in str(err.value) and "'actions'" in str(err.value)
    with pytest.raises(DatasetError, match=r"'no_such_camera' \(data.camera\) is missing; keys there: agentview_rgb"):
        read_episodes(path, opts=ReadOptions(camera="no_such_camera"))
    (tmp_path / "bad.hdf5").write_text("not hdf5")
    with pytest.raises(DatasetError, match="bad.hdf5 is not a readable HDF5 file"):
        read_episodes(tmp_path / "bad.hdf5")

    root = write_lerobot(tmp_path / "lerobot", episodes[:3])
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    with pytest.raises(DatasetError, match="codebase_version"):
        read_episodes(root)
    del info["features"]["action"]
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError) as err:
        read_episodes(root)
    assert "meta/info.json" in str(err.value) and "'action'" in str(err.value)
    root = write_lerobot(tmp_path / "lerobot2", episodes[:3])
    table = pq.read_table(root / "data/chunk-000/file-000.parquet")
    pq.write_table(table.drop_columns(["observation.state"]), root / "data/chunk-000/file-000.parquet")
    with pytest.raises(DatasetError) as err:
        read_episodes(root)
    assert "file-000.parquet" in str(err.value) and "'observation.state'" in str(err.value)


def test_config_schema():
    cfg = load_config(["env=toy", "data.path=demos", "data.state_keys=[ee_pos,gripper_states]", "sft.steps=5"])
    assert cfg.data.state_keys == ["ee_pos", "gripper_states"] and cfg.sft.steps == 5
    with pytest.raises(ConfigError, match="valid keys in data: path, format"):
        load_config(["env=toy", "data.bogus=1"])
    with pytest.raises(ConfigError, match="choose one of auto, hdf5, lerobot"):
        load_config(["env=toy", "data.format=parquet"])
    with pytest.raises(ConfigError, match="valid keys in sft"):
        load_config(["env=toy", "sft.stepz=1"])
    assert ToySpec().image_size == 16  # the writers above use the toy task's 16-pixel frames
