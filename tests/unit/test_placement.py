"""Placement plans of the cluster presets against described clusters, and the sentences a request
that does not fit stops with. The plan is checked by hand-counted layouts."""

from __future__ import annotations

import pytest

from vlarl.config import ConfigError, load_config
from vlarl.placement import Node, PlacementError, described_nodes, plan


def cluster(*args: str):
    return load_config(["env=toy", "rollout.num_envs=64", *args]).cluster


def layout(c, nodes) -> dict:
    return {g.role: g.nodes for g in plan(c, nodes)}


def test_multi_node_spreads_engines_and_packs_learner_ranks_per_node():
    got = layout(cluster("cluster=multi_node"), described_nodes("2x8:64"))
    assert got["rollout"] == [0, 1, 0, 1]
    assert got["learner"] == [0] * 6 + [1] * 6  # 2 engines + 6 ranks on each node


def test_multi_node_sizes_follow_the_node_count():
    c = cluster("cluster=multi_node", "cluster.num_nodes=4")
    assert (c.num_gpus, c.num_rollout_workers, c.num_learners) == (32, 4, 28)
    got = layout(c, described_nodes("4x8:64"))
    assert sorted(got["rollout"]) == [0, 1, 2, 3]
    assert [got["learner"].count(i) for i in range(4)] == [7, 7, 7, 7]


def test_node_split_and_colocated_on_one_node():
    got = layout(cluster("cluster=node_split"), described_nodes("1x8:64"))
    assert got == {"rollout": [0, 0], "learner": [0] * 6}
    c = cluster("cluster=node_colocated")
    assert (c.num_rollout_workers, c.num_learners, c.colocate) == (8, 8, True)
    groups = plan(c, described_nodes("1x8:64"))
    assert [g.role for g in groups] == ["pair"] and groups[0].bundles[0] == {"CPU": 6.0, "GPU": 1.0}


def test_one_gpu_pairs_engine_and_learner():
    groups = plan(cluster("cluster=one_gpu"), described_nodes("1x1:8"))
    assert [(g.role, g.nodes) for g in groups] == [("pair", [0])]


def test_too_few_gpus_names_the_fix():
    with pytest.raises(PlacementError, match=r"^cluster=node_split needs 8 GPU\(s\) \(2 for rollout workers \+ 6 for "
                                             r"learner ranks\); the cluster has 4: set cluster.num_gpus=4 or add nodes.$"):
        plan(cluster("cluster=node_split"), described_nodes("1x4:64"))
    with pytest.raises(PlacementError, match="on CPU use cluster=local_cpu"):
        plan(cluster("cluster=one_gpu"), described_nodes("1x0:8"))


def test_too_few_cpus_and_bundles_larger_than_any_node():
    with pytest.raises(PlacementError, match=r"needs 48 CPUs .* the cluster has 32"):
        plan(cluster("cluster=node_colocated"), described_nodes("1x8:32"))
    nodes = [Node(name, {"CPU": 3.0, "GPU": 4.0}) for name in "abc"]  # 9 CPUs in all, 3 per node
    with pytest.raises(PlacementError, match=r"each rollout worker needs 4 CPU, 1 GPU but no node"):
        plan(cluster("cluster=node_split", "cluster.num_gpus=3", "cluster.rollout_gpus=1"), nodes)


def test_fragmented_nodes_and_strict_strategies():
    # 4 GPUs in all but 1 + 1 + 2 across nodes of 1 CPU each: two 1-CPU learner bundles need two nodes
    nodes = [Node(f"n{i}", {"CPU": 1.0, "GPU": 1.0}) for i in range(3)]
    c = cluster("cluster=node_split", "cluster.num_gpus=3", "cluster.rollout_gpus=1", "cluster.cpus_per_learner=1",
                "cluster.cpus_per_rollout_worker=1")
    assert layout(c, nodes) == {"rollout": [0], "learner": [1, 2]}
    strict = cluster("cluster=node_split", "cluster.num_gpus=3", "cluster.rollout_gpus=1",
                     "cluster.cpus_per_learner=1", "cluster.cpus_per_rollout_worker=1",
                     "cluster.learner_strategy=STRICT_PACK")
    with pytest.raises(PlacementError, match="STRICT_PACK puts all 2 learner ranks"):
        plan(strict, nodes)
    spread = cluster("cluster=multi_node", "cluster.rollout_strategy=STRICT_SPREAD")
    with pytest.raises(PlacementError, match="STRICT_SPREAD puts each of the 4 rollout workers on its own node"):
        plan(spread, described_nodes("2x8:64"))


def test_custom_device_resource_places_cpu_actors_like_gpu_ones():
    c = cluster("cluster=node_split", "cluster.device=cpu", "cluster.device_resource=fake_gpu", "cluster.num_gpus=3",
                "cluster.rollout_gpus=1")
    nodes = [Node("head", {"CPU": 8.0})] + [Node(f"n{i}", {"CPU": 8.0, "fake_gpu": 1.0}) for i in range(3)]
    assert layout(c, nodes) == {"rollout": [1], "learner": [2, 3]}


def test_preset_budget_and_counts_must_agree():
    with pytest.raises(ConfigError, match="cluster.num_gpus=8 but 2 rollout worker"):
        cluster("cluster=node_split", "cluster.num_learners=3")
    with pytest.raises(ConfigError, match="cluster.rollout_gpus=8 of cluster.num_gpus=8"):
        cluster("cluster=node_split", "cluster.rollout_gpus=8")
    with pytest.raises(ConfigError, match="cluster.learner_strategy=CLUSTERED is not valid"):
        cluster("cluster.learner_strategy=CLUSTERED")


@pytest.mark.parametrize("spec", ["2x", "x8", "0x8", "2 nodes", "2x8:"])
def test_bad_cluster_description(spec):
    with pytest.raises(PlacementError, match="is not NODESxGPUS"):
        described_nodes(spec)
