"""Node-loss scenarios on a fake multi-node Ray cluster, run as its own process by test_node_loss.py
(a `ray.cluster_utils.Cluster` needs a process whose Ray is not already started).

The cluster: a head (the driver, the curriculum and the checkpoint actor) and four nodes with one
`fake_gpu` each, standing in for GPUs (cluster.device_resource=fake_gpu). The run: cluster=node_split
with one rollout worker and two learner ranks, so each actor has a node of its own and one node is
spare. Scenarios, in order: a dry run and an oversized request against the live cluster; a reference
run; a run that loses the rollout worker's node; a node is added back; a run that loses a learner
rank's node mid-iteration; a run whose learner rank freezes (a stuck collective). Writes one JSON
file with what each produced.

usage: python tests/integration/fault_cluster.py OUT.json RUN_ROOT
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

ITERATIONS = 5
PRESET_SIZES = {"one_gpu": [], "node_split": ["cluster.num_gpus=4", "cluster.rollout_gpus=2"],
                "node_colocated": ["cluster.num_gpus=4"],
                "multi_node": ["cluster.num_nodes=2", "cluster.gpus_per_node=2", "cluster.rollout_gpus=2"]}


def overrides(address: str, run_dir: Path, collective_timeout: int = 120) -> list[str]:
    return ["env=toy", "rollout.num_envs=16", "algo.minibatch_size=64", "algo.epochs=2", "rollout.eval_every=0",
            "cluster.dashboard=false", "cluster=node_split", "cluster.device=cpu", "cluster.device_resource=fake_gpu",
            "cluster.num_gpus=3", "cluster.rollout_gpus=1", "cluster.cpus_per_rollout_worker=1",
            "cluster.cpus_per_learner=1", "cluster.recovery_timeout_s=120", "cluster.placement_timeout_s=60",
            f"cluster.collective_timeout_s={collective_timeout}",
            f"cluster.address={address}", f"trainer.run_dir={run_dir}", f"trainer.iterations={ITERATIONS}"]


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_with_loss(cluster: Cluster, address: str, run_dir: Path, role: str, rank: int, log: list,
                  freeze: bool = False) -> dict:
    """Train in a thread; once iteration 2 is logged, remove the node holding `role` actor `rank`, or
    with `freeze` stop a learner rank's process (SIGSTOP: alive but silent, its peer hangs in the
    collective) under a 20 s cluster.collective_timeout_s."""
    from vlarl.config import load_config
    from vlarl.trainer import train

    cfg = load_config(overrides(address, run_dir, 20 if freeze else 120))
    result: dict = {}

    def work():
        try:
            result["last"] = train(cfg)
        except BaseException as e:  # reported to the test, not swallowed
            result["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=work)
    thread.start()
    removed = None
    while thread.is_alive():
        if removed is None and freeze and any(r["iteration"] >= 1 for r in rows(run_dir)):
            pid = int(subprocess.run(["pgrep", "-f", "ray::LearnerWorker"], capture_output=True,
                                     text=True).stdout.split()[0])
            os.kill(pid, signal.SIGSTOP)
            removed = f"pid {pid}"
            log.append(f"stopped learner process {pid} at {time.strftime('%X')}")
        elif removed is None and any(r["iteration"] >= 1 for r in rows(run_dir)):
            node_id = json.loads((run_dir / "placement.json").read_text())[role][rank]
            victim = next(n for n in cluster.list_all_nodes() if n.node_id == node_id)
            cluster.remove_node(victim, allow_graceful=False)
            removed = node_id
            log.append(f"removed node {node_id[:12]} holding {role} {rank} at {time.strftime('%X')}")
        time.sleep(0.05)
    thread.join()
    placement = json.loads((run_dir / "placement.json").read_text())
    return {**result, "removed": removed, "placement_after": placement, "rows": rows(run_dir)}


def main() -> None:
    out, root = Path(sys.argv[1]), Path(sys.argv[2])
    # Fast health checks: a removed node is declared dead in about 2 s instead of 30.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                           "health_check_initial_delay_ms": 1000}})
    for _ in range(4):
        cluster.add_node(num_cpus=2, resources={"fake_gpu": 1})
    cluster.wait_for_nodes()
    address = cluster.address
    report: dict = {"log": []}
    try:
        dry = subprocess.run([sys.executable, "-m", "vlarl.main", *overrides(address, root / "dry"), "--dry-run"],
                             capture_output=True, text=True, timeout=300)
        report["dry_run"] = {"rc": dry.returncode, "stdout": dry.stdout, "stderr": dry.stderr[-2000:],
                             "made_run_dir": (root / "dry").exists()}
        report["preset_dry_runs"] = {}
        from vlarl.main import main as vlarl_main

        for preset, sizes in PRESET_SIZES.items():  # every GPU preset, sized to the 4 fake GPUs
            # In this process (the command line itself ran above): a Python start per preset costs CI minutes.
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                rc = vlarl_main(["env=toy", "rollout.num_envs=16", f"cluster={preset}", *sizes, "cluster.device=cpu",
                                 "cluster.device_resource=fake_gpu", "cluster.cpus_per_rollout_worker=0.5",
                                 "cluster.cpus_per_learner=0.5", f"cluster.address={address}", "--dry-run"])
            report["preset_dry_runs"][preset] = {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()[-2000:]}
        big = subprocess.run([sys.executable, "-m", "vlarl.main", *overrides(address, root / "big"),
                              "cluster.num_gpus=8"], capture_output=True, text=True, timeout=300)
        report["too_big"] = {"rc": big.returncode, "stderr": big.stderr[-2000:]}

        ray.init(address=address)
        from vlarl.config import load_config
        from vlarl.trainer import train

        started = time.monotonic()
        train(load_config(overrides(address, root / "reference")))
        report["reference_s"] = time.monotonic() - started
        report["reference_rows"] = rows(root / "reference")
        report["rollout_loss"] = run_with_loss(cluster, address, root / "rollout_loss", "rollout", 0, report["log"])
        cluster.add_node(num_cpus=2, resources={"fake_gpu": 1})  # a spare again
        cluster.wait_for_nodes()
        report["learner_loss"] = run_with_loss(cluster, address, root / "learner_loss", "learner", 1, report["log"])
        report["stuck_collective"] = run_with_loss(cluster, address, root / "stuck_collective", "learner", 0,
                                                   report["log"], freeze=True)
    finally:
        out.write_text(json.dumps(report, indent=1, default=str))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
