"""Unit tests for vlarl.workers.checkpoint.CheckpointActor (plain class, plus one real Ray actor)."""

import json
import os

import pytest
import torch

from vlarl.workers import checkpoint
from vlarl.workers.checkpoint import CheckpointActor

CONFIG = {"algo": {"name": "grpo", "lr": 1e-5}, "seed": 1}


def make_state(seed: int = 0):
    """A small model + Adam optimizer after one step, with tied weights like a real LM head."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Linear(4, 11, bias=False))
    model[1].weight = model[0].weight  # tied: two state-dict entries share one storage
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    return model.state_dict(), opt.state_dict()


def save_step(ckpt: CheckpointActor, step: int, **trainer_extra):
    """Save a checkpoint at step with a deterministic payload."""
    model_state, opt_state = make_state(step)
    trainer_state = {"weights_version": step, **trainer_extra}
    return ckpt.save(step, model_state, opt_state, trainer_state, {"ema": [0.5, float(step)]})


def assert_nested_equal(a, b, where: str = "state"):
    """Compare (optimizer) state dicts exactly: nested dicts/lists of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_nested_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_save_load_round_trip(tmp_path):
    """Tensors, optimizer state, trainer/curriculum state and config all come back equal."""
    ckpt = CheckpointActor(str(tmp_path), config=CONFIG)
    model_state, opt_state = make_state(5)
    path = ckpt.save(5, model_state, opt_state, {"weights_version": 3}, {"ema": [0.25]})
    assert path == os.path.join(str(tmp_path), "checkpoints", "step_000005")
    assert sorted(os.listdir(path)) == sorted(checkpoint.REQUIRED_FILES + checkpoint.FULL_FILES)
    loaded = ckpt.load(path)
    assert loaded["model_state"].keys() == model_state.keys()
    for name, tensor in model_state.items():
        assert torch.equal(loaded["model_state"][name], tensor)
    assert_nested_equal(loaded["optimizer_state"], opt_state)
    assert loaded["trainer_state"]["step"] == 5
    assert loaded["trainer_state"]["weights_version"] == 3
    assert loaded["curriculum_state"] == {"ema": [0.25]}
    assert loaded["config"] == CONFIG
    # The optimizer state actually loads back into an optimizer.
    model = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Linear(4, 11, bias=False))
    model[1].weight = model[0].weight
    torch.optim.Adam(model.parameters(), lr=1e-3).load_state_dict(loaded["optimizer_state"])


def test_non_contiguous_tensor_is_saved(tmp_path):
    """A transposed (non-contiguous) view is made contiguous rather than rejected."""
    ckpt = CheckpointActor(str(tmp_path))
    base = torch.arange(12.0).reshape(3, 4)
    state = {"t": base.t(), "row": base[1]}
    path = ckpt.save(0, state, {}, {}, {})
    loaded = ckpt.load(path)["model_state"]
    assert torch.equal(loaded["t"], base.t()) and torch.equal(loaded["row"], base[1])


def test_retention_and_latest(tmp_path):
    """Only the newest keep_last step dirs survive; latest() is the highest step."""
    ckpt = CheckpointActor(str(tmp_path), keep_last=2)
    assert ckpt.latest() is None
    for step in (1, 2, 3, 10):
        save_step(ckpt, step)
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["step_000003", "step_000010"]
    assert ckpt.latest() == str(tmp_path / "checkpoints" / "step_000010")


def test_latest_ignores_temp_and_incomplete_dirs(tmp_path):
    """A half-written temp dir or a step dir missing files is never returned."""
    ckpt = CheckpointActor(str(tmp_path))
    save_step(ckpt, 4)
    (tmp_path / "checkpoints" / ".tmp-step_000009-123").mkdir()
    (tmp_path / "checkpoints" / "step_000008").mkdir()  # no files: incomplete
    assert ckpt.latest() == str(tmp_path / "checkpoints" / "step_000004")


def test_best_return_written_only_when_ema_improves(tmp_path):
    """EMA with alpha 0.99 against a hand computation; best_return follows strict improvement."""
    ckpt = CheckpointActor(str(tmp_path), ema_alpha=0.99, config=CONFIG)
    model_state, opt_state = make_state(0)
    args = (model_state, opt_state, {"weights_version": 0}, {"ema": []})

    assert ckpt.update_best(1, 10.0, *args) is True  # first call: ema = 10.0
    meta = json.loads((tmp_path / "best_return" / "metadata.json").read_text())
    assert meta["step"] == 1 and meta["ema_return"] == 10.0 and meta["current_return"] == 10.0

    assert ckpt.update_best(2, 0.0, *args) is False  # ema = 0.99 * 10 = 9.9 < 10
    assert ckpt.ema_state()["ema_return"] == pytest.approx(9.9)
    assert json.loads((tmp_path / "best_return" / "metadata.json").read_text())["step"] == 1

    assert ckpt.update_best(3, 30.0, *args) is True  # ema = 0.99 * 9.9 + 0.01 * 30 = 10.101
    meta = json.loads((tmp_path / "best_return" / "metadata.json").read_text())
    assert meta["step"] == 3
    assert meta["ema_return"] == pytest.approx(0.99 * 9.9 + 0.01 * 30.0)
    assert meta["current_return"] == 30.0
    assert meta["config"] == CONFIG
    assert "T" in meta["timestamp"]  # ISO 8601 date-time
    assert ckpt.ema_state() == {"ema_return": meta["ema_return"], "best_ema_return": meta["ema_return"], "best_step": 3}
    # best_return is a complete, loadable checkpoint, with no leftovers beside it.
    loaded = ckpt.load(ckpt.best())
    assert loaded["trainer_state"]["step"] == 3 and loaded["metadata"]["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["best_return", "checkpoints"]


def test_ema_state_persists_across_resume(tmp_path):
    """A restarted actor continues the EMA from the saved trainer state and keeps the best."""
    ckpt = CheckpointActor(str(tmp_path))
    model_state, opt_state = make_state(0)
    ckpt.update_best(1, 10.0, model_state, opt_state, {}, {})
    ckpt.update_best(2, 0.0, model_state, opt_state, {}, {})  # ema 9.9, best stays 10
    path = ckpt.save(2, model_state, opt_state, {}, {})

    resumed = CheckpointActor(str(tmp_path))
    assert resumed.ema_state()["best_ema_return"] == 10.0  # read from best_return/metadata.json
    resumed.load_ema_state(resumed.load(path)["ema_state"])
    assert resumed.ema_state() == {"ema_return": pytest.approx(9.9), "best_ema_return": 10.0, "best_step": 1}
    # 0.99 * 9.9 + 0.01 * 20 = 10.001 > 10: improves only because the EMA continued.
    assert resumed.update_best(3, 20.0, model_state, opt_state, {}, {}) is True


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    """An exception mid-write keeps the old checkpoint loadable and removes the temp dir."""
    ckpt = CheckpointActor(str(tmp_path), keep_last=1)
    good = save_step(ckpt, 1)

    def broken_write(path, obj):
        """Stand-in for the optimizer writer that fails after creating a partial file."""
        open(path, "wb").close()
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_torch", broken_write)
    with pytest.raises(OSError, match="disk full"):
        save_step(ckpt, 2)
    assert os.listdir(tmp_path / "checkpoints") == ["step_000001"]
    assert ckpt.latest() == good
    assert ckpt.load(good)["trainer_state"]["step"] == 1

    # The same failure during update_best keeps the old best_return and its best EMA.
    monkeypatch.undo()
    model_state, opt_state = make_state(0)
    assert ckpt.update_best(1, 1.0, model_state, opt_state, {}, {})
    monkeypatch.setattr(checkpoint, "_write_torch", broken_write)
    with pytest.raises(OSError):
        ckpt.update_best(2, 500.0, model_state, opt_state, {}, {})
    assert sorted(os.listdir(tmp_path)) == ["best_return", "checkpoints"]
    assert ckpt.load(ckpt.best())["metadata"]["step"] == 1
    assert ckpt.ema_state()["best_ema_return"] == 1.0


def test_crash_between_best_renames_is_recovered(tmp_path):
    """If the process died after moving the old best to trash, the next start restores it."""
    ckpt = CheckpointActor(str(tmp_path))
    model_state, opt_state = make_state(0)
    ckpt.update_best(7, 1.0, model_state, opt_state, {}, {})
    os.replace(tmp_path / "best_return", tmp_path / ".trash-best_return-999")
    (tmp_path / ".tmp-best_return-999").mkdir()  # the new best never made it
    restarted = CheckpointActor(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["best_return", "checkpoints"]
    assert restarted.load(restarted.best())["metadata"]["step"] == 7


def test_resave_same_step_replaces_it(tmp_path):
    """Saving a step that already exists (e.g. right after resume) swaps in the new content."""
    ckpt = CheckpointActor(str(tmp_path))
    save_step(ckpt, 3, note="first")
    path = save_step(ckpt, 3, note="second")
    assert ckpt.load(path)["trainer_state"]["note"] == "second"
    assert os.listdir(tmp_path / "checkpoints") == ["step_000003"]


def test_load_missing_checkpoint_raises_clear_error(tmp_path):
    """A missing or incomplete path raises FileNotFoundError naming the path."""
    ckpt = CheckpointActor(str(tmp_path))
    missing = str(tmp_path / "checkpoints" / "step_000099")
    with pytest.raises(FileNotFoundError, match="No complete checkpoint at .*step_000099"):
        ckpt.load(missing)
    os.makedirs(missing)
    (tmp_path / "checkpoints" / "step_000099" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="start without resuming"):
        ckpt.load(missing)


def test_invalid_arguments_raise_clear_errors(tmp_path):
    """keep_last < 1 and a non-JSON config are refused at construction."""
    with pytest.raises(ValueError, match="keep at least 1"):
        CheckpointActor(str(tmp_path), keep_last=0)
    with pytest.raises(TypeError, match="OmegaConf.to_container"):
        CheckpointActor(str(tmp_path), config={"x": object()})


@pytest.fixture(scope="module")
def ray_session():
    """A one-CPU local Ray, shared by the tests of this module that need it."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # a session-wide cluster from conftest
        yield ray
        return
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_checkpoint_actor_through_ray(ray_session, tmp_path):
    """The class works unchanged as a Ray actor made at the call site, as the trainer does."""
    ray = ray_session
    actor = ray.remote(num_cpus=0)(CheckpointActor).remote(str(tmp_path), keep_last=1, config=CONFIG)
    model_state, opt_state = make_state(2)
    path = ray.get(actor.save.remote(2, model_state, opt_state, {"weights_version": 2}, {"ema": [0.5]}))
    assert ray.get(actor.latest.remote()) == path
    assert ray.get(actor.update_best.remote(2, 1.5, model_state, opt_state, {}, {})) is True
    loaded = ray.get(actor.load.remote(path))
    assert torch.equal(loaded["model_state"]["0.weight"], model_state["0.weight"])
    assert loaded["config"] == CONFIG
