"""Pipelined rollouts (rollout.pipeline_stages): the batch does not depend on the number of stages.

The worker runs in this process (no Ray): one worker collects with S = 1, 2 and 3 stages from the
same seed, and every field of the batch must agree, because each environment samples from its own
generator and the stages are visited in a fixed order.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from omegaconf import OmegaConf

from vlarl.config import load_config
from vlarl.trainer import prepare_model
from vlarl.workers.rollout import RolloutWorker

pytestmark = pytest.mark.integration


def worker(tmp_path, overrides: list[str], n: int) -> RolloutWorker:
    cfg = load_config([f"trainer.run_dir={tmp_path}", f"rollout.num_envs={n}", *overrides])
    return RolloutWorker(OmegaConf.to_container(cfg, resolve=True), 0, prepare_model(cfg, tmp_path), n)


def with_stages(w: RolloutWorker, stages: int, collect):
    w.cfg.rollout.pipeline_stages = stages  # one worker (and one set of simulators) for every S
    return collect()


def assert_same(a, b, continuous: bool = False) -> None:
    """Every field equal; log-probs, and with a flow policy (`continuous`) every float field (its continuous actions
    carry the rounding into the states), to float32 rounding: a batched matmul rounds differently
    for a batch of 10 rows than for 4 of them, as when episodes end beside each other without stages."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x is None or y is None:
            assert x is None and y is None, f.name
        elif f.name == "rollout_logprobs" or (continuous and isinstance(x, np.ndarray) and x.dtype.kind == "f"):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-5, err_msg=f.name)
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        elif isinstance(x, dict):  # videos
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{f.name}[{k}]")
        else:
            assert x == y, f.name


@pytest.mark.parametrize("chunk, model", [(1, "tiny_token"), (2, "tiny_token"), (2, "tiny_flow")])
def test_toy_batches_do_not_depend_on_the_number_of_stages(tmp_path, chunk, model):
    n, flow = 10, model == "tiny_flow"  # stages of uneven size (S=3); episodes end at different steps inside each
    w = worker(tmp_path, ["env=toy", f"model={model}", f"env.action_chunk={chunk}", "rollout.temperature=1.5"], n)
    assert w.pipeline_stages == 1  # auto: the toy steps in-process, nothing to overlap
    tasks, inits = [i % 4 for i in range(n)], list(range(100, 100 + n))
    runs = {s: with_stages(w, s, lambda: w.collect(tasks, inits, list(range(n)), 3, record=2)) for s in (1, 2, 3)}
    lengths = runs[1].mask.sum(1)
    assert lengths.min() < lengths.max()
    assert runs[1].videos[0].shape[0] == lengths[0] + 1
    for s in (2, 3):
        assert_same(runs[1], runs[s], flow)
    other = w.collect(tasks, inits, list(range(n)), 4)  # another iteration, other draws
    first = (lambda b: b.chains[:, :1]) if flow else (lambda b: b.action_tokens[:, :1])  # noqa: E731
    assert not np.array_equal(first(other), first(runs[1]))
    demos = {s: with_stages(w, s, lambda: w.demonstrations(tasks, inits)) for s in (1, 2)}
    assert_same(demos[1], demos[2], flow)
    assert demos[1].success.mean() > 0.5  # the expert (it may brush a distractor on its way)
    evals = {s: with_stages(w, s, lambda: w.evaluate(tasks, inits, 0, record=1)) for s in (1, 3)}
    assert_same(evals[1], evals[3], flow)


def test_libero_batches_do_not_depend_on_the_number_of_stages(tmp_path):
    pytest.importorskip("libero.libero", reason="LIBERO is installed by `bash launch/setup.sh dev,libero`")
    n = 2  # stages of one simulator each with S=2
    w = worker(tmp_path, ["env.max_steps=5", "env.settle_steps=2", "env.image_size=32", "env.camera_size=64"], n)
    try:
        assert w.pipeline_stages == 2  # auto: simulators step in subprocesses
        tasks, inits = [0, 1], [0, 1]
        runs = {s: with_stages(w, s, lambda: w.collect(tasks, inits, list(range(n)), 0, record=1)) for s in (1, 2)}
        assert runs[1].mask.all() and runs[1].env_restarts == 0
        assert_same(runs[1], runs[2])
    finally:
        w.shutdown()
