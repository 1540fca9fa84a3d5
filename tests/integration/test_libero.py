"""Real LIBERO simulators (MuJoCo + OSMesa on CPU) behind vlarl's vectorised env interface."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="LIBERO is installed by `bash launch/setup.sh dev,libero`")

from vlarl.envs.base import held_out_episodes  # noqa: E402
from vlarl.envs.libero import SUITE_MAX_STEPS, LiberoEnv, LiberoSpec, suite_tasks, to_robosuite  # noqa: E402

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
HOLD = np.array([0, 0, 0, 0, 0, 0, -1], np.float32)


@pytest.fixture(scope="module")
def env():
    e = LiberoEnv(3, LiberoSpec(suite="libero_spatial", num_tasks=10, num_init_states=40, max_steps=40,
                                image_size=64, camera_size=128, step_timeout=20))
    yield e
    e.close()


def test_every_suite_lists_its_tasks_and_instructions():
    from libero.libero import benchmark

    for suite, count in {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10,
                         "libero_90": 90}.items():
        tasks = suite_tasks(suite)
        assert len(tasks) == count, suite
        assert all(name and len(instruction.split()) >= 3 for name, instruction in tasks), suite
        assert len({name for name, _ in tasks}) == count, suite  # (libero_90 repeats instructions across scenes)
        assert benchmark.get_benchmark_dict()[suite]().get_task_init_states(0).shape[0] == 50
    assert suite_tasks("libero_spatial")[0][1].startswith("pick up the black bowl")
    assert SUITE_MAX_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                               "libero_90": 400}


def test_held_out_init_states_never_overlap_training():
    tasks, inits = held_out_episodes(10, 40, 10, 0, 250)
    assert min(inits) == 40 and max(inits) == 49 and sorted(set(tasks)) == list(range(10))
    assert len(set(zip(tasks, inits))) == 100  # every (task, held-out state) pair, then it cycles


def test_gripper_convention_and_action_conversion():
    a = np.array([[0.5, -2.0, 0, 0, 0, 0, 1.0, 0.1, 0, 0, 0, 0, 0, -1.0]], np.float32)
    out = to_robosuite(a, 2, invert_gripper=False)
    assert out.shape == (1, 2, 7) and out[0, 0, 1] == -1.0 and out[0, 0, 6] == 1.0 and out[0, 1, 6] == -1.0
    flipped = to_robosuite(a, 2, invert_gripper=True)
    assert flipped[0, 0, 6] == -1.0 and flipped[0, 1, 6] == 1.0 and flipped[0, 0, 0] == 0.5


def test_reset_to_an_init_state_reproduces_the_observation(env):
    first = env.reset([0, 1, 2], [3, 3, 7])
    again = env.reset([0, 1, 2], [3, 3, 7])
    assert first["image"].shape == (3, 64, 64, 3) and first["image"].dtype == np.uint8
    assert first["proprio"].shape == (3, 8) and first["proprio"].dtype == np.float32
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["proprio"], again["proprio"])
    other = env.reset([0, 1, 2], [4, 3, 7])
    assert np.abs(other["image"][0].astype(int) - first["image"][0]).max() > 30  # another layout
    np.testing.assert_array_equal(other["image"][1:], first["image"][1:])
    assert first["instruction"][1] == suite_tasks("libero_spatial")[1][1]
    for pid in env.sim_pids():  # simulators run single-threaded BLAS (much faster on busy cores)
        environ = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
        assert environ["OPENBLAS_NUM_THREADS"] == "1" and environ["OMP_NUM_THREADS"] == "1", environ


def test_a_step_moves_the_robot_and_the_gripper_follows_robosuite_signs(env):
    obs = env.reset([0, 0, 0], [0, 0, 0])
    a = np.tile(HOLD, (3, 1))
    a[0, 0] = 1.0  # +x
    a[1, -1] = 1.0  # close the gripper
    for _ in range(6):
        res = env.step(a)
    moved = res.obs["proprio"] - obs["proprio"]
    assert moved[0, 0] > 0.02 and abs(moved[0, 1]) < 0.01  # eef went along +x
    assert abs(moved[2, 0]) < 0.005  # holding still stays put
    width = lambda p: p[:, 6] - p[:, 7]  # noqa: E731  finger joints: apart when open
    assert width(res.obs["proprio"])[1] < width(obs["proprio"])[1] - 0.01  # +1 closed it
    assert abs(width(res.obs["proprio"])[2] - width(obs["proprio"])[2]) < 0.005  # -1 keeps it open
    assert not res.terminated.any() and not res.truncated.any()


def test_goal_state_terminates_and_untouched_does_not(env):
    env.reset([0, 0, 0], [0, 0, 0])
    res = env.step(np.tile(HOLD, (3, 1)))
    assert not res.terminated.any() and not res.info["success"].any()
    _, solved = env.place(1, "akita_black_bowl_1", "plate_1")  # the task: bowl onto the plate
    assert solved
    res = env.step(np.tile(HOLD, (3, 1)))
    assert res.terminated.tolist() == [False, True, False] and res.reward[1] == 1.0 and res.info["success"][1]
    res = env.step(np.tile(HOLD, (3, 1)))  # an ended episode is not stepped again
    assert not res.terminated.any() and res.reward.sum() == 0.0


def test_object_suite_goal_state_terminates():
    e = LiberoEnv(1, LiberoSpec(suite="libero_object", num_tasks=10, num_init_states=40, max_steps=20,
                                image_size=32, camera_size=64))
    try:
        e.reset([0], [5])
        assert not e.step(HOLD[None]).terminated[0]
        e.reset([0], [5])
        _, solved = e.place(0, "alphabet_soup_1", "basket_1_contain_region")
        assert solved
        assert e.step(HOLD[None]).terminated[0]
    finally:
        e.close()


def test_truncation_at_the_step_limit_counts_simulator_steps_with_chunks():
    e = LiberoEnv(1, LiberoSpec(suite="libero_spatial", num_tasks=10, num_init_states=40, max_steps=5,
                                action_chunk=2, image_size=32, camera_size=64, settle_steps=2))
    try:
        assert e.max_steps == 3  # policy calls: 2 + 2 + 1 simulator steps
        e.reset([2], [0])
        chunk = np.tile(HOLD, 2)[None]
        assert not e.step(chunk).truncated[0] and not e.step(chunk).truncated[0]
        assert e.step(chunk).truncated[0]
    finally:
        e.close()


def test_replanning_executes_the_first_steps_of_each_chunk():
    e = LiberoEnv(1, LiberoSpec(suite="libero_spatial", num_tasks=10, num_init_states=40, max_steps=5,
                                action_chunk=4, replan_steps=2, image_size=32, camera_size=64, settle_steps=2))
    try:
        assert e.max_steps == 3  # policy calls: 2 + 2 + 1 simulator steps of each 4-action chunk
        e.reset([2], [0])
        chunk = np.tile(HOLD, 4)[None]
        assert not e.step(chunk).truncated[0] and e._steps[0] == 2
        assert not e.step(chunk).truncated[0] and e.step(chunk).truncated[0] and e._steps[0] == 5
    finally:
        e.close()


def test_killed_and_stalled_simulators_are_restarted_and_their_episodes_truncated(env):
    env.reset([0, 1, 2], [1, 1, 1])
    hold = np.tile(HOLD, (3, 1))
    env.step(hold)
    before, pids = env.restarts, env.sim_pids()
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(1.0)  # dead before the next request: sending it fails (broken pipe), not only the reply
    os.kill(pids[1], signal.SIGSTOP)
    res = env.step(hold)
    assert res.truncated.tolist() == [True, True, False]
    assert env.restarts == before + 2 and env.sim_pids()[2] == pids[2]
    assert not set(env.sim_pids()[:2]) & set(pids)
    for _ in range(3):  # the healthy episode carries on
        res = env.step(hold)
        assert not res.truncated[2] and not res.truncated[:2].any()
    obs = env.reset([0, 1, 2], [1, 1, 1])  # the replacements build and run episodes
    assert obs["image"].shape == (3, 64, 64, 3)
    assert not env.step(hold).truncated.any()


# ---- the trainer and the evaluation command on LIBERO -------------------------------------------
def sim_processes() -> list:
    """Simulators started by Ray actors (not by this test process's own env fixture)."""
    import psutil

    return [p for p in psutil.process_iter(["name", "cmdline", "ppid"])
            if "vlarl.envs.libero_sim" in " ".join(p.info["cmdline"] or []) and p.info["ppid"] != os.getpid()]


def sabotage(done: threading.Event, log: list) -> None:
    """Once two simulators are mid-episode, SIGKILL one and SIGSTOP the other."""
    while not done.is_set():
        running = [p for p in sim_processes() if p.info["name"] == "vlarl-sim-ep"]
        if len(running) >= 2:
            time.sleep(1.0)
            os.kill(running[0].pid, signal.SIGKILL)
            os.kill(running[1].pid, signal.SIGSTOP)
            log += [running[0].pid, running[1].pid]
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def libero_run(tmp_path_factory, ray_local):
    """One PPO iteration on libero_spatial with two simulators, one killed and one stalled mid-episode."""
    from vlarl.config import load_config
    from vlarl.trainer import train

    run_dir = tmp_path_factory.mktemp("libero_run")
    cfg = load_config([f"trainer.run_dir={run_dir}", "trainer.iterations=1", "rollout.num_envs=3",
                       "rollout.eval_every=0", "env.max_steps=30", "env.step_timeout=8", "cluster.dashboard=false",
                       "algo.minibatch_size=32", "algo.epochs=1"])
    done, killed = threading.Event(), []
    t = threading.Thread(target=sabotage, args=(done, killed), daemon=True)
    t.start()
    try:
        metrics = train(cfg)
    finally:
        done.set()
    return run_dir, metrics, killed


def test_an_iteration_completes_despite_a_killed_and_a_stalled_simulator(libero_run):
    run_dir, metrics, killed = libero_run
    assert len(killed) == 2
    assert metrics["env/restarts"] == 2
    assert metrics["rollout/episodes"] == 3 and metrics["rollout/episode_length"] < 30
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["iteration"] == 0 and (run_dir / "best_return" / "state" / ".metadata").is_file()
    assert not sim_processes()  # the workers closed their simulators


def test_eval_command_writes_report_and_playable_video(libero_run):
    import imageio.v2 as imageio

    run_dir, _, _ = libero_run
    out = run_dir / "eval_out"
    proc = subprocess.run([sys.executable, "-m", "vlarl.eval", "--checkpoint", str(run_dir / "best_return"),
                           "--out", str(out), "--tasks", "0,3", "--init-states", "41", "--videos", "1",
                           "rollout.num_envs=2", "env.max_steps=12", "cluster.dashboard=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    suite = report["suites"]["libero_spatial"]
    assert suite["episodes"] == 2 and set(suite["tasks"]) == {"0", "3"}
    assert [e["init_state"] for e in suite["episode_results"]] == [41, 41]
    assert 0.0 <= suite["success_rate"] <= 1.0 and report["success_rate"] == suite["success_rate"]
    (video,) = suite["videos"]
    frames = [f for f in imageio.get_reader(video)]  # (not list(): the reader's len() is inf for MP4)
    assert len(frames) == suite["episode_results"][0]["length"] + 1 and frames[0].shape == (128, 128, 3)
    assert np.std(frames[0]) > 5  # a rendered scene, not a blank frame


def test_eval_robustness_writes_the_table_chart_and_json(libero_run):
    run_dir, _, _ = libero_run
    out = run_dir / "robust_out"
    proc = subprocess.run([sys.executable, "-m", "vlarl.eval", "--checkpoint", str(run_dir / "best_return"),
                           "--out", str(out), "--robustness", "--variants", "swap,with_milk", "--tasks", "0",
                           "--init-states", "3", "--videos", "2", "rollout.num_envs=2", "env.max_steps=4",
                           "cluster.dashboard=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    names = ["libero_spatial", "libero_spatial_swap", "libero_spatial_with_milk"]
    rob = report["robustness"]
    assert list(rob["suites"]) == names and rob["base"] == "libero_spatial"
    for name in names:  # every cell counts the episodes that ran
        episodes = report["suites"][name]["episode_results"]
        row = rob["suites"][name]
        assert row["episodes"] == len(episodes) == 1 and row["successes"] == sum(e["success"] for e in episodes)
        assert list(row["tasks"]) == ["0"] and row["tasks"]["0"]["episodes"] == 1
        assert all(v.endswith("failure.mp4") for v in report["suites"][name]["videos"])
    md = (out / "robustness.md").read_text()
    assert all(f"| {n} |" in md for n in names)
    from PIL import Image

    chart = np.asarray(Image.open(out / "robustness.png").convert("L"))
    assert chart.shape[0] > 200 and (chart < 128).mean() > 0.005  # axes, labels and interval bars drawn


def test_each_perturbation_family_resets_steps_and_checks_success():
    from vlarl.envs.libero_suites import check_suite

    suites = ["libero_spatial_lan", "libero_spatial_object", "libero_spatial_swap", "libero_spatial_task",
              "libero_spatial_with_mug"]
    envs = {s: LiberoEnv(1, LiberoSpec(suite=s, num_tasks=10, num_init_states=40, max_steps=3, image_size=32,
                                       camera_size=64, settle_steps=1)) for s in suites}
    try:
        for suite, e in envs.items():
            e.reset([1], [45])
            for _ in range(3):
                res = e.step(HOLD[None])
            assert res.truncated[0] and not res.info["success"][0], suite
            assert res.obs["image"].shape == (1, 32, 32, 3) and np.std(res.obs["image"]) > 3
        base = suite_tasks("libero_spatial")
        lan, task = suite_tasks("libero_spatial_lan"), suite_tasks("libero_spatial_task")
        assert all(a[1] != b[1] for a, b in zip(lan, base))  # every instruction paraphrased (the BDDL's)
        assert any(a[1] != b[1] for a, b in zip(task, base))  # redesigned goals say so
        for same in ("libero_spatial_swap", "libero_spatial_with_mug", "libero_spatial_object"):
            assert [i for _, i in suite_tasks(same)] == [i for _, i in base], same
        # a variant with 10 init states per task is evaluation-only: all of them held out
        milk = LiberoEnv(1, LiberoSpec(suite="libero_spatial_with_milk", num_tasks=10, num_init_states=40, max_steps=3))
        assert (milk.num_init_states, milk.num_held_out_states) == (0, 10)
        with pytest.raises(ValueError, match="choose 1..49"):
            LiberoEnv(1, LiberoSpec(suite="libero_spatial", num_tasks=10, num_init_states=50, max_steps=3))
        with pytest.raises(ValueError, match="libero_spatial: .base., lan"):
            check_suite("libero_spatial_nonesuch")
    finally:
        for e in envs.values():
            e.close()


def test_eval_command_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlarl.eval", "--checkpoint", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not a vlarl checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_a_perturbed_suite_is_a_valid_env_name_and_an_unknown_one_lists_the_suites():
    from vlarl.config import ConfigError
    from vlarl.preflight import load_run_config as load_config

    assert load_config(["env=libero_goal", "env.name=libero_goal_swap"]).env.name == "libero_goal_swap"
    with pytest.raises(ConfigError, match="libero_goal: .base., lan, object, swap") as err:
        load_config(["env=libero_goal", "env.name=libero_goal_nonesuch"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not installed"):
        load_config(["env=libero_goal", "env.name=libero_goal_env"])


def test_robustness_settings_that_do_not_fit_stop_at_start():
    from vlarl.config import ConfigError
    from vlarl.preflight import load_run_config as load_config

    cases = {"has none": ["env=toy", "rollout.eval_robustness=true"],
             "cannot also be reported as held out": ["env=libero_goal", "env.name=libero_goal_swap",
                                                     "rollout.eval_robustness=true",
                                                     "rollout.eval_robustness_variants=[swap]"],
             "unknown LIBERO suite": ["env=libero_goal", "rollout.eval_robustness=true",
                                      "rollout.eval_robustness_variants=[nonesuch]"],
             "set rollout.eval_robustness=true": ["env=libero_goal", "rollout.eval_robustness_variants=[swap]"]}
    for words, overrides in cases.items():
        with pytest.raises(ConfigError, match=words):
            load_config(overrides)
    from vlarl.robustness import robustness_variants

    cfg = load_config(["env=libero_goal", "env.name=libero_goal_swap", "rollout.eval_robustness=true"])
    suites = robustness_variants(cfg)
    assert "libero_goal" in suites and "libero_goal_swap" not in suites and "libero_goal_lan" in suites


def test_training_on_a_mixture_reports_robustness_on_held_out_suites(ray_local, tmp_path):
    """Two iterations on libero_spatial + libero_spatial_swap (one task each: two curriculum arms), the
    held-out with_milk variant evaluated each iteration against libero_spatial alone."""
    from vlarl.config import load_config
    from vlarl.trainer import train

    train(load_config([f"trainer.run_dir={tmp_path}", "env=libero_spatial", "trainer.iterations=2",
                       "env.train_suites=[libero_spatial,libero_spatial_swap]", "env.num_tasks=1",
                       "rollout.num_envs=2", "env.max_steps=4", "rollout.eval_every=2",
                       "rollout.eval_robustness_every=1", "rollout.eval_episodes=2",
                       "rollout.eval_videos=0", "rollout.eval_robustness=true",
                       "rollout.eval_robustness_variants=[with_milk]", "cluster.dashboard=false",
                       "algo.minibatch_size=8", "algo.epochs=1", "trainer.save_every=2"]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["iteration"] == 1 and 0 <= last["eval_robust/with_milk/success_rate"] <= 1
    curriculum = json.loads((tmp_path / "checkpoints" / "step_000002" / "curriculum.json").read_text())
    assert curriculum["arms"] == ["libero_spatial/0", "libero_spatial_swap/0"]
    assert sum(curriculum["counts"]) == 4 and min(curriculum["counts"]) > 0  # both arms were rolled out
    mixed = json.loads((tmp_path / "eval" / "iter_000002" / "report.json").read_text())  # the mixture's held-out eval
    assert set(mixed["suites"]) == {"libero_spatial", "libero_spatial_swap"}
    assert sum(s["episodes"] for s in mixed["suites"].values()) == mixed["episodes"] == 2
    assert "eval/libero_spatial_swap/success_rate" in last
    for it in ("iter_000001", "iter_000002"):
        folder = tmp_path / "eval" / it
        table = json.loads((folder / "robustness.json").read_text())
        base = json.loads((folder / "libero_spatial" / "report.json").read_text())  # env.name alone, not the mixture
        milk = json.loads((folder / "libero_spatial_with_milk" / "report.json").read_text())
        assert list(table["suites"]) == ["libero_spatial", "libero_spatial_with_milk"]
        assert {e["task"] for e in base["episode_results"]} == {0} and base["suite"] == "libero_spatial"
        assert table["suites"]["libero_spatial_with_milk"]["episodes"] == milk["episodes"] == 2
        assert [e["init_state"] for e in milk["episode_results"]][0] == 0  # evaluation-only: from state 0 on
        assert (folder / "robustness.png").stat().st_size > 5000


def test_a_mixture_env_holds_each_suites_tasks_with_their_own_pixels_and_step_limits():
    """Task ids run over the suites in order; an episode of a mixture task is the one that suite's own
    env gives (same pixels), and each episode stops at its suite's step limit."""
    suites = ("libero_spatial", "libero_spatial_swap", "libero_object")
    spec = LiberoSpec(suite="libero_spatial", num_tasks=1, num_init_states=40, max_steps=4, image_size=32,
                      camera_size=64, step_timeout=60, suites=suites)
    mixed = LiberoEnv(3, spec)
    alone = LiberoEnv(1, LiberoSpec(suite="libero_spatial_swap", num_tasks=1, num_init_states=40, max_steps=4,
                                    image_size=32, camera_size=64, step_timeout=60))
    try:
        assert mixed.num_tasks == 3 and mixed.task_suites() == list(suites)
        assert mixed.instructions() == [suite_tasks(s)[0][1] for s in suites]
        assert mixed.step_limits == {"libero_spatial": 4, "libero_spatial_swap": 4, "libero_object": 280}
        assert mixed.max_steps == 280
        obs = mixed.reset([0, 1, 2], [7, 7, 7])
        np.testing.assert_array_equal(obs["image"][1], alone.reset([0], [7])["image"][0])
        assert not np.array_equal(obs["image"][0], obs["image"][1])  # swap moved the objects
        for step in range(4):
            res = mixed.step(np.tile(HOLD, (3, 1)))
        assert res.truncated[:2].all() and res.info["timeout"][:2].all()  # spatial's 4-step limit
        assert not res.truncated[2] and not res.info["timeout"][2]  # libero_object runs to 280
    finally:
        mixed.close()
        alone.close()


def test_a_mixture_that_does_not_fit_stops_with_what_to_change():
    from vlarl.config import ConfigError
    from vlarl.preflight import load_run_config as load_config

    cases = {"does not hold env.name=libero_spatial": ["env.train_suites=[libero_spatial_swap,libero_spatial_lan]"],
             "names a suite twice": ["env.train_suites=[libero_spatial,libero_spatial]"],
             "evaluation-only": ["env.train_suites=[libero_spatial,libero_spatial_with_milk]"],
             "unknown LIBERO suite": ["env.train_suites=[libero_spatial,libero_spatial_nonesuch]"],
             "cannot also be reported as held out": ["env.train_suites=[libero_spatial,libero_spatial_swap]",
                                                     "rollout.eval_robustness=true",
                                                     "rollout.eval_robustness_variants=[swap]"]}
    for words, overrides in cases.items():
        with pytest.raises(ConfigError, match=words):
            load_config(["env=libero_spatial", *overrides])
    with pytest.raises(ConfigError, match="is not one"):
        load_config(["env=toy", "env.train_suites=[libero_spatial]"])
    from vlarl.robustness import robustness_variants

    cfg = load_config(["env=libero_spatial", "env.train_suites=[libero_spatial,libero_spatial_swap]",
                       "rollout.eval_robustness=true"])
    held_out = robustness_variants(cfg)
    assert "libero_spatial_swap" not in held_out and "libero_spatial" not in held_out and "libero_spatial_lan" in held_out


def test_eval_takes_a_mixture_run_one_suite_at_a_time():
    from omegaconf import OmegaConf

    from vlarl.config import load_config
    from vlarl.eval import EvalError, robustness_suites, suite_config

    run = OmegaConf.to_container(load_config(["env=libero_spatial", "env.num_tasks=2", "env.max_steps=50",
                                              "env.train_suites=[libero_spatial,libero_spatial_swap]",
                                              "rollout.eval_robustness=true",
                                              "rollout.eval_robustness_variants=[with_milk]"]))
    milk = suite_config(run, "libero_spatial_with_milk", [])  # the training-time robustness settings do not apply
    assert (milk.env.name, milk.env.train_suites, milk.env.num_tasks, milk.env.max_steps) == (
        "libero_spatial_with_milk", [], 2, 50)  # env.name's base: the same tasks and step limit
    goal = suite_config(run, "libero_goal", [])
    assert (goal.env.num_tasks, goal.env.max_steps) == (10, 300)  # another base: all tasks, its standard limit
    assert suite_config(run, "libero_spatial", []).env.train_suites == []
    mixture = run["env"]["train_suites"]
    suites = robustness_suites("libero_spatial", None, mixture)
    assert suites[0] == "libero_spatial" and "libero_spatial_swap" not in suites and "libero_spatial_lan" in suites
    with pytest.raises(EvalError, match="not held out"):
        robustness_suites("libero_spatial", ["swap"], mixture)
