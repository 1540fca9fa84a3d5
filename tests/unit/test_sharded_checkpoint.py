"""Sharded checkpoints (vlarl.workers.checkpoint: save_shards, CheckpointActor.begin_shards/commit,
load_shards, read_model_state).

Ranks are real processes in a gloo group with the model under FSDP2, as in the learner. What a
checkpoint holds is checked against torch's own consolidation (format_utils.dcp_to_torch_save)
and against the full state gathered from the ranks that wrote it.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlarl.workers import checkpoint
from vlarl.workers.checkpoint import CheckpointActor, read_model_state

from test_checkpoint import assert_nested_equal  # tests/unit is on sys.path (rootdir-relative imports)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(world_size: int):
    """A two-layer model under FSDP2 (one unit per layer, as vlarl.workers.learner.shard) and AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5))
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)


def train_step(model, optimizer, seed: int) -> None:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def full(model, optimizer):
    """Copies of the full model and optimizer state (on one rank they would share the live tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.utils._pytree import tree_map

    state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, state)


def rank_main(rank: int, world_size: int, port: int, job: str, state_dir: str, out: str) -> None:
    """One rank. save: two steps, save shards, scribble on the weights while the write runs, then
    record the full state as of the save. load: load the shards, record the full state, and take
    one more step (the continuation)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    group = dist.new_group(backend="gloo")
    model, optimizer = build(world_size)
    if job == "save":
        train_step(model, optimizer, 1)
        train_step(model, optimizer, 2)
        saved = full(model, optimizer)
        future = checkpoint.save_shards(model, optimizer, state_dir, group)
        with torch.no_grad():  # training goes on: the shard was copied before save_shards returned
            for p in model.parameters():
                p.add_(100.0)
        future.result()
        state = saved
    else:
        checkpoint.load_shards(model, optimizer, state_dir, group)
        state = full(model, optimizer)
        train_step(model, optimizer, 3)
        state = (*state, full(model, optimizer)[0])
    if rank == 0:
        torch.save(state, out)
    dist.destroy_process_group()


def run_ranks(world_size: int, job: str, state_dir: str, out: str) -> tuple:
    mp.spawn(rank_main, args=(world_size, free_port(), job, state_dir, out), nprocs=world_size)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A continuation from the 1-rank state, unsharded: what every resumed group must reproduce."""
    root = tmp_path_factory.mktemp("sharded")
    keeper = CheckpointActor(str(root / "run1"))
    state_dir = keeper.begin_shards(2)
    saved = run_ranks(1, "save", state_dir, str(root / "saved1.pt"))
    path = keeper.commit(2, state_dir, 1.0, {"iteration": 2}, {"ema": [0.5]}, 0)
    continued = run_ranks(1, "load", os.path.join(path, checkpoint.STATE_DIR), str(root / "loaded1.pt"))
    return root, saved, continued


@pytest.mark.parametrize("saved_on,loaded_on", [(2, 1), (1, 2)])
def test_shards_load_onto_another_rank_count_and_continue_exactly(reference, saved_on, loaded_on):
    root, saved1, continued1 = reference
    run = root / f"run_{saved_on}_{loaded_on}"
    keeper = CheckpointActor(str(run))
    state_dir = keeper.begin_shards(2)
    saved = run_ranks(saved_on, "save", state_dir, str(run / "saved.pt"))
    assert sorted(os.listdir(state_dir)) == [".metadata", *[f"__{r}_0.distcp" for r in range(saved_on)]]
    path = keeper.commit(2, state_dir, 1.0, {"iteration": 2}, {"ema": [0.5]}, *range(saved_on))
    assert keeper.latest() == path and keeper.best() is not None

    # What is on disk is the state as of the save (not the scribbled weights), by torch's own reader.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(os.path.join(path, checkpoint.STATE_DIR), str(run / "consolidated.pt"))
    consolidated = torch.load(run / "consolidated.pt", weights_only=False)
    assert_nested_equal(consolidated["model"], saved[0], "model")
    assert_nested_equal(consolidated["optim"], saved[1], "optim")
    assert_nested_equal(read_model_state(path), saved[0], "read_model_state")
    assert_nested_equal(read_model_state(keeper.best()), saved[0], "best_return")

    # Loaded onto another number of ranks: the same full state, and the same next step.
    model, optimizer, stepped = run_ranks(loaded_on, "load", os.path.join(path, checkpoint.STATE_DIR),
                                          str(run / "loaded.pt"))
    assert_nested_equal(model, saved[0], "loaded model")
    assert_nested_equal(optimizer, saved[1], "loaded optimizer")
    # The training math (sums over ranks) may round differently with another rank count; the step
    # after loading must equal the 1-rank continuation to float precision.
    for k, v in stepped.items():
        assert torch.allclose(v, continued1[2][k], rtol=0, atol=1e-6), k
    if saved_on == 1:
        assert_nested_equal(saved, saved1, "1-rank save")


def single_process_shards(keeper: CheckpointActor, step: int, scale: float = 1.0) -> str:
    """Shards of a plain (unsharded) model written in this process, committed as `step`."""
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(scale)
    optimizer = torch.optim.AdamW(model.parameters())
    state_dir = keeper.begin_shards(step)
    checkpoint.save_shards(model, optimizer, state_dir, None).result()
    return keeper.commit(step, state_dir, scale, {"iteration": step}, {"ema": []}, 0)


def test_commit_needs_every_shard_and_a_failed_commit_keeps_the_previous(tmp_path, monkeypatch):
    keeper = CheckpointActor(str(tmp_path), keep_last=1)
    good = single_process_shards(keeper, 1)
    # Shards without DCP's .metadata (a rank still writing, or lost) never become a checkpoint.
    state_dir = keeper.begin_shards(2)
    open(os.path.join(state_dir, "__0_0.distcp"), "wb").close()
    with pytest.raises(FileNotFoundError, match="no complete sharded save of step 2"):
        keeper.commit(2, state_dir, 5.0, {}, {})
    assert keeper.latest() == good and keeper.ema_state()["ema_return"] == 1.0

    # A failure while committing (disk full writing the JSON files) leaves step 1 whole.
    state_dir = keeper.begin_shards(2)  # also clears the uncommitted attempt above
    assert [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".tmp-")] == [os.path.basename(os.path.dirname(state_dir))]
    model = torch.nn.Linear(3, 2)
    checkpoint.save_shards(model, torch.optim.AdamW(model.parameters()), state_dir, None).result()

    def broken(path, obj):
        open(path, "w").close()
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        keeper.commit(2, state_dir, 5.0, {}, {})
    monkeypatch.undo()
    assert os.listdir(tmp_path / "checkpoints") == ["step_000001"]
    assert keeper.latest() == good and keeper.ema_state() == {"ema_return": 1.0, "best_ema_return": 1.0, "best_step": 1}
    assert torch.equal(read_model_state(good)["weight"], torch.ones(2, 3))

    # A save interrupted by a crash (hidden directory left behind) is removed at the next start.
    keeper.begin_shards(3)
    restarted = CheckpointActor(str(tmp_path), keep_last=1)
    assert os.listdir(tmp_path / "checkpoints") == ["step_000001"] and restarted.latest() == good


def test_best_return_outlives_its_pruned_step(tmp_path):
    keeper = CheckpointActor(str(tmp_path), keep_last=1, ema_alpha=0.0)
    single_process_shards(keeper, 1, scale=3.0)
    single_process_shards(keeper, 2, scale=1.0)  # worse: best stays at step 1
    latest = single_process_shards(keeper, 3, scale=2.0)  # worse than 3.0
    assert os.listdir(tmp_path / "checkpoints") == ["step_000003"]
    best = keeper.best()
    assert json.loads(open(os.path.join(best, "metadata.json")).read())["step"] == 1
    assert torch.equal(read_model_state(best)["weight"], torch.full((2, 3), 3.0))
    assert torch.equal(read_model_state(latest)["weight"], torch.full((2, 3), 2.0))
    state = keeper.load(best)
    assert state["state_dir"] == os.path.join(best, "state") and "model_state" not in state
    assert state["ema_state"] == {"ema_return": 3.0, "best_ema_return": 3.0, "best_step": 1}


def test_missing_shared_directory_says_what_to_do(tmp_path):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(FileNotFoundError, match="shared filesystem|every node mounts"):
        checkpoint.save_shards(model, torch.optim.AdamW(model.parameters()), str(tmp_path / "elsewhere"), None)
