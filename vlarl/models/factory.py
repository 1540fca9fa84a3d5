"""Build, save and load token VLAs as Hugging Face folders.

A model folder holds config.json + model.safetensors (transformers' `save_pretrained`), the text
tokenizer (tokenizer.json and friends), and action_stats.json. Tiny configurations are built from
config alone: a word-level tokenizer over the environment's instructions (real checkpoints bring
their own tokenizer), followed by 256 action-bin tokens so the bins sit at the vocabulary tail.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlarl.envs.base import ACTION_DIM, PROPRIO_DIM
from vlarl.models.action_tokenizer import NUM_BINS, ActionStats, ActionTokenizer
from vlarl.models.flow import FlowVLA, FlowVLAConfig
from vlarl.models.token_vla import TokenVLA, TokenVLAConfig

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODEL_CLASSES = {TokenVLAConfig.model_type: TokenVLA, FlowVLAConfig.model_type: FlowVLA}  # config.json model_type


def words_of(texts: list[str]) -> list[str]:
    return sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})


def build_text_tokenizer(instructions: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the instructions' words, with the 256 bin tokens last."""
    vocab_list = SPECIALS + words_of(instructions) + [f"<bin_{b:03d}>" for b in range(NUM_BINS)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab_list)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
    fast.padding_side = "left"
    return fast


def build_tiny_model(model_cfg, image_size: int, instructions: list[str], seed: int = 0, action_chunk: int = 1):
    """The tiny policy `model.policy` names (token or flow VLA), its tokenizer and action statistics."""
    build = build_tiny_flow_vla if model_cfg.policy == "flow" else build_tiny_token_vla
    return build(model_cfg, image_size, instructions, seed, action_chunk)


def _tiny_backbone(model_cfg, image_size: int, tokenizer) -> dict:
    """Vision, decoder and proprio settings shared by the tiny token and flow VLAs."""
    t = model_cfg.tiny
    return dict(
        vision_config=dict(hidden_size=t.vision_hidden, intermediate_size=2 * t.vision_hidden,
                           num_hidden_layers=t.vision_layers, num_attention_heads=4,
                           image_size=image_size, patch_size=t.patch_size, vision_use_head=False),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=t.hidden, intermediate_size=t.intermediate,
                         num_hidden_layers=t.layers, num_attention_heads=t.heads, num_key_value_heads=t.heads,
                         max_position_embeddings=1024, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id),
        proprio_dim=PROPRIO_DIM, use_proprio=model_cfg.use_proprio,
    )


def build_tiny_token_vla(model_cfg, image_size: int, instructions: list[str], seed: int = 0, action_chunk: int = 1):
    """A tiny token VLA, its tokenizer and identity action statistics, from config alone. With an
    action chunk of n it emits n consecutive 7-D actions (7n tokens) per call."""
    tokenizer = build_text_tokenizer(instructions)
    config = TokenVLAConfig(**_tiny_backbone(model_cfg, image_size, tokenizer), action_dim=ACTION_DIM * action_chunk)
    torch.manual_seed(seed)
    model = TokenVLA(config)
    return model, tokenizer, ActionStats.identity(ACTION_DIM * action_chunk)


def build_tiny_flow_vla(model_cfg, image_size: int, instructions: list[str], seed: int = 0, action_chunk: int = 1):
    """A tiny flow VLA (same backbone as the token VLA + action expert) denoising chunks of
    `action_chunk` 7-D actions, with the sampler settings of `model_cfg.flow`."""
    tokenizer = build_text_tokenizer(instructions)
    f = model_cfg.flow
    config = FlowVLAConfig(**_tiny_backbone(model_cfg, image_size, tokenizer), step_dim=ACTION_DIM,
                           horizon=action_chunk, expert_hidden=f.expert_hidden, expert_layers=f.expert_layers,
                           expert_heads=f.expert_heads, **sampler_settings(f))
    torch.manual_seed(seed)
    model = FlowVLA(config)
    return model, tokenizer, ActionStats.identity(ACTION_DIM * action_chunk)


def sampler_settings(flow_cfg) -> dict:
    """The flow sampler fields of `model.flow` (they define the log-probs, so the run's config wins
    over what a loaded folder was saved with)."""
    return {k: flow_cfg[k] for k in ("method", "num_steps", "noise_level", "noise_min", "noise_max", "std_floor")}


def save_model(folder: str | Path, model: TokenVLA, tokenizer, stats: ActionStats, state_dict=None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    stats.save(folder)


def load_model(folder: str | Path, dtype: str = "float32", flow_cfg=None):
    """Load a model folder written by `save_model` (token or flow VLA); returns model, tokenizer,
    ActionTokenizer. `flow_cfg` (model.flow) overrides a flow VLA's sampler settings."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # actors' logs should hold training output, not load bars
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json); check model.path.")
    cls = MODEL_CLASSES.get(json.loads((folder / "config.json").read_text()).get("model_type"), TokenVLA)
    model = cls.from_pretrained(folder, dtype=DTYPES[dtype])
    if isinstance(model, FlowVLA) and flow_cfg is not None:
        for key, value in sampler_settings(flow_cfg).items():
            setattr(model.config, key, value)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return model, tokenizer, ActionTokenizer(model.vocab_size, ActionStats.load(folder))


def apply_lora(model: TokenVLA, rank: int, alpha: int) -> TokenVLA:
    """Wrap the decoder's projections with LoRA adapters; everything else but the value head,
    projector and proprio projection stays frozen (those are small and trained from scratch)."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model.language_model = inject_adapter_in_model(lora, model.language_model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or name.startswith(("value_head", "projector", "proprio_proj"))
    return model


def merge_lora_state_dict(state: dict, scaling: float) -> dict:
    """Fold LoRA pairs into their base weights: W = W_base + scaling * B @ A, original names back.

    state keys look like `...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`,
    `...q_proj.lora_B.default.weight`; a state without LoRA keys is returned unchanged.
    """
    if not any(".lora_A." in k for k in state):
        return state
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix = key.split(".base_layer.")[0]
            name = key.replace(".base_layer.", ".")
            if key.endswith(".weight"):
                a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
                value = value + scaling * (b.float() @ a.float()).to(value.dtype)
            merged[name] = value
        else:
            merged[key] = value
    return merged
