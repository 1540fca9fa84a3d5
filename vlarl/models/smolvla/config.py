"""What a SmolVLA folder says about its model (LeRobot src/lerobot/policies/smolvla/, `lerobot/smolvla_base`
and its fine-tunes).

The folder: config.json with `"type": "smolvla"` (draccus; num_vlm_layers, self_attn_every_n_layers,
expert_width_multiplier, attention_mode, chunk_size, n_action_steps, resize_imgs_with_padding,
tokenizer_max_length, vlm_model_name, ...), model.safetensors with keys under `model.`, and the
normaliser statistics as in pi0's LeRobot layout (mean/std). The SmolVLM2 backbone's own sizes are not
in the folder: `vlm_model_name` names them (a hub id or a local folder). They come from, in order:
arch.json beside config.json (tiny test folders write it), a local folder's config.json, the Hugging
Face cache, and a table of the known SmolVLM2 ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import SmolVLMConfig

from vlarl.models.family import FamilyError
from vlarl.models.pi0.config import (
    ARCH_FILE,
    Pi0Stats,
    StatsDims,
    _cameras,
    _json,
    _lerobot_stats,
    _tokenizer_step,
)

DEFAULT_VLM = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"  # configuration_smolvla.py vlm_model_name
# HuggingFaceTB/SmolVLM2-500M-Video-Instruct's config.json: SmolLM2-360M text model, SigLIP base-patch16-512
# vision tower, pixel shuffle by 4 (64 tokens per 512 px image).
KNOWN_VLMS = {
    DEFAULT_VLM: {
        "text_config": {"model_type": "llama", "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                        "num_attention_heads": 15, "num_key_value_heads": 5, "head_dim": 64, "vocab_size": 49280,
                        "rms_norm_eps": 1e-5, "hidden_act": "silu", "max_position_embeddings": 8192},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "patch_size": 16, "image_size": 512},
        "scale_factor": 4, "image_token_id": 49190},
}
ROPE_THETA = 10_000.0  # smolvlm_with_expert.py apply_rope(max_wavelength=10_000), whatever the VLM's own


@dataclass
class SmolVLASpec(StatsDims):
    vlm: dict  # SmolVLMConfig fields (text_config, vision_config, scale_factor, image_token_id)
    num_vlm_layers: int  # the VLM's first layers kept (16 for SmolVLA)
    self_attn_every_n_layers: int  # expert layer i self-attends (jointly with the prefix) when i % n == 0
    expert_width_multiplier: float
    attention_mode: str  # "cross_attn" (interleaved) | "self_attn" (every layer joint)
    image_size: int  # cameras are resized (with padding) to this square
    num_cameras: int
    chunk_size: int
    executed_steps: int
    max_state_dim: int
    max_action_dim: int
    num_steps: int
    min_period: float
    max_period: float
    tokenizer_name: str
    tokenizer_max_length: int
    stats: Pi0Stats = field(repr=False)
    kind: str = "smolvla"
    layout: str = "lerobot"

    def vlm_config(self) -> SmolVLMConfig:
        """transformers' SmolVLMConfig, cut to num_vlm_layers, with SmolVLA's RoPE base."""
        text = dict(self.vlm["text_config"], num_hidden_layers=self.num_vlm_layers,
                    rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
        text.pop("rope_theta", None)
        return SmolVLMConfig(text_config=text, vision_config=self.vlm["vision_config"],
                             scale_factor=self.vlm["scale_factor"], image_token_id=self.vlm["image_token_id"])


def vlm_sizes(folder: Path, name: str) -> dict:
    """The SmolVLM2 backbone's config (see the module docstring for where it is looked up)."""
    arch = folder / ARCH_FILE
    if arch.is_file():
        return _json(arch)["vlm"]
    local = Path(name) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    try:
        from transformers.utils import cached_file

        path = cached_file(name, "config.json", local_files_only=True)
        if path:
            return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        pass
    if name in KNOWN_VLMS:
        return KNOWN_VLMS[name]
    raise FamilyError(f"SmolVLA's backbone {name!r} is neither a known SmolVLM2 id nor in the local Hugging Face "
                      "cache; set vlm_model_name in the folder's config.json to a local SmolVLM2 folder.")


def is_smolvla(config: dict) -> bool:
    return config.get("type") == "smolvla"


def read_spec(folder: str | Path, model_cfg=None) -> SmolVLASpec:
    folder = Path(folder)
    config = _json(folder / "config.json")
    if not is_smolvla(config):
        raise FamilyError(f"{folder}/config.json is not a SmolVLA config (LeRobot's \"type\": \"smolvla\").")
    if config.get("add_image_special_tokens"):
        raise FamilyError(f"{folder}: add_image_special_tokens=true is not supported yet; vlarl reads SmolVLA "
                          "checkpoints trained without image special tokens (the default).")
    if config.get("num_expert_layers", -1) > 0 and config["num_expert_layers"] != config.get("num_vlm_layers", 16):
        raise FamilyError(f"{folder}: an expert with fewer layers than the VLM is not supported yet "
                          f"(num_expert_layers={config['num_expert_layers']}).")
    chunk, executed = config.get("chunk_size", 50), config.get("n_action_steps", 50)
    executed = getattr(model_cfg, "executed_steps", None) or executed
    if not 0 < executed <= chunk:
        raise FamilyError(f"SmolVLA executes {executed} of its {chunk}-action chunk; choose between 1 and {chunk}.")
    tok = _tokenizer_step(folder)
    name = config.get("vlm_model_name", DEFAULT_VLM)
    size = config.get("resize_imgs_with_padding") or [512, 512]
    return SmolVLASpec(
        vlm=vlm_sizes(folder, name), num_vlm_layers=config.get("num_vlm_layers", 16),
        self_attn_every_n_layers=config.get("self_attn_every_n_layers", 2),
        expert_width_multiplier=config.get("expert_width_multiplier", 0.75),
        attention_mode=config.get("attention_mode", "cross_attn"), image_size=int(size[0]),
        num_cameras=_cameras(config) + config.get("empty_cameras", 0), chunk_size=chunk, executed_steps=executed,
        max_state_dim=config.get("max_state_dim", 32), max_action_dim=config.get("max_action_dim", 32),
        num_steps=config.get("num_steps", 10), min_period=config.get("min_period", 4e-3),
        max_period=config.get("max_period", 4.0), tokenizer_name=tok.get("tokenizer_name", name),
        tokenizer_max_length=tok.get("max_length", config.get("tokenizer_max_length", 48)),
        stats=_lerobot_stats(folder, config, "smolvla"))
