"""pi0 weights: upstream key names <-> transformers' PI0ForConditionalGeneration, and the folder's files.

Upstream names (LeRobot modeling_pi0.py PI0Pytorch / openpi pi0_pytorch.py; LeRobot adds `model.`):
`paligemma_with_expert.paligemma.model.{vision_tower.vision_model,multi_modal_projector,language_model}.*`,
`paligemma_with_expert.paligemma.lm_head.weight` (tied to the Gemma embeddings; checkpoints may hold
only this copy), `paligemma_with_expert.gemma_expert.model.{layers,norm}.*`,
`paligemma_with_expert.gemma_expert.lm_head.weight`, `{state_proj,action_in_proj,action_time_mlp_in,
action_time_mlp_out,action_out_proj}.*`. transformers' names follow its own conversion mapping
(conversion_mapping.py "pi0"; SigLIP without `vision_model.`). A load records the source key list and
dtypes, so a save writes back exactly the key set, shapes and dtypes it read.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
VALUE_HEAD = "value_head.safetensors"  # vlarl's value head (and Flow-Noise head), never among the weights
PI05_KEYS = ("time_mlp_in.weight", "time_mlp_out.weight")

# (upstream pattern, vlarl backbone name), first match wins; applied to names without `model.`.
SHARED_RULES = [
    (r"^paligemma_with_expert\.paligemma\.model\.vision_tower\.vision_model\.", "model.vlm.vision_tower."),
    (r"^paligemma_with_expert\.paligemma\.model\.", "model.vlm."),
    (r"^paligemma_with_expert\.paligemma\.lm_head\.weight$", "model.vlm.language_model.embed_tokens.weight"),
    (r"^paligemma_with_expert\.gemma_expert\.model\.", "model.dit."),
    (r"^paligemma_with_expert\.gemma_expert\.lm_head\.weight$", "model.dit.embed_tokens.weight"),
    (r"^action_out_proj\.", "action_out_proj."),
]
RULES = {  # pi0: transformers' PI0ForConditionalGeneration; pi0.5: vlarl/models/pi05/modeling.py Pi05Backbone
    "pi0": [*SHARED_RULES,
            (r"^(state_proj|action_in_proj|action_time_mlp_in|action_time_mlp_out)\.", r"embed_action_time.\1.")],
    "pi05": [*SHARED_RULES, (r"^(action_in_proj|time_mlp_in|time_mlp_out)\.", r"\1.")],
    # vlarl/models/smolvla/modeling.py SmolVLABackbone (LeRobot's VLAFlowMatching without `vlm_with_expert.`)
    "smolvla": [(r"^vlm_with_expert\.(vlm|lm_expert)\.", r"\1."),
                (r"^(state_proj|action_in_proj|action_out_proj|action_time_mlp_in|action_time_mlp_out)\.", r"\1.")],
}


def prefix_of(layout: str) -> str:
    return "model." if layout == "lerobot" else ""


def to_transformers(name: str, layout: str, kind: str = "pi0") -> str:
    """One upstream key -> the backbone key (KeyError when unknown)."""
    prefix = prefix_of(layout)
    bare = name[len(prefix):] if prefix and name.startswith(prefix) else name
    for pattern, repl in RULES[kind]:
        if re.match(pattern, bare):
            return re.sub(pattern, repl, bare)
    raise KeyError(name)


def read_weights(folder: Path, layout: str, kind: str = "pi0") -> tuple[dict[str, torch.Tensor],
                                                                        list[tuple[str, str, torch.dtype]]]:
    """-> transformers-named state (aliases collapse onto one tensor), source record [(upstream, transformers, dtype)]."""
    raw = load_file(Path(folder) / WEIGHTS)
    state, record = {}, []
    for name, tensor in raw.items():
        target = to_transformers(name, layout, kind)
        record.append((name, target, tensor.dtype))
        # Both copies of a tied pair may be stored; the embedding (not lm_head) wins when they differ.
        if target not in state or ".lm_head." not in name:
            state[target] = tensor
    return state, record


def write_weights(folder: Path, state: dict[str, torch.Tensor], record: list[tuple[str, str, torch.dtype]]) -> None:
    """The upstream file: every recorded key, from its transformers tensor, in its recorded dtype."""
    out = {name: state[target].detach().to("cpu", dtype).contiguous() for name, target, dtype in record}
    # Tied copies must not share memory in a safetensors file.
    seen: set[int] = set()
    for name, t in out.items():
        if t.data_ptr() in seen:
            out[name] = t.clone()
        seen.add(out[name].data_ptr())
    save_file(out, Path(folder) / WEIGHTS, metadata={"format": "pt"})


def side_files(folder: Path) -> dict[str, bytes]:
    """Every file of the folder but the weights and vlarl's heads (configs, statistics, assets), by relative path."""
    folder = Path(folder)
    skip = {WEIGHTS, VALUE_HEAD}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in skip}


def write_side_files(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = Path(folder) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
