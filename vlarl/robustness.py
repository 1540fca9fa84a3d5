"""The robustness table: success on a base LIBERO suite and on each perturbed variant, side by side.

For each suite: episodes, successes, the success rate with its 95 % Wilson score interval, the ratio
to the base suite's (in-distribution) success, and the same per task. Written as report JSON (the
`robustness` entry), a Markdown table and a bar chart PNG with the intervals as error bars
(`write_robustness`). Rows come from the episodes actually run (vlarl.eval's per-suite reports).
"""

from __future__ import annotations

import math
from pathlib import Path

Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval


def trained_suites(cfg) -> list[str]:
    """The suites a run trains on: env.train_suites (a mixture), else env.name."""
    return list(cfg.env.train_suites) or [cfg.env.name]


def robustness_variants(cfg) -> list[str]:
    """The held-out suites rollout.eval_robustness evaluates besides env.name: the
    rollout.eval_robustness_variants (perturbation or suite names), or env.name's base and every
    runnable variant of it that is not trained on."""
    from vlarl.envs.libero_suites import base_suite, variants

    base = base_suite(cfg.env.name)
    named = list(cfg.rollout.eval_robustness_variants)
    if not named:  # the base too when a variant is trained on
        return [s for s in [base, *variants(base)] if s not in trained_suites(cfg)]
    return [v if v.startswith(base) else f"{base}_{v}" for v in named]


def check_robustness(cfg) -> None:
    """ValueError unless every suite rollout.eval_robustness names runs here and none is trained on."""
    from vlarl.envs.libero_suites import base_suite, check_suite

    if not cfg.rollout.eval_robustness:
        return
    if base_suite(cfg.env.name) is None:
        raise ValueError(f"rollout.eval_robustness needs a LIBERO suite; env.name={cfg.env.name} is not one.")
    for suite in robustness_variants(cfg):
        if suite in trained_suites(cfg):
            where = "env.train_suites" if cfg.env.train_suites else "env.name"
            raise ValueError(f"{suite} is trained on ({where}) and cannot also be reported as held out in "
                             f"rollout.eval_robustness_variants; drop it from one of the two lists.")
        check_suite(suite)


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a success rate; (0, 1) for no episodes."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # The bounds are exactly 0 at no successes and 1 at all (the formula leaves float rounding there).
    lo = 0.0 if successes == 0 else max(0.0, min(p, centre - half))
    hi = 1.0 if successes == n else min(1.0, max(p, centre + half))
    return lo, hi


def cell(successes: int, n: int, base_rate: float | None) -> dict:
    rate = successes / n if n else 0.0
    lo, hi = wilson(successes, n)
    return {"episodes": n, "successes": successes, "success_rate": rate, "ci95": [lo, hi],
            "ratio_to_base": (rate / base_rate) if base_rate else None}


def table(base: str, suites: dict[str, dict]) -> dict:
    """suites: {suite: vlarl.eval report (episode_results, tasks)} with the base among them -> the table."""
    from vlarl.envs.libero_suites import describe, perturbation

    def counts(rep, task=None):
        eps = [e for e in rep["episode_results"] if task is None or e["task"] == task]
        return sum(e["success"] for e in eps), len(eps)

    base_rep = suites[base]
    k, n = counts(base_rep)
    base_rate = k / n if n else None
    rows = {}
    for name, rep in suites.items():
        row = {"perturbation": perturbation(name) or "none", "changes": describe(name),
               **cell(*counts(rep), base_rate), "tasks": {}}
        for t, info in rep["tasks"].items():
            bk, bn = counts(base_rep, int(t)) if t in base_rep["tasks"] else (0, 0)
            row["tasks"][t] = {"instruction": info["instruction"],
                               **cell(*counts(rep, int(t)), bk / bn if bn else None)}
        rows[name] = row
    return {"base": base, "suites": rows}


def robustness_metrics(result: dict) -> dict[str, float]:
    """eval_robust/<perturbation>/success_rate and ratio_to_base of every suite but the base."""
    out = {}
    for suite, row in result["suites"].items():
        if suite == result["base"]:
            continue
        name = row["perturbation"] if row["perturbation"] != "none" else "base"
        out[f"eval_robust/{name}/success_rate"] = row["success_rate"]
        if row["ratio_to_base"] is not None:
            out[f"eval_robust/{name}/ratio_to_base"] = row["ratio_to_base"]
    return out


def markdown(result: dict) -> str:
    """The table as Markdown: one row per suite, then per task."""
    def pct(x):
        return f"{100 * x:.1f}%"

    def ratio(x):
        return "-" if x is None else f"{x:.2f}"

    lines = [f"# Robustness: {result['base']} and its perturbed variants", "",
             "| suite | perturbation | episodes | success | 95% interval | ratio to base |",
             "|---|---|---|---|---|---|"]
    for name, r in result["suites"].items():
        lo, hi = r["ci95"]
        lines.append(f"| {name} | {r['changes']} | {r['episodes']} | {pct(r['success_rate'])} | "
                     f"{pct(lo)} - {pct(hi)} | {ratio(r['ratio_to_base'])} |")
    lines += ["", "## Per task", "", "| suite | task | episodes | success | 95% interval | ratio to base |",
              "|---|---|---|---|---|---|"]
    for name, r in result["suites"].items():
        for t, c in r["tasks"].items():
            lo, hi = c["ci95"]
            lines.append(f"| {name} | {t}: {c['instruction']} | {c['episodes']} | {pct(c['success_rate'])} | "
                         f"{pct(lo)} - {pct(hi)} | {ratio(c['ratio_to_base'])} |")
    return "\n".join(lines) + "\n"


def bar_chart(result: dict, path: Path) -> None:
    """Success per suite with 95 % intervals as error bars, the base suite's level as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["suites"])
    rates = [result["suites"][n]["success_rate"] for n in names]
    lo = [r - result["suites"][n]["ci95"][0] for n, r in zip(names, rates)]
    hi = [result["suites"][n]["ci95"][1] - r for n, r in zip(names, rates)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(names) + 2), 4.5))
    colours = ["#1f77b4" if n == result["base"] else "#ff7f0e" for n in names]
    ax.bar(range(len(names)), rates, yerr=[lo, hi], capsize=4, color=colours)
    ax.axhline(result["suites"][result["base"]]["success_rate"], color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.removeprefix(result["base"] + "_") if n != result["base"] else "base" for n in names],
                       rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("greedy success (95% interval)")
    ax.set_title(f"{result['base']}: success under perturbation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_robustness(result: dict, folder: Path) -> dict[str, str]:
    """robustness.md and robustness.png in `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    md, png = folder / "robustness.md", folder / "robustness.png"
    md.write_text(markdown(result))
    bar_chart(result, png)
    return {"markdown": str(md), "chart": str(png)}
