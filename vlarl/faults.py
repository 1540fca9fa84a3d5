"""Surviving lost actors and nodes inside a job.

Every remote call the trainer waits on goes through `gather`, which returns at the first failed
call instead of waiting behind a healthy rank stuck in a collective, and turns a call that runs past
`cluster.collective_timeout_s` into a fault. `is_fault` tells a lost actor, a lost node or a broken
collective (recoverable) from an error in vlarl's own code (not: replaying it would fail again).
`probe` finds which actors are gone; the trainer then replaces rollout workers one by one, or
rebuilds the whole learner group (a process group cannot take a new member), and resumes from the
last checkpoint.
"""

from __future__ import annotations

import re
import time

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, OwnerDiedError, RayActorError, RayTaskError

# How gloo and NCCL report a peer rank that went away or a collective that timed out.
COLLECTIVE_FAILURE = re.compile(r"Connection closed by peer|Connection reset|Broken pipe|Timed out|timed out|"
                                r"NCCL communicator was aborted|NCCL error|ProcessGroup.*(abort|timeout)", re.I)


class SetupError(RuntimeError):
    """The run directory or the cluster cannot be used as asked; the message says what to do."""


class Fault(RuntimeError):
    """Something outside vlarl's code failed (an actor, a node, a collective); the run can recover."""


def gather(refs: list, timeout: float, fetch: bool = True) -> list | None:
    """ray.get(refs), raising at the first failed call; past `timeout` seconds a GetTimeoutError.
    fetch=False only waits (the values stay in the object store for another actor to read)."""
    deadline = time.monotonic() + timeout
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0.0),
                                  fetch_local=False)
        if not ready:
            raise GetTimeoutError(f"{len(pending)} call(s) still running after {timeout:g} s "
                                  "(cluster.collective_timeout_s)")
        if fetch:
            ray.get(ready[0])  # raises the call's error, if it failed
    return ray.get(list(refs)) if fetch else None


def is_fault(e: BaseException) -> bool:
    """A lost actor or node, a timed-out call, or a collective broken by a lost peer: all of them
    are recovered from. Anything else is a bug that replaying would only repeat."""
    if isinstance(e, (Fault, RayActorError, GetTimeoutError, ObjectLostError, OwnerDiedError)):
        return True
    if isinstance(e, RayTaskError):
        cause = getattr(e, "cause", None)
        if cause is not None and cause is not e and is_fault(cause):
            return True
        return bool(COLLECTIVE_FAILURE.search(str(e))) or _is_dist_error(cause)
    return _is_dist_error(e) or (isinstance(e, RuntimeError) and bool(COLLECTIVE_FAILURE.search(str(e))))


def _is_dist_error(e) -> bool:
    import torch.distributed as dist

    return isinstance(e, getattr(dist, "DistError", ()))


def probe(actors: list, timeout: float = 30.0) -> list[bool]:
    """Which of `actors` answer a ping within `timeout` seconds (a rank stuck in a collective does not)."""
    refs = [a.node_id.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    done = set(ready)
    alive = []
    for ref in refs:
        try:
            alive.append(ref in done and bool(ray.get(ref)))
        except Exception:  # the actor is gone
            alive.append(False)
    return alive


def settle_nodes(node_ids: list, timeout: float) -> None:
    """Wait until Ray either marks each node dead or runs a task on it. A lost actor's node may be
    gone without Ray knowing yet (it notices after missed heartbeats); a replacement placed there
    would never start."""

    @ray.remote(num_cpus=0)
    def here() -> bool:
        return True

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    pending = {}
    for node in {n for n in node_ids if n}:
        pending[node] = here.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0.5)
        pending = {n: ref for n, ref in pending.items() if n in alive and ref not in ready}
    for ref in pending.values():
        ray.cancel(ref, force=True)


def until_alive(make, timeout: float, what: str):
    """Call `make(deadline)` (which starts actors and waits for them, each wait bounded) until it
    succeeds or `timeout` seconds have passed."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            return make(deadline)
        except SetupError:
            raise
        except Exception as e:  # noqa: BLE001 - any start-up failure of a replacement is retried
            if not is_fault(e):
                raise
            last = e
            time.sleep(1.0)
    raise SetupError(f"could not start {what} again within cluster.recovery_timeout_s={timeout:g} s "
                     f"(last error: {str(last).splitlines()[0] if last else 'none'}); add capacity and re-run "
                     "the same command to resume from the last checkpoint.")
