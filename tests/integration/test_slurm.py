"""launch/slurm/vlarl.sbatch under a fake Slurm: `srun` and `scontrol` are shims that start each
"node" (a Ray head, a Ray worker) on this machine. The script brings up the cluster, waits for both
nodes, submits the toy run with cluster=multi_node (custom resource fake_gpu standing in for GPUs,
the engines SPREAD over the two nodes), and on SIGUSR1 (Slurm's pre-emption warning) stops the job,
which finishes its iteration and checkpoints it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

SRUN = r"""#!/usr/bin/env bash
# srun shim: drop srun's options, run the command here. A second Ray node on this machine needs
# ports of its own (on real hosts each node has the defaults to itself).
while [ $# -gt 0 ]; do
  case "$1" in -w|--nodelist|-N|-n|--nodes|--ntasks) shift 2 ;; --*=*|-*) shift ;; *) break ;; esac
done
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
if [ "$(basename "$1")" = ray ] && [ "${2:-}" = start ]; then
  extra=(--dashboard-agent-listen-port="$(port)" --metrics-export-port="$(port)" --runtime-env-agent-port="$(port)")
  case " $* " in *" --head "*) extra+=(--ray-client-server-port="$(port)") ;; esac
  exec "$@" "${extra[@]}"
fi
exec "$@"
"""

SCONTROL = r"""#!/usr/bin/env bash
# scontrol shim: only `scontrol show hostnames LIST` (a comma-separated list, no ranges)
[ "$1 $2" = "show hostnames" ] && tr ',' '\n' <<< "$3"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sbatch_script_runs_and_forwards_preemption(tmp_path):
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    temp = tempfile.mkdtemp(prefix="vls", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{shims}{os.pathsep}{BIN}{os.pathsep}{env['PATH']}", PY=sys.executable, VLARL_PYTHON=sys.executable,
               VLARL_DIR=str(REPO), SLURM_JOB_NODELIST="fake1,fake2", SLURM_JOB_ID="4242", SLURM_CPUS_ON_NODE="2",
               VLARL_GPUS_PER_NODE="0", VLARL_RAY_PORT=str(free_port()), VLARL_DASHBOARD_PORT=str(free_port()),
               VLARL_RAY_START_ARGS=f'--resources={{"fake_gpu":2}} --temp-dir={temp}/ray --disable-usage-stats',
               VLARL_JOIN_TIMEOUT_S="180", VLARL_STOP_GRACE_S="120", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    args = ["env=toy", "rollout.num_envs=16", "rollout.eval_every=0", "trainer.iterations=200",
            "trainer.save_every=100", f"trainer.run_dir={run_dir}", "cluster.gpus_per_node=2", "cluster.rollout_gpus=2",
            "cluster.device=cpu", "cluster.device_resource=fake_gpu", "cluster.cpus_per_rollout_worker=0.5",
            "cluster.cpus_per_learner=0.5", "cluster.dashboard=false"]
    log = open(tmp_path / "sbatch.log", "w")
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "slurm" / "vlarl.sbatch"), *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, (tmp_path / "sbatch.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (tmp_path / "sbatch.log").read_text()[-4000:]
            time.sleep(1)
        proc.send_signal(signal.SIGUSR1)  # Slurm's --signal=B:USR1@300
        rc = proc.wait(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    out = (tmp_path / "sbatch.log").read_text()
    assert rc == 0, out[-4000:]
    assert "vlarl.sbatch: all 2 node(s) joined" in out
    assert "SIGUSR1: stopping job vlarl-4242-" in out and "STOPPED" in out
    assert "vlarl: SIGTERM: finishing this iteration and checkpointing it" in out  # what `ray job stop` sent
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    done = len(rows)
    assert f"vlarl: stopping after iteration {done} on SIGTERM" in out
    state = json.loads((run_dir / "checkpoints" / f"step_{done:06d}" / "trainer_state.json").read_text())
    assert state["iteration"] == done
    placement = json.loads((run_dir / "placement.json").read_text())
    assert len(set(placement["rollout"])) == 2  # multi_node SPREADs the engines over both nodes
