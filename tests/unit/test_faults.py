"""Which failures the trainer recovers from (vlarl.faults.is_fault), the first-failure gather, and
the metrics rewind after a recovery."""

from __future__ import annotations

import json

import pytest
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from vlarl.faults import is_fault
from vlarl.metrics import MetricsLogger


def task_error(cause: BaseException) -> RayTaskError:
    return RayTaskError("LearnerWorker.update", "traceback text", cause)


def test_lost_actors_timeouts_and_broken_collectives_are_faults():
    assert is_fault(RayActorError())
    assert is_fault(GetTimeoutError("late"))
    # gloo's messages when a peer rank went away, raised inside a learner call
    assert is_fault(task_error(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:1")))
    assert is_fault(task_error(RuntimeError("Timed out waiting 1800000ms for recv operation to complete")))
    assert is_fault(task_error(RayActorError()))  # a learner whose push hit a lost rollout worker


def test_errors_of_our_own_code_are_not_faults():
    assert not is_fault(ValueError("shape mismatch"))
    assert not is_fault(task_error(ValueError("step needs actions of shape (4, 7)")))
    assert not is_fault(task_error(KeyError("language_model.lm_head.weight")))


def test_gather_raises_at_the_first_failure_not_behind_a_slow_call(ray_local):
    from vlarl.faults import gather

    @ray.remote
    def slow():
        import time

        time.sleep(60)

    @ray.remote
    def broken():
        raise RuntimeError("Connection closed by peer")

    import time

    started = time.monotonic()
    with pytest.raises(RayTaskError) as info:
        gather([slow.remote(), broken.remote()], timeout=120)
    assert time.monotonic() - started < 30 and is_fault(info.value)
    with pytest.raises(GetTimeoutError):
        gather([slow.remote()], timeout=1)


def test_rewind_drops_the_iterations_that_run_again(tmp_path):
    logger = MetricsLogger(tmp_path, {}, 5)
    logger.record(-1, {"eval/success_rate": 0.1})
    for it in range(4):
        logger.log(it, {"rollout/return": float(it)})
    logger.rewind(2)
    logger.log(2, {"rollout/return": 20.0})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [-1, 0, 1, 2] and rows[-1]["rollout/return"] == 20.0
    logger = MetricsLogger(tmp_path, {}, 5)
    logger.rewind(0)  # no checkpoint yet: the run starts over, its starting report included
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
