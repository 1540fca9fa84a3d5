"""Tiny random pi0 and pi0.5 folders in the real layouts, and a tiny PaliGemma-style tokenizer, for tests.

    python -m vlarl.models.pi0.tiny OUT --format lerobot|openpi [--tokenizer DIR]
    python -m vlarl.models.pi05.tiny OUT --format lerobot|openpi [--tokenizer DIR]

The folders carry the upstream file names, config fields, weight names and statistics files
(vlarl/models/pi0/config.py describes both layouts) with tiny sizes in arch.json beside config.json.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from vlarl.data.spec import ACTION_DIM, PROPRIO_DIM
from vlarl.models.pi0.checkpoint import prefix_of, to_transformers, write_weights
from vlarl.models.pi0.config import (
    ARCH_FILE,
    DEFAULT_TOKENIZER,
    GemmaSize,
    Pi0Spec,
    TOKENIZER_MAX_LENGTH,
    Pi0Stats,
    VisionSize,
    arch_dict,
)
from vlarl.models.pi0.modeling import Pi0Policy, Pi0Settings

LIBERO_WORDS = ("put pick up place open close turn on off the a and in into on top of to drawer bowl plate black "
                "white red yellow green blue cream cheese ketchup mug stove cabinet basket box alphabet soup "
                "tomato sauce butter milk orange juice wine bottle rack middle left right front back move block "
                "purple cyan Task State Action")  # LIBERO's, the toy task's ("move to the {colour} block"), pi0.5's
ASSET_ID = "physical-intelligence/libero"  # openpi's pi0_libero asset id

# transformers name -> upstream name (without LeRobot's `model.`), the inverse of checkpoint.RULES.
INVERSE = [
    (r"^model\.vlm\.vision_tower\.", "paligemma_with_expert.paligemma.model.vision_tower.vision_model."),
    (r"^model\.vlm\.language_model\.embed_tokens\.weight$", "paligemma_with_expert.paligemma.lm_head.weight"),
    (r"^model\.vlm\.", "paligemma_with_expert.paligemma.model."),
    (r"^model\.dit\.embed_tokens\.weight$", "paligemma_with_expert.gemma_expert.lm_head.weight"),
    (r"^model\.dit\.", "paligemma_with_expert.gemma_expert.model."),
    (r"^embed_action_time\.", ""),
    (r"^(action_in_proj|time_mlp_in|time_mlp_out|action_out_proj)\.", r"\1."),
]


def upstream_name(name: str, layout: str) -> str:
    for pattern, repl in INVERSE:
        if re.match(pattern, name):
            return prefix_of(layout) + re.sub(pattern, repl, name)
    raise KeyError(name)


def write_tiny_tokenizer(out: str | Path, words: str = LIBERO_WORDS) -> Path:
    """A word-level tokenizer with Gemma's special ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3) and "\\n";
    punctuation and each digit are tokens of their own (Gemma splits digits too)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<eos>", "<bos>", "<unk>", "\n", *":,;-.", *"0123456789"]
    for w in words.split():
        if w not in vocab:
            vocab.append(w)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(out))
    return Path(out)


def tiny_inputs(model, tokenizer, texts=("put the black bowl on the plate", "open the drawer"), seed: int = 0):
    """Test inputs for a pi0-style policy: one observation per text, two cameras side by side, the texts'
    prompts left-padded to the longest -> (images uint8, proprio (B, 8), ids, mask)."""
    g = torch.Generator().manual_seed(seed)
    b, s = len(texts), model.image_size
    images = torch.randint(0, 256, (b, s, 2 * s, 3), generator=g, dtype=torch.uint8)
    proprio = torch.randn(b, PROPRIO_DIM, generator=g)
    rows = [model.encode_instruction(tokenizer, t) for t in texts]
    width = max(map(len, rows))
    ids, mask = torch.zeros(b, width, dtype=torch.long), torch.zeros(b, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    return images, proprio, ids, mask


def tiny_spec(layout: str, image_size: int = 16, chunk_size: int = 10, executed_steps: int = 2,
              vocab_size: int = 128, cameras: int = 2, seed: int = 0, tokenizer_name: str = DEFAULT_TOKENIZER,
              kind: str = "pi0") -> Pi0Spec:
    rng = np.random.default_rng(seed)
    state_mean, state_std = rng.normal(0, 0.3, PROPRIO_DIM), rng.uniform(0.1, 1.0, PROPRIO_DIM)
    action_mean, action_std = rng.normal(0, 0.1, ACTION_DIM), rng.uniform(0.05, 0.5, ACTION_DIM)
    if kind == "pi05":  # quantiles, as (q01, q99) = mean -+ 2 std
        stats = Pi0Stats(*(x.tolist() for x in (state_mean - 2 * state_std, state_mean + 2 * state_std,
                                                 action_mean - 2 * action_std, action_mean + 2 * action_std)),
                         0.0 if layout == "lerobot" else 1e-6, 0.0 if layout == "lerobot" else 1e-6, "quantiles")
    else:
        stats = Pi0Stats(state_mean.tolist(), state_std.tolist(), action_mean.tolist(), action_std.tolist(),
                         1e-8 if layout == "lerobot" else 1e-6, 0.0 if layout == "lerobot" else 1e-6)
    return Pi0Spec(layout=layout, kind=kind, vocab_size=vocab_size, paligemma=GemmaSize(32, 2, 64, 2, 1, 16),
                   action_expert=GemmaSize(16, 2, 32, 2, 1, 16), vision=VisionSize(16, 32, 1, 2, 4),
                   image_size=image_size, num_cameras=cameras, chunk_size=chunk_size, executed_steps=executed_steps,
                   max_state_dim=32, max_action_dim=32, num_inference_steps=10, min_period=4e-3, max_period=4.0,
                   tokenizer_name=tokenizer_name, tokenizer_max_length=TOKENIZER_MAX_LENGTH[kind], stats=stats)


def _features(spec: Pi0Spec) -> dict:
    cams = ["observation.images.image", "observation.images.wrist_image"][:spec.num_cameras]
    inputs = {k: {"type": "VISUAL", "shape": [3, spec.image_size, spec.image_size]} for k in cams}
    inputs["observation.state"] = {"type": "STATE", "shape": [spec.state_dim]}
    return inputs


def _stats_tensors(spec: Pi0Spec) -> dict[str, np.ndarray]:
    """Every statistic LeRobot stores, consistent with the spec's: q01/q99 = mean -+ 2 std, min/max -+ 3 std."""
    s, f = spec.stats, lambda x: np.asarray(x, np.float32)  # noqa: E731
    out = {}
    for key, what in (("observation.state", "state"), ("action", "action")):
        a, b = f(getattr(s, f"{what}_mean")), f(getattr(s, f"{what}_std"))
        mean, std = ((a + b) / 2, (b - a) / 4) if s.mode == "quantiles" else (a, b)
        out.update({f"{key}.mean": mean, f"{key}.std": std, f"{key}.min": mean - 3 * std, f"{key}.max": mean + 3 * std,
                    f"{key}.q01": a if s.mode == "quantiles" else mean - 2 * std,
                    f"{key}.q99": b if s.mode == "quantiles" else mean + 2 * std})
    return out


def _write_lerobot_side(out: Path, spec: Pi0Spec) -> None:
    mode = "QUANTILES" if spec.stats.mode == "quantiles" else "MEAN_STD"
    norm_map = {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}
    features = {**_features(spec), "action": {"type": "ACTION", "shape": [spec.action_dim]}}
    config = {"type": spec.kind, "n_obs_steps": 1, "input_features": _features(spec),
              "output_features": {"action": {"type": "ACTION", "shape": [spec.action_dim]}}, "device": "cpu",
              "use_amp": False, "push_to_hub": False, "paligemma_variant": "gemma_2b",
              "action_expert_variant": "gemma_300m", "dtype": "float32", "chunk_size": spec.chunk_size,
              "n_action_steps": spec.executed_steps, "max_state_dim": spec.max_state_dim,
              "max_action_dim": spec.max_action_dim, "num_inference_steps": spec.num_inference_steps,
              "time_sampling_beta_alpha": 1.5, "time_sampling_beta_beta": 1.0, "time_sampling_scale": 0.999,
              "time_sampling_offset": 0.001, "min_period": spec.min_period, "max_period": spec.max_period,
              "image_resolution": [spec.image_size, spec.image_size], "empty_cameras": 0,
              "normalization_mapping": norm_map, "tokenizer_max_length": spec.tokenizer_max_length}
    (out / "config.json").write_text(json.dumps(config, indent=4))
    norm_config = {"eps": 1e-8, "features": features, "norm_map": norm_map}
    tokenizer = {"registry_name": "tokenizer_processor", "config": {
        "max_length": spec.tokenizer_max_length, "task_key": "task", "padding_side": "right",
        "padding": "max_length", "truncation": True, "tokenizer_name": spec.tokenizer_name}}
    device = {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}
    start = [{"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
             {"registry_name": "to_batch_processor", "config": {}}]
    if spec.kind == "pi05":  # processor_pi05.py: normalise, then the state goes into the prompt
        steps = [*start, {"registry_name": "normalizer_processor", "config": norm_config},
                 {"registry_name": "pi05_prepare_state_tokenizer_processor_step",
                  "config": {"max_state_dim": spec.max_state_dim, "task_key": "task"}}, tokenizer, device]
    else:  # processor_pi0.py
        steps = [*start, {"registry_name": "pi0_new_line_processor", "config": {}}, tokenizer, device,
                 {"registry_name": "normalizer_processor", "config": norm_config}]
    index = next(i for i, s in enumerate(steps) if s["registry_name"] == "normalizer_processor")
    pre_state = f"policy_preprocessor_step_{index}_normalizer_processor.safetensors"
    post_state = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    steps[index]["state_file"] = pre_state
    pre = {"name": "policy_preprocessor", "steps": steps}
    post = {"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor", "config": norm_config, "state_file": post_state},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}]}
    (out / "policy_preprocessor.json").write_text(json.dumps(pre, indent=2))
    (out / "policy_postprocessor.json").write_text(json.dumps(post, indent=2))
    save_file(_stats_tensors(spec), out / pre_state)
    save_file(_stats_tensors(spec), out / post_state)


def _write_openpi_side(out: Path, spec: Pi0Spec) -> None:
    config = {"action_dim": spec.max_action_dim, "action_horizon": spec.chunk_size, "paligemma_variant": "gemma_2b",
              "action_expert_variant": "gemma_300m", "precision": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    t = _stats_tensors(spec)
    stats = {k: {"mean": t[f"{src}.mean"].tolist(), "std": t[f"{src}.std"].tolist(),
                 "q01": t[f"{src}.min"].tolist(), "q99": t[f"{src}.max"].tolist()}
             for k, src in (("state", "observation.state"), ("actions", "action"))}
    path = out / "assets" / ASSET_ID / "norm_stats.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"norm_stats": stats}, indent=2))


def write_tiny_pi0(out: str | Path, format: str = "lerobot", seed: int = 0, kind: str = "pi0", **sizes) -> Path:
    """A tiny random pi0 (kind="pi0") or pi0.5 ("pi05") folder in `format` ("lerobot" | "openpi");
    `sizes` override tiny_spec's arguments. The same seed gives the same weights in either format."""
    if format not in ("lerobot", "openpi"):
        raise ValueError(f"format={format!r}; choose lerobot or openpi.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = tiny_spec(format, seed=seed, kind=kind, **sizes)
    torch.manual_seed(seed)
    policy = Pi0Policy
    if kind == "pi05":
        from vlarl.models.pi05.modeling import Pi05Policy as policy
    model = policy(replace(spec, layout=format), Pi0Settings(action_dim=spec.action_dim * spec.executed_steps))
    if kind == "pi05":  # upstream initialises adaRMS's dense weights to zero; random ones test them
        for name, p in model.backbone.named_parameters():
            if ".dense." in name:
                torch.nn.init.normal_(p, std=0.1)
    state = model.backbone.state_dict()
    record = [(upstream_name(k, format), k, v.dtype) for k, v in state.items()]
    assert all(to_transformers(u, format, kind) == k for u, k, _ in record)
    (_write_lerobot_side if format == "lerobot" else _write_openpi_side)(out, spec)
    arch = arch_dict(spec)
    if format == "openpi":  # openpi's config.json names neither (224 px; base + wrist cameras on LIBERO)
        arch.update(image_size=spec.image_size, num_cameras=spec.num_cameras)
    (out / ARCH_FILE).write_text(json.dumps(arch, indent=2))
    write_weights(out, state, record)
    return out


def main(kind: str = "pi0") -> None:
    parser = argparse.ArgumentParser(description=f"A tiny random {kind} folder in LeRobot's or openpi's layout.")
    parser.add_argument("out")
    parser.add_argument("--format", choices=("lerobot", "openpi"), default="lerobot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="also write the tiny tokenizer to this folder")
    args = parser.parse_args()
    print(write_tiny_pi0(args.out, args.format, args.seed, kind))
    if args.tokenizer:
        print(write_tiny_tokenizer(args.tokenizer))


if __name__ == "__main__":
    main()
