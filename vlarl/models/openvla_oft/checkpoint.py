"""OpenVLA-OFT folders: an OpenVLA folder plus the component files upstream saves beside it.

Upstream (moojink/openvla-oft, vla-scripts/finetune.py and experiments/robot/openvla_utils.py):
`action_head--{step}_checkpoint.pt` (L1 head) and `proprio_projector--{step}_checkpoint.pt`, each a
torch.save of a DDP module's state dict (keys prefixed `module.`), found as the one file whose name
holds the component and "checkpoint". `vision_backbone--{step}_checkpoint.pt` marks a FiLM fine-tune
(use_film): the whole FiLM-wrapped vision backbone, which replaces model.safetensors' vision weights
(film.py). A `noisy_action_projector--*` (diffusion head) stops with a clear error.
`dataset_statistics.json` holds the fine-tune's action and proprio statistics (OpenVLA's loader
already prefers it).

The run configuration (chunk, cameras, head, attention) is not in upstream files: it comes from
`model.oft` (LIBERO defaults), checked against the tensors, and vlarl's exports write it to
vlarl_oft.json, so a vlarl-exported folder describes itself (its values then win over the defaults;
a model.oft value set to something else is an error).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch

from vlarl.models.openvla.checkpoint import load_openvla, read_header, save_openvla
from vlarl.models.openvla.config import OpenVLAConfigError, read_config, select_unnorm_key
from vlarl.models.openvla_oft import film
from vlarl.models.openvla_oft.modeling import OFTPolicy, OFTSpec

COMPONENTS = ("action_head", "proprio_projector")  # files vlarl loads, and the module each fills
UNSUPPORTED = {
    "noisy_action_projector": "a diffusion action head (use_diffusion), which vlarl does not train; use an L1-head "
                              "or discrete checkpoint",
}
RUN_CONFIG = "vlarl_oft.json"
SPEC_KEYS = ("chunk", "num_images", "head", "attention")  # model.oft keys a vlarl export records


def component_file(folder: Path, name: str) -> Path | None:
    """The one `{name}--*checkpoint*` file in the folder, or None."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith(f"{name}--")
                   and "checkpoint" in p.name)
    if len(found) > 1:
        raise OpenVLAConfigError(f"{folder} holds {len(found)} {name} checkpoints ({', '.join(p.name for p in found)});"
                                 " keep the one that belongs to the weights.")
    return found[0] if found else None


def load_component(path: Path) -> dict[str, torch.Tensor]:
    """A component file's state dict with the DDP `module.` prefix removed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file, said plainly
        raise OpenVLAConfigError(f"{path} is not a readable torch state dict ({e}); copy the file again.") from None
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_spec(folder: str | Path, oft_cfg, unnorm_key: str | None = None) -> tuple[OFTSpec, dict[str, torch.Tensor], dict | None]:
    """The run's OFTSpec from model.oft, vlarl_oft.json and the component tensors, checked against
    each other -> (spec, the component tensors under vlarl's parameter names, proprio statistics)."""
    folder = Path(folder)
    for name, why in UNSUPPORTED.items():
        if component_file(folder, name):
            raise OpenVLAConfigError(f"{folder} holds {name}--*checkpoint*: {why}.")
    settings = {k: oft_cfg[k] for k in (*SPEC_KEYS, "init_log_std")}
    recorded = {}
    if (folder / RUN_CONFIG).is_file():
        recorded = json.loads((folder / RUN_CONFIG).read_text())
        defaults = _schema_defaults()
        for key in SPEC_KEYS:
            if key in recorded and settings[key] not in (recorded[key], defaults[key], "auto"):
                raise OpenVLAConfigError(f"{folder}/{RUN_CONFIG} says {key}={recorded[key]} but model.oft.{key}="
                                         f"{settings[key]}; drop the override (the folder describes itself).")
            settings[key] = recorded.get(key, settings[key])
    cfg = read_config(folder)
    key = select_unnorm_key(cfg.norm_stats, unnorm_key)
    stats = cfg.norm_stats[key]
    action_dim, llm = len(stats["action"]["q01"]), cfg.text.hidden_size
    tensors: dict[str, torch.Tensor] = {}
    files = {name: component_file(folder, name) for name in COMPONENTS}
    head = settings["head"]
    if head == "auto":
        head = "l1" if files["action_head"] else "discrete"
    if head == "l1" and not files["action_head"]:
        raise OpenVLAConfigError(f"model.oft.head=l1 but {folder} has no action_head--*checkpoint.pt; use "
                                 "model.oft.head=discrete (or auto) for a discrete-token checkpoint.")
    if head == "discrete" and files["action_head"]:
        raise OpenVLAConfigError(f"{folder} holds an L1 action head ({files['action_head'].name}) but "
                                 "model.oft.head=discrete; set model.oft.head=auto or l1.")
    head_hidden = 0
    if head == "l1":
        state = load_component(files["action_head"])
        fc1, fc2 = state.get("model.fc1.weight"), state.get("model.fc2.weight")
        if fc1 is None or fc2 is None:
            raise OpenVLAConfigError(f"{files['action_head']} is not an L1 regression head (no model.fc1/fc2); "
                                     "only L1-head and discrete OFT checkpoints load.")
        if fc1.shape[1] != action_dim * llm or fc2.shape[0] != action_dim:
            raise OpenVLAConfigError(f"{files['action_head'].name} reads {fc1.shape[1]} features and writes "
                                     f"{fc2.shape[0]} values; the decoder ({llm} wide) and the action statistics "
                                     f"({action_dim}-D) need {action_dim * llm} and {action_dim}.")
        head_hidden = fc1.shape[0]
        tensors.update({f"action_head.{k}": v for k, v in state.items()})
        log_std = recorded.get("log_std") or [float(settings["init_log_std"])] * action_dim
        tensors["action_log_std"] = torch.tensor(log_std, dtype=torch.float32)
    proprio_dim = 0
    if files["proprio_projector"]:
        state = load_component(files["proprio_projector"])
        proprio_dim = state["fc1.weight"].shape[1]
        if state["fc1.weight"].shape[0] != llm:
            raise OpenVLAConfigError(f"{files['proprio_projector'].name} projects to {state['fc1.weight'].shape[0]}; "
                                     f"the decoder is {llm} wide.")
        q01 = (stats.get("proprio") or {}).get("q01")
        if q01 is not None and len(q01) != proprio_dim:
            raise OpenVLAConfigError(f"{folder}: the proprio projector reads {proprio_dim} values but the statistics "
                                     f"of {key} have {len(q01)}.")
        tensors.update({f"proprio_projector.{k}": v for k, v in state.items()})
    film_file = component_file(folder, film.FILE)
    if film_file:
        tensors.update(film.read_film(film_file, cfg, {k: v[0] for k, v in read_header(folder).items()}))
    spec = OFTSpec(chunk=int(settings["chunk"]), action_dim=action_dim, proprio_dim=proprio_dim,
                   num_images=int(settings["num_images"]), head=head, attention=settings["attention"],
                   head_hidden=head_hidden, init_log_std=float(settings["init_log_std"]), film=film_file is not None)
    return spec, tensors, stats.get("proprio")


def _schema_defaults() -> dict:
    from vlarl.config import OFTModelConfig

    return {f.name: f.default for f in fields(OFTModelConfig)}


def load_oft(folder: str | Path, model_cfg):
    """An OFT folder -> (OFTPolicy, tokenizer, OpenVLA's action tokenizer for 7-D actions)."""
    spec, tensors, proprio_stats = read_spec(folder, model_cfg.oft, model_cfg.unnorm_key)

    def policy(cfg, mlps, projector_hidden, pixel_spec, action_dim):
        return OFTPolicy(cfg, mlps, projector_hidden, pixel_spec, spec, proprio_stats)

    return load_openvla(folder, model_cfg.dtype, model_cfg.unnorm_key, policy=policy, extra=tensors)


def run_config(model: OFTPolicy) -> dict:
    """vlarl_oft.json: what a later load needs that upstream files do not say."""
    spec = asdict(model.spec)
    out = {k: spec[k] for k in (*SPEC_KEYS, "action_dim", "proprio_dim")}
    if model.action_log_std is not None:
        out["log_std"] = [float(x) for x in model.action_log_std.detach().float().cpu()]
    return out


def save_oft(folder: str | Path, model: OFTPolicy, tokenizer, base_folder: str | Path | None = None,
             state_dict: dict | None = None, **kwargs) -> None:
    """The OpenVLA folder (save_openvla), the component files under upstream names (the base's file
    names, else `{component}--0_checkpoint.pt`; DDP `module.` keys, the base file's dtypes), a FiLM
    model's vision_backbone file in the base file's layout (film.py), and vlarl_oft.json."""
    folder = Path(folder)
    base = Path(base_folder or model.source_folder or "")
    save_openvla(folder, model, tokenizer, base, state_dict=state_dict, **kwargs)
    state = state_dict if state_dict is not None else model.state_dict()
    for name in COMPONENTS:
        for stale in folder.glob(f"{name}--*checkpoint*"):
            stale.unlink()
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        if not sub:
            continue
        source = component_file(base, name) if base.is_dir() else None
        dtypes = {k: v.dtype for k, v in load_component(source).items()} if source else {}
        out = {f"module.{k}": v.detach().to("cpu", dtypes.get(k, torch.float32)).contiguous().clone()
               for k, v in sub.items()}
        torch.save(out, folder / (source.name if source else f"{name}--0_checkpoint.pt"))
    for stale in folder.glob(f"{film.FILE}--*checkpoint*"):
        stale.unlink()
    if model.film is not None:
        source = component_file(base, film.FILE) if base.is_dir() else None
        if source is None:
            raise OpenVLAConfigError(f"saving a FiLM model needs its base folder's {film.FILE}--*checkpoint.pt (its "
                                     f"LoRA layout); {base} has none. Pass the folder the model was loaded from.")
        torch.save(film.film_state(model, state, source), folder / source.name)
    config = run_config(model)
    if "action_log_std" in state:
        config["log_std"] = [float(x) for x in state["action_log_std"].detach().float().cpu()]
    (folder / RUN_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
