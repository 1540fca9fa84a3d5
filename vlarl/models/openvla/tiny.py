"""Write a tiny random OpenVLA folder with the real openvla-7b layout: `python -m vlarl.models.openvla.tiny OUT`.

Same file names and formats as the published folder: config.json with every real field (plus
`timm_override_kwargs`, the one addition the loader honours, giving the tiny tower sizes),
model.safetensors in bfloat16 under the exact upstream tensor names (timm tower layout with fused
qkv and LayerScale `scale_factor`, SigLIP's attention-pool head, projector fc1..fc3, LLaMA with the
vocabulary padded to 32064), preprocessor_config.json, dataset_statistics.json, generation_config.json,
the LLaMA-layout tokenizer (tiny_tokenizer.py) and placeholder files named like the remote code.
Images stay 224 x 224 (256 patches) so the prefix has the real length; the towers and decoder are
narrow and shallow, so a forward takes milliseconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from vlarl.models.openvla import tiny_tokenizer, vision
from vlarl.models.openvla.checkpoint import SHARD_BYTES, write_weights
from vlarl.models.openvla.config import parse_config
from vlarl.models.openvla.processing import IMAGENET_MEAN, IMAGENET_STD

TIMM_IDS = ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
SIGLIP_MLP_RATIO = 3.7362  # timm's so400m ratio: MLP width = int(width * ratio)
REMOTE_CODE = ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py")

LIBERO_SPATIAL = {  # shaped like openvla's libero_spatial_no_noops statistics (values approximate)
    "action": {"mean": [0.1534, 0.1369, -0.1553, -0.0052, -0.0112, -0.0181, 0.4574],
               "std": [0.4127, 0.3452, 0.5094, 0.0525, 0.0743, 0.0782, 0.4982],
               "max": [0.9375, 0.9375, 0.9375, 0.1971, 0.3364, 0.375, 1.0],
               "min": [-0.9375, -0.9375, -0.9375, -0.1875, -0.3675, -0.36, 0.0],
               "q01": [-0.7454, -0.6616, -0.9375, -0.1071, -0.2046, -0.1875, 0.0],
               "q99": [0.9375, 0.8759, 0.9375, 0.1821, 0.1446, 0.3589, 1.0],
               "mask": [True] * 6 + [False]},
    "proprio": {k: [0.0] * 8 for k in ("mean", "std", "max", "min", "q01", "q99")},
    "num_transitions": 52970, "num_trajectories": 432,
}
BRIDGE = {  # shaped like openvla's bridge_orig statistics (values approximate)
    "action": {"mean": [0.0002, 0.0001, -0.0001, -0.0002, -0.0003, 0.0002, 0.5767],
               "std": [0.0097, 0.0136, 0.0127, 0.0286, 0.0307, 0.0765, 0.4979],
               "max": [0.4150, 0.4078, 0.3996, 0.7896, 0.7857, 2.1055, 1.0],
               "min": [-0.4007, -0.4131, -0.3398, -0.8138, -0.7814, -2.1185, 0.0],
               "q01": [-0.0287, -0.0417, -0.0261, -0.0809, -0.0929, -0.2072, 0.0],
               "q99": [0.0283, 0.0409, 0.0402, 0.0819, 0.0779, 0.2038, 1.0],
               "mask": [True] * 6 + [False]},
    "proprio": {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")},
    "num_transitions": 2135463, "num_trajectories": 60064,
}
SIZES = dict(dino_width=32, siglip_width=48, tower_depth=3, tower_heads=4, image_size=224,
             hidden=64, layers=2, heads=4, intermediate=128)


def tiny_config(sizes: dict) -> dict:
    s = sizes
    text = {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064,
            "hidden_size": s["hidden"], "intermediate_size": s["intermediate"], "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"], "num_key_value_heads": s["heads"]}
    return {
        "arch_specifier": "no-align+fused-gelu-mlp",
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                     "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": "resize-naive",
        "image_sizes": [s["image_size"]] * 2,
        "llm_backbone_id": "llama2-7b-pure",
        "llm_max_length": 2048,
        "model_type": "openvla",
        "n_action_bins": 256,
        "norm_stats": {"bridge_orig": BRIDGE, "libero_spatial_no_noops": LIBERO_SPATIAL},
        "output_projector_states": False,
        "pad_to_multiple_of": 64,
        "pad_token_id": 32000,
        "text_config": text,
        "timm_model_ids": TIMM_IDS,
        "timm_override_act_layers": [None, None],
        "timm_override_kwargs": [
            {"embed_dim": s["dino_width"], "depth": s["tower_depth"], "num_heads": s["tower_heads"]},
            {"embed_dim": s["siglip_width"], "depth": s["tower_depth"], "num_heads": s["tower_heads"]}],
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_fused_vision_backbone": True,
        "vision_backbone_id": "dinosiglip-vit-so-224px",
    }


def upstream_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of an upstream checkpoint with this config."""
    cfg = parse_config(config)
    shapes, vision_dim = {}, 0
    for name, spec in zip(("featurizer", "fused_featurizer"), cfg.towers):
        mlp = 4 * spec.width if spec.kind == "dinov2" else int(spec.width * SIGLIP_MLP_RATIO)
        shapes.update({f"vision_backbone.{name}.{k}": v for k, v in vision.upstream_shapes(spec, mlp).items()})
        vision_dim += spec.width
    e = cfg.text.hidden_size
    shapes.update({"projector.fc1.weight": (4 * vision_dim, vision_dim), "projector.fc1.bias": (4 * vision_dim,),
                   "projector.fc2.weight": (e, 4 * vision_dim), "projector.fc2.bias": (e,),
                   "projector.fc3.weight": (e, e), "projector.fc3.bias": (e,)})
    with torch.device("meta"):
        llm = LlamaForCausalLM(cfg.text)
    shapes.update({f"language_model.{k}": tuple(v.shape) for k, v in llm.state_dict().items()})
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random values that keep every weight influential: norms near 1, LayerScale near 0.5."""
    noise = torch.randn(shape, generator=g)
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight")):
        return 1 + 0.1 * noise
    if name.endswith("scale_factor"):
        return 0.5 + 0.1 * noise
    if name.endswith("embed_tokens.weight"):  # large enough that each token, not the patch average, steers
        return 0.5 * noise
    if name.endswith("lm_head.weight"):
        return 0.1 * noise
    return 0.05 * noise


def preprocessor_config(size: int) -> dict:
    """preprocessor_config.json as the remote PrismaticImageProcessor saves it (resize-naive, bicubic)."""
    means, stds = [list(IMAGENET_MEAN), [0.5] * 3], [list(IMAGENET_STD), [0.5] * 3]
    return {
        "auto_map": {"AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
                     "AutoProcessor": "processing_prismatic.PrismaticProcessor"},
        "image_processor_type": "PrismaticImageProcessor", "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, size, size]] * 2, "interpolations": ["bicubic", "bicubic"], "means": means, "stds": stds,
        "processor_class": "PrismaticProcessor",
        "tvf_crop_params": [{"output_size": [size, size]}] * 2, "tvf_do_letterbox": False, "tvf_letterbox_fill": None,
        "tvf_normalize_params": [{"inplace": False, "mean": m, "std": s} for m, s in zip(means, stds)],
        "tvf_resize_params": [{"antialias": True, "interpolation": 3, "max_size": None, "size": [size, size]}] * 2,
        "use_fused_vision_backbone": True,
    }


def write_tiny_openvla(out: str | Path, seed: int = 0, **sizes) -> Path:
    """Write the tiny folder to `out` (created); `sizes` override SIZES entries. Returns the folder."""
    unknown = set(sizes) - set(SIZES)
    if unknown:
        raise TypeError(f"unknown tiny sizes {sorted(unknown)}; known: {sorted(SIZES)}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config({**SIZES, **sizes})
    g = torch.Generator().manual_seed(seed)
    shapes = upstream_shapes(config)
    tensors = {k: random_tensor(k, shapes[k], g).to(torch.bfloat16) for k in sorted(shapes)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    dumps = lambda obj: json.dumps(obj, indent=2) + "\n"
    (out / "config.json").write_text(dumps(config))
    (out / "dataset_statistics.json").write_text(dumps(config["norm_stats"]))
    (out / "preprocessor_config.json").write_text(dumps(preprocessor_config(config["image_sizes"][0])))
    (out / "generation_config.json").write_text(dumps({"_from_model_config": True, "bos_token_id": 1,
                                                       "eos_token_id": 2, "pad_token_id": 32000,
                                                       "transformers_version": "4.40.1"}))
    for name in REMOTE_CODE:
        (out / name).write_text(f'"""Placeholder for OpenVLA\'s remote-code file {name}.\n\nA tiny test folder '
                                "written by vlarl.models.openvla.tiny; it keeps the file name of the real folder and "
                                'holds no code. vlarl never imports it."""\n')
    tiny_tokenizer.write_tokenizer(out)
    return out


def write_7b_shaped(out: str | Path, seed: int = 0) -> Path:
    """A random folder with openvla-7b's real shapes (towers named by timm id only, LLaMA-2-7B decoder):
    for GPU benchmarks, about 15 GB in bfloat16."""
    out = write_tiny_openvla(out, seed=seed, layers=1)  # files and tokenizer; weights replaced below
    config = json.loads((out / "config.json").read_text())
    del config["timm_override_kwargs"]
    config["text_config"].update(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32)
    g = torch.Generator().manual_seed(seed)
    shapes = upstream_shapes(config)
    tensors = {k: random_tensor(k, shapes[k], g).to(torch.bfloat16) for k in sorted(shapes)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_weights(out, tensors, sorted(tensors), SHARD_BYTES)  # sharded like the real folder
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_openvla(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
