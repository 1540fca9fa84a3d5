"""Where every actor runs: placement groups from the cluster preset, checked before anything starts.

A run has two groups of actors that need a device each: rollout workers and learner ranks. With
`cluster.colocate` they come in pairs, one pair per device. Each group is one Ray placement group
of one bundle per actor ({CPU: n, <device resource>: 1}) under the preset's strategy (learner ranks
PACKed node by node, engines SPREAD over nodes in `multi_node`). `plan()` lays those bundles onto a
list of nodes the way Ray would, so a request that cannot fit stops at start with one sentence
naming what is missing (`--dry-run` prints the same plan without starting the job); `Placement`
holds the real groups and gives each actor its scheduling options, and after a lost node waits for
Ray to re-place the lost bundles on the nodes that remain.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field

from omegaconf import DictConfig

from vlarl.faults import SetupError

EPS = 1e-9


class PlacementError(RuntimeError):
    """The requested placement does not fit the cluster; the message says what is missing and what to do."""


@dataclass
class Node:
    name: str  # how the plan names it (the node id on a live cluster)
    resources: dict  # total resources: CPU, GPU, custom ones


@dataclass
class Group:
    role: str  # "rollout", "learner" or "pair" (a rollout worker and a learner rank on one device)
    strategy: str  # Ray placement strategy
    bundles: list  # one resource dict per actor (per pair)
    nodes: list = field(default_factory=list)  # plan(): index into the node list of each bundle


def device_resource(c: DictConfig) -> str | None:
    """The Ray resource one device is: cluster.device_resource, else GPU on cuda, else none."""
    if c.device_resource:
        return c.device_resource
    return "GPU" if c.device == "cuda" else None


def groups(c: DictConfig) -> list[Group]:
    """The bundles a run asks for, in the order they are placed: rollout workers first, so that SPREAD
    engines take a share of every node before the PACKed learner ranks fill what is left (2 x 8 GPUs,
    4 engines: 2 engines and 6 ranks per node)."""
    unit = device_resource(c)

    def bundle(cpus: float) -> dict:
        return {"CPU": float(cpus), **({unit: 1.0} if unit else {})}

    if c.colocate:
        return [Group("pair", c.learner_strategy, [bundle(c.cpus_per_rollout_worker + c.cpus_per_learner)] * c.num_learners)]
    return [Group("rollout", c.rollout_strategy, [bundle(c.cpus_per_rollout_worker)] * c.num_rollout_workers),
            Group("learner", c.learner_strategy, [bundle(c.cpus_per_learner)] * c.num_learners)]


# ---- planning against a list of nodes --------------------------------------------------------------
def plan(c: DictConfig, nodes: list[Node]) -> list[Group]:
    """Lay every group's bundles onto `nodes` as Ray's strategies would; raises PlacementError."""
    wanted = groups(c)
    _check_totals(c, wanted, nodes)
    free = [dict(n.resources) for n in nodes]
    for g in wanted:
        g.nodes = _place(g, free, nodes, c)
    return wanted


def _fits(bundle: dict, free: dict) -> bool:
    return all(free.get(k, 0.0) + EPS >= v for k, v in bundle.items())


def _take(bundle: dict, free: dict) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


def _place(g: Group, free: list[dict], nodes: list[Node], c: DictConfig) -> list[int]:
    b, n = g.bundles[0] if g.bundles else {}, len(g.bundles)
    for bundle in g.bundles:  # one bundle bigger than every node never fits, whatever the strategy
        if not any(_fits(bundle, n_.resources) for n_ in nodes):
            biggest = max(nodes, key=lambda x: x.resources.get("CPU", 0.0))
            raise PlacementError(f"each {_what(g)} needs {_fmt(bundle)} but no node of the cluster is that large "
                                 f"(the largest has {_fmt(biggest.resources)}); lower cluster.cpus_per_"
                                 f"{'learner' if g.role == 'learner' else 'rollout_worker'} or use larger nodes.")
    if g.strategy == "STRICT_PACK":
        whole = {k: v * n for k, v in b.items()}
        for i, f in enumerate(free):
            if _fits(whole, f):
                _take(whole, f)
                return [i] * n
        raise PlacementError(f"cluster.{_key(g)}=STRICT_PACK puts all {n} {_what(g)}s ({_fmt(whole)}) on one node "
                             f"and no node has that much free; use PACK, fewer actors or larger nodes.")
    out: list[int] = []
    for bundle in g.bundles:
        candidates = [i for i, f in enumerate(free) if _fits(bundle, f)]
        if g.strategy == "STRICT_SPREAD":
            candidates = [i for i in candidates if i not in out]
        if not candidates:
            if g.strategy == "STRICT_SPREAD":
                raise PlacementError(f"cluster.{_key(g)}=STRICT_SPREAD puts each of the {n} {_what(g)}s on its own "
                                     f"node but only {len(out)} node(s) can take one; use SPREAD or add nodes.")
            raise PlacementError(f"the cluster's nodes cannot hold all {n} {_what(g)}s beside the other actors "
                                 f"(free per node: {'; '.join(_fmt(f) for f in free)}); lower the cpus_per_* keys, "
                                 "use fewer actors or add nodes.")
        if g.strategy == "PACK":  # fill the nodes this group already uses before opening another
            i = next((j for j in candidates if j in out), candidates[0])
        else:  # SPREAD: the node holding fewest of this group's bundles
            i = min(candidates, key=lambda j: out.count(j))
        _take(bundle, free[i])
        out.append(i)
    return out


def _check_totals(c: DictConfig, wanted: list[Group], nodes: list[Node]) -> None:
    unit = device_resource(c)
    have = {k: sum(n.resources.get(k, 0.0) for n in nodes) for k in ("CPU", unit) if k}
    need = {k: sum(b.get(k, 0.0) for g in wanted for b in g.bundles) for k in have}
    split = " + ".join(f"{len(g.bundles)} for {_what(g)}s" for g in wanted)
    if unit and need[unit] > have[unit] + EPS:
        name = "GPU(s)" if unit == "GPU" else f"{unit} unit(s)"
        if have[unit] == 0:
            fix = (f"it has no {unit} resource; on CPU use cluster=local_cpu, or run on nodes with GPUs"
                   if unit == "GPU" else f"start the nodes with --resources='{{\"{unit}\": N}}'")
        elif c.num_gpus > 0 and have[unit] >= (1 if c.colocate else c.rollout_gpus + 1):
            fix = f"set cluster.num_gpus={have[unit]:g} or add nodes"
        else:
            fix = "lower cluster.num_rollout_workers / cluster.num_learners (or cluster.num_gpus) or add nodes"
        raise PlacementError(f"cluster={c.name} needs {need[unit]:g} {name} ({split}); the cluster has "
                             f"{have[unit]:g}: {fix}.")
    if need["CPU"] > have["CPU"] + EPS:
        raise PlacementError(f"cluster={c.name} needs {need['CPU']:g} CPUs ({split}, at cluster.cpus_per_"
                             f"rollout_worker={c.cpus_per_rollout_worker:g} and cluster.cpus_per_learner="
                             f"{c.cpus_per_learner:g}); the cluster has {have['CPU']:g}: lower those or add nodes.")


def _what(g: Group) -> str:
    return {"rollout": "rollout worker", "learner": "learner rank", "pair": "rollout-worker/learner-rank pair"}[g.role]


def _key(g: Group) -> str:
    return "rollout_strategy" if g.role == "rollout" else "learner_strategy"


def _fmt(resources: dict) -> str:
    keep = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or not re.match(r"node:|memory|object_store", k)}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(keep.items()))


# ---- the nodes to plan against ---------------------------------------------------------------------
def described_nodes(spec: str) -> list[Node]:
    """cluster.describe: NODESxGPUS[:CPUS] (CPUS per node; default 16 per GPU, 16 without GPUs)."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*(?::\s*(\d+))?\s*", str(spec))
    if not m or int(m.group(1)) < 1:
        raise PlacementError(f"cluster.describe={spec!r} is not NODESxGPUS[:CPUS], e.g. 2x8:64 (two nodes of 8 "
                             "GPUs and 64 CPUs) or 1x0:16 (one CPU node).")
    count, gpus = int(m.group(1)), int(m.group(2))
    cpus = int(m.group(3)) if m.group(3) else 16 * max(gpus, 1)
    return [Node(f"node{i}", {"CPU": float(cpus), "GPU": float(gpus)}) for i in range(count)]


def live_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster, head first."""
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    alive.sort(key=lambda n: "node:__internal_head__" not in n["Resources"])
    return [Node(n["NodeID"], dict(n["Resources"])) for n in alive]


def local_resources(c: DictConfig) -> dict:
    """What a local cluster (vlarl.cluster.init_ray) declares: at least the CPUs the actors reserve
    (Ray CPUs are a reservation, not a core each), a custom device resource as many as they take."""
    needed = c.num_rollout_workers * c.cpus_per_rollout_worker + c.num_learners * c.cpus_per_learner
    out = {"num_cpus": max(os.cpu_count() or 1, int(math.ceil(needed)))}
    unit = device_resource(c)
    if unit and unit != "GPU":
        out["resources"] = {unit: c.num_learners if c.colocate else c.num_rollout_workers + c.num_learners}
    return out


def this_machine(c: DictConfig) -> list[Node]:
    import torch

    local = local_resources(c)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [Node("this machine", {"CPU": float(local["num_cpus"]), "GPU": float(gpus), **local.get("resources", {})})]


def dry_run_report(cfg: DictConfig) -> str:
    """What `python -m vlarl.main ... --dry-run` prints: the nodes, each actor's node and device, the
    weight-sync path. Plans against cluster.describe, else the Ray cluster at cluster.address /
    RAY_ADDRESS (read, not used), else this machine."""
    from vlarl.rollout.weight_sync import describe_transport

    c = cfg.cluster
    address = c.address or os.environ.get("RAY_ADDRESS")
    if c.describe:
        nodes, source = described_nodes(c.describe), f"cluster.describe={c.describe}"
    elif address:
        import ray

        ray.init(address=address, log_to_driver=False)
        try:
            nodes, source = live_nodes(), f"the Ray cluster at {address}"
        finally:
            ray.shutdown()
    else:
        nodes, source = this_machine(c), "this machine (set cluster.describe=NODESxGPUS[:CPUS] to plan for another)"
    lines = [f"vlarl dry run: cluster={c.name} against {source}"]
    lines += [f"  node {i}: {n.name}  ({_fmt(n.resources)})" for i, n in enumerate(nodes)]
    placed = plan(c, nodes)
    unit = device_resource(c)
    for g in placed:
        lines.append(f"  {_what(g)}s: {len(g.bundles)}, {g.strategy}")
        device = (f"a {unit} {'shared by the pair' if g.role == 'pair' else 'each'}" if unit else "CPU only")
        k = 0
        while k < len(g.nodes):  # consecutive actors on one node share a line
            end = k
            while end + 1 < len(g.nodes) and g.nodes[end + 1] == g.nodes[k]:
                end += 1
            ids = f"{k}" if end == k else f"{k}-{end}"
            lines.append(f"    {g.role} {ids}: node {g.nodes[k]}  ({g.bundles[k]['CPU']:g} CPU, {device})")
            k = end + 1
    lines.append(f"  weight sync: {describe_transport(cfg)}")
    lines.append("  curriculum and checkpoint actors: the driver's node (they write trainer.run_dir)")
    learner_nodes = {n for g in placed if g.role in ("learner", "pair") for n in g.nodes}
    if cfg.trainer.checkpoint_format == "sharded":
        shared = (f"; the learners are on {len(learner_nodes)} nodes, so trainer.run_dir must be on a filesystem "
                  "they all mount" if len(learner_nodes) > 1 else "")
        lines.append(f"  checkpoints: sharded, each learner rank writes its shard into trainer.run_dir{shared}")
    else:
        lines.append("  checkpoints: full, gathered on learner rank 0 and written by the checkpoint actor")
    return "\n".join(lines)


# ---- the real placement groups -----------------------------------------------------------------------
class Placement:
    """The run's placement groups (created after `plan` says they fit) and each actor's Ray options."""

    def __init__(self, cfg: DictConfig, with_learners: bool = True):
        from ray.util.placement_group import placement_group

        self.c = cfg.cluster
        self.unit = device_resource(self.c)
        wanted = groups(self.c) if with_learners else [g for g in groups(self.c) if g.role == "rollout"]
        if not with_learners and self.c.colocate:  # evaluation alone: the pairs' bundles hold only rollout workers
            wanted = [Group("rollout", self.c.learner_strategy, groups(self.c)[0].bundles[:self.c.num_rollout_workers])]
        try:
            plan_nodes = live_nodes()
            _check_totals(self.c, wanted, plan_nodes)
            free = [dict(n.resources) for n in plan_nodes]
            for g in wanted:
                _place(g, free, plan_nodes, self.c)
        except PlacementError as e:
            raise SetupError(str(e)) from None
        self.groups = {}
        for g in wanted:  # one after the other, so Ray places them in plan()'s order
            self.groups[g.role] = (g, placement_group(g.bundles, strategy=g.strategy))
            self.wait(self.c.placement_timeout_s, "at start")

    def options(self, role: str, index: int) -> dict:
        """Ray options for actor `index` of `role` ("rollout" or "learner")."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        key = "pair" if "pair" in self.groups else role
        group, pg = self.groups[key]
        share = 0.5 if key == "pair" else 1.0
        cpus = self.c.cpus_per_rollout_worker if role == "rollout" else self.c.cpus_per_learner
        device = {} if not self.unit else {"num_gpus": share} if self.unit == "GPU" else {"resources": {self.unit: share}}
        return {"num_cpus": cpus, **device, "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=index)}

    def wait(self, timeout: float, when: str) -> None:
        """Until every bundle sits on an alive node (Ray re-places bundles of a lost node by itself)."""
        import ray

        deadline = time.monotonic() + timeout
        while True:
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            tables = [ray.util.placement_group_table(pg) for _, pg in self.groups.values()]
            if all(t["state"] == "CREATED" and all(n in alive for n in t["bundles_to_node_id"].values())
                   for t in tables):
                return
            if time.monotonic() > deadline:
                raise SetupError(f"the Ray cluster could not place this run's actors {when} within {timeout:g} s "
                                 f"(bundles: {'; '.join(f'{len(g.bundles)} x {_fmt(g.bundles[0])}' for g, _ in self.groups.values())}); "
                                 "check `ray status` for free resources, or raise cluster.placement_timeout_s / "
                                 "cluster.recovery_timeout_s.")
            time.sleep(0.5)

    def nodes(self) -> dict:
        """{role: [node id of each bundle]} as Ray placed them."""
        import ray

        return {role: [ray.util.placement_group_table(pg)["bundles_to_node_id"][i] for i in range(len(g.bundles))]
                for role, (g, pg) in self.groups.items()}

    def remove(self) -> None:
        import ray

        for _, pg in self.groups.values():
            ray.util.remove_placement_group(pg)
