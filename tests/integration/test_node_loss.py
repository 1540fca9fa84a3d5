"""Surviving lost nodes on a fake multi-node Ray cluster (tests/integration/fault_cluster.py runs
the scenarios in a process of its own): the dry run and the start-up check see the live cluster; a
run that loses the node of its rollout worker, and one that loses the node of a learner rank
mid-iteration, finish every iteration exactly once and end with the same weights and optimizer
state as a run that lost nothing (sampling is derived from the seed and the iteration, so a
replayed iteration is the same iteration). A learner rank that freezes (SIGSTOP: its peer waits
in a collective) times out into the same recovery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import assert_same, saved_state  # tests/integration is on sys.path (rootdir-relative imports)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ITERATIONS = 5


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    out = root / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "integration" / "fault_cluster.py"), str(out),
                           str(root / "runs")], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.is_file(), proc.stderr[-4000:]
    report = json.loads(out.read_text())
    report["root"] = root / "runs"
    report["stdout"] = proc.stdout
    return report


def final_state(run_dir: Path):
    step = run_dir / "checkpoints" / f"step_{ITERATIONS:06d}"
    return (*saved_state(step), json.loads((step / "trainer_state.json").read_text()))


def test_dry_run_shows_the_live_cluster_and_starts_nothing(scenarios):
    dry = scenarios["dry_run"]
    assert dry["rc"] == 0, dry["stderr"]
    text = dry["stdout"]
    assert "against the Ray cluster at" in text
    assert sum(line.strip().startswith("node ") for line in text.splitlines()) == 5  # head + 4 nodes
    assert text.count("1 fake_gpu") == 4
    assert "rollout 0: node" in text and "learner 0: node" in text and "learner 1: node" in text
    assert "weight sync: object_store" in text
    assert not dry["made_run_dir"]


@pytest.mark.parametrize("preset,groups", [
    ("one_gpu", {"rollout-worker/learner-rank pairs: 1": 1}),
    ("node_split", {"rollout workers: 2, PACK": 2, "learner ranks: 2, PACK": 2}),
    ("node_colocated", {"rollout-worker/learner-rank pairs: 4": 4}),
    ("multi_node", {"rollout workers: 2, SPREAD": 2, "learner ranks: 2, PACK": 2}),
])
def test_every_gpu_preset_plans_onto_the_live_cluster(scenarios, preset, groups):
    dry = scenarios["preset_dry_runs"][preset]
    assert dry["rc"] == 0, dry["stderr"]
    lines = dry["stdout"].splitlines()
    for header, count in groups.items():
        assert any(line.strip().startswith(header) for line in lines), (header, dry["stdout"])
    used = [line.split("node ")[1].split()[0] for line in lines if line.startswith("    ")]  # actor lines
    assert "0" not in used  # the head has no fake_gpu: nothing that needs one lands there
    if preset == "multi_node":  # SPREAD: the two engines on two different nodes
        engines = [line for line in lines if line.startswith("    rollout ")]
        assert len({line.split("node ")[1] for line in engines}) == 2, dry["stdout"]


def test_a_run_larger_than_the_cluster_stops_at_start(scenarios):
    big = scenarios["too_big"]
    assert big["rc"] == 2
    assert ("cluster=node_split needs 8 fake_gpu unit(s) (1 for rollout workers + 7 for learner ranks); "
            "the cluster has 4: set cluster.num_gpus=4 or add nodes.") in big["stderr"]
    assert not (scenarios["root"] / "big" / "checkpoints").exists()


@pytest.mark.parametrize("scenario", ["rollout_loss", "learner_loss", "stuck_collective"])
def test_node_loss_is_survived_exactly(scenarios, scenario):
    run = scenarios[scenario]
    assert "error" not in run, run.get("error")
    assert run["removed"], "the node was never removed"
    placed = run["placement_after"]
    assert run["removed"] not in placed["rollout"] + placed["learner"]  # everything lives elsewhere now
    assert None not in placed["rollout"] + placed["learner"]
    rows = run["rows"]
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))  # none lost, none counted twice
    assert rows[-1]["faults/actor_restarts"] >= 1
    if scenario != "rollout_loss":
        assert rows[-1]["faults/recoveries"] >= 1 and rows[-1]["faults/iterations_replayed"] >= 1
        assert rows[-1]["faults/actor_restarts"] >= 2  # the whole group of two ranks starts again
    reference = {r["iteration"]: r for r in scenarios["reference_rows"]}
    for r in rows:
        ref = reference[r["iteration"]]
        assert r["rollout/success_rate"] == ref["rollout/success_rate"]
        assert r["env/steps"] == ref["env/steps"]
        assert r["actor/pg_loss"] == pytest.approx(ref["actor/pg_loss"], abs=1e-6)
    model, optim, trainer_state = final_state(scenarios["root"] / scenario)
    ref_model, ref_optim, ref_trainer_state = final_state(scenarios["root"] / "reference")
    assert trainer_state == ref_trainer_state
    assert_same(model, ref_model, "model")
    assert_same(optim, ref_optim, "optimizer")
