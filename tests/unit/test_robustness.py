"""The robustness table: Wilson intervals against scipy, counts and ratios from the episodes, the
Markdown table and a bar chart that really shows the bars."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlarl.robustness import markdown, table, wilson, write_robustness


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (10, 10), (3, 37), (99, 100)])
def test_wilson_interval_equals_scipys(k, n):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-6)


def test_wilson_hand_case():
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    for n in range(1, 200):  # exact at the ends, and the rate always inside (error bars never negative)
        assert wilson(0, n)[0] == 0.0 and wilson(n, n)[1] == 1.0
        assert all(wilson(k, n)[0] <= k / n <= wilson(k, n)[1] for k in range(n + 1))


def test_chart_of_suites_that_all_failed(tmp_path):
    suites = {s: report(s, {0: [False] * 6}) for s in ("libero_10", "libero_10_swap", "libero_10_lan")}
    files = write_robustness(table("libero_10", suites), tmp_path)
    assert np.asarray(Image.open(files["chart"]).convert("L")).min() < 100  # drawn: axes, labels, interval bars


def report(suite: str, successes: dict[int, list[bool]]) -> dict:
    """A vlarl.eval suite report with these per-task episode outcomes."""
    episodes = [{"task": t, "init_state": 40 + i, "success": s, "length": 5}
                for t, outcomes in successes.items() for i, s in enumerate(outcomes)]
    tasks = {str(t): {"instruction": f"task {t}", "episodes": len(o), "success_rate": float(np.mean(o))}
             for t, o in successes.items()}
    return {"suite": suite, "episode_results": episodes, "tasks": tasks}


def test_table_counts_the_episodes_and_divides_by_the_base(tmp_path):
    suites = {"libero_goal": report("libero_goal", {0: [True] * 8 + [False] * 2, 1: [True] * 6 + [False] * 4}),
              "libero_goal_swap": report("libero_goal_swap", {0: [True] * 2 + [False] * 8, 1: [False] * 10}),
              "libero_goal_with_mug": report("libero_goal_with_mug", {0: [True] * 7 + [False] * 3, 1: [True] * 6 + [False] * 4})}
    result = table("libero_goal", suites)
    base, swap, mug = (result["suites"][s] for s in suites)
    assert (base["episodes"], base["successes"], base["success_rate"]) == (20, 14, 0.7)
    assert base["ratio_to_base"] == pytest.approx(1.0) and swap["ratio_to_base"] == pytest.approx(0.1 / 0.7)
    assert swap["perturbation"] == "swap" and "position" in swap["changes"] and mug["perturbation"] == "with_mug"
    assert swap["tasks"]["0"]["ratio_to_base"] == pytest.approx(0.2 / 0.8)
    assert swap["tasks"]["1"]["success_rate"] == 0 and swap["tasks"]["1"]["ci95"][0] == 0
    assert mug["ci95"] == pytest.approx(list(wilson(13, 20)))
    md = markdown(result)
    assert "| libero_goal_swap | positions" in md and "| 20 | 10.0% |" in md and "| 0.14 |" in md
    files = write_robustness(result, tmp_path)
    image = np.asarray(Image.open(files["chart"]).convert("RGB"))
    assert image.shape[0] >= 300 and image.shape[1] >= 500
    blue = np.all(np.abs(image.astype(int) - [31, 119, 180]) < 8, -1).sum()  # the base suite's bar
    orange = np.all(np.abs(image.astype(int) - [255, 127, 14]) < 8, -1).sum()  # the variants' bars
    assert blue > 500 and orange > 2 * 100 and orange > blue * 0.5  # two variant bars, one 10 % the other 65 %


def test_eval_report_of_a_mixture_gives_success_per_suite():
    from vlarl.data.batch import EvalEpisodes
    from vlarl.eval import report

    ids = np.array([0, 0, 1, 2, 2, 2])
    result = EvalEpisodes(task_ids=ids, init_state_ids=np.arange(6) + 40,
                          success=np.array([1, 0, 1, 0, 0, 1], bool), returns=np.zeros(6, np.float32),
                          lengths=np.full(6, 5), videos={})
    rep = report(result, ["a", "b", "c"], "libero_spatial", ["libero_spatial", "libero_spatial", "libero_spatial_swap"])
    # hand count: libero_spatial tasks 0, 1 -> 2 of 3 succeed; libero_spatial_swap task 2 -> 1 of 3
    assert rep["suites"] == {"libero_spatial": {"episodes": 3, "success_rate": 2 / 3},
                             "libero_spatial_swap": {"episodes": 3, "success_rate": 1 / 3}}
    assert rep["tasks"]["2"]["suite"] == "libero_spatial_swap"
    assert "suites" not in report(result, ["a", "b", "c"], "libero_spatial", ["libero_spatial"] * 3)
