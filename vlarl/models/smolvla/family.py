"""The SmolVLA family (vlarl/models/family.py): LeRobot `smolvla` folders in, the same layout out.

Settings read from `model`: dtype, flow (the run's sampler replaces the plain ODE for RL), tokenizer_path
(a folder with the SmolVLM2 tokenizer; else the id the folder names, from the local Hugging Face cache),
executed_steps (actions executed per call; else n_action_steps). vlarl's value and Flow-Noise heads
live in value_head.safetensors beside the weights, as for pi0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlarl.models.family import DTYPES, Family, FamilyError, Loaded, Supervised
from vlarl.models.pi0.actions import Pi0Actions
from vlarl.models.pi0.checkpoint import WEIGHTS, read_weights, side_files
from vlarl.models.pi0.family import libero_cameras, load_heads, load_tokenizer, save_pi0
from vlarl.models.pi0.modeling import Pi0Settings
from vlarl.models.smolvla.config import SmolVLASpec, is_smolvla, read_spec
from vlarl.models.smolvla.modeling import SmolVLAPolicy
from vlarl.models.tiny_flow.family import flow_matching, sampler_settings

UNUSED = {"vlm.lm_head.weight"}  # SmolVLM's language head: SmolVLA never decodes text
IMAGE_TOKENS = ("fake_image_token", "global_image_token")  # SmolVLM2's tokenizer_config.json extra_special_tokens


def image_token_ids(spec: SmolVLASpec, tokenizer, folder: Path) -> tuple[int, int] | None:
    """The tokenizer's (fake_image_token_id, global_image_token_id) when the folder adds image special
    tokens (modeling_smolvla.py reads them from the SmolVLM2 processor's tokenizer), else None."""
    if not spec.add_image_special_tokens:
        return None
    ids = []
    for name in IMAGE_TOKENS:
        token = getattr(tokenizer, name, None)
        if token is None or str(token) not in tokenizer.get_vocab():
            raise FamilyError(f"{folder} sets add_image_special_tokens=true, but its tokenizer has no {name}; set "
                              "model.tokenizer_path to the SmolVLM2 tokenizer the checkpoint was trained with.")
        ids.append(tokenizer.convert_tokens_to_ids(str(token)))
    return ids[0], ids[1]


def load_smolvla(folder: Path, model_cfg) -> Loaded:
    spec = read_spec(folder, model_cfg)
    if not (folder / WEIGHTS).is_file():
        raise FamilyError(f"{folder / WEIGHTS} is missing; copy the whole SmolVLA folder.")
    settings = Pi0Settings(action_dim=spec.action_dim * spec.executed_steps, value_from=model_cfg.value_from,
                           **sampler_settings(model_cfg.flow))
    tokenizer = load_tokenizer(spec, model_cfg)
    model = SmolVLAPolicy(spec, settings, init_weights=False,  # every weight comes from the folder
                          image_token_ids=image_token_ids(spec, tokenizer, folder))
    state, record = read_weights(folder, spec.layout, "smolvla")
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if set(missing) - UNUSED or unexpected:
        raise FamilyError(f"{folder / WEIGHTS} does not fit SmolVLA at the folder's sizes (missing "
                          f"{sorted(set(missing) - UNUSED)[:3]}, unexpected {sorted(unexpected)[:3]}); the folder is "
                          "damaged, or its vlm_model_name names another backbone.")
    for name in set(missing) & UNUSED:
        torch.nn.init.zeros_(model.backbone.get_parameter(name))  # the same in every process
    load_heads(model, folder)
    model.source_record, model.source_files = record, side_files(folder)
    model.to(DTYPES[model_cfg.dtype])
    return Loaded(model, tokenizer, Pi0Actions(spec.stats, spec.executed_steps), SmolVLA())


class SmolVLA(Family):
    name = "smolvla"
    serves_vllm = False  # its actions come from the action expert, in PyTorch
    action_expert = True
    supervised = Supervised(flow_matching, 1e-4)  # LeRobot configuration_smolvla.py optimizer_lr

    def recognises(self, config: dict, folder: Path | None = None) -> bool:
        return is_smolvla(config)

    def check(self, folder: Path, model_cfg) -> None:
        spec = read_spec(folder, model_cfg)
        image_token_ids(spec, load_tokenizer(spec, model_cfg), folder)

    def actions_per_call(self, folder: Path, model_cfg) -> int:
        return read_spec(folder, model_cfg).executed_steps

    def load(self, folder: Path, model_cfg) -> Loaded:
        return load_smolvla(Path(folder), model_cfg)

    def save(self, folder: Path, loaded: Loaded, state_dict: dict | None = None) -> None:
        save_pi0(folder, loaded.model, state_dict)

    def frame_transform(self, env_name: str, model_cfg):
        """LIBERO: the checkpoint's cameras side by side (agentview | wrist); the model resizes each to
        its image size. Other envs: None."""
        return libero_cameras(env_name, model_cfg, read_spec)
