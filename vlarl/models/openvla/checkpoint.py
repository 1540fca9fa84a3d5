"""Load and save OpenVLA folders in the upstream layout, without remote code.

A folder (openvla/openvla-7b and fine-tunes) holds config.json, model.safetensors or shards
model-0000i-of-0000N.safetensors + model.safetensors.index.json, the LLaMA tokenizer files,
preprocessor_config.json, often dataset_statistics.json, and the remote-code *.py files (never
imported here). Upstream tensor names are kept exactly; only the vision towers are renamed on the
way in and out (vision.py). Upstream tensors no module reads (each tower's last block and final
norm, SigLIP's pool head) are kept aside bit-exactly on `model.passthrough` and written back, so a
load -> save round trip reproduces the upstream key set, shapes and dtypes. The value head is not
an upstream tensor: it lives in value_head.safetensors beside the weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from vlarl.models.openvla import vision
from vlarl.models.openvla.action_tokenizer import OpenVLAActionTokenizer
from vlarl.models.openvla.config import OpenVLAConfigError, read_config, select_unnorm_key
from vlarl.models.openvla.modeling import TOWER_NAMES, OpenVLAPolicy, value_head
from vlarl.models.openvla.processing import PixelSpec

WEIGHTS, INDEX, VALUE_HEAD = "model.safetensors", "model.safetensors.index.json", "value_head.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors weight files, from the shard index when there is one."""
    if (folder / INDEX).is_file():
        names = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise OpenVLAConfigError(f"{folder}: {INDEX} names shards that are missing: {missing}.")
        return [folder / n for n in names]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    raise OpenVLAConfigError(f"{folder} holds neither {WEIGHTS} nor {INDEX}; it has no weights.")


def read_header(folder: Path) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """{upstream key: (shape, dtype name, file)} without reading any tensor."""
    out = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                out[key] = (tuple(s.get_shape()), s.get_dtype(), path)
    return out


def read_tensors(header: dict, keys) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(header[key][2], []).append(key)
    out = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in names})
    return out


def expected_shapes(model: OpenVLAPolicy) -> dict[str, tuple[int, ...]]:
    """Every upstream tensor name and shape the model's architecture implies."""
    out = {}
    for name, tower in zip(TOWER_NAMES, model.vision_backbone.towers()):
        cfg = tower.config
        mlp = cfg.intermediate_size if tower.spec.kind == "siglip" else cfg.mlp_ratio * tower.spec.width
        out.update({f"vision_backbone.{name}.{k}": v for k, v in vision.upstream_shapes(tower.spec, mlp).items()})
    for prefix, module in (("projector.", model.projector), ("language_model.", model.language_model)):
        out.update({prefix + k: tuple(v.shape) for k, v in module.state_dict().items()})
    return out


def _check_keys(found: dict, expected: dict, folder: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise OpenVLAConfigError(f"{folder}: weights do not fit the OpenVLA architecture its config.json describes: "
                                 f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                                 f"(e.g. {unexpected[:3]}).")
    bad = [k for k in expected if tuple(found[k]) != tuple(expected[k])]
    if bad:
        k = bad[0]
        raise OpenVLAConfigError(f"{folder}: {len(bad)} tensors have unexpected shapes, e.g. {k} is {found[k]}, "
                                 f"expected {expected[k]}.")


def _materialise_buffers(model: OpenVLAPolicy) -> None:
    """Non-persistent buffers (computed at construction, absent from checkpoints) rebuilt on the CPU
    after the meta-device build: rotary frequencies and SigLIP's position ids."""
    lm = model.language_model.model
    lm.rotary_emb = LlamaRotaryEmbedding(config=model.openvla.text)
    for tower in model.vision_backbone.towers():
        emb = tower.embeddings
        if hasattr(emb, "position_ids"):
            emb.register_buffer("position_ids", torch.arange(emb.num_positions).expand((1, -1)), persistent=False)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"tensors left unmaterialised after loading: {meta[:5]}; transformers' modules changed.")


def load_openvla(folder: str | Path, dtype: str = "float32", unnorm_key: str | None = None, policy=OpenVLAPolicy,
                 extra: dict[str, torch.Tensor] | None = None):
    """An upstream-layout OpenVLA folder -> (OpenVLAPolicy, tokenizer, OpenVLAActionTokenizer).

    policy: the module class or factory `(config, mlp widths, projector width, pixel spec, action dim)`
    (an extension such as OpenVLA-OFT); extra: its own tensors beyond the OpenVLA weights, under its
    parameter names, loaded with them.

    The modules are sized by config.json (timm ids or timm_override_kwargs) and the weights' shapes
    (MLP and projector widths), built on the meta device and filled from safetensors, so a 7B folder
    never allocates a random copy. unnorm_key picks the dataset statistics (required when there are
    several). Raises OpenVLAConfigError on a folder that does not fit.
    """
    folder = Path(folder)
    cfg = read_config(folder)
    key = select_unnorm_key(cfg.norm_stats, unnorm_key)
    header = read_header(folder)
    shapes = {k: v[0] for k, v in header.items()}
    mlps = []
    for name, _ in zip(TOWER_NAMES, cfg.towers):
        if f"vision_backbone.{name}.blocks.0.mlp.fc1.weight" not in shapes:
            raise OpenVLAConfigError(f"{folder}: no vision_backbone.{name} weights; is this an OpenVLA checkpoint?")
        mlps.append(vision.mlp_width(shapes, f"vision_backbone.{name}."))
    proj_hidden = shapes.get("projector.fc1.weight", (None,))[0] if cfg.fused else None
    stats = cfg.norm_stats[key]["action"]
    with torch.device("meta"):
        model = policy(cfg, mlps, proj_hidden, PixelSpec.from_folder(folder, [t.kind for t in cfg.towers],
                                                                     cfg.image_size), len(stats["q01"]))
    _check_keys(shapes, expected_shapes(model), folder)

    target = DTYPES[dtype]
    ours: dict[str, torch.Tensor] = {}
    for name, tower in zip(TOWER_NAMES, model.vision_backbone.towers()):
        prefix = f"vision_backbone.{name}."
        tensors = read_tensors(header, [k for k in header if k.startswith(prefix)])
        mapped, kept = vision.from_upstream(tower.spec, {k[len(prefix):]: v.float() for k, v in tensors.items()})
        ours.update({prefix + k: v.to(target) for k, v in mapped.items()})
        model.passthrough.update({prefix + k: tensors[prefix + k] for k in kept})  # stored dtype, untouched
    rest = [k for k in header if k.startswith(("projector.", "language_model."))]
    ours.update({k: v.to(target) for k, v in read_tensors(header, rest).items()})
    ours.update({k: v.to(target) for k, v in (extra or {}).items()})
    missing, unexpected = model.load_state_dict(ours, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith("value_head.")]
    if missing or unexpected:
        raise OpenVLAConfigError(f"{folder}: mapped weights do not fill the model: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}.")
    model.value_head = value_head(cfg.text.hidden_size).to(target)
    if (folder / VALUE_HEAD).is_file():
        with safe_open(str(folder / VALUE_HEAD), framework="pt") as f:
            state = {k.removeprefix("value_head."): f.get_tensor(k) for k in f.keys()}
        model.value_head.load_state_dict({k: v.to(target) for k, v in state.items()})
    _materialise_buffers(model)
    model.config.unnorm_key = key
    model.source_folder = folder

    tokenizer = LlamaTokenizerFast.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.vocab_size != cfg.base_vocab_size or tokenizer.pad_token_id is None:
        raise OpenVLAConfigError(f"{folder}: tokenizer has {tokenizer.vocab_size} base tokens and pad id "
                                 f"{tokenizer.pad_token_id}; config.json implies {cfg.base_vocab_size} and a pad "
                                 "token.")
    model.tokenizer = tokenizer
    return model.eval(), tokenizer, OpenVLAActionTokenizer(stats, cfg.base_vocab_size, cfg.n_action_bins)


def upstream_state_dict(model: OpenVLAPolicy, state_dict: dict | None = None, base: Path | None = None) -> dict:
    """Our state dict (or `state_dict`, same names, e.g. gathered from FSDP) -> upstream names and
    layout; the value head is left out, the kept tensors (model.passthrough, else read from `base`)
    put back."""
    state = state_dict if state_dict is not None else model.state_dict()
    out = {k: v for k, v in state.items() if k.startswith(("projector.", "language_model."))}
    for name, tower in zip(TOWER_NAMES, model.vision_backbone.towers()):
        prefix = f"vision_backbone.{name}."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        kept_names = [k for k in vision.upstream_shapes(tower.spec, 1) if vision.is_passthrough(tower.spec, k)]
        kept = {k: model.passthrough[prefix + k] for k in kept_names if prefix + k in model.passthrough}
        if len(kept) < len(kept_names):
            if base is None:
                raise OpenVLAConfigError("the model carries no passthrough tensors; pass the base folder to read them.")
            header = read_header(base)
            kept.update({k[len(prefix):]: v for k, v in read_tensors(header, [prefix + k for k in kept_names]).items()})
        out.update({prefix + k: v for k, v in vision.to_upstream(tower.spec, sub, kept).items()})
    return out


def write_weights(folder: Path, tensors: dict[str, torch.Tensor], order: list[str], shard_bytes: int) -> None:
    for stale in [*folder.glob("model*.safetensors"), folder / INDEX]:
        stale.unlink(missing_ok=True)
    sizes = {k: tensors[k].numel() * tensors[k].element_size() for k in order}
    shards, current, used = [], [], 0
    for k in order:
        if current and used + sizes[k] > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(k)
        used += sizes[k]
    shards.append(current)
    if len(shards) == 1:
        save_file({k: tensors[k] for k in order}, str(folder / WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def save_openvla(folder: str | Path, model: OpenVLAPolicy, tokenizer, base_folder: str | Path | None = None,
                 state_dict: dict | None = None, shard_bytes: int = SHARD_BYTES) -> None:
    """Write an upstream-layout folder the original remote code (and load_openvla) reads.

    base_folder (default: the folder the model was loaded from) supplies what training never changes,
    copied verbatim: config.json (norm_stats etc.), preprocessor_config.json, dataset_statistics.json,
    the remote-code *.py files and the tokenizer files. Weights keep the base's key set, shapes and
    dtypes; they are sharded (model-0000i-of-0000N + index) above `shard_bytes`, like transformers.
    The value head goes to value_head.safetensors, never among the OpenVLA weights.
    """
    folder = Path(folder)
    base = Path(base_folder or model.source_folder or "")
    if not (base / "config.json").is_file():
        raise OpenVLAConfigError(f"save_openvla needs the base OpenVLA folder (config.json etc.); {base} is not one.")
    if folder.resolve() == base.resolve():
        raise OpenVLAConfigError(f"save_openvla would overwrite its base folder {base}; write elsewhere.")
    folder.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    header = read_header(base)
    tensors = upstream_state_dict(model, state, base)
    _check_keys({k: tuple(v.shape) for k, v in tensors.items()}, {k: v[0] for k, v in header.items()}, base)
    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    out = {k: tensors[k].detach().to("cpu", dtypes[header[k][1]]).contiguous() for k in header}
    write_weights(folder, out, list(header), shard_bytes)

    for path in base.iterdir():
        if path.is_file() and (path.suffix in (".py", ".json") or path.name in TOKENIZER_FILES) \
                and path.name != INDEX:
            shutil.copyfile(path, folder / path.name)
    if not (base / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(folder)
    if not (folder / "dataset_statistics.json").is_file():
        (folder / "dataset_statistics.json").write_text(json.dumps(model.openvla.norm_stats, indent=2) + "\n")
    head = {k: v for k, v in state.items() if k.startswith("value_head.")}
    if head:
        save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(folder / VALUE_HEAD))
