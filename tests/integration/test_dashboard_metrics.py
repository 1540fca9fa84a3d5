"""The Ray dashboard's metrics: during a real toy run, the Prometheus endpoint of the local Ray node
serves the run's per-iteration gauges (ray_vlarl_*), tagged with the run, and the curriculum's
per-task values. The run gets its own Ray cluster in a process of its own (a fixed metrics port and
a fast report interval)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import json, socket, sys, threading, time, urllib.request
import ray
from vlarl.config import load_config
from vlarl.trainer import train

s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
ray.init(address="local", num_cpus=4, include_dashboard=False, _metrics_export_port=port,
         _system_config={"metrics_report_interval_ms": 300})
seen, done = {}, threading.Event()

def scrape():
    while not done.is_set():
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            text = ""
        for line in text.splitlines():
            if line.startswith("ray_vlarl_"):
                name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
                seen.setdefault(name, []).append((line.split("{", 1)[1].rsplit("}", 1)[0], value))
        time.sleep(0.3)

thread = threading.Thread(target=scrape, daemon=True)
thread.start()
train(load_config(["env=toy", "rollout.num_envs=16", "rollout.eval_every=0", "trainer.iterations=6",
                   "cluster.dashboard=false", f"trainer.run_dir={sys.argv[1]}"]))
during = {name: values for name, values in seen.items()}
done.set()
print("SEEN " + json.dumps(during))
'''


def test_prometheus_endpoint_serves_the_run_metrics_during_the_run(tmp_path):
    run_dir = tmp_path / "dash_run"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("SEEN "))[5:])
    for key in ("iteration", "rollout_success_rate", "rollout_return", "perf_env_steps_per_s", "perf_actions_per_s",
                "rollout_weights_version", "timing_sync", "actor_pg_loss", "critic_vf_loss", "actor_approx_kl",
                "actor_clipfrac", "faults_actor_restarts", "curriculum_task_prob", "curriculum_task_success_ema"):
        assert f"ray_vlarl_{key}" in seen, (key, sorted(seen))
    assert all('run="dash_run"' in tags for tags, _ in seen["ray_vlarl_iteration"])
    # The gauges move with the run: several iterations were scraped while it ran.
    assert len({v for _, v in seen["ray_vlarl_iteration"]}) >= 2
    versions = [v for _, v in seen["ray_vlarl_rollout_weights_version"]]
    assert max(versions) > min(versions)
    tasks = {tags.split('task="')[1].split('"')[0] for tags, _ in seen["ray_vlarl_curriculum_task_prob"]}
    assert tasks == {"0", "1", "2", "3"}  # the toy env's 4 tasks
    # Every value scraped is one the run logged (the endpoint lags the run by a report interval).
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("rollout/return", "actor/pg_loss"):
        logged = [r[key] for r in rows if key in r]
        assert all(any(v == pytest.approx(x, rel=1e-6, abs=1e-9) for x in logged)
                   for _, v in seen[f"ray_vlarl_{key.replace('/', '_')}"]), key
