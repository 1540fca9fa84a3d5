"""The scripted LIBERO demonstrator on real simulators: its HDF5 files read back through vlarl's SFT reader
with the same actions, instruction and frames that vlarl's LIBERO env shows, and its controller moves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="LIBERO is installed by `bash launch/setup.sh dev,libero`")

from vlarl.datasets.hdf5 import read_hdf5  # noqa: E402
from vlarl.envs.libero import LiberoEnv, LiberoSpec, suite_tasks  # noqa: E402

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SIZE, STEPS = 32, 24  # a tiny camera and an episode cut short: the file layout, not the task, is under test


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos")
    proc = subprocess.run([sys.executable, "-m", "vlarl.envs.libero_demos", "--suite", "libero_spatial", "--tasks", "0",
                           "--episodes-per-task", "1", "--camera-size", str(SIZE), "--max-steps", str(STEPS),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_demo_file_has_the_libero_layout(demo_dir):
    import h5py

    name, instruction = suite_tasks("libero_spatial")[0]
    path = demo_dir / f"{name}_demo.hdf5"
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert json.loads(data.attrs["problem_info"])["language_instruction"] == instruction
        assert json.loads(data.attrs["env_args"])["env_kwargs"]["camera_heights"] == SIZE
        assert data.attrs["num_demos"] == 1 and data.attrs["total"] == STEPS
        demo = data["demo_0"]
        assert demo.attrs["num_samples"] == STEPS and not demo.attrs["success"] and demo.attrs["init_state"] == 0
        assert demo.attrs["grasp_attempts"] == 1
        obs = demo["obs"]
        assert obs["agentview_rgb"].shape == obs["eye_in_hand_rgb"].shape == (STEPS, SIZE, SIZE, 3)
        assert obs["agentview_rgb"].dtype == np.uint8 and np.std(obs["agentview_rgb"][0]) > 5
        shapes = {k: obs[k].shape for k in ("ee_pos", "ee_ori", "ee_states", "gripper_states", "joint_states")}
        assert shapes == {"ee_pos": (STEPS, 3), "ee_ori": (STEPS, 3), "ee_states": (STEPS, 6),
                          "gripper_states": (STEPS, 2), "joint_states": (STEPS, 7)}
        actions = demo["actions"][()]
        assert actions.shape == (STEPS, 7) and np.abs(actions).max() <= 1.0
        assert (actions[:, 6] == -1.0).all()  # still reaching: the gripper stays open (robosuite: -1)
        assert demo["rewards"].shape == demo["dones"].shape == (STEPS,) and demo["dones"][-1] == 1
        assert demo["states"].shape[0] == STEPS
    report = json.loads((demo_dir / "report.json").read_text())
    assert report["tasks"]["0"]["episodes"] == 1 and report["tasks"]["0"]["successes"] == 0


def test_sft_reader_gets_the_actions_instruction_and_the_env_view(demo_dir):
    import h5py

    (episode,) = read_hdf5(demo_dir)
    path = next(demo_dir.glob("*.hdf5"))
    with h5py.File(path, "r") as f:
        np.testing.assert_allclose(episode.actions, f["data/demo_0/actions"][()], atol=1e-6)
        np.testing.assert_allclose(episode.proprio[:, :3], f["data/demo_0/obs/ee_pos"][()], atol=1e-6)
    assert episode.instruction == suite_tasks("libero_spatial")[0][1]
    # The first frame is what vlarl's LIBERO env shows a policy at the same init state (turned upright).
    env = LiberoEnv(1, LiberoSpec(suite="libero_spatial", num_tasks=1, num_init_states=40, max_steps=5,
                                  camera_size=SIZE, image_size=SIZE))
    try:
        obs = env.reset([0], [0])
    finally:
        env.close()
    np.testing.assert_array_equal(episode.images[0], obs["image"][0])
    np.testing.assert_allclose(episode.proprio[0], obs["proprio"][0], atol=1e-5)


def test_the_reach_phase_brings_the_gripper_to_the_object():
    from vlarl.envs.libero_demos import TaskSim
    from vlarl.envs.libero_script import PickPlace

    sim = TaskSim("libero_spatial", 0, camera_size=0)  # physics only
    try:
        sim.reset(0)
        controller = PickPlace(sim.goal)
        distance = []
        for _ in range(12):
            action = controller.act(sim.scene)
            assert controller.phase == "reach" and action[6] == -1.0 and np.abs(action).max() <= 1.0
            distance.append(np.linalg.norm(sim.scene.body_pos(sim.goal.obj) - sim.scene.eef_pos()))
            sim.env.step(action)
        assert sim.goal.obj == "akita_black_bowl_1" and sim.goal.target == "plate_1"
        assert distance[-1] < distance[0] - 0.08  # about 1 cm per step toward the bowl
        assert all(b < a for a, b in zip(distance[2:], distance[3:]))  # and steadily
    finally:
        sim.close()


def test_unscripted_suite_is_refused_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlarl.envs.libero_demos", "--suite", "libero_goal", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not scripted" in proc.stderr and "Traceback" not in proc.stderr
