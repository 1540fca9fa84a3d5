"""OpenVLA-OFT's FiLM (use_film=True): the instruction scales and shifts every ViT layer; its file format.

Upstream (moojink/openvla-oft, prismatic/models/film_vit_wrapper.py) wraps each timm block of both
towers as `FiLMedVisionTransformerBlock` (`.block` the original, `.scale` and `.shift` =
nn.Linear(llm -> tower width)):
    x = x + drop_path1(ls1(attn(norm1(x))))
    x = x * (1 + scale(lang))[:, None] + shift(lang)[:, None]
    x = x + drop_path2(ls2(mlp(norm2(x))))
`lang` (B, E) is the mean input embedding of the sequence's non-action tokens (modeling_prismatic.py
`predict_action`: <s>, the prompt ending in 29871, and </s>; the placeholders left out), the same for
every camera. Here the modulation runs between the halves of vision.py's transformers layers.

File `vision_backbone--{step}_checkpoint.pt` (vla-scripts/finetune.py `save_training_checkpoint`):
torch.save of `vla.module.vision_backbone.state_dict()`, the WHOLE FiLM-wrapped backbone. `vla.module`
already drops DDP's `module.` prefix and the wrapper holds the original backbone as `.vision_backbone`,
so keys read `vision_backbone.{featurizer|fused_featurizer}.<timm key>`, with
- `blocks.{i}.block.<timm block key>` and `blocks.{i}.scale|shift.{weight,bias}` for every block (the
  last block, which OpenVLA never reads, included);
- peft LoRA layers: fine-tuning (peft 0.11.1, target_modules="all-linear") wraps every module named like
  one of the model's Linears, so in the towers attn.qkv, attn.proj, mlp.fc1/fc2, SigLIP's attn_pool
  q/kv/proj/mlp and patch_embed.proj (a Conv2d, caught by its name) appear as `X.base_layer.*`,
  `X.lora_A.default.weight`, `X.lora_B.default.weight`, scaled by lora_alpha / r = min(r, 16) / r
  (finetune.py and openvla_utils.py both build `LoraConfig(lora_alpha=min(lora_rank, 16))`).
At evaluation (experiments/robot/openvla_utils.py `_apply_film_to_vla`) upstream re-applies LoRA and FiLM
to the merged model and loads this file strictly: it replaces every vision weight of model.safetensors.
vlarl does the same: LoRA folded in (W = base + s * B @ A, in float64), the FiLM layers on `OFTPolicy.film`.

Saving writes the base file's keys and dtypes back: a weight equal to its folded base tensors gets them
back bit-exactly; a changed one is written as its base layer with lora_B zeroed (the same function under
upstream's loader; a retrained weight's low-rank split is not kept). Tensors OpenVLA never reads (last
block, final norm, SigLIP's pool head) come back from the base file verbatim.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from vlarl.models.openvla import vision
from vlarl.models.openvla.config import OpenVLAConfig, OpenVLAConfigError, TowerSpec
from vlarl.models.openvla.modeling import TOWER_NAMES

FILE = "vision_backbone"  # the component file: vision_backbone--{step}_checkpoint.pt
PREFIX = "vision_backbone."  # the FiLM wrapper's attribute holding the original backbone
LORA_NAMES = ("qkv", "proj", "fc1", "fc2", "q", "kv")  # the towers' Linear names, which all-linear LoRA wraps
FILM_KEY = re.compile(r"blocks\.(\d+)\.(scale|shift)\.(weight|bias)$")
LORA_KEY = re.compile(r"(.+)\.(base_layer\.weight|base_layer\.bias|lora_A\.default\.weight|lora_B\.default\.weight)$")


class FiLM(nn.Module):
    """One layer's modulation, upstream's `scale` and `shift` projections of the instruction embedding."""

    def __init__(self, llm_dim: int, width: int):
        super().__init__()
        self.scale, self.shift = nn.Linear(llm_dim, width), nn.Linear(llm_dim, width)

    def forward(self, x: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """x  # (B, T, D) the residual stream; lang  # (B, E) -> (B, T, D)"""
        return x * (1 + self.scale(lang)[:, None]) + self.shift(lang)[:, None]


def film_layers(cfg: OpenVLAConfig) -> nn.ModuleDict:
    """{tower name: one FiLM per layer vlarl runs} (the last timm block is never run, see vision.py)."""
    e = cfg.text.hidden_size
    return nn.ModuleDict({name: nn.ModuleList(FiLM(e, spec.width) for _ in range(spec.depth - 1))
                          for name, spec in zip(TOWER_NAMES, cfg.towers)})


def lora_scaling(rank: int) -> float:
    """Upstream's LoRA scaling: lora_alpha / r with lora_alpha = min(r, 16)."""
    return min(rank, 16) / rank


def fold(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """base + s * B @ A in float64, returned in float32. A Conv2d pair (A (r, C, p, p), B (D, r, 1, 1))
    composes to one conv whose kernel is B @ A over the flattened input dims."""
    delta = (b.flatten(1).double() @ a.flatten(1).double()).reshape(base.shape)
    return (base.double() + lora_scaling(a.shape[0]) * delta).float()


def split_key(key: str, path: Path) -> tuple[str, str]:
    """A file key -> (tower name, key inside the tower with FiLM's `.block.` nesting removed)."""
    bare = key.removeprefix("module.")
    tower = bare[len(PREFIX):].split(".", 1)[0] if bare.startswith(PREFIX) else ""
    if tower not in TOWER_NAMES:
        raise OpenVLAConfigError(f"{path} holds {key!r}, not a FiLM vision backbone tensor "
                                 f"({PREFIX}featurizer.* / fused_featurizer.*); is it an OpenVLA-OFT use_film file?")
    rest = bare[len(PREFIX) + len(tower) + 1:]
    if FILM_KEY.fullmatch(rest):
        return tower, rest
    if rest.startswith("blocks.") and not re.match(r"blocks\.\d+\.block\.", rest):
        raise OpenVLAConfigError(f"{path}: block tensor {key!r} lacks FiLM's `.block.` nesting.")
    return tower, re.sub(r"^blocks\.(\d+)\.block\.", r"blocks.\1.", rest)


def read_raw(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # a 7B backbone: 1.2 GB
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file, said plainly
        raise OpenVLAConfigError(f"{path} is not a readable torch state dict ({e}); copy the file again.") from None


def by_tower(raw: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors per tower, under timm names (`.block.` removed, LoRA parts still apart)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        tower, name = split_key(key, path)
        out.setdefault(tower, {})[name] = value
    return out


def folded(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One tower's timm-named tensors with each LoRA layer folded into plain weight/bias (float32);
    the FiLM tensors left out."""
    out, groups = {}, {}
    for name, value in tensors.items():
        if FILM_KEY.fullmatch(name):
            continue
        m = LORA_KEY.fullmatch(name)
        if m:
            groups.setdefault(m[1], {})[m[2]] = value
        else:
            out[name] = value.float()
    for module, parts in groups.items():
        if set(parts) - {"base_layer.bias"} != {"base_layer.weight", "lora_A.default.weight", "lora_B.default.weight"}:
            raise OpenVLAConfigError(f"LoRA layer {module} is incomplete (has {sorted(parts)}).")
        out[f"{module}.weight"] = fold(parts["base_layer.weight"], parts["lora_A.default.weight"],
                                       parts["lora_B.default.weight"])
        if "base_layer.bias" in parts:
            out[f"{module}.bias"] = parts["base_layer.bias"].float()
    return out


def read_film(path: Path, cfg: OpenVLAConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The FiLM file -> tensors under vlarl's parameter names: every vision tensor the model reads
    (they replace model.safetensors' ones, as upstream's strict load does) and `film.*`.

    shapes: the main weights' {upstream key: shape}; the file must hold the same vision backbone."""
    towers = by_tower(read_raw(path), path)
    e = cfg.text.hidden_size
    out: dict[str, torch.Tensor] = {}
    for name, spec in zip(TOWER_NAMES, cfg.towers):
        prefix = f"vision_backbone.{name}."
        plain = folded(towers.get(name, {}))
        expected = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
        found = {k: tuple(v.shape) for k, v in plain.items()}
        if found != expected:
            bad = sorted(set(found) ^ set(expected)) or [k for k in found if found[k] != expected[k]]
            raise OpenVLAConfigError(f"the FiLM vision backbone {path.name} does not hold the {name} tower of "
                                     f"model.safetensors (e.g. {bad[:3]}); keep the file that belongs to the weights.")
        ours, _ = vision.from_upstream(spec, plain)  # the unused tensors are re-read from the file on save
        out.update({prefix + k: v for k, v in ours.items()})
        out.update(film_tensors(towers[name], spec, e, name, path))
    extra = sorted(set(towers) - set(TOWER_NAMES[:len(cfg.towers)]))
    if extra:
        raise OpenVLAConfigError(f"{path.name} holds a {extra[0]} tower that config.json does not describe.")
    return out


def film_tensors(tensors: dict, spec: TowerSpec, llm_dim: int, name: str, path: Path) -> dict[str, torch.Tensor]:
    """One tower's scale/shift tensors -> `film.{tower}.{layer}.*`, checked against the widths."""
    out = {}
    for layer in range(spec.depth):
        for kind in ("scale", "shift"):
            w, b = tensors.get(f"blocks.{layer}.{kind}.weight"), tensors.get(f"blocks.{layer}.{kind}.bias")
            if w is None or b is None:
                raise OpenVLAConfigError(f"{path.name} has no {name} blocks.{layer}.{kind}; every block of a FiLM "
                                         "backbone carries scale and shift.")
            if tuple(w.shape) != (spec.width, llm_dim):
                raise OpenVLAConfigError(f"{path.name}: {name} blocks.{layer}.{kind} maps {w.shape[1]} -> "
                                         f"{w.shape[0]}; the decoder is {llm_dim} wide and the tower {spec.width}.")
            if layer < spec.depth - 1:
                out.update({f"film.{name}.{layer}.{kind}.weight": w, f"film.{name}.{layer}.{kind}.bias": b})
    return out


def film_state(model, state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """The FiLM file of `state` (the model's parameter names) in the layout of `source`, the base's file:
    same keys and dtypes (see the module docstring for what is kept bit-exact)."""
    raw = read_raw(source)
    towers = by_tower(raw, source)
    specs = {name: tower.spec for name, tower in zip(TOWER_NAMES, model.vision_backbone.towers())}
    current = {}  # per tower: the model's used tensors under timm names
    for name, spec in specs.items():
        prefix = f"vision_backbone.{name}."
        ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        current[name] = vision.to_upstream(spec, ours, {})
    unchanged: dict[tuple[str, str], bool] = {}

    def kept(tower: str, module: str) -> bool:
        """Is the model's weight still the folded base tensors (in the model's dtype)?"""
        if (tower, module) not in unchanged:
            t, w = towers[tower], current[tower][f"{module}.weight"]
            base = fold(t[f"{module}.base_layer.weight"], t[f"{module}.lora_A.default.weight"],
                        t[f"{module}.lora_B.default.weight"])
            unchanged[(tower, module)] = torch.equal(w.detach().cpu(), base.to(w.dtype))
        return unchanged[(tower, module)]

    out, covered = {}, set()
    for key, value in raw.items():
        tower, name = split_key(key, source)
        spec = specs.get(tower)
        if spec is None:
            raise OpenVLAConfigError(f"{source} holds a {tower} tower the model does not have.")
        film, lora = FILM_KEY.fullmatch(name), LORA_KEY.fullmatch(name)
        plain = f"{lora[1]}.{lora[2].rsplit('.', 1)[1]}" if lora else name  # X.weight / X.bias
        covered.add((tower, plain))
        if film:
            layer, kind, param = int(film[1]), film[2], film[3]
            name = f"film.{tower}.{layer}.{kind}.{param}"
            covered.add((tower, name))
            new = state[name] if layer < spec.depth - 1 else None
        elif vision.is_passthrough(spec, plain):
            new = None
        elif lora is None or lora[2] == "base_layer.bias":
            new = current[tower][plain]
        elif kept(tower, lora[1]):
            new = None
        elif lora[2] == "base_layer.weight":
            new = current[tower][plain]
        else:  # lora_A kept, lora_B zeroed: the base layer alone carries the weight
            new = value if lora[2].startswith("lora_A") else torch.zeros_like(value)
        out[key] = value if new is None else new.detach().to("cpu", value.dtype).contiguous().clone()
    needed = {(t, k) for t, c in current.items() for k in c}
    needed |= {(k.split(".")[1], k) for k in state if k.startswith("film.")}
    if needed - covered:
        raise OpenVLAConfigError(f"{source} lacks vision tensors the model has (e.g. {sorted(needed - covered)[:3]}); "
                                 "pass the folder the model was loaded from as the base.")
    return out
