"""Unit tests for the tiny token VLA (vlarl/models/tiny_token), its family (build, save/load) and LoRA."""

import pytest
import torch

from vlarl.config import load_config
from vlarl.data.spec import ACTION_DIM
from vlarl.envs.toy import ToyEnv
from vlarl.models.action_tokenizer import NUM_BINS, ActionTokenizer
from vlarl.models.family import Loaded
from vlarl.models.lora import apply_lora, merge_lora_state_dict
from vlarl.models.registry import build_tiny_model, load_model, save_model
from vlarl.models.tiny_token.family import TinyToken
from vlarl.models.tiny_token.modeling import TokenVLA
from vlarl.rollout.hf_engine import InstructionCache

IMAGE_SIZE = 16
LORA_RANK, LORA_ALPHA = 4, 16


def tiny(seed: int = 0, value_head: bool = True):
    """A tiny token VLA in eval mode; with `value_head` its zero-initialised last layer is randomised
    so values depend on the input (a zero critic would pass any value test)."""
    model, tokenizer, action_tokenizer = build_tiny_model(load_config([]).model, IMAGE_SIZE, ToyEnv(1).instructions(), seed)
    stats = action_tokenizer.stats
    if value_head:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 100)
            for p in model.value_head[-1].parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval(), tokenizer, stats


@pytest.fixture(scope="module")
def built():
    return tiny()


def batch(tokenizer, instructions=None, seed: int = 0):
    """(images, proprio, input_ids, text_mask, action_tokens) for toy observations of every task."""
    env = ToyEnv(4)
    obs = env.reset([0, 1, 2, 3], [seed, seed + 1, seed + 2, seed + 3])
    instructions = obs["instruction"] if instructions is None else instructions
    ids, mask = InstructionCache(tokenizer, TokenVLA).encode(instructions)
    n = len(instructions)
    g = torch.Generator().manual_seed(seed)
    first = len(tokenizer) - NUM_BINS
    actions = torch.randint(first, first + NUM_BINS, (n, ACTION_DIM), generator=g)
    return (torch.as_tensor(obs["image"][:n]), torch.as_tensor(obs["proprio"][:n]), ids, mask, actions)


# ---- building -------------------------------------------------------------------------------------
def test_parameter_count(built):
    model, _, _ = built
    n = sum(p.numel() for p in model.parameters())
    assert 1e5 <= n <= 5e6


def test_tokenizer_vocab_matches_model(built):
    model, tokenizer, stats = built
    assert len(tokenizer) == model.vocab_size
    assert model.language_model.get_output_embeddings().weight.shape[0] == model.vocab_size
    assert model.first_bin_id == model.vocab_size - NUM_BINS
    assert tokenizer.convert_tokens_to_ids("<bin_000>") == model.first_bin_id
    assert tokenizer.convert_tokens_to_ids("<bin_255>") == model.vocab_size - 1
    assert tokenizer.padding_side == "left"
    assert ActionTokenizer(model.vocab_size, stats).first_bin_id == model.first_bin_id
    # every instruction word is a real token, never <unk>
    for text in ToyEnv(1).instructions():
        assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"]


def test_same_seed_same_weights():
    a, _, _ = tiny(3, value_head=False)
    b, _, _ = tiny(3, value_head=False)
    c, _, _ = tiny(4, value_head=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", ["tiny_token", "tiny_flow"])
def test_embed_std_rescales_only_the_token_embeddings(name):
    instructions = ToyEnv(1).instructions()
    plain = build_tiny_model(load_config([f"model={name}"]).model, IMAGE_SIZE, instructions, 3).model.state_dict()
    wide = build_tiny_model(load_config([f"model={name}", "model.tiny.embed_std=0.5"]).model, IMAGE_SIZE,
                            instructions, 3).model.state_dict()
    key = "language_model.model.embed_tokens.weight"
    assert abs(plain[key].std().item() - 0.02) < 0.002 and abs(wide[key].std().item() - 0.5) < 0.05
    torch.testing.assert_close(wide[key], plain[key] * 25)  # the same draw, scaled
    assert all(torch.equal(plain[k], wide[k]) for k in plain if k != key)


def test_value_head_starts_at_zero():
    model, tokenizer, _ = tiny(value_head=False)
    with torch.no_grad():
        _, _, values = model(*batch(tokenizer))
    torch.testing.assert_close(values, torch.zeros(4), atol=0, rtol=0)


# ---- forward: log-probs, entropy and values ------------------------------------------------------
def hand_bin_logprobs(model, images, proprio, input_ids, text_mask, action_tokens, temperature):
    """The decoder's full-vocabulary logits on [prefix, action tokens[:-1]] for unpadded rows, sliced
    to the bin ids: position L-1+d predicts action token d."""
    assert bool(text_mask.all()), "this hand computation assumes no padding"
    embeds, _, _ = model.prefix(images, proprio, input_ids, text_mask)
    length, d = embeds.shape[1], action_tokens.shape[1]
    inputs = torch.cat([embeds, model.language_model.get_input_embeddings()(action_tokens[:, :-1])], 1)
    positions = torch.arange(inputs.shape[1])[None].expand(inputs.shape[0], -1)
    logits = model.language_model(inputs_embeds=inputs, position_ids=positions).logits  # (B, L+D-1, V)
    logits = logits[:, length - 1:length - 1 + d, model.vocab_size - NUM_BINS:] / temperature
    logp_all = torch.log_softmax(logits.double(), -1)
    bins = action_tokens - (model.vocab_size - NUM_BINS)
    return logp_all.gather(-1, bins[..., None]).squeeze(-1), logp_all


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_logprobs_are_bin_restricted_log_softmax_at_temperature(built, temperature):
    model, tokenizer, _ = built
    inputs = batch(tokenizer)
    with torch.no_grad():
        logprobs, entropy, values = model(*inputs, temperature=temperature)
        expected, logp_all = hand_bin_logprobs(model, *inputs, temperature)
    assert logprobs.shape == entropy.shape == (4, ACTION_DIM) and values.shape == (4,)
    assert logprobs.dtype == entropy.dtype == values.dtype == torch.float32
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), -(logp_all.exp() * logp_all).sum(-1), atol=1e-5, rtol=0)
    # a full-vocabulary log-softmax would be lower by log(p(any bin)), about 0.05 here
    torch.testing.assert_close(logp_all.exp().sum(-1), torch.ones(4, ACTION_DIM, dtype=torch.float64))


def test_temperature_changes_logprobs_and_entropy(built):
    model, tokenizer, _ = built
    inputs = batch(tokenizer)
    with torch.no_grad():
        lp1, ent1, v1 = model(*inputs, temperature=1.0)
        lp2, ent2, v2 = model(*inputs, temperature=2.0)
    assert not torch.allclose(lp1, lp2)
    assert (ent2 > ent1).all()  # flatter distribution
    torch.testing.assert_close(v1, v2)  # values do not depend on the sampling temperature


def test_values_come_from_the_last_prefix_position(built):
    model, tokenizer, _ = built
    images, proprio, ids, mask, actions = batch(tokenizer)
    other_actions = batch(tokenizer, seed=5)[-1]
    assert not torch.equal(actions, other_actions)
    with torch.no_grad():
        lp_a, _, values_a = model(images, proprio, ids, mask, actions)
        lp_b, _, values_b = model(images, proprio, ids, mask, other_actions)
        embeds, _, _ = model.prefix(images, proprio, ids, mask)
        hidden = model.language_model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
        expected = model.value_head(hidden[:, -1]).squeeze(-1)
    torch.testing.assert_close(values_a, values_b, atol=0, rtol=0)
    torch.testing.assert_close(values_a, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(lp_a, lp_b)  # the action tokens did change something
    assert values_a.std() > 0  # and values depend on the observation


def test_left_padding_matches_unpadded(built):
    model, tokenizer, _ = built
    long, short = "move to the red block", "red block"
    images, proprio, ids, mask, actions = batch(tokenizer, [long, short])
    assert mask[1, 0] == 0 and mask[0].all()  # the short instruction really is padded
    with torch.no_grad():
        lp_pair, ent_pair, v_pair = model(images, proprio, ids, mask, actions)
        for i, text in enumerate([long, short]):
            one_ids, one_mask = InstructionCache(tokenizer, model).encode([text])
            assert one_mask.all()
            lp, ent, v = model(images[i:i + 1], proprio[i:i + 1], one_ids, one_mask, actions[i:i + 1])
            torch.testing.assert_close(lp_pair[i:i + 1], lp, atol=1e-5, rtol=0)
            torch.testing.assert_close(ent_pair[i:i + 1], ent, atol=1e-5, rtol=0)
            torch.testing.assert_close(v_pair[i:i + 1], v, atol=1e-5, rtol=0)


def test_instruction_changes_the_output(built):
    model, tokenizer, _ = built
    images, proprio, _, _, actions = batch(tokenizer)
    red = InstructionCache(tokenizer, model).encode(["move to the red block"] * 4)
    blue = InstructionCache(tokenizer, model).encode(["move to the blue block"] * 4)
    with torch.no_grad():
        lp_red, _, _ = model(images, proprio, *red, actions)
        lp_blue, _, _ = model(images, proprio, *blue, actions)
    assert not torch.allclose(lp_red, lp_blue)


def test_gradients_reach_every_trained_part():
    model, tokenizer, _ = tiny()
    model.train()
    logprobs, entropy, values = model(*batch(tokenizer))
    (logprobs.sum() + values.sum()).backward()
    for prefix in ("vision.", "projector.", "proprio_proj.", "language_model.", "value_head."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), prefix


# ---- save / load --------------------------------------------------------------------------------
def test_save_load_round_trip(built, tmp_path):
    model, tokenizer, stats = built
    stats = type(stats)(q01=[-0.5] * 7, q99=[2.0] * 7, mask=[True] * 6 + [False])
    save_model(tmp_path, Loaded(model, tokenizer, ActionTokenizer(model.vocab_size, stats), TinyToken()))
    for name in ("config.json", "model.safetensors", "action_stats.json", "tokenizer.json"):
        assert (tmp_path / name).is_file(), name
    loaded, loaded_tok, action_tok = load_model(tmp_path)
    loaded.eval()
    assert loaded_tok.padding_side == "left"
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    assert action_tok.stats == stats and action_tok.first_bin_id == model.first_bin_id
    assert loaded.dtype == torch.float32
    inputs = batch(tokenizer)
    with torch.no_grad():
        expected = model(*inputs, temperature=1.3)
        got = loaded(*inputs, temperature=1.3)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_load_bfloat16(built, tmp_path):
    model, tokenizer, stats = built
    save_model(tmp_path, Loaded(model, tokenizer, ActionTokenizer(model.vocab_size, stats), TinyToken()))
    loaded, _, _ = load_model(tmp_path, load_config(["model.dtype=bfloat16"]).model)
    assert loaded.dtype == torch.bfloat16
    with torch.no_grad():
        logprobs, _, values = loaded.eval()(*batch(tokenizer))
    assert logprobs.dtype == values.dtype == torch.float32  # scores stay float32 for the learner


def test_load_model_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert "config.json" in message and str(tmp_path) in message and "model.path" in message
    assert "\n" not in message


# ---- LoRA ----------------------------------------------------------------------------------------
def lora_model():
    """A tiny model with LoRA adapters whose B matrices are random (PEFT starts them at zero)."""
    model, tokenizer, stats = tiny()
    model = apply_lora(model, LORA_RANK, LORA_ALPHA)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval(), tokenizer, stats


def test_apply_lora_freezes_all_but_adapters_and_small_heads():
    model, _, _ = lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    allowed = ("value_head.", "projector.", "proprio_proj.")
    assert all("lora_" in n or n.startswith(allowed) for n in trainable), sorted(trainable)
    for part in allowed + ("lora_A", "lora_B"):
        assert any(part in n for n in trainable), part
    assert all("lora_" not in n for n in frozen)
    assert any(n.startswith("vision.") for n in frozen)
    assert any(n.endswith("embed_tokens.weight") for n in frozen)
    assert any(n.endswith("lm_head.weight") for n in frozen)
    lora_targets = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable if "lora_A" in n}
    assert lora_targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_merged_lora_state_dict_reproduces_the_lora_model():
    model, tokenizer, _ = lora_model()
    base, _, _ = tiny()  # same seed, no adapters: the weights before LoRA
    inputs = batch(tokenizer)
    with torch.no_grad():
        lora_lp, lora_ent, lora_v = model(*inputs)
        base_lp, _, _ = base(*inputs)
    assert not torch.allclose(lora_lp, base_lp, atol=1e-3)  # the adapters matter

    merged = merge_lora_state_dict(model.state_dict(), LORA_ALPHA / LORA_RANK)
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    fresh, _, _ = tiny(seed=11, value_head=False)  # different weights everywhere, no adapters
    assert set(merged) == set(fresh.state_dict())
    fresh.load_state_dict(merged, strict=True)
    with torch.no_grad():
        lp, ent, v = fresh.eval()(*inputs)
    torch.testing.assert_close(lp, lora_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, lora_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(v, lora_v, atol=1e-5, rtol=0)


def test_merge_lora_state_dict_without_lora_is_unchanged(built):
    model, _, _ = built
    state = model.state_dict()
    assert merge_lora_state_dict(state, 4.0) is state


def test_merge_lora_by_hand():
    a = torch.randn(2, 3)  # (r, in)
    b = torch.randn(5, 2)  # (out, r)
    w = torch.randn(5, 3)
    bias = torch.randn(5)
    state = {"m.q_proj.base_layer.weight": w, "m.q_proj.base_layer.bias": bias,
             "m.q_proj.lora_A.default.weight": a, "m.q_proj.lora_B.default.weight": b, "other": torch.ones(1)}
    merged = merge_lora_state_dict(state, 0.5)
    assert set(merged) == {"m.q_proj.weight", "m.q_proj.bias", "other"}
    torch.testing.assert_close(merged["m.q_proj.weight"], w + 0.5 * b @ a)
    torch.testing.assert_close(merged["m.q_proj.bias"], bias)
