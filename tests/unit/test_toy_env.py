"""Unit tests for vlarl.envs.toy.ToyEnv: schema, reproducibility, task design, termination, speed."""

import time

import numpy as np
import pytest

from vlarl.data.spec import ACTION_DIM, PROPRIO_DIM
from vlarl.envs.toy import COLOURS, ToyEnv, ToySpec

SPEC = ToySpec()


def colour_cells(image: np.ndarray, spec: ToySpec = SPEC) -> dict:
    """Block colours drawn on one image (H, W, 3) -> {colour name: (col, row) cell}.

    Reads the cell's corner pixel: the 2x2 effector marker never covers all four corners.
    """
    cell = spec.image_size // spec.grid
    found = {}
    for row in range(spec.grid):
        for col in range(spec.grid):
            patch = image[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell].reshape(-1, 3)
            for name, rgb in COLOURS.items():
                if (patch == rgb).all(-1).sum() >= cell * cell - 4:  # all but the effector marker
                    found[name] = (col, row)
    return found


def run_episodes(env: ToyEnv, make_policy, seed: int = 0) -> np.ndarray:
    """Run one episode per env (tasks cycle, init state = env index) -> success (N,) bool.

    `make_policy(env, rng)` is called after reset and returns a function of no arguments giving
    the actions (N, ACTION_DIM). The env does not auto-reset, so only the first end counts.
    """
    n = env.num_envs
    env.reset(np.arange(n) % env.num_tasks, np.arange(n) + 1000 * seed)
    policy = make_policy(env, np.random.default_rng(seed))
    done, success = np.zeros(n, bool), np.zeros(n, bool)
    for _ in range(env.max_steps):
        res = env.step(policy())
        success |= res.info["success"] & ~done
        done |= res.terminated | res.truncated
    assert done.all(), "every episode must end by max_steps"
    return success


# ---- observation schema ----------------------------------------------------------------------------
def test_observation_schema():
    env = ToyEnv(5)
    tasks = np.array([0, 1, 2, 3, 0])
    obs = env.reset(tasks, np.arange(5))
    assert obs["image"].dtype == np.uint8 and obs["image"].shape == (5, SPEC.image_size, SPEC.image_size, 3)
    assert obs["proprio"].dtype == np.float32 and obs["proprio"].shape == (5, PROPRIO_DIM)
    assert isinstance(obs["instruction"], list) and len(obs["instruction"]) == 5
    assert all(isinstance(s, str) for s in obs["instruction"])
    for i, task in enumerate(tasks):
        target = env.colour_names[task]
        assert target in obs["instruction"][i]
        assert [c for c in env.colour_names if c in obs["instruction"][i]] == [target]  # names only the target
        assert target in colour_cells(obs["image"][i])  # and the target is drawn
    assert np.all(np.abs(obs["proprio"]) <= 1.0)
    step = env.step(np.zeros((5, ACTION_DIM), np.float32))
    assert step.reward.shape == step.terminated.shape == step.truncated.shape == (5,)
    assert step.reward.dtype == np.float32 and step.terminated.dtype == bool and step.truncated.dtype == bool
    assert step.info["success"].shape == (5,)


def test_instructions_indexed_by_task():
    env = ToyEnv(1)
    instr = env.instructions()
    assert len(instr) == env.num_tasks == SPEC.num_colours
    for task, text in enumerate(instr):
        obs = env.reset([task], [7])
        assert obs["instruction"] == [text]
        assert env.colour_names[task] in text


def test_proprio_tracks_effector():
    env = ToyEnv(2)
    before = env.reset([0, 1], [3, 4])["proprio"]
    actions = np.zeros((2, ACTION_DIM), np.float32)
    actions[:, 0] = 0.2  # small enough not to leave the board or reach a block from a clear start
    after = env.step(actions).obs["proprio"]
    # proprio xy is the effector position mapped to [-1, 1]: dx = 0.2 * max_move * 2
    np.testing.assert_allclose(after[:, 0] - before[:, 0], 0.2 * SPEC.max_move * 2, atol=1e-5)
    np.testing.assert_allclose(after[:, 1], before[:, 1])
    np.testing.assert_array_equal(after[:, 2:], 0)


# ---- reproducibility -------------------------------------------------------------------------------
def test_same_task_and_init_state_reproduce_the_observation():
    tasks, inits = np.array([0, 1, 2, 3]), np.array([5, 5, 17, 9999])
    env = ToyEnv(4)
    a = env.reset(tasks, inits)
    env.step(np.ones((4, ACTION_DIM), np.float32))  # move away, then reset again
    b = env.reset(tasks, inits)
    c = ToyEnv(4).reset(tasks, inits)  # a fresh env with the same seed agrees too
    for other in (b, c):
        np.testing.assert_array_equal(a["image"], other["image"])
        np.testing.assert_array_equal(a["proprio"], other["proprio"])
        assert a["instruction"] == other["instruction"]


def test_different_init_states_give_different_layouts():
    env = ToyEnv(32)
    obs = env.reset(np.zeros(32, int), np.arange(32))
    layouts = {tuple(sorted(colour_cells(img).items())) for img in obs["image"]}
    assert len(layouts) >= 24  # 32 draws from thousands of layouts rarely collide
    starts = {tuple(p) for p in obs["proprio"][:, :2]}
    assert len(starts) == 32


def test_env_seed_changes_layouts():
    a = ToyEnv(8, seed=0).reset(np.zeros(8, int), np.arange(8))
    b = ToyEnv(8, seed=1).reset(np.zeros(8, int), np.arange(8))
    assert not np.array_equal(a["image"], b["image"])


# ---- the task design: only the instruction names the target ----------------------------------------
def test_target_position_varies_across_init_states():
    env = ToyEnv(64)
    obs = env.reset(np.full(64, 2), np.arange(64))
    target = env.colour_names[2]
    cells = [colour_cells(img)[target] for img in obs["image"]]
    assert len(set(cells)) >= 12  # of 16 cells: the target is not at a fixed place


def test_every_image_shows_the_same_kind_of_scene():
    """Each image shows num_blocks distinct palette colours, one being the target; every colour
    also appears as a distractor, so the image alone does not say which task is asked."""
    env = ToyEnv(200)
    tasks = np.arange(200) % SPEC.num_colours
    obs = env.reset(tasks, np.arange(200))
    seen_as_distractor = set()
    for img, task in zip(obs["image"], tasks):
        colours = set(colour_cells(img))
        assert len(colours) == SPEC.num_blocks
        assert colours <= set(env.colour_names)
        target = env.colour_names[task]
        assert target in colours
        seen_as_distractor |= colours - {target}
    assert seen_as_distractor == set(env.colour_names)


# ---- success rates of scripted policies (properties of the task design) ----------------------------
def test_expert_policy_succeeds():
    success = run_episodes(ToyEnv(256), lambda env, rng: env.expert_actions)
    assert success.mean() >= 0.85


def test_instruction_blind_block_policy_succeeds_about_one_in_num_blocks():
    def random_block(env, rng):
        blocks = rng.integers(0, env.spec.num_blocks, env.num_envs)  # one block per episode
        return lambda: env.block_actions(blocks)

    success = run_episodes(ToyEnv(256), random_block)
    assert 0.20 <= success.mean() <= 0.45


def test_uniform_random_policy_rarely_succeeds():
    success = run_episodes(ToyEnv(256), lambda env, rng: lambda: rng.uniform(-1, 1, (env.num_envs, ACTION_DIM)))
    assert success.mean() < 0.25


# ---- termination and truncation ---------------------------------------------------------------------
def test_reaching_the_target_ends_with_reward_one():
    env = ToyEnv(16)
    env.reset(np.arange(16) % 4, np.arange(16))
    successes = np.zeros(16, bool)
    for _ in range(env.max_steps):
        res = env.step(env.expert_actions())
        success = res.info["success"]
        np.testing.assert_array_equal(res.reward, success.astype(np.float32))  # reward 1 exactly on success
        assert res.terminated[success].all() and not res.truncated[success].any()
        # the effector is at the target block
        pos = (res.obs["proprio"][:, :2] + 1) / 2
        assert (np.linalg.norm(env.block_pos[success, 0] - pos[success], axis=-1) < SPEC.success_radius).all()
        successes |= success
        if res.terminated.all():
            break
    assert successes.mean() >= 0.8  # the expert may brush a distractor on the way, rarely
    # steps before reaching anything are not rewarded and do not end the episode
    env.reset(np.arange(16) % 4, np.arange(16))
    first = env.step(np.zeros((16, ACTION_DIM), np.float32))
    np.testing.assert_array_equal(first.reward, 0.0)
    assert not first.terminated.any()


def test_touching_a_wrong_block_ends_with_reward_zero():
    n = 64
    env = ToyEnv(n)
    env.reset(np.arange(n) % 4, np.arange(n))
    wrong = np.ones(n, np.int64)  # block 0 is the target; go to block 1
    failures = 0
    ended = np.zeros(n, bool)
    for _ in range(env.max_steps):
        res = env.step(env.block_actions(wrong))
        fail = res.terminated & ~ended & ~res.info["success"]
        np.testing.assert_array_equal(res.reward[fail], 0.0)
        assert not res.truncated[fail].any()
        # the effector really is at a distractor (block 1, or block 2 when it lay on the way)
        pos = (res.obs["proprio"][:, :2] + 1) / 2
        dist = np.linalg.norm(env.block_pos[fail, 1:] - pos[fail, None], axis=-1).min(-1)
        assert (dist < SPEC.success_radius).all()
        failures += fail.sum()
        ended |= res.terminated
    assert failures >= n // 2  # mostly the target is not on the way to the wrong block


def test_truncation_at_max_steps():
    env = ToyEnv(8)
    env.reset(np.arange(8) % 4, np.arange(8))
    still = np.zeros((8, ACTION_DIM), np.float32)  # starts are clear of every block, so never touches
    for t in range(1, env.max_steps + 1):
        res = env.step(still)
        assert not res.terminated.any()
        np.testing.assert_array_equal(res.reward, 0.0)
        assert res.truncated.all() == (t == env.max_steps)
        assert res.truncated.any() == (t == env.max_steps)


def test_ending_on_the_last_step_is_terminated_not_truncated():
    env = ToyEnv(64, ToySpec(max_steps=2))
    env.reset(np.arange(64) % 4, np.arange(64))
    first = env.step(env.expert_actions())
    last = env.step(env.expert_actions())
    assert not first.truncated.any()
    on_last = last.terminated & ~first.terminated
    assert on_last.sum() >= 5  # some episodes reach a block exactly at the step limit
    assert not last.truncated[last.terminated].any()
    assert last.truncated[~last.terminated].all()


# ---- input validation -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 2), (3, ACTION_DIM), (4, ACTION_DIM + 1), (4 * ACTION_DIM,)])
def test_bad_action_shape_raises(shape):
    env = ToyEnv(4)
    env.reset(np.zeros(4, int), np.arange(4))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(shape, np.float32))


@pytest.mark.parametrize("tasks", [[0, 1, 2, 4], [-1, 0, 0, 0], [0, 1, 2]])
def test_bad_task_ids_raise(tasks):
    with pytest.raises(ValueError):
        ToyEnv(4).reset(tasks, np.arange(len(tasks)))


def test_wrong_number_of_init_states_raises():
    with pytest.raises(ValueError):
        ToyEnv(4).reset(np.zeros(4, int), np.arange(3))


@pytest.mark.parametrize("spec", [ToySpec(num_blocks=1), ToySpec(num_blocks=5, num_colours=4),
                                  ToySpec(num_colours=7, num_blocks=3), ToySpec(image_size=18, grid=4)])
def test_bad_spec_raises(spec):
    with pytest.raises(ValueError):
        ToyEnv(2, spec)


# ---- speed ------------------------------------------------------------------------------------------
def test_throughput_with_64_envs():
    """Product requirement: >= 5,000 env steps/s on one core with 64 envs (about 100k measured)."""
    env = ToyEnv(64)
    rng = np.random.default_rng(0)
    steps = 0
    start = time.perf_counter()
    while steps < 20_000:
        env.reset(rng.integers(0, env.num_tasks, 64), rng.integers(0, env.num_init_states, 64))
        for _ in range(env.max_steps):
            env.step(env.expert_actions())
            steps += 64
    rate = steps / (time.perf_counter() - start)
    assert rate >= 5_000, f"{rate:.0f} env steps/s"


def test_success_radius_that_leaves_no_room_is_refused():
    with pytest.raises(ValueError, match="success_radius"):
        ToyEnv(1, ToySpec(success_radius=0.45))


def test_chunks_replan_after_replan_steps():
    from vlarl.envs.chunk import ChunkedEnv

    spec = ToySpec(max_steps=6, max_move=0.1)
    whole, replan = ChunkedEnv(ToyEnv(1, spec, 0), 3), ChunkedEnv(ToyEnv(1, spec, 0), 3, replan=1)
    assert whole.max_steps == 2 and replan.max_steps == 6  # policy calls per episode
    for env in (whole, replan):
        env.reset([0], [0])
    step = np.zeros((1, 3 * ACTION_DIM), np.float32)
    step[0, 0] = 1.0  # +x only in the chunk's first action
    a, b = whole.step(step), replan.step(step)
    # the replanning env executed just that first action; the other executed all three (two of them still)
    np.testing.assert_allclose(a.obs["proprio"][0, :2], b.obs["proprio"][0, :2], atol=1e-6)
    step[0, ACTION_DIM + 1] = 1.0  # +y in the second action: only the whole-chunk env moves along y
    y_whole, y_replan = whole.env.pos[0, 1], replan.env.pos[0, 1]
    whole.step(step), replan.step(step)
    assert replan.env.pos[0, 1] == pytest.approx(y_replan, abs=1e-6)
    assert whole.env.pos[0, 1] > y_whole + 0.05
    with pytest.raises(ValueError, match="env.replan_steps=4"):
        ChunkedEnv(ToyEnv(1, spec, 0), 3, replan=4)


@pytest.mark.parametrize("replan", [0, 2])
def test_chunks_report_how_many_actions_ran(replan):
    """info["executed"] counts the chunk's actions that ran: all of them (or env.replan_steps), fewer when
    the episode ended inside the chunk, as stepping the plain env action by action shows."""
    from vlarl.envs.chunk import ChunkedEnv

    n, chunk = 64, 4
    chunked, plain = ChunkedEnv(ToyEnv(n), chunk, replan), ToyEnv(n)
    for env in (chunked, plain):
        env.reset(np.arange(n) % 4, np.arange(n))
    seen_short = False
    alive = np.ones(n, bool)
    for _ in range(chunked.max_steps):
        actions = chunked.expert_actions()
        res = chunked.step(actions)
        expected = np.zeros(n, np.int64)
        done = ~alive
        for k in range(replan or chunk):
            step = plain.step(actions[:, k * ACTION_DIM:(k + 1) * ACTION_DIM])
            expected += ~done
            done = done | step.terminated | step.truncated
        np.testing.assert_array_equal(res.info["executed"][alive], expected[alive])
        seen_short |= bool((expected[alive] < (replan or chunk)).any())
        alive &= ~(res.terminated | res.truncated)
        if not alive.any():
            break
    assert seen_short, "no episode ended inside a chunk: the check above compared only full chunks"


def test_executed_mask_marks_the_log_probs_of_actions_that_ran():
    from vlarl.data.batch import TrajectoryBatch

    # Two episodes of two steps, chunks of 2 actions (14 values per call); episode 0's second call ran
    # one action, episode 1's first call both and its second none (the simulator failed).
    executed = np.array([[2, 1], [2, 0]])
    batch = TrajectoryBatch(images=None, proprio=None, instructions=[], task_ids=np.zeros(2), init_state_ids=np.zeros(2),
                            group_ids=np.zeros(2), action_tokens=None, rollout_logprobs=None, rewards=None,
                            mask=np.ones((2, 2), bool), dones=None, terminated=None, success=None, executed=executed)
    ep, t = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    tokens = batch.executed_mask(ep, t, 14, 14)  # one log-prob per token, action by action
    np.testing.assert_array_equal(tokens.sum(1), [14, 7, 14, 0])
    assert tokens[1, :7].all() and not tokens[1, 7:].any()
    flow = batch.executed_mask(ep, t, 3 * 14, 14)  # a flow policy's 3 Gaussian steps, each laid out the same
    np.testing.assert_array_equal(flow.reshape(4, 3, 14), np.repeat(tokens[:, None], 3, 1))
    with pytest.raises(ValueError, match="whole number"):
        batch.executed_mask(ep, t, 20, 14)
    batch.executed = None  # batches from before the field: every element counts
    assert batch.executed_mask(ep, t, 14, 14).all()
