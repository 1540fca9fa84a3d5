"""`ray job submit -- python -m vlarl.main ...` against a real `ray start --head` cluster.

The head is this module's own: free ports for everything with a fixed default, its own temp dir
(so /tmp/ray/ray_current_cluster is not written and no other `ray.init()` on the machine joins it;
a process that should see it as "the" cluster gets RAY_TMPDIR pointing there), and `--block`, so
SIGTERM to the `ray start` process we launched tears down exactly the processes it started.
`ray stop` is not used: it kills every Ray process of the user by name, including the in-process
cluster of conftest's `ray_local` and any other run on the machine.
"""

from __future__ import annotations

import os
import re
import shutil
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
BIN = Path(sys.executable).parent  # the virtualenv's bin: ray, and the `python` the job runs
JOB_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def ray_head():
    """(client env for `ray job ...`, T) for a head whose temp dir is T/ray, i.e. what Ray's default
    /tmp/ray is to a process with RAY_TMPDIR=T; the head is stopped afterwards."""
    # Short: Ray's unix socket paths under T/ray/session_*/sockets must stay below 108 bytes.
    temp = tempfile.mkdtemp(prefix="vlr", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # The job's entrypoint `python` is looked up on the head's PATH: make it the virtualenv's.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # no drain wait on SIGTERM (that is for Serve)
    dash = free_port()
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--port={free_port()}", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         "--num-cpus=3", "--disable-usage-stats", f"--temp-dir={temp}/ray"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = dict(env, RAY_AUTH_MODE="token", RAY_ADDRESS=f"http://127.0.0.1:{dash}")
    try:
        deadline = time.monotonic() + 120
        while ray_cli("job", "list", env=client).returncode != 0:
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray start --head did not come up:\n" + (Path(temp) / "head.log").read_text()[-4000:])
            time.sleep(1)
        yield client, Path(temp)
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever the head left in its own process group (e.g. the dashboard's forkserver)
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def job_status(job_id: str, env: dict) -> str:
    """SUCCEEDED, FAILED, STOPPED, PENDING, RUNNING, or UNKNOWN if the CLI said nothing we know."""
    out = ray_cli("job", "status", job_id, env=env)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)  # the CLI colours even into a pipe
    for pattern, status in ((r"Job '\S+' succeeded", "SUCCEEDED"), (r"Job '\S+' failed", "FAILED"),
                            (r"Job '\S+' was stopped", "STOPPED")):
        if re.search(pattern, text):
            return status
    match = re.search(r"Status for job '\S+': (?:JobStatus\.)?(\w+)", text)
    return match.group(1) if match else "UNKNOWN"


def test_ray_job_submit_runs_training(ray_head, tmp_path):
    env, temp = ray_head
    run_dir = tmp_path / "run"
    submit = ray_cli("job", "submit", "--working-dir", ".", "--no-wait", "--", "python", "-m", "vlarl.main", "env=toy",
                     "trainer.iterations=1", f"trainer.run_dir={run_dir}", "rollout.num_envs=16",
                     "rollout.eval_every=0", env=env, timeout=120)
    text = re.sub(r"\x1b\[[0-9;]*m", "", submit.stdout + submit.stderr)
    assert submit.returncode == 0, text
    job_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", text).group(1)
    package = re.search(r"gcs://(_ray_pkg_\w+)\.zip", text).group(1)

    deadline, status = time.monotonic() + JOB_TIMEOUT_S, "PENDING"
    while status not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(2)
        status = job_status(job_id, env)
    if status != "SUCCEEDED":
        if status not in ("FAILED", "STOPPED"):
            ray_cli("job", "stop", job_id, env=env)
        logs = ray_cli("job", "logs", job_id, env=env).stdout
        pytest.fail(f"job {job_id} ended {status}; its logs:\n{logs[-6000:]}")

    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 1
    assert (run_dir / "checkpoints" / "step_000001" / "state" / ".metadata").is_file()

    # The working dir went up without .venv/ and runs/ (.gitignore is honoured): a few hundred KB.
    unpacked = list({p.resolve() for p in temp.glob(f"ray/session_*/runtime_resources/working_dir_files/{package}")})
    assert len(unpacked) == 1, f"no unpacked {package} under {temp}"
    files = [p for p in unpacked[0].rglob("*") if p.is_file()]
    assert (unpacked[0] / "vlarl" / "main.py").is_file()
    assert not (unpacked[0] / ".venv").exists() and not (unpacked[0] / "runs").exists()
    size = sum(p.stat().st_size for p in files)
    assert size < 5 * 2**20, f"the uploaded working dir is {size / 2**20:.1f} MiB"


def test_plain_run_starts_its_own_cluster_beside_a_ray_start_head(ray_head, tmp_path):
    """DESIGN: plain `python -m vlarl.main` starts a local Ray; with cluster.address null and no
    RAY_ADDRESS it must do so even while a `ray start` head (README's recipe) runs on the machine."""
    env, temp = ray_head
    env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_TMPDIR"] = str(temp)  # this process's /tmp/ray is the head's temp dir
    proc = subprocess.run([sys.executable, "-m", "vlarl.main", "env=toy", "trainer.iterations=1", f"trainer.run_dir={tmp_path}",
                           "rollout.num_envs=16", "rollout.eval_every=0", "cluster.dashboard=false"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "checkpoints" / "step_000001" / "state" / ".metadata").is_file()
