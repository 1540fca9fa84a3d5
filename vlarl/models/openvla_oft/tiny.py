"""Write a tiny random OpenVLA-OFT folder in the upstream layout:
`python -m vlarl.models.openvla_oft.tiny OUT --head discrete|l1 [--film]`.

The tiny OpenVLA folder (vlarl/models/openvla/tiny.py) plus what an OFT LIBERO fine-tune adds:
`proprio_projector--50000_checkpoint.pt` and, for the L1 head, `action_head--50000_checkpoint.pt`
(torch.save of DDP state dicts: keys `module.*`, bfloat16 as upstream's `init_module(to_bf16=True)`),
and dataset_statistics.json holding one LIBERO dataset with action and 8-D proprio statistics. No
vlarl_oft.json: like an upstream folder it does not say its chunk or cameras (model.oft does).

`film=True` adds `vision_backbone--50000_checkpoint.pt` as a use_film fine-tune saves it (film.py):
keys `vision_backbone.{tower}.*` without DDP's prefix, blocks nested under `.block.`, the folder's vision
tensors as LoRA base layers with random rank-32 LoRA pairs (finetune.py's default rank) wherever
all-linear LoRA puts them, and random scale/shift for every block. bfloat16 like the backbone, except
scale/shift: upstream creates them after the model's bfloat16 cast and never casts them, so float32.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlarl.models.openvla import vision
from vlarl.models.openvla.config import parse_config
from vlarl.models.openvla.modeling import TOWER_NAMES
from vlarl.models.openvla.tiny import LIBERO_SPATIAL, write_tiny_openvla
from vlarl.models.openvla_oft.film import LORA_NAMES
from vlarl.models.openvla_oft.heads import L1Head, ProprioProjector

STEP = 50000
LORA_RANK = 32  # finetune.py's default lora_rank; scaling min(32, 16) / 32 = 0.5
DATASET = "libero_spatial_no_noops"
LIBERO_PROPRIO = {  # shaped like LIBERO's eef position, axis-angle and gripper qpos statistics (approximate)
    "mean": [-0.0245, 0.1068, 1.0584, 2.9747, -0.0229, -0.1183, 0.0264, -0.0269],
    "std": [0.1011, 0.1514, 0.0831, 0.1221, 0.2311, 0.0815, 0.0141, 0.0140],
    "max": [0.1762, 0.3512, 1.2725, 3.3105, 0.8214, 0.2543, 0.0423, -0.0018],
    "min": [-0.4828, -0.3255, 0.8694, 2.1306, -0.9143, -0.5263, 0.0012, -0.0420],
    "q01": [-0.4194, -0.2809, 0.8959, 2.5132, -0.6322, -0.3469, 0.0017, -0.0402],
    "q99": [0.1418, 0.3218, 1.2371, 3.2489, 0.6081, 0.1293, 0.0401, -0.0016],
}


def component_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A random module's state dict as upstream's DDP saves it: `module.` keys, bfloat16."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        value = 1 + 0.1 * torch.randn(v.shape, generator=g) if k.endswith("norm1.weight") or k.endswith(
            "norm2.weight") or ".ffn.0.weight" in k else 0.05 * torch.randn(v.shape, generator=g)
        out[f"module.{k}"] = value.to(torch.bfloat16)
    return out


def write_tiny_oft(out: str | Path, head: str = "discrete", proprio: bool = True, seed: int = 0, film: bool = False,
                   **sizes) -> Path:
    """Write the tiny OFT folder to `out` (created): head `discrete` (no action head file) or `l1`;
    film: a FiLM fine-tune's vision_backbone file too."""
    return add_oft_files(write_tiny_openvla(out, seed=seed, **sizes), head, proprio, seed, film)


def film_file_state(folder: Path, seed: int, rank: int = LORA_RANK) -> dict[str, torch.Tensor]:
    """The vision_backbone file of a FiLM fine-tune of the OpenVLA folder (see the module docstring)."""
    cfg = parse_config(json.loads((folder / "config.json").read_text()))
    llm = cfg.text.hidden_size
    weights = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in zip(TOWER_NAMES, cfg.towers):
        prefix = f"vision_backbone.{name}."
        tower = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        for key in vision.upstream_shapes(spec, vision.mlp_width(tower)):
            value, nested = tower[key], re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.block.", key)
            module, param = nested.rsplit(".", 1) if "." in nested else ("", nested)
            if module.rsplit(".", 1)[-1] not in LORA_NAMES:
                out[prefix + nested] = value
                continue
            out[f"{prefix}{module}.base_layer.{param}"] = value
            if param == "weight":  # A as peft's "gaussian" init draws it, B as training left it (not zero)
                conv = (1, 1) if value.dim() == 4 else ()
                out[f"{prefix}{module}.lora_A.default.weight"] = (
                    torch.randn((rank, *value.shape[1:]), generator=g) / rank).to(value.dtype)
                out[f"{prefix}{module}.lora_B.default.weight"] = (
                    0.05 * torch.randn((value.shape[0], rank, *conv), generator=g)).to(value.dtype)
        for i in range(spec.depth):
            for kind in ("scale", "shift"):
                out[f"{prefix}blocks.{i}.{kind}.weight"] = 0.1 * torch.randn((spec.width, llm), generator=g)
                out[f"{prefix}blocks.{i}.{kind}.bias"] = 0.05 * torch.randn((spec.width,), generator=g)
    return out


def write_7b_shaped_oft(out: str | Path, head: str = "discrete", seed: int = 0) -> Path:
    """openvla-7b's real shapes plus OFT's files (LLaMA-2-7B width 4096): for GPU benchmarks."""
    from vlarl.models.openvla.tiny import write_7b_shaped

    return add_oft_files(write_7b_shaped(out, seed=seed), head, True, seed)


def add_oft_files(out: Path, head: str, proprio: bool, seed: int, film: bool = False) -> Path:
    """An OpenVLA folder -> an OFT LIBERO fine-tune's folder: its statistics and component files."""
    if head not in ("discrete", "l1"):
        raise ValueError(f"head={head!r} is not discrete or l1.")
    config = json.loads((out / "config.json").read_text())
    llm = config["text_config"]["hidden_size"]
    stats = {DATASET: {**copy.deepcopy(LIBERO_SPATIAL), "proprio": dict(LIBERO_PROPRIO)}}
    (out / "dataset_statistics.json").write_text(json.dumps(stats, indent=2) + "\n")
    config["norm_stats"] = {**config["norm_stats"], **stats}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if proprio:
        torch.save(component_state(ProprioProjector(len(LIBERO_PROPRIO["q01"]), llm), seed + 1),
                   out / f"proprio_projector--{STEP}_checkpoint.pt")
    if head == "l1":
        torch.save(component_state(L1Head(llm, llm, 7), seed + 2), out / f"action_head--{STEP}_checkpoint.pt")
    if film:
        torch.save(film_file_state(out, seed + 3), out / f"vision_backbone--{STEP}_checkpoint.pt")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--head", choices=("discrete", "l1"), default="discrete")
    parser.add_argument("--no-proprio", action="store_true", help="no proprio projector (no proprio token)")
    parser.add_argument("--film", action="store_true", help="a FiLM fine-tune (vision_backbone file)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_oft(args.out, args.head, proprio=not args.no_proprio, seed=args.seed, film=args.film))


if __name__ == "__main__":
    main()
