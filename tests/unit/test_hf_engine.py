"""Unit tests for vlarl.rollout.hf_engine: KV-cached generation against the teacher-forced forward."""

import numpy as np
import pytest
import torch

from vlarl.config import load_config
from vlarl.data.spec import ACTION_DIM
from vlarl.envs.toy import ToyEnv
from vlarl.models.action_tokenizer import ActionStats, ActionTokenizer
from vlarl.models.registry import build_tiny_model
from vlarl.rollout.hf_engine import HFEngine, InstructionCache

IMAGE_SIZE = 16
STATS = ActionStats(q01=[-0.5] * 6 + [0.0], q99=[2.0] * 6 + [1.0], mask=[True] * 6 + [False])


@pytest.fixture(scope="module")
def engine():
    """An engine over a tiny VLA whose output head is re-drawn with a larger scale, so bin
    distributions are peaked rather than near-uniform (temperature then matters visibly)."""
    model, tokenizer, _ = build_tiny_model(load_config([]).model, IMAGE_SIZE, ToyEnv(1).instructions())
    with torch.no_grad():
        head = model.language_model.get_output_embeddings().weight
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    return HFEngine(model, tokenizer, ActionTokenizer(model.vocab_size, STATS))


def observations(n: int, seed: int = 0) -> dict:
    env = ToyEnv(n)
    return env.reset(np.arange(n) % env.num_tasks, np.arange(n) + 100 * seed)


def rescore(engine: HFEngine, obs: dict, tokens: np.ndarray, temperature: float):
    """Teacher-forced logprobs (B, D) and full bin log-softmax (B, D, 256) of given tokens."""
    m = engine.model
    inputs = engine.model_inputs(obs)
    with torch.no_grad():
        logprobs, entropy, _ = m(*inputs, torch.as_tensor(tokens), temperature=temperature)
    return logprobs.numpy(), entropy.numpy()


def bin_logits(engine: HFEngine, obs: dict, tokens: np.ndarray) -> torch.Tensor:
    """Decoder logits over the 256 bins at each action step (B, D, 256), teacher-forced on `tokens`,
    computed directly from the language model (rows must be unpadded)."""
    m = engine.model
    images, proprio, ids, mask = engine.model_inputs(obs)
    assert bool(mask.all())
    with torch.no_grad():
        embeds, _, _ = m.prefix(images, proprio, ids, mask)
        act = m.language_model.get_input_embeddings()(torch.as_tensor(tokens[:, :-1]))
        logits = m.language_model(inputs_embeds=torch.cat([embeds, act], 1)).logits
    length = embeds.shape[1]
    return logits[:, length - 1:, m.first_bin_id:]


def test_output_types_and_ranges(engine):
    out = engine.generate(observations(4), temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == out.logprobs.shape == out.actions.shape == (4, ACTION_DIM)
    assert out.tokens.dtype == np.int64 and out.logprobs.dtype == np.float32 and out.actions.dtype == np.float32
    first = engine.model.first_bin_id
    assert out.tokens.min() >= first and out.tokens.max() < engine.model.vocab_size
    assert (out.logprobs <= 0).all()


def test_actions_are_detokenised_tokens(engine):
    out = engine.generate(observations(8), temperature=1.0, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(out.actions, engine.action_tokenizer.tokens_to_actions(out.tokens))
    # the engine's statistics are used: dims 0-5 live in [-0.5, 2], the masked gripper in [-1, 1]
    assert out.actions[:, :6].min() >= -0.5 and out.actions[:, :6].max() <= 2.0
    assert (out.actions[:, :6] > 1.0).any() or (out.actions[:, :6] < -0.0).any()


def test_greedy_is_deterministic_and_the_teacher_forced_argmax(engine):
    obs = observations(4)
    a = engine.generate(obs, temperature=1.0, greedy=True)
    b = engine.generate(obs, temperature=1.0, greedy=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    logprobs, _ = rescore(engine, obs, a.tokens, 1.0)
    np.testing.assert_allclose(a.logprobs, logprobs, atol=1e-5, rtol=0)
    logits = bin_logits(engine, obs, a.tokens)  # (B, D, 256)
    np.testing.assert_array_equal(logits.argmax(-1).numpy() + engine.model.first_bin_id, a.tokens)
    # the recorded log-prob is the log-softmax over the bins only
    np.testing.assert_allclose(a.logprobs, torch.log_softmax(logits, -1).max(-1).values.numpy(), atol=1e-5, rtol=0)


def test_greedy_ignores_the_generator_and_temperature_only_scales_logprobs(engine):
    obs = observations(4)
    a = engine.generate(obs, temperature=1.0, greedy=True)
    b = engine.generate(obs, temperature=0.5, greedy=True, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    logprobs, _ = rescore(engine, obs, b.tokens, 0.5)
    np.testing.assert_allclose(b.logprobs, logprobs, atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible(engine):
    obs = observations(8)
    a = engine.generate(obs, temperature=1.0, generator=torch.Generator().manual_seed(42))
    b = engine.generate(obs, temperature=1.0, generator=torch.Generator().manual_seed(42))
    c = engine.generate(obs, temperature=1.0, generator=torch.Generator().manual_seed(43))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)


def test_with_a_generator_per_row_a_sample_does_not_depend_on_its_batch_mates(engine):
    """What pipeline stages rely on: rows 5-7 sampled alone or inside a batch of 8 draw the same tokens."""
    obs = observations(8)
    gens = lambda rows: [torch.Generator().manual_seed(100 + i) for i in rows]  # noqa: E731
    full = engine.generate(obs, temperature=1.0, generator=gens(range(8)))
    part = engine.generate({k: v[5:] for k, v in obs.items()}, temperature=1.0, generator=gens(range(5, 8)))
    np.testing.assert_array_equal(full.tokens[5:], part.tokens)
    np.testing.assert_allclose(full.logprobs[5:], part.logprobs, atol=1e-5, rtol=0)
    other = engine.generate(obs, temperature=1.0, generator=gens(range(1, 9)))
    assert not np.array_equal(other.tokens, full.tokens)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_the_forward(engine, temperature):
    obs = observations(8, seed=1)
    out = engine.generate(obs, temperature=temperature, generator=torch.Generator().manual_seed(5))
    logprobs, _ = rescore(engine, obs, out.tokens, temperature)
    np.testing.assert_allclose(out.logprobs, logprobs, atol=1e-5, rtol=0)


def test_temperature_is_applied_when_sampling(engine):
    """Samples drawn at T=0.5 and T=2 (64 observations x 7 tokens each):
    - under the T=1 distribution, hotter samples are less likely and more spread out;
    - at each T, the mean sampled log-prob estimates minus the entropy at that T, as it must when
      tokens really are drawn from the distribution whose log-probs are recorded.
    Fails if sampling ignores the temperature or samples from a different distribution."""
    obs = observations(64)
    samples, at_t1 = {}, {}
    for t in (0.5, 2.0):
        out = engine.generate(obs, temperature=t, generator=torch.Generator().manual_seed(0))
        samples[t] = out.tokens
        logprobs_t, entropy_t = rescore(engine, obs, out.tokens, t)
        np.testing.assert_allclose(out.logprobs, logprobs_t, atol=1e-5, rtol=0)
        stderr = out.logprobs.std() / np.sqrt(out.logprobs.size)
        assert abs(out.logprobs.mean() + entropy_t.mean()) < 4 * stderr + 0.02, t
        at_t1[t], _ = rescore(engine, obs, out.tokens, 1.0)
    assert at_t1[0.5].mean() > at_t1[2.0].mean() + 0.5
    distinct = {t: np.mean([len(np.unique(s[:, d])) for d in range(ACTION_DIM)]) for t, s in samples.items()}
    assert distinct[2.0] > distinct[0.5]


def test_padded_batch_generates_like_each_alone(engine):
    obs = observations(2)
    obs["instruction"] = ["move to the red block", "red block"]  # the second row is left-padded
    both = engine.generate(obs, temperature=1.0, greedy=True)
    for i in range(2):
        one = {k: v[i:i + 1] for k, v in obs.items()}
        alone = engine.generate(one, temperature=1.0, greedy=True)
        np.testing.assert_array_equal(both.tokens[i:i + 1], alone.tokens)
        np.testing.assert_allclose(both.logprobs[i:i + 1], alone.logprobs, atol=1e-5, rtol=0)


def test_instruction_cache_left_pads(engine):
    tokenizer = engine.instructions.tokenizer
    cache = InstructionCache(tokenizer, engine.model)
    texts = ["move to the red block", "red block", "move to the red block"]
    ids, mask = cache.encode(texts)
    long = tokenizer("move to the red block", add_special_tokens=False)["input_ids"]
    short = tokenizer("red block", add_special_tokens=False)["input_ids"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, len(long))
    assert ids[0].tolist() == long == ids[2].tolist()
    pad = len(long) - len(short)
    assert ids[1].tolist() == [tokenizer.pad_token_id] * pad + short
    assert mask[1].tolist() == [0] * pad + [1] * len(short)
    assert mask[0].all() and mask[2].all()
    again_ids, again_mask = cache.encode(["red block"])  # cached: same ids, no padding alone
    assert again_ids[0].tolist() == short and again_mask.all()


def test_load_state_dict_updates_weights_and_rejects_mismatches():
    cfg, instructions = load_config([]).model, ToyEnv(1).instructions()
    model, tokenizer, at = build_tiny_model(cfg, IMAGE_SIZE, instructions, seed=0)
    other, _, _ = build_tiny_model(cfg, IMAGE_SIZE, instructions, seed=1)
    eng = HFEngine(model, tokenizer, at)
    ref = HFEngine(other, tokenizer, ActionTokenizer(other.vocab_size, at.stats))
    obs = observations(2)
    target = ref.generate(obs, 1.0, greedy=True).logprobs
    assert not np.allclose(eng.generate(obs, 1.0, greedy=True).logprobs, target)
    # a pushed state dict may leave out the value head (the rollout side never uses it)
    eng.load_state_dict({k: v for k, v in other.state_dict().items() if not k.startswith("value_head")})
    np.testing.assert_array_equal(eng.generate(obs, 1.0, greedy=True).logprobs, target)
    with pytest.raises(RuntimeError):
        eng.load_state_dict({"not.a.weight": torch.zeros(1)})
