"""The GPU verification pack (run by launch/gpu_check.sh): every CUDA-marked test and the GPU
benchmarks, one after the other within one time budget, into one JSON.

    bash launch/gpu_check.sh [--dry-run] [--budget-s 540]     (results: $OUT, default bench/results/gpu)

Each step gets its own timeout, cut to what is left of the budget; a step that would start with
under 20 s left is recorded as skipped. A benchmark's own JSON is folded into the report, so
$OUT/gpu_check.json holds every figure. --dry-run runs nothing: it lists the steps and checks that
every test and script they name exists and compiles (exit 1 naming what is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def steps(out: Path, py: str) -> list[dict]:
    """name, command, timeout (s), the files it needs, the JSON it writes."""
    def bench(name: str, script: str, timeout: int, *args: str) -> dict:
        result = out / f"{name}.json"
        return {"name": name, "command": [py, script, *args, "--out", str(result)], "timeout_s": timeout,
                "needs": [script], "result": result}

    gpu_tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests" / "gpu").glob("test_*.py"))
    return [
        {"name": "gpu_tests", "command": [py, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider",
                                          "--junitxml", str(out / "gpu_tests.xml")],
         "timeout_s": 200, "needs": ["tests/gpu", *gpu_tests], "result": None},
        bench("attention", "bench/attention.py", 45, "--device", "cuda", "--repeats", "3"),
        bench("engines", "bench/engines.py", 90, "--device", "cuda", "--repeats", "2"),
        bench("flow_denoise", "bench/flow_denoise.py", 90, "--real", "--repeats", "3"),
        bench("oft_decode", "bench/oft_decode.py", 60, "--device", "cuda", "--repeats", "3"),
        bench("openvla_7b", "bench/openvla_7b.py", 240, "--repeats", "1"),
    ]


def check(plan: list[dict]) -> list[str]:
    """What the plan names that is not there or does not compile."""
    problems = []
    for step in plan:
        for need in step["needs"]:
            path = REPO / need
            if not path.exists():
                problems.append(f"{step['name']}: {need} does not exist")
            elif path.suffix == ".py":
                try:
                    compile(path.read_text(), str(path), "exec")
                except SyntaxError as e:
                    problems.append(f"{step['name']}: {need} does not compile (line {e.lineno}: {e.msg})")
    return problems


def gpu_info() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi unavailable: {e}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list and check the steps; run nothing")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 540)))
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results/gpu"))
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = steps(out, os.environ.get("PYTHON", sys.executable))
    problems = check(plan)
    report = {"dry_run": args.dry_run, "budget_s": args.budget_s, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "problems": problems, "steps": []}
    if not args.dry_run:
        report["gpu"] = gpu_info()
    started = time.monotonic()
    for step in plan:
        row = {"name": step["name"], "command": " ".join(step["command"]), "timeout_s": step["timeout_s"]}
        report["steps"].append(row)
        print(f"gpu_check: {step['name']}: {row['command']} (timeout {step['timeout_s']} s)", flush=True)
        if args.dry_run:
            row["status"] = "planned"
            continue
        left = args.budget_s - (time.monotonic() - started)
        if left < 20:
            row["status"] = f"skipped: {left:.0f} s of the {args.budget_s:.0f} s budget left"
            continue
        timeout = min(step["timeout_s"], left)
        begin = time.monotonic()
        try:
            proc = subprocess.run(step["command"], cwd=REPO, capture_output=True, text=True, timeout=timeout)
            row["rc"], tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
            row["status"] = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired as e:
            row["rc"], tail = None, ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))[-3000:]
            row["status"] = f"timed out after {timeout:.0f} s"
        row["seconds"], row["tail"] = round(time.monotonic() - begin, 1), tail
        if step["result"] is not None and step["result"].is_file():
            row["result"] = json.loads(step["result"].read_text())
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))  # after every step: a cut-off run keeps its figures
        print(f"gpu_check: {step['name']}: {row['status']} in {row['seconds']} s", flush=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    for problem in problems:
        print(f"gpu_check: {problem}", file=sys.stderr)
    print(f"gpu_check: report in {out / 'gpu_check.json'}")
    failed = [r["name"] for r in report["steps"] if r.get("status") not in ("planned", "passed")]
    return 1 if problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
