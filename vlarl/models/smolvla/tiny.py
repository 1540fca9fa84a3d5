"""Tiny random SmolVLA folders in LeRobot's layout, for tests.

    python -m vlarl.models.smolvla.tiny OUT [--tokenizer DIR] [--num-vlm-layers N] [--num-expert-layers N]
        [--self-attn-every-n-layers N] [--attention-mode cross_attn|self_attn] [--add-image-special-tokens]

The folder carries LeRobot's file names, config fields (`"type": "smolvla"`), weight names under
`model.` and statistics files; the tiny SmolVLM2 backbone's sizes go into arch.json beside config.json
(`{"vlm": SmolVLMConfig fields}`), which the loader reads before `vlm_model_name`. The tokenizer written
beside it names SmolVLM2's image special tokens, as add_image_special_tokens folders need.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from vlarl.data.spec import ACTION_DIM, PROPRIO_DIM
from vlarl.models.pi0.checkpoint import to_transformers, write_weights
from vlarl.models.pi0.config import ARCH_FILE, Pi0Stats
from vlarl.models.pi0.modeling import Pi0Settings
from vlarl.models.pi0.tiny import _stats_tensors
from vlarl.models.pi0.tiny import write_tiny_tokenizer as write_word_tokenizer
from vlarl.models.smolvla.config import SmolVLASpec
from vlarl.models.smolvla.modeling import SmolVLAPolicy

TINY_VLM = {  # a SmolVLM2-shaped backbone: 4 text layers (the folder keeps the first 2), 4 tokens per camera
    "text_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 128,
                    "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 100000.0},
    "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "patch_size": 4, "image_size": 16},
    "scale_factor": 2, "image_token_id": 127}
TINY_VLM_NAME = "vlarl-test/tiny-smolvlm2"
# SmolVLM2's named extra special tokens (its tokenizer_config.json), which add_image_special_tokens reads.
IMAGE_SPECIAL_TOKENS = {"fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
                        "image_token": "<image>"}


def tiny_spec(seed: int = 0, chunk_size: int = 10, executed_steps: int = 2, cameras: int = 2,
              tokenizer_name: str = TINY_VLM_NAME, num_vlm_layers: int = 2, num_expert_layers: int = -1,
              self_attn_every_n_layers: int = 2, attention_mode: str = "cross_attn",
              add_image_special_tokens: bool = False, empty_cameras: int = 0) -> SmolVLASpec:
    """The options take LeRobot's config.json names; num_expert_layers <= 0 means num_vlm_layers, and
    `cameras` counts the empty ones."""
    rng = np.random.default_rng(seed)
    stats = Pi0Stats(rng.normal(0, 0.3, PROPRIO_DIM).tolist(), rng.uniform(0.1, 1.0, PROPRIO_DIM).tolist(),
                     rng.normal(0, 0.1, ACTION_DIM).tolist(), rng.uniform(0.05, 0.5, ACTION_DIM).tolist(), 1e-8, 0.0)
    return SmolVLASpec(vlm=TINY_VLM, num_vlm_layers=num_vlm_layers,
                       num_expert_layers=num_expert_layers if num_expert_layers > 0 else num_vlm_layers,
                       self_attn_every_n_layers=self_attn_every_n_layers, expert_width_multiplier=0.75,
                       attention_mode=attention_mode, add_image_special_tokens=add_image_special_tokens,
                       image_size=16, num_cameras=cameras, empty_cameras=empty_cameras, chunk_size=chunk_size,
                       executed_steps=executed_steps, max_state_dim=32, max_action_dim=32, num_steps=10,
                       min_period=4e-3, max_period=4.0, tokenizer_name=tokenizer_name, tokenizer_max_length=48,
                       stats=stats)


def write_tiny_tokenizer(out: str | Path) -> Path:
    """pi0's tiny word-level tokenizer (vlarl/models/pi0/tiny.py) plus SmolVLM2's image special tokens
    (ids right after its words, inside the tiny vocabulary), named as in SmolVLM2's tokenizer."""
    from transformers import AutoTokenizer

    out = write_word_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(str(out), extra_special_tokens=IMAGE_SPECIAL_TOKENS)
    tokenizer.add_tokens(list(IMAGE_SPECIAL_TOKENS.values()), special_tokens=True)
    assert len(tokenizer) <= TINY_VLM["text_config"]["vocab_size"]
    tokenizer.save_pretrained(str(out))
    return out


def upstream_name(name: str) -> str:
    """Backbone name -> LeRobot's (the inverse of vlarl/models/pi0/checkpoint.py RULES["smolvla"])."""
    return "model." + re.sub(r"^(vlm|lm_expert)\.", r"vlm_with_expert.\1.", name)


def _write_side_files(out: Path, spec: SmolVLASpec) -> None:
    norm_map = {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    cams = ["observation.images.image", "observation.images.wrist_image"][:spec.num_cameras - spec.empty_cameras]
    inputs = {k: {"type": "VISUAL", "shape": [3, spec.image_size, spec.image_size]} for k in cams}
    inputs["observation.state"] = {"type": "STATE", "shape": [spec.state_dim]}
    outputs = {"action": {"type": "ACTION", "shape": [spec.action_dim]}}
    config = {"type": "smolvla", "n_obs_steps": 1, "input_features": inputs, "output_features": outputs,
              "device": "cpu", "use_amp": False, "push_to_hub": False, "chunk_size": spec.chunk_size,
              "n_action_steps": spec.executed_steps, "normalization_mapping": norm_map,
              "max_state_dim": spec.max_state_dim, "max_action_dim": spec.max_action_dim,
              "resize_imgs_with_padding": [spec.image_size, spec.image_size], "empty_cameras": spec.empty_cameras,
              "adapt_to_pi_aloha": False, "use_delta_joint_actions_aloha": False,
              "tokenizer_max_length": spec.tokenizer_max_length, "num_steps": spec.num_steps, "use_cache": True,
              "freeze_vision_encoder": True, "train_expert_only": True, "train_state_proj": True,
              "optimizer_lr": 1e-4, "vlm_model_name": spec.tokenizer_name, "load_vlm_weights": True,
              "add_image_special_tokens": spec.add_image_special_tokens, "attention_mode": spec.attention_mode,
              "prefix_length": -1, "pad_language_to": "longest",
              "num_expert_layers": spec.num_expert_layers if spec.num_expert_layers < spec.num_vlm_layers else -1,
              "num_vlm_layers": spec.num_vlm_layers,
              "self_attn_every_n_layers": spec.self_attn_every_n_layers,
              "expert_width_multiplier": spec.expert_width_multiplier, "min_period": spec.min_period,
              "max_period": spec.max_period}
    (out / "config.json").write_text(json.dumps(config, indent=4))
    pre_state = "policy_preprocessor_step_5_normalizer_processor.safetensors"
    post_state = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    norm = {"eps": 1e-8, "features": {**inputs, **outputs}, "norm_map": norm_map}
    pre = {"name": "policy_preprocessor", "steps": [  # processor_smolvla.py make_smolvla_pre_post_processors
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "smolvla_new_line_processor", "config": {}},
        {"registry_name": "tokenizer_processor", "config": {
            "max_length": spec.tokenizer_max_length, "task_key": "task", "padding_side": "right",
            "padding": "longest", "truncation": True, "tokenizer_name": spec.tokenizer_name}},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
        {"registry_name": "normalizer_processor", "config": norm, "state_file": pre_state}]}
    post = {"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor", "config": norm, "state_file": post_state},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}]}
    (out / "policy_preprocessor.json").write_text(json.dumps(pre, indent=2))
    (out / "policy_postprocessor.json").write_text(json.dumps(post, indent=2))
    save_file(_stats_tensors(spec), out / pre_state)
    save_file(_stats_tensors(spec), out / post_state)
    (out / ARCH_FILE).write_text(json.dumps({"vlm": spec.vlm}, indent=2))


def write_tiny_smolvla(out: str | Path, seed: int = 0, **sizes) -> Path:
    """A tiny random SmolVLA folder in LeRobot's layout; `sizes` override tiny_spec's arguments."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = tiny_spec(seed=seed, **sizes)
    torch.manual_seed(seed)
    model = SmolVLAPolicy(spec, Pi0Settings(action_dim=spec.action_dim * spec.executed_steps))
    state = model.backbone.state_dict()
    record = [(upstream_name(k), k, v.dtype) for k, v in state.items()]
    assert all(to_transformers(u, "lerobot", "smolvla") == k for u, k, _ in record)
    _write_side_files(out, spec)
    write_weights(out, state, record)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="also write a tiny tokenizer to this folder")
    parser.add_argument("--num-vlm-layers", type=int, default=2, help="of the tiny backbone's 4")
    parser.add_argument("--num-expert-layers", type=int, default=-1, help="a divisor of --num-vlm-layers")
    parser.add_argument("--self-attn-every-n-layers", type=int, default=2)
    parser.add_argument("--attention-mode", default="cross_attn", choices=["cross_attn", "self_attn"])
    parser.add_argument("--add-image-special-tokens", action="store_true")
    args = parser.parse_args()
    print(write_tiny_smolvla(args.out, args.seed, num_vlm_layers=args.num_vlm_layers,
                             num_expert_layers=args.num_expert_layers,
                             self_attn_every_n_layers=args.self_attn_every_n_layers,
                             attention_mode=args.attention_mode,
                             add_image_special_tokens=args.add_image_special_tokens))
    if args.tokenizer:
        print(write_tiny_tokenizer(args.tokenizer))


if __name__ == "__main__":
    main()
