"""The tiny token VLA as a family: build from config, load and save as a Hugging Face folder.

A folder holds config.json + model.safetensors (transformers' `save_pretrained`), the text
tokenizer (tokenizer.json and friends) and action_stats.json. Tiny configurations are built from
config alone: a word-level tokenizer over the environment's instructions, followed by 256
action-bin tokens so the bins sit at the vocabulary tail. The export adds what deployment reads:
an image processor config, a greedy generation config and the decoder alone as a LlamaForCausalLM
folder (vLLM serves it with prompt_embeds = the VLA's prefix).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlarl.data.spec import ACTION_DIM, PROPRIO_DIM
from vlarl.models.action_tokenizer import NUM_BINS, ActionStats, ActionTokenizer
from vlarl.models.family import DTYPES, Family, Loaded, Supervised
from vlarl.models.supervised import token_nll
from vlarl.models.tiny_token.modeling import TokenVLA, TokenVLAConfig

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
DECODER_DIR = "decoder"  # export sub-folder holding the decoder alone (LlamaForCausalLM)


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


def tiny_backbone(model_cfg, image_size: int, tokenizer) -> dict:
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


def load_hf_folder(folder: Path, cls, dtype: str):
    """A vlarl tiny-family folder: the model class's own from_pretrained, its tokenizer and statistics."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # actors' logs should hold training output, not load bars
    model = cls.from_pretrained(folder, dtype=DTYPES[dtype])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return model, tokenizer, ActionStats.load(folder)


def save_hf_folder(folder: Path, loaded: Loaded, state_dict: dict | None = None, max_shard_size: str = "5GB") -> None:
    folder, model = Path(folder), loaded.model
    folder.mkdir(parents=True, exist_ok=True)
    model.config.dtype = model.language_model.config.dtype = model.dtype  # config.json says what the weights are
    model.save_pretrained(folder, state_dict=state_dict, max_shard_size=max_shard_size)
    loaded.tokenizer.save_pretrained(folder)
    loaded.action_tokenizer.stats.save(folder)


def write_image_processor(folder: Path, side: int) -> None:
    """The model maps uint8 pixels to [-1, 1] itself (x / 127.5 - 1); this says the same in the form
    image pipelines read: resize to the encoder's size, rescale 1/255, mean = std = 0.5."""
    from transformers import SiglipImageProcessorPil

    SiglipImageProcessorPil(size={"height": side, "width": side}, do_resize=True, do_rescale=True,
                            rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
                            image_std=[0.5] * 3).save_pretrained(folder)


class TinyToken(Family):
    name = "tiny_token"
    model_class = TokenVLA
    builds_tiny = True
    supervised = Supervised(token_nll, 2e-3)

    def recognises(self, config: dict, folder: Path | None = None) -> bool:
        return config.get("model_type") == self.model_class.config_class.model_type

    def actions_per_call(self, folder: Path, model_cfg) -> int:
        config = json.loads((Path(folder) / "config.json").read_text())
        return int(config.get("action_dim", ACTION_DIM)) // ACTION_DIM

    def load(self, folder: Path, model_cfg) -> Loaded:
        model, tokenizer, stats = load_hf_folder(folder, self.model_class, model_cfg.dtype)
        return Loaded(model, tokenizer, ActionTokenizer(model.vocab_size, stats), self)

    def save(self, folder: Path, loaded: Loaded, state_dict: dict | None = None) -> None:
        save_hf_folder(folder, loaded, state_dict)

    def export(self, folder: Path, loaded: Loaded, base: Path, max_shard_size: str) -> None:
        """The folder plus a greedy generation config and the decoder alone under decoder/."""
        from transformers import GenerationConfig

        model, tokenizer = loaded.model, loaded.tokenizer
        d = model.config.action_dim
        generation = GenerationConfig(do_sample=False, max_new_tokens=d, min_new_tokens=d,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
        model.language_model.generation_config = generation
        save_hf_folder(folder, loaded, max_shard_size=max_shard_size)
        model.language_model.save_pretrained(folder / DECODER_DIR, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(folder / DECODER_DIR)
        for f in (folder, folder / DECODER_DIR):
            generation.save_pretrained(f)
        write_image_processor(folder, model.image_size)

    def build_tiny(self, model_cfg, image_size: int, instructions: list[str], seed: int = 0,
                   action_chunk: int = 1) -> Loaded:
        """A tiny token VLA, its tokenizer and identity action statistics, from config alone. With an
        action chunk of n it emits n consecutive 7-D actions (7n tokens) per call."""
        tokenizer = build_text_tokenizer(instructions)
        config = TokenVLAConfig(**tiny_backbone(model_cfg, image_size, tokenizer), action_dim=ACTION_DIM * action_chunk)
        torch.manual_seed(seed)
        model = TokenVLA(config)
        model.scale_token_embeddings(model_cfg.tiny.embed_std)
        return Loaded(model, tokenizer, ActionTokenizer(model.vocab_size, ActionStats.identity(ACTION_DIM * action_chunk)), self)
