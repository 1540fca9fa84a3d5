"""Metrics sinks: a one-line console progress report, metrics.jsonl, TensorBoard, Ray dashboard
gauges and (optionally) wandb."""

from __future__ import annotations

import json
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path


class Timer:
    """Accumulates wall time per phase: `with timer("collect"): ...` -> metrics timing/collect."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[f"timing/{name}"] = self.times.get(f"timing/{name}", 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.times = self.times, {}
        return out


# What a person watching a run looks at, as Ray gauges (Prometheus: ray_vlarl_<key with _>{run=...}).
DASHBOARD = ("iteration", "rollout/success_rate", "rollout/return", "eval/success_rate", "perf/env_steps_per_s",
             "perf/actions_per_s", "env/steps", "rollout/weights_version", "timing/sync", "timing/collect",
             "timing/update", "actor/pg_loss", "critic/vf_loss", "actor/approx_kl", "actor/clipfrac", "actor/entropy",
             "critic/vf_clipfrac", "faults/actor_restarts", "faults/iterations_replayed", "faults/recoveries")


def gauge_name(key: str) -> str:
    """rollout/success_rate -> vlarl_rollout_success_rate (Ray prefixes ray_ in Prometheus)."""
    return "vlarl_" + re.sub(r"[^A-Za-z0-9_]", "_", key)


class DashboardGauges:
    """The DASHBOARD metrics and the curriculum's per-task sampling probability and success EMA as
    `ray.util.metrics` gauges, tagged with the run's name, so the Ray dashboard's Metrics view and
    every node's Prometheus endpoint (`cluster.metrics_port`) show them. Needs a connected Ray."""

    def __init__(self, run: str):
        from ray.util.metrics import Gauge

        self.tags = {"run": run}
        self.gauges = {key: Gauge(gauge_name(key), description=f"vlarl {key}, per iteration", tag_keys=("run",))
                       for key in DASHBOARD}
        self.per_task = {name: Gauge(gauge_name(f"curriculum/task_{name}"), tag_keys=("run", "task"),
                                     description=f"vlarl curriculum: {name.replace('_', ' ')} of each task")
                         for name in ("prob", "success_ema")}
        # eval_robust/<perturbation>/<stat>: one gauge per stat, the perturbation as a tag
        self.robust = {stat: Gauge(gauge_name(f"eval_robust/{stat}"), tag_keys=("run", "perturbation"),
                                   description=f"vlarl robustness evaluation: {stat.replace('_', ' ')} per perturbation")
                       for stat in ("success_rate", "ratio_to_base")}

    def set(self, iteration: int, metrics: dict[str, float], tasks: dict[str, list] | None = None) -> None:
        for key, value in {"iteration": iteration, **metrics}.items():
            if key in self.gauges:
                self.gauges[key].set(float(value), tags=self.tags)
            elif key.startswith("eval_robust/") and key.count("/") == 2:
                _, perturbation, stat = key.split("/")
                if stat in self.robust:
                    self.robust[stat].set(float(value), tags={**self.tags, "perturbation": perturbation})
        tasks = dict(tasks or {})
        names = tasks.pop("names", None)
        for name, values in tasks.items():
            for task, value in enumerate(values):
                self.per_task[name].set(float(value), tags={**self.tags, "task": names[task] if names else str(task)})


class MetricsLogger:
    def __init__(self, run_dir: str | Path, config: dict, total_iterations: int, use_wandb: bool = False,
                 wandb_project: str = "vlarl", stream=sys.stdout):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.total = total_iterations
        self.stream = stream
        self.started = time.time()
        self.first_iteration: int | None = None
        self.dashboard: DashboardGauges | None = None  # set by the trainer once Ray is up
        self.wandb = None
        if use_wandb:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("trainer.wandb=true needs the wandb package: pip install 'vlarl[wandb]'.") from None
            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(self.run_dir))

    def log(self, iteration: int, metrics: dict[str, float], tasks: dict[str, list] | None = None) -> None:
        """Write one iteration's metrics everywhere and print the progress line; `tasks` (per-task
        curriculum values) goes to the dashboard only."""
        self.record(iteration, metrics)
        if self.dashboard is not None:
            self.dashboard.set(iteration, metrics, tasks)
        self.stream.write(self.progress_line(iteration, metrics) + "\n")
        self.stream.flush()

    def record(self, iteration: int, metrics: dict[str, float]) -> None:
        """Write metrics to the files and dashboards only (iteration -1: before the first update)."""
        record = {"iteration": iteration, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, iteration)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=iteration)

    def rewind(self, start: int) -> None:
        """After a fault, iterations from `start` run again: drop their rows from metrics.jsonl (all
        rows, the starting report included, when start is 0) and purge them from TensorBoard."""
        from torch.utils.tensorboard import SummaryWriter

        path = self.run_dir / "metrics.jsonl"
        self.jsonl.close()
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        keep = [line for line in rows if start > 0 and json.loads(line)["iteration"] < start]
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)
        self.jsonl = open(path, "a", buffering=1)
        self.tb.close()
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start)
        self.first_iteration, self.started = None, time.time()

    def start_clock(self) -> None:
        """Start timing iterations now (so warm-up work does not inflate s/it and the ETA)."""
        self.started = time.time()

    def progress_line(self, iteration: int, m: dict[str, float]) -> str:
        if self.first_iteration is None:
            self.first_iteration = iteration
        done = iteration - self.first_iteration + 1
        per_it = (time.time() - self.started) / max(done, 1)
        eta = per_it * (self.total - iteration - 1)
        parts = [f"[iter {iteration + 1}/{self.total}]",
                 f"success {m.get('rollout/success_rate', float('nan')):.2f}",
                 f"return {m.get('rollout/return', float('nan')):.2f}"]
        if "eval/success_rate" in m:
            parts.append(f"eval {m['eval/success_rate']:.2f}")
        parts += [f"{m.get('perf/env_steps_per_s', 0.0):.0f} steps/s", f"{per_it:.1f} s/it",
                  f"ETA {time.strftime('%H:%M:%S', time.gmtime(max(eta, 0)))}"]
        return "  ".join(parts)

    def info(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
