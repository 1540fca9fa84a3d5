"""What a SmolVLA folder says about its model (LeRobot src/lerobot/policies/smolvla/, `lerobot/smolvla_base`
and its fine-tunes).

The folder: config.json with `"type": "smolvla"` (draccus; num_vlm_layers, self_attn_every_n_layers,
expert_width_multiplier, attention_mode, chunk_size, n_action_steps, resize_imgs_with_padding,
tokenizer_max_length, vlm_model_name, ...), model.safetensors with keys under `model.`, and the
normaliser statistics as in pi0's LeRobot layout (mean/std). The SmolVLM2 backbone's own sizes are not
in the folder: `vlm_model_name` names them (a hub id or a local folder). They come from, in order:
arch.json beside config.json (tiny test folders write it), a local folder's config.json, the Hugging
Face cache, and a table of the known SmolVLM2 ids.

Two options change the model (smolvlm_with_expert.py, modeling_smolvla.py embed_prefix):
- num_expert_layers > 0 (a divisor of num_vlm_layers; <= 0 means as many): expert layer j pairs with VLM
  layer j * num_vlm_layers // num_expert_layers (get_model_layers); the VLM layers between pass the
  actions through unchanged. Whether a layer self- or cross-attends follows the VLM layer's index.
- add_image_special_tokens: each camera's tokens sit between the tokenizer's fake_image_token and
  global_image_token, and one more fake_image_token (vlarl/models/smolvla/modeling.py).
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
    num_expert_layers: int  # the expert's layers: num_vlm_layers, or a divisor of it (fewer, spread evenly)
    self_attn_every_n_layers: int  # VLM layer i's expert layer self-attends (jointly with the prefix) when i % n == 0
    expert_width_multiplier: float
    attention_mode: str  # "cross_attn" (interleaved) | "self_attn" (every layer joint)
    add_image_special_tokens: bool  # each camera between <fake_token_around_image><global-img> and <fake_...>
    image_size: int  # cameras are resized (with padding) to this square
    num_cameras: int  # the folder's cameras, empty ones included
    empty_cameras: int  # of num_cameras, the padded (fully masked) ones LeRobot adds when cameras are missing
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

    @property
    def expert_stride(self) -> int:
        """VLM layers per expert layer: expert layer j reads VLM layer j * expert_stride."""
        return self.num_vlm_layers // self.num_expert_layers

    def vlm_config(self) -> SmolVLMConfig:
        """transformers' SmolVLMConfig, cut to num_vlm_layers, with SmolVLA's RoPE base."""
        text = dict(self.vlm["text_config"], num_hidden_layers=self.num_vlm_layers,
                    rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
        text.pop("rope_theta", None)
        return SmolVLMConfig(text_config=text, vision_config=self.vlm["vision_config"],
                             scale_factor=self.vlm["scale_factor"], image_token_id=self.vlm["image_token_id"])


def is_cross(spec: SmolVLASpec, layer: int) -> bool:
    """Whether `layer` cross-attends (upstream's test, for VLM layer indices in the forward and for expert
    layer indices when it sizes their k/v projections)."""
    if "cross" not in spec.attention_mode:
        return False
    n = spec.self_attn_every_n_layers
    return not (n > 0 and layer % n == 0)


def _check_expert_layers(folder: Path, spec: SmolVLASpec) -> None:
    """LeRobot sizes expert layer j's k/v projections by is_cross(j) but runs it as VLM layer j * stride does;
    where the two disagree its model does not fit together (a shape error), so neither can vlarl's."""
    for j in range(spec.num_expert_layers):
        if is_cross(spec, j) != is_cross(spec, j * spec.expert_stride):
            raise FamilyError(
                f"{folder}: SmolVLA's expert layer {j} pairs with VLM layer {j * spec.expert_stride}, which "
                f"{'cross' if is_cross(spec, j * spec.expert_stride) else 'self'}-attends, but LeRobot shapes the "
                f"layer's k/v projections for {'cross' if is_cross(spec, j) else 'self'}-attention; LeRobot cannot "
                f"run num_vlm_layers={spec.num_vlm_layers}, num_expert_layers={spec.num_expert_layers}, "
                f"self_attn_every_n_layers={spec.self_attn_every_n_layers} either (choose an n coprime with "
                f"{spec.expert_stride}).")


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


def _real_cameras(config: dict, empty: int) -> int:
    """The folder's real cameras: LeRobot's saved input_features may already list its empty ones
    (configuration_smolvla.py validate_features names them observation.images.empty_camera_<i>)."""
    return _cameras(config, frozenset(f"observation.images.empty_camera_{i}" for i in range(empty)))


def is_smolvla(config: dict) -> bool:
    return config.get("type") == "smolvla"


def read_spec(folder: str | Path, model_cfg=None) -> SmolVLASpec:
    folder = Path(folder)
    config = _json(folder / "config.json")
    if not is_smolvla(config):
        raise FamilyError(f"{folder}/config.json is not a SmolVLA config (LeRobot's \"type\": \"smolvla\").")
    chunk, executed = config.get("chunk_size", 50), config.get("n_action_steps", 50)
    executed = getattr(model_cfg, "executed_steps", None) or executed
    if not 0 < executed <= chunk:
        raise FamilyError(f"SmolVLA executes {executed} of its {chunk}-action chunk; choose between 1 and {chunk}.")
    tok = _tokenizer_step(folder)
    name = config.get("vlm_model_name", DEFAULT_VLM)
    size = config.get("resize_imgs_with_padding") or [512, 512]
    vlm = vlm_sizes(folder, name)
    layers = config.get("num_vlm_layers", 16)
    layers = layers if layers > 0 else vlm["text_config"]["num_hidden_layers"]  # <= 0: LeRobot keeps them all
    experts = config.get("num_expert_layers", -1)
    experts = experts if experts > 0 else layers
    if layers % experts:
        raise FamilyError(f"{folder}: SmolVLA's num_vlm_layers={layers} is not a multiple of num_expert_layers="
                          f"{experts} (LeRobot requires it); fix the folder's config.json.")
    empty = config.get("empty_cameras", 0)
    spec = SmolVLASpec(
        vlm=vlm, num_vlm_layers=layers, num_expert_layers=experts,
        self_attn_every_n_layers=config.get("self_attn_every_n_layers", 2),
        expert_width_multiplier=config.get("expert_width_multiplier", 0.75),
        attention_mode=config.get("attention_mode", "cross_attn"),
        add_image_special_tokens=bool(config.get("add_image_special_tokens", False)), image_size=int(size[0]),
        num_cameras=_real_cameras(config, empty) + empty, empty_cameras=empty, chunk_size=chunk, executed_steps=executed,
        max_state_dim=config.get("max_state_dim", 32), max_action_dim=config.get("max_action_dim", 32),
        num_steps=config.get("num_steps", 10), min_period=config.get("min_period", 4e-3),
        max_period=config.get("max_period", 4.0), tokenizer_name=tok.get("tokenizer_name", name),
        tokenizer_max_length=tok.get("max_length", config.get("tokenizer_max_length", 48)),
        stats=_lerobot_stats(folder, config, "smolvla"))
    _check_expert_layers(folder, spec)
    return spec
