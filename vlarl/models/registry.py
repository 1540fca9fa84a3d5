"""The model families and how a folder finds its family.

A folder's family comes from its config.json (`model_type`, `architectures` or a `"type"` field,
each family says what it recognises); `model.family=NAME` overrides the detection. A new family is a
new subpackage plus one line in FAMILIES.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlarl.models.family import Family, FamilyError, Loaded
from vlarl.models.openvla.family import OpenVLA
from vlarl.models.openvla_oft.family import OpenVLAOFT
from vlarl.models.pi0.family import Pi0
from vlarl.models.pi05.family import Pi05
from vlarl.models.smolvla.family import SmolVLA
from vlarl.models.tiny_flow.family import TinyFlow
from vlarl.models.tiny_token.family import TinyToken

# Detection asks in this order: OpenVLA-OFT (an OpenVLA folder with OFT's files) before OpenVLA.
FAMILIES: dict[str, Family] = {f.name: f for f in (TinyToken(), TinyFlow(), OpenVLAOFT(), OpenVLA(), Pi0(), Pi05(),
                                                   SmolVLA())}


def default_model_cfg():
    """`model` settings when a caller gives none (tests, tools): the schema's defaults."""
    from omegaconf import OmegaConf

    from vlarl.config import ModelConfig

    return OmegaConf.structured(ModelConfig)


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise FamilyError(f"model.family={name} is unknown; choose one of {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def read_folder_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json); check model.path.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FamilyError(f"{path} is not valid JSON ({e}); the folder is damaged, copy it again.") from None


def family_of_folder(folder: str | Path, override: str | None = None) -> Family:
    """The family `override` names, or the one that recognises the folder's config.json."""
    config = read_folder_config(folder)
    if override:
        return family_named(override)
    found = [f for f in FAMILIES.values() if f.recognises(config, Path(folder))]
    if not found:
        what = config.get("model_type") or config.get("type") or config.get("architectures")
        raise FamilyError(f"{folder} holds a {what!r} model, which no family recognises; set model.family to one of "
                          f"{', '.join(FAMILIES)} if it is one of them.")
    return found[0]


def tiny_family(model_cfg) -> Family:
    """The family whose tiny configuration a run builds when model.path is null."""
    return family_named(model_cfg.family or ("tiny_flow" if model_cfg.policy == "flow" else "tiny_token"))


def load_model(folder: str | Path, model_cfg=None, device: str | None = None) -> Loaded:
    """Load a model folder through its family; `model_cfg` is the run's `model` section (dtype,
    family override, sampler settings, ...), the schema's defaults when None. With `device` (where
    the model will run) its attention kernel is set from model.attn_implementation."""
    model_cfg = model_cfg if model_cfg is not None else default_model_cfg()
    folder = Path(folder)
    loaded = family_of_folder(folder, model_cfg.family).load(folder, model_cfg)
    if device is not None:
        from vlarl.models.attention import set_attention

        set_attention(loaded.model, model_cfg.attn_implementation, device)
    return loaded


def build_tiny_model(model_cfg, image_size: int, instructions: list[str], seed: int = 0, action_chunk: int = 1
                     ) -> Loaded:
    """The tiny policy the run's `model` section describes (token or flow VLA)."""
    return tiny_family(model_cfg).build_tiny(model_cfg, image_size, instructions, seed, action_chunk)


def save_model(folder: str | Path, loaded: Loaded, state_dict: dict | None = None) -> None:
    """Write `loaded` in its family's own layout (`state_dict` replaces the module's weights)."""
    loaded.family.save(Path(folder), loaded, state_dict)
