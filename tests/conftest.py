"""Shared fixtures.

`ray_local` starts one in-process local Ray cluster for the whole session, on request only (the
unit tests and tests/integration/test_ray_job.py, which runs its own `ray start` head, do not use
it). `address="local"` always starts a fresh cluster, so a `ray start` head elsewhere on the
machine (ours in test_ray_job, or anyone else's) is never joined by mistake.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A 4-CPU local Ray cluster in this process; `vlarl.trainer.train` reuses it (init_ray is a no-op)."""
    import ray

    if ray.is_initialized():  # someone (e.g. a module fixture) already connected this process
        yield ray
        return
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()
