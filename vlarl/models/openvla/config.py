"""An OpenVLA config.json read into a small typed record, without the remote code.

Real checkpoints (openvla/openvla-7b and its fine-tunes) name their vision towers only by timm model
id, so the tower sizes below are the published architectures of those ids (checked against timm's
`vit_large_patch14_reg4_dinov2` / `vit_so400m_patch14_siglip_224` definitions). Tiny test folders add
one key, `timm_override_kwargs`: a list with one dict per tower (`embed_dim`, `depth`, `num_heads`);
MLP widths always come from the weights' shapes, so they need no key.

`text_config` is saved by transformers as a diff against LlamaConfig's defaults (the real file holds
little more than the vocabulary size and pad id), so it is rebuilt with LlamaConfig(**text_config):
missing fields take LlamaConfig defaults, exactly as the upstream remote code does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import LlamaConfig


class OpenVLAConfigError(ValueError):
    """A config.json or folder that is not a usable OpenVLA checkpoint, said in one sentence."""


@dataclass(frozen=True)
class TowerSpec:
    """One timm ViT tower as OpenVLA uses it (features of its second-to-last block)."""

    kind: str  # "dinov2" or "siglip": which transformers module family rebuilds it
    timm_id: str  # e.g. "vit_large_patch14_reg4_dinov2.lvd142m"
    width: int  # embed_dim
    depth: int  # number of timm blocks (the last one is carried but not run)
    heads: int
    patch: int
    image_size: int
    registers: int  # register tokens (DINOv2-reg4: 4)
    cls_token: bool  # DINOv2: yes; SigLIP: no
    layer_scale: bool  # DINOv2 blocks carry LayerScale (saved upstream as `scale_factor`)
    attn_pool: bool  # SigLIP carries timm's attention-pool head (unused by OpenVLA)
    act: str | None = None  # timm_override_act_layers entry; None = timm's default (exact GELU)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patches that OpenVLA drops (timm's num_prefix_tokens)."""
        return int(self.cls_token) + self.registers


# Published architectures of the timm ids OpenVLA checkpoints name (tag after the dot ignored).
TOWER_PRESETS = {
    "vit_large_patch14_reg4_dinov2": dict(kind="dinov2", width=1024, depth=24, heads=16, patch=14, registers=4,
                                          cls_token=True, layer_scale=True, attn_pool=False),
    "vit_so400m_patch14_siglip_224": dict(kind="siglip", width=1152, depth=27, heads=16, patch=14, registers=0,
                                          cls_token=False, layer_scale=False, attn_pool=True),
}
OVERRIDE_KEYS = {"embed_dim": "width", "depth": "depth", "num_heads": "heads"}
TEXT_IGNORED = ("model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "architectures")
REQUIRED = ("timm_model_ids", "image_sizes", "use_fused_vision_backbone", "text_config", "n_action_bins",
            "pad_to_multiple_of", "norm_stats")


@dataclass(frozen=True)
class OpenVLAConfig:
    raw: dict  # config.json as read
    towers: tuple[TowerSpec, ...]  # featurizer, then fused_featurizer when fused
    fused: bool  # use_fused_vision_backbone
    text: LlamaConfig  # the decoder, LlamaConfig(**text_config)
    n_action_bins: int  # 256
    pad_to_multiple_of: int  # 64: the weights' vocabulary is padded by this much
    pad_token_id: int  # 32000 (<PAD>)
    norm_stats: dict = field(repr=False)  # {dataset: {"action": {q01, q99, mask, ...}, "proprio": ..., ...}}
    image_resize_strategy: str = "resize-naive"

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding / lm_head (32064 for openvla-7b)."""
        return self.text.vocab_size

    @property
    def base_vocab_size(self) -> int:
        """The tokenizer's vocabulary before padding (32000): action tokens count down from it."""
        return self.text.vocab_size - self.pad_to_multiple_of

    @property
    def first_bin_id(self) -> int:
        """Lowest action token id (31744 = 32000 - 256)."""
        return self.base_vocab_size - self.n_action_bins

    @property
    def image_size(self) -> int:
        return self.towers[0].image_size

    def action_stats(self, unnorm_key: str | None) -> dict:
        return self.norm_stats[select_unnorm_key(self.norm_stats, unnorm_key)]["action"]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise OpenVLAConfigError(message)


def tower_spec(timm_id: str, image_size: int, override: dict | None, act: str | None) -> TowerSpec:
    """The architecture of one tower from its timm id, with a tiny folder's overrides applied."""
    name = timm_id.split(".")[0]
    _require(name in TOWER_PRESETS, f"timm model id {timm_id!r} is not a tower this loader knows; "
                                    f"expected one of {sorted(TOWER_PRESETS)}.")
    fields = dict(TOWER_PRESETS[name])
    for key, value in (override or {}).items():
        _require(key in OVERRIDE_KEYS, f"timm_override_kwargs key {key!r} is not supported; use "
                                       f"{sorted(OVERRIDE_KEYS)}.")
        _require(isinstance(value, int) and value > 0, f"timm_override_kwargs {key}={value!r} must be a positive int.")
        fields[OVERRIDE_KEYS[key]] = value
    spec = TowerSpec(timm_id=timm_id, image_size=image_size, act=act, **fields)
    _require(spec.width % spec.heads == 0, f"tower {timm_id}: embed_dim {spec.width} is not divisible by "
                                           f"num_heads {spec.heads}.")
    _require(spec.depth >= 2, f"tower {timm_id}: depth {spec.depth} < 2; OpenVLA reads the second-to-last block.")
    _require(image_size % spec.patch == 0, f"tower {timm_id}: image size {image_size} is not a multiple of the "
                                           f"patch size {spec.patch}.")
    return spec


def parse_config(raw: dict, norm_stats: dict | None = None) -> OpenVLAConfig:
    """config.json (a dict) -> OpenVLAConfig; raises OpenVLAConfigError naming the bad field.
    `norm_stats` (dataset_statistics.json) replaces the config's own when given."""
    _require(isinstance(raw, dict), "config.json must hold a JSON object.")
    missing = [k for k in REQUIRED if k not in raw]
    _require(not missing, f"config.json lacks {missing}; it is not an OpenVLA (Prismatic) config.")
    ids, sizes, fused = raw["timm_model_ids"], raw["image_sizes"], raw["use_fused_vision_backbone"]
    _require(isinstance(fused, bool), f"use_fused_vision_backbone={fused!r} must be true or false.")
    n = 2 if fused else 1
    _require(isinstance(ids, list) and len(ids) == n and all(isinstance(i, str) for i in ids),
             f"timm_model_ids={ids!r} must list {n} timm ids (use_fused_vision_backbone={fused}).")
    _require(isinstance(sizes, list) and len(sizes) == n and all(isinstance(s, int) for s in sizes),
             f"image_sizes={sizes!r} must list {n} ints.")
    _require(len(set(sizes)) == 1, f"image_sizes={sizes} differ; both towers must read the same image.")
    acts = raw.get("timm_override_act_layers") or [None] * n
    _require(isinstance(acts, list) and len(acts) == n, f"timm_override_act_layers={acts!r} must list {n} entries.")
    overrides = raw.get("timm_override_kwargs") or [None] * n
    _require(isinstance(overrides, list) and len(overrides) == n and all(o is None or isinstance(o, dict)
                                                                         for o in overrides),
             f"timm_override_kwargs={overrides!r} must be a list of {n} dicts.")
    towers = tuple(tower_spec(i, s, o, a) for i, s, o, a in zip(ids, sizes, overrides, acts))
    _require(len({t.num_patches for t in towers}) == 1, "the towers give different patch counts; "
                                                         "their features cannot be concatenated.")
    text_config = raw["text_config"]
    _require(isinstance(text_config, dict), "text_config must be a JSON object (LlamaConfig fields).")
    model_type = text_config.get("model_type", "llama")
    _require(model_type == "llama", f"text_config.model_type={model_type!r}; only LLaMA decoders are supported.")
    text = LlamaConfig(**{k: v for k, v in text_config.items() if k not in TEXT_IGNORED})
    bins, pad_multiple = raw["n_action_bins"], raw["pad_to_multiple_of"]
    _require(isinstance(bins, int) and 1 < bins, f"n_action_bins={bins!r} must be an int > 1.")
    _require(isinstance(pad_multiple, int) and pad_multiple >= 0,
             f"pad_to_multiple_of={pad_multiple!r} must be an int >= 0.")
    _require(text.vocab_size - pad_multiple > bins, f"text_config.vocab_size={text.vocab_size} leaves no room for "
                                                    f"{bins} action bins below the {pad_multiple} padding rows.")
    strategy = raw.get("image_resize_strategy", "letterbox")  # upstream PrismaticConfig's default
    _require(strategy == "resize-naive", f"image_resize_strategy={strategy!r} is not supported (OpenVLA "
                                         "checkpoints use resize-naive).")
    pad_id = raw.get("pad_token_id", text.pad_token_id)
    _require(isinstance(pad_id, int), f"pad_token_id={pad_id!r} must be an int.")
    norm_stats = raw["norm_stats"] if norm_stats is None else norm_stats
    check_norm_stats(norm_stats)
    return OpenVLAConfig(raw=raw, towers=towers, fused=fused, text=text, n_action_bins=bins,
                         pad_to_multiple_of=pad_multiple, pad_token_id=pad_id, norm_stats=norm_stats,
                         image_resize_strategy=strategy)


def check_norm_stats(norm_stats) -> None:
    _require(isinstance(norm_stats, dict) and norm_stats, "norm_stats must map dataset names to statistics.")
    for name, stats in norm_stats.items():
        action = stats.get("action") if isinstance(stats, dict) else None
        _require(isinstance(action, dict) and "q01" in action and "q99" in action,
                 f"norm_stats[{name!r}] lacks action q01/q99.")
        _require(len(action["q01"]) == len(action["q99"]) == len(action.get("mask", action["q01"])),
                 f"norm_stats[{name!r}].action has q01/q99/mask of different lengths.")


def select_unnorm_key(norm_stats: dict, unnorm_key: str | None) -> str:
    """Which dataset's statistics un-normalise actions. Required when there are several; a key
    missing but present with LIBERO's `_no_noops` suffix resolves to it, as the LIBERO eval does."""
    keys = sorted(norm_stats)
    if unnorm_key is None:
        _require(len(keys) == 1, f"this checkpoint holds action statistics for several datasets; set "
                                 f"model.unnorm_key to one of {keys}.")
        return keys[0]
    if unnorm_key not in norm_stats and f"{unnorm_key}_no_noops" in norm_stats:
        return f"{unnorm_key}_no_noops"
    _require(unnorm_key in norm_stats, f"model.unnorm_key={unnorm_key} is not in this checkpoint's statistics; "
                                       f"choose one of {keys}.")
    return unnorm_key


def read_config(folder: str | Path) -> OpenVLAConfig:
    """config.json of an OpenVLA folder; dataset_statistics.json, when present, replaces norm_stats
    (upstream's evaluation does the same: fine-tuned folders carry their statistics there)."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise OpenVLAConfigError(f"{folder} has no config.json; it is not a model folder.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OpenVLAConfigError(f"{path} is not valid JSON ({e}).") from None
    stats_path = folder / "dataset_statistics.json"
    return parse_config(raw, json.loads(stats_path.read_text()) if stats_path.is_file() else None)
