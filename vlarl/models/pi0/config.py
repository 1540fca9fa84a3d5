"""What a pi0 folder says about its model: layout, sizes, run constants, normaliser statistics.

Two layouts hold the same tensors:
- LeRobot (`lerobot/pi0_base`, `lerobot/pi0_libero*`; src/lerobot/policies/pi0/): config.json with
  `"type": "pi0"` (draccus), `model.safetensors` with keys under `model.`, the normaliser statistics in
  `policy_preprocessor.json` + the state file its `normalizer_processor` step names
  (`policy_preprocessor_step_<i>_normalizer_processor.safetensors`, keys `<feature>.mean|std|...`), and
  `policy_postprocessor*` likewise. Sizes are named: `paligemma_variant: gemma_2b`,
  `action_expert_variant: gemma_300m`; the tokenizer is named by the `tokenizer_processor` step.
- openpi's PyTorch export (examples/convert_jax_model_to_pytorch.py): config.json `{action_dim,
  action_horizon, paligemma_variant, action_expert_variant, precision}`, `model.safetensors` without
  the `model.` prefix, statistics in `assets/<asset_id>/norm_stats.json` (`{"norm_stats": {"state":
  {mean, std, q01, q99}, "actions": {...}}}`).
pi0.5 folders (`"type": "pi05"`, LeRobot src/lerobot/policies/pi05/; openpi's export of a pi05 config)
have the same layouts; openpi's config.json does not say which model it holds, the weights do
(`time_mlp_in`). pi0.5 normalises by quantiles (q01/q99) where pi0 uses mean/std.
Tiny test folders (vlarl/models/pi0/tiny.py) add `arch.json` with explicit sizes, which wins.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from vlarl.models.family import FamilyError

ARCH_FILE = "arch.json"
DEFAULT_TOKENIZER = "google/paligemma-3b-pt-224"  # lerobot processor_pi0.py TokenizerProcessorStep


@dataclass
class GemmaSize:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass
class VisionSize:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int


# lerobot modeling_pi0.py get_gemma_config (= openpi gemma.py get_config)
VARIANTS = {"gemma_2b": GemmaSize(2048, 18, 16384, 8, 1, 256), "gemma_300m": GemmaSize(1024, 18, 4096, 8, 1, 256)}
SO400M = VisionSize(1152, 4304, 27, 16, 14)  # SigLIP so400m/14 (PaliGemma's vision tower)
PALIGEMMA_VOCAB = 257152
TOKENIZER_MAX_LENGTH = {"pi0": 48, "pi05": 200}  # LeRobot configuration_pi0/pi05.py (openpi max_token_len)


@dataclass
class Pi0Stats:
    """State and action normalisation, per dimension. "mean_std" (pi0): x_n = (x - mean) / (std + norm_eps),
    x = x_n * (std + unnorm_eps) + mean (LeRobot 1e-8 / 0; openpi 1e-6 / 1e-6). "quantiles" (pi0.5):
    x_n = 2 (x - q01) / d - 1, x = (x_n + 1) d / 2 + q01 with d = q99 - q01 + unnorm_eps (LeRobot 0, a
    zero span taken as 1e-8; openpi 1e-6). Both are affine: `affine` gives (offset, scale) per use."""

    state_mean: list[float]  # (S,) (quantiles: q01)
    state_std: list[float]  # (S,) (quantiles: q99)
    action_mean: list[float]  # (D,) (quantiles: q01)
    action_std: list[float]  # (D,) (quantiles: q99)
    norm_eps: float
    unnorm_eps: float
    mode: str = "mean_std"

    def affine(self, what: str, unnormalise: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """what "state" | "action" -> (offset, scale): x_n = (x - offset) / scale, x = x_n * scale + offset."""
        a = np.asarray(getattr(self, f"{what}_mean"), np.float32)
        b = np.asarray(getattr(self, f"{what}_std"), np.float32)
        if self.mode == "mean_std":
            return a, b + np.float32(self.unnorm_eps if unnormalise else self.norm_eps)
        span = b - a + np.float32(self.unnorm_eps)
        span = np.where(span == 0, np.float32(1e-8), span)
        return a + span / 2, span / 2


class StatsDims:
    """State and action dims of a spec that holds `stats` (pi0, pi0.5, SmolVLA)."""

    @property
    def state_dim(self) -> int:
        return len(self.stats.state_mean)

    @property
    def action_dim(self) -> int:
        return len(self.stats.action_mean)


@dataclass
class Pi0Spec(StatsDims):
    layout: str  # "lerobot" | "openpi"
    kind: str  # "pi0" | "pi05"
    vocab_size: int
    paligemma: GemmaSize
    action_expert: GemmaSize
    vision: VisionSize
    image_size: int  # camera side the vision tower reads
    num_cameras: int  # cameras laid side by side in vlarl's image array
    chunk_size: int  # actions denoised per call (openpi action_horizon)
    executed_steps: int  # actions executed per call (LeRobot n_action_steps)
    max_state_dim: int
    max_action_dim: int
    num_inference_steps: int
    min_period: float
    max_period: float
    tokenizer_name: str
    tokenizer_max_length: int
    stats: Pi0Stats = field(repr=False)


def layout_of(config: dict) -> str | None:
    """"lerobot", "openpi" or None (neither a pi0 nor a pi0.5 folder) from config.json."""
    if config.get("type") in ("pi0", "pi05"):
        return "lerobot"
    if "type" not in config and "model_type" not in config and {"action_horizon", "paligemma_variant"} <= config.keys():
        return "openpi"
    return None


def kind_of(folder: str | Path | None, config: dict) -> str | None:
    """"pi0", "pi05" or None: LeRobot's config names it; openpi's export does not, its weights do
    (pi0.5 has time_mlp_* where pi0 has state_proj and action_time_mlp_*)."""
    layout = layout_of(config)
    if layout == "lerobot":
        return config["type"]
    if layout is None:
        return None
    path = Path(folder or ".") / "model.safetensors"
    if folder is None or not path.is_file():
        return "pi0"  # check() then names the missing weights
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        return "pi05" if "time_mlp_in.weight" in set(f.keys()) else "pi0"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FamilyError(f"{path} is missing; copy the whole pi0 folder.") from None


def _variant(name: str) -> GemmaSize:
    if name not in VARIANTS:
        raise FamilyError(f"pi0 size {name!r} is unknown; known: {', '.join(VARIANTS)}.")
    return VARIANTS[name]


def _step_state(folder: Path, pipeline: str, registry_name: str) -> dict[str, np.ndarray]:
    """The state tensors of the first `registry_name` step of a LeRobot processor pipeline file."""
    config = _json(folder / f"{pipeline}.json")
    for step in config.get("steps", []):
        if step.get("registry_name") == registry_name and step.get("state_file"):
            return load_file(folder / step["state_file"])
    raise FamilyError(f"{folder / (pipeline + '.json')} has no {registry_name} step with statistics; "
                      "the folder is not a complete LeRobot pi0 export.")


def _tokenizer_step(folder: Path) -> dict:
    config = _json(folder / "policy_preprocessor.json")
    return next((s.get("config", {}) for s in config.get("steps", [])
                 if s.get("registry_name") == "tokenizer_processor"), {})


MODES = {"MEAN_STD": ("mean_std", "mean", "std"), "QUANTILES": ("quantiles", "q01", "q99")}


def _lerobot_stats(folder: Path, config: dict, kind: str) -> Pi0Stats:
    state = _step_state(folder, "policy_preprocessor", "normalizer_processor")
    default = "QUANTILES" if kind == "pi05" else "MEAN_STD"
    modes = {k: config.get("normalization_mapping", {}).get(k, default) for k in ("STATE", "ACTION")}
    if len(set(modes.values())) > 1 or modes["STATE"] not in MODES:
        raise FamilyError(f"{folder}/config.json normalises with {modes}; vlarl reads MEAN_STD or QUANTILES, the same "
                          "for state and action.")
    mode, lo, hi = MODES[modes["STATE"]]
    try:
        return Pi0Stats(state[f"observation.state.{lo}"].tolist(), state[f"observation.state.{hi}"].tolist(),
                        state[f"action.{lo}"].tolist(), state[f"action.{hi}"].tolist(),
                        1e-8 if mode == "mean_std" else 0.0, 0.0, mode)
    except KeyError as e:
        raise FamilyError(f"{folder}: the normalizer statistics lack {e}; the folder is not a {kind} fine-tune.") from None


def asset_ids(folder: Path) -> list[str]:
    """The asset ids (paths under assets/, e.g. openpi's "physical-intelligence/libero") with statistics."""
    root = folder / "assets"
    return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("norm_stats.json"))


def _openpi_stats(folder: Path, asset_id: str | None, kind: str) -> Pi0Stats:
    ids = asset_ids(folder)
    if not ids:
        raise FamilyError(f"{folder}/assets/<asset_id>/norm_stats.json is missing; copy the checkpoint's assets folder.")
    if asset_id is None and len(ids) > 1:
        raise FamilyError(f"{folder} holds statistics for {', '.join(ids)}; set model.unnorm_key to one of them.")
    asset_id = asset_id or ids[0]
    if asset_id not in ids:
        raise FamilyError(f"{folder} has no statistics {asset_id!r}; set model.unnorm_key to one of {', '.join(ids)}.")
    stats = _json(folder / "assets" / asset_id / "norm_stats.json")["norm_stats"]
    # openpi transforms.py Normalize / Unnormalize; pi0.5 configs normalise by quantiles (use_quantile_norm).
    mode, lo, hi = MODES["QUANTILES" if kind == "pi05" else "MEAN_STD"]
    return Pi0Stats(stats["state"][lo], stats["state"][hi], stats["actions"][lo], stats["actions"][hi], 1e-6, 1e-6, mode)


def _cameras(config: dict, ignore: frozenset[str] = frozenset()) -> int:
    """The folder's cameras: its VISUAL input features, less those named in `ignore`."""
    features = config.get("input_features") or {}
    return max(1, sum(1 for k, f in features.items() if f.get("type") == "VISUAL" and k not in ignore))


def read_spec(folder: str | Path, model_cfg=None) -> Pi0Spec:
    folder = Path(folder)
    config = _json(folder / "config.json")
    layout, kind = layout_of(config), kind_of(folder, config)
    if layout is None:
        raise FamilyError(f"{folder}/config.json is not a pi0 or pi0.5 config (neither LeRobot's type=pi0|pi05 nor "
                          "openpi's export).")
    arch = _json(folder / ARCH_FILE) if (folder / ARCH_FILE).is_file() else {}
    max_tokens = TOKENIZER_MAX_LENGTH[kind]
    if layout == "lerobot":
        stats = _lerobot_stats(folder, config, kind)
        resolution = config.get("image_resolution", [224, 224])
        tok = _tokenizer_step(folder)
        chunk, executed = config.get("chunk_size", 50), config.get("n_action_steps", 50)
        spec = dict(max_state_dim=config.get("max_state_dim", 32), max_action_dim=config.get("max_action_dim", 32),
                    num_inference_steps=config.get("num_inference_steps", 10), min_period=config.get("min_period", 4e-3),
                    max_period=config.get("max_period", 4.0), image_size=int(resolution[0]),
                    num_cameras=_cameras(config), tokenizer_name=tok.get("tokenizer_name", DEFAULT_TOKENIZER),
                    tokenizer_max_length=tok.get("max_length", config.get("tokenizer_max_length", max_tokens)))
    else:
        stats = _openpi_stats(folder, getattr(model_cfg, "unnorm_key", None), kind)
        chunk = executed = config["action_horizon"]
        spec = dict(max_state_dim=config.get("action_dim", 32), max_action_dim=config.get("action_dim", 32),
                    num_inference_steps=10, min_period=4e-3, max_period=4.0, image_size=arch.get("image_size", 224),
                    num_cameras=arch.get("num_cameras", 2),  # LIBERO: base + left wrist (the right wrist is masked)
                    tokenizer_name=DEFAULT_TOKENIZER, tokenizer_max_length=max_tokens)
    executed = getattr(model_cfg, "executed_steps", None) or executed
    if not 0 < executed <= chunk:
        raise FamilyError(f"pi0 executes {executed} of its {chunk}-action chunk; choose between 1 and {chunk}.")
    if "paligemma" in arch:
        sizes = dict(vocab_size=arch["vocab_size"], paligemma=GemmaSize(**arch["paligemma"]),
                     action_expert=GemmaSize(**arch["action_expert"]), vision=VisionSize(**arch["vision"]))
    else:
        sizes = dict(vocab_size=PALIGEMMA_VOCAB, paligemma=_variant(config.get("paligemma_variant", "gemma_2b")),
                     action_expert=_variant(config.get("action_expert_variant", "gemma_300m")), vision=SO400M)
    return Pi0Spec(layout=layout, kind=kind, chunk_size=chunk, executed_steps=executed, stats=stats, **sizes, **spec)


def arch_dict(spec: Pi0Spec) -> dict:
    """arch.json content for a spec (tiny folders)."""
    return {"vocab_size": spec.vocab_size, "paligemma": asdict(spec.paligemma),
            "action_expert": asdict(spec.action_expert), "vision": asdict(spec.vision)}
