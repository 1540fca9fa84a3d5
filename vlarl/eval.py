"""Greedy evaluation of a checkpoint: per-task and per-suite success as JSON, and MP4 videos.

    python -m vlarl.eval --checkpoint RUN/best_return [--suites libero_spatial,libero_object]
        [--tasks 0,1,2] [--init-states 40-49] [--videos 4] [--out DIR] [key=value ...]
    python -m vlarl.eval --checkpoint RUN/best_return --robustness [--variants swap,lan,with_mug]

Episodes run in parallel on the run's rollout workers (Ray, local unless RAY_ADDRESS is set), each
stepping its simulators in parallel. By default every task of each suite runs once from every
held-out init state (ids past env.num_init_states), the states training never drew. The trainer
uses the same functions every rollout.eval_every iterations and logs eval/success_rate.

--robustness evaluates the trained-on suite's base and every perturbed variant the installed
benchmark lists (or those --variants names), each on its held-out init states (all of them for a
variant with no more than env.num_init_states), and writes the robustness table (vlarl/robustness.py)
into report.json, robustness.md and robustness.png; the videos kept are failures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from vlarl.data.batch import EvalEpisodes
from vlarl.data.video import write_video



# ---- shared with the trainer ------------------------------------------------------------------
def greedy_episodes(rollout_workers: list, per_worker: int, episodes: list[tuple[int, int]], seed_iteration: int,
                    record: int, version: int, suite: str | None = None) -> EvalEpisodes:
    """Run `episodes` [(task, init state)] greedily, per_worker at a time on each worker (on another
    LIBERO suite than the one trained on with `suite`); the first `record` come back with videos.
    The last round is padded with repeats that are then dropped.
    (A lost worker raises here; in training the trainer recovers and runs the iteration again.)"""
    import ray

    per_round = per_worker * len(rollout_workers)
    rounds = -(-len(episodes) // per_round)
    padded = episodes + [episodes[k % len(episodes)] for k in range(rounds * per_round - len(episodes))]
    parts = []
    for r in range(rounds):
        jobs = []
        for i in range(len(rollout_workers)):
            start = (r * len(rollout_workers) + i) * per_worker
            chunk = padded[start:start + per_worker]
            jobs.append(([t for t, _ in chunk], [k for _, k in chunk], min(max(record - start, 0), per_worker)))
        results = ray.get([w.evaluate.remote(t, k, seed_iteration + r, rec, suite)
                           for w, (t, k, rec) in zip(rollout_workers, jobs)])
        if any(res.weights_version != version for res in results):
            raise RuntimeError(f"rollout workers did not take weights version {version}; check the worker logs.")
        for i, res in enumerate(results):
            start = (r * len(rollout_workers) + i) * per_worker
            res.videos = {start + j: v for j, v in res.videos.items()}
            parts.append(res)
    n = len(episodes)
    cat = {f: np.concatenate([getattr(p, f) for p in parts])[:n]
           for f in ("task_ids", "init_state_ids", "success", "returns", "lengths")}
    videos = {k: v for p in parts for k, v in p.videos.items() if k < n}
    return EvalEpisodes(**cat, videos=videos, weights_version=version,
                        env_restarts=sum(p.env_restarts for p in parts))


def report(result: EvalEpisodes, instructions: list[str], suite: str, task_suites: list[str] | None = None) -> dict:
    """Per-task and overall success of one suite's episodes; on a mixture (task_suites: the suite of
    each task id, more than one) each task names its suite and `suites` holds success per suite."""
    tasks = {}
    mixture = task_suites is not None and len(set(task_suites)) > 1
    for t in sorted(set(result.task_ids.tolist())):
        sel = result.task_ids == t
        tasks[str(t)] = {"instruction": instructions[t], "episodes": int(sel.sum()),
                         "success_rate": float(result.success[sel].mean()),
                         **({"suite": task_suites[t]} if mixture else {})}
    extra = {}
    if mixture:
        of = np.array([task_suites[t] for t in result.task_ids])
        extra["suites"] = {s: {"episodes": int((of == s).sum()), "success_rate": float(result.success[of == s].mean())}
                           for s in dict.fromkeys(task_suites) if (of == s).any()}
    return {"suite": suite, **extra, "episodes": len(result.success), "success_rate": float(result.success.mean()),
            "mean_return": float(result.returns.mean()), "mean_length": float(result.lengths.mean()),
            "env_restarts": int(result.env_restarts), "tasks": tasks,
            "episode_results": [{"task": int(t), "init_state": int(k), "success": bool(s), "length": int(n)}
                                for t, k, s, n in zip(result.task_ids, result.init_state_ids, result.success,
                                                      result.lengths)]}


def write_videos(result: EvalEpisodes, folder: Path, prefix: str = "", failures_only: bool = False) -> list[str]:
    """One MP4 per recorded episode (or per recorded failure): {prefix}task{T}_init{K}_{success|failure}.mp4"""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, frames in sorted(result.videos.items()):
        if failures_only and result.success[k]:
            continue
        name = (f"{prefix}task{result.task_ids[k]}_init{result.init_state_ids[k]}_"
                f"{'success' if result.success[k] else 'failure'}.mp4")
        write_video(frames, folder / name)
        paths.append(str(folder / name))
    return paths


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# ---- the command ------------------------------------------------------------------------------
class EvalError(RuntimeError):
    """A checkpoint or an argument that cannot be evaluated; the message says what to do."""


def parse_ids(text: str | None, count: int, what: str) -> list[int] | None:
    """"0,3,5-7" -> [0, 3, 5, 6, 7]; None stays None (the default set)."""
    if text is None:
        return None
    ids = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            ids += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise EvalError(f"--{what}={text!r} is not a list like 0,3,5-7.") from None
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise EvalError(f"--{what} has ids {bad} outside 0..{count - 1}.")
    return ids


def load_checkpoint(path: Path, base_model: str | None = None) -> tuple[dict, dict, str]:
    """(run config, merged model state, base model folder) of a checkpoint directory, with the
    export tool's checks (a base model that fits, adapters merged)."""
    from vlarl.export import ExportError, find_base_model, load_base, merged_state, read_checkpoint

    try:
        ckpt = read_checkpoint(path)
        base = find_base_model(ckpt, base_model)
        state, _ = merged_state(ckpt, base, load_base(base, ckpt).model)
    except ExportError as e:
        raise EvalError(str(e)) from None
    return ckpt.run_config, state, str(base)


def suite_config(run_config: dict, suite: str, overrides: list[str]):
    """The run's config with env switched to `suite` (tasks and step limit from suite_env) and the
    user's key=value overrides applied last."""
    from omegaconf import OmegaConf

    from vlarl.config import Config, ConfigError, _set, validate
    from vlarl.preflight import check_components

    cfg = OmegaConf.merge(OmegaConf.structured(Config), run_config)
    cfg.env.train_suites = []  # one suite at a time, also for a run that trained on a mixture
    cfg.rollout.eval_robustness, cfg.rollout.eval_robustness_variants = False, []  # training-time settings
    if suite != cfg.env.name:
        if suite == "toy" or cfg.env.name == "toy":
            raise EvalError(f"a model trained on env={cfg.env.name} cannot be evaluated on {suite}.")
        from vlarl.envs.libero import suite_env
        from vlarl.envs.libero_suites import SuiteError

        try:
            cfg.env = OmegaConf.merge(cfg.env, suite_env(cfg.env, suite))
        except SuiteError as e:
            raise EvalError(str(e)) from None
    try:
        for item in overrides:
            key, _, value = item.partition("=")
            _set(cfg, key, value)
        validate(cfg)
        check_components(cfg)
    except ConfigError as e:
        raise EvalError(str(e)) from None
    except Exception as e:  # OmegaConf's own errors for unknown keys or bad types
        raise EvalError(f"bad override in {overrides}: {str(e).splitlines()[0]}") from None
    return cfg


def robustness_suites(trained_on: str, variants: list[str] | None = None, mixture: list[str] = ()) -> list[str]:
    """The base of the suite trained on, then its perturbed variants (all runnable ones but those in the
    training `mixture`, or `variants` given as perturbation names or suite names)."""
    from vlarl.envs.libero_suites import SuiteError, base_suite, check_suite, listing
    from vlarl.envs.libero_suites import variants as runnable

    base = base_suite(trained_on)
    if base is None:
        raise EvalError(f"--robustness needs a LIBERO run; this one trained on env={trained_on}.")
    if variants is None:
        return [base, *(s for s in runnable(base) if s not in mixture)]
    names = [v if v.startswith(base) else f"{base}_{v}" for v in variants]
    for name in names:
        try:
            check_suite(name)
        except SuiteError:
            raise EvalError(f"--variants: {name} is not a runnable variant of {base}; there are {listing()}.") from None
        if name in mixture and name != base:
            raise EvalError(f"--variants: the checkpoint trained on {name} (env.train_suites), so it is not held out; "
                            "drop it from --variants.")
    return [base, *[n for n in names if n != base]]


def evaluate_checkpoint(checkpoint: str, out: str | None = None, suites: list[str] | None = None,
                        tasks: str | None = None, init_states: str | None = None, videos: int = 2,
                        overrides: list[str] = (), base_model: str | None = None, robustness: bool = False,
                        variants: list[str] | None = None) -> dict:
    import ray

    from vlarl.cluster import SetupError, check_renderer, init_ray, release, start_rollout_workers
    from vlarl.placement import Placement

    path = Path(checkpoint).resolve()
    run_config, state, base = load_checkpoint(path, base_model)
    out_dir = Path(out) if out else path / "eval"
    if robustness:
        suites = robustness_suites(run_config["env"]["name"], variants, run_config["env"].get("train_suites") or ())
    suites = suites or [run_config["env"]["name"]]
    summary = {"checkpoint": str(path), "created": datetime.datetime.now().isoformat(timespec="seconds"),
               "suites": {}}
    started = time.monotonic()
    for suite in suites:
        cfg = suite_config(run_config, suite, list(overrides))
        try:
            check_renderer(cfg)
        except SetupError as e:
            raise EvalError(str(e)) from None
        init_ray(cfg)
        per_worker = cfg.rollout.num_envs // cfg.cluster.num_rollout_workers
        try:
            placement = Placement(cfg, with_learners=False)
        except SetupError as e:
            raise EvalError(str(e)) from None
        workers = start_rollout_workers(cfg, base, placement)
        try:
            shape = ray.get(workers[0].env_shape.remote())
            task_ids = parse_ids(tasks, shape["num_tasks"], "tasks") or list(range(shape["num_tasks"]))
            total = shape["num_init_states"] + shape["num_held_out_states"]
            inits = parse_ids(init_states, total, "init-states") or list(range(shape["num_init_states"], total))
            episodes = [(t, k) for t in task_ids for k in inits]
            ref = ray.put(state)
            ray.get([w.load_weights.remote(ref, 1) for w in workers])
            print(f"vlarl.eval: {suite}: {len(episodes)} greedy episodes ({len(task_ids)} tasks x {len(inits)} init "
                  f"states) on {len(workers)} worker(s) x {per_worker} envs", flush=True)
            result = greedy_episodes(workers, per_worker, episodes, 0, videos, 1)
        finally:
            release(workers)
            placement.remove()
        rep = report(result, shape["instructions"], suite, shape["task_suites"])
        rep["videos"] = write_videos(result, out_dir / "videos", prefix=f"{suite}_", failures_only=robustness)
        summary["suites"][suite] = rep
        print(f"vlarl.eval: {suite}: success {rep['success_rate']:.3f} over {rep['episodes']} episodes", flush=True)
    summary["success_rate"] = float(np.mean([s["success_rate"] for s in summary["suites"].values()]))
    if robustness:
        from vlarl.robustness import table, write_robustness

        summary["robustness"] = table(suites[0], summary["suites"])
        summary["robustness"]["files"] = write_robustness(summary["robustness"], out_dir)
        print(f"vlarl.eval: robustness table {out_dir / 'robustness.md'}", flush=True)
    summary["elapsed_s"] = round(time.monotonic() - started, 1)
    write_json(out_dir / "report.json", summary)
    print(f"vlarl.eval: report {out_dir / 'report.json'}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlarl.eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run_dir/best_return or run_dir/checkpoints/step_NNNNNN")
    p.add_argument("--out", help="report folder (default: CHECKPOINT/eval)")
    p.add_argument("--suites", help="comma-separated env names (default: the one trained on)")
    p.add_argument("--tasks", help="task ids, e.g. 0,2,5-7 (default: all of the suite)")
    p.add_argument("--init-states", help="init-state ids, e.g. 40-49 (default: the held-out ones)")
    p.add_argument("--videos", type=int, default=2, help="episodes recorded as MP4 per suite (default 2)")
    p.add_argument("--base-model", help="the model the run started from, when it is not where the run left it")
    p.add_argument("--robustness", action="store_true",
                   help="the base suite and its perturbed variants, with the robustness table (md, png, json)")
    p.add_argument("--variants", help="with --robustness: comma-separated perturbations (swap,lan,with_mug) or "
                                      "suite names (default: every runnable variant)")
    p.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. rollout.num_envs=8")
    args = p.parse_args(argv)
    if args.robustness and args.suites:
        print("vlarl.eval: --robustness picks the suites itself; give --variants instead of --suites.", file=sys.stderr)
        return 2
    try:
        evaluate_checkpoint(args.checkpoint, args.out, args.suites.split(",") if args.suites else None, args.tasks,
                            args.init_states, args.videos, args.overrides, args.base_model, args.robustness,
                            args.variants.split(",") if args.variants else None)
    except EvalError as e:
        print(f"vlarl.eval: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
