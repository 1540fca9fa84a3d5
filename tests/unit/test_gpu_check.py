"""launch/gpu_check.sh --dry-run: the GPU pack's plan is listed and every test and script it names
exists and compiles; a pack that names a missing or broken script says which and exits 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def dry_run(root: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / "launch" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable})


def test_dry_run_lists_every_step_and_finds_everything(tmp_path):
    proc = dry_run(REPO, tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["problems"] == []
    names = [s["name"] for s in report["steps"]]
    assert names == ["gpu_tests", "attention", "engines", "flow_denoise", "oft_decode", "openvla_7b"]
    assert all(s["status"] == "planned" for s in report["steps"])
    assert report["budget_s"] == 540  # each step's timeout is cut to what is left of it
    assert "tests/gpu" in report["steps"][0]["command"]
    for name in names[1:]:
        assert f"bench/{name}.py" in proc.stdout


def test_dry_run_names_what_is_missing_or_broken(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(REPO / "launch", root / "launch")
    shutil.copytree(REPO / "tests" / "gpu", root / "tests" / "gpu")
    (root / "bench").mkdir()
    for name in ("attention", "engines", "flow_denoise", "oft_decode"):  # no openvla_7b.py
        shutil.copy(REPO / "bench" / f"{name}.py", root / "bench")
    (root / "bench" / "engines.py").write_text("def broken(:\n")
    proc = dry_run(root, tmp_path / "out")
    assert proc.returncode == 1
    assert "openvla_7b: bench/openvla_7b.py does not exist" in proc.stderr
    assert "engines: bench/engines.py does not compile" in proc.stderr
    assert len(json.loads((tmp_path / "out" / "gpu_check.json").read_text())["problems"]) == 2
