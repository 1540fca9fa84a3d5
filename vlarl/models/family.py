"""What a model family is: the folder-level half of the policy interface.

A family (one subpackage of vlarl/models/) knows one checkpoint layout. The rest of vlarl reaches
it through two small surfaces, so nothing outside `vlarl/models/<family>/` knows a family's key
names, prompt, preprocessing or action decoding:

Folder level (a `Family` object, found by `vlarl.models.registry`):

| method | returns | called by |
|---|---|---|
| `recognises(config, folder)` | whether config.json (a dict; the folder where it does not say) is this family's | registry (detection) |
| `check(folder, model_cfg)`, `actions_per_call(...)` | FamilyError on a folder that does not fit the run; 7-D actions per call | preflight |
| `load(folder, model_cfg)` | `Loaded(model, tokenizer, action_tokenizer)` | rollout worker, learner, sft, export |
| `save(folder, loaded, state_dict)` | writes the folder in the family's own layout | trainer (tiny base), sft, export |
| `export(folder, loaded, base, max_shard_size)` | the deployable folder | tools/merge_adapters.py |
| `frame_transform(env_name, model_cfg)` | obs -> the images the model reads (per-benchmark transform), or None | rollout worker |
| `build_tiny(model_cfg, image_size, instructions, seed, chunk)` | a `Loaded` built from config | trainer, sft |
| `supervised` | loss, default lr (`Supervised`) | sft |

Model level (methods of the family's nn.Module; the tiny token VLA, vlarl/models/tiny_token, is the
reference implementation):

| method / attribute | returns | called by |
|---|---|---|
| `encode_instruction(tokenizer, text)` | prompt token ids the prefix reads | engines, learner, sft (InstructionCache) |
| `prefix(images, proprio, ids, mask)` | decoder input embeds, mask, positions | engines (hf, vllm), forward |
| `forward(images, proprio, ids, mask, actions, temperature)` | logprobs, entropy, values (+ stats) | learner, sft |
| `first_bin_id`, `bin_logits(logits, T)` | the 256 action ids, their logits at T | engines |
| `embed_tokens(ids)`, `language_model` | token embeddings; the LLaMA decoder vLLM serves | engines, weight sync |
| `image_size`, `config.action_dim` | pixels the model reads; values per call | sft, rollout worker |
| `fsdp_units()` | modules FSDP shards one by one | learner |
| `lora_targets`, `lora_trainable` | decoder module names for LoRA; parameters trained beside the adapters | vlarl.models.lora |
| `action_kind` | "token", "flow", "parallel" (OFT's discrete head) or "gaussian" (its L1 head): which engine and which per-step record | rollout worker |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Loaded:
    model: Any  # the family's nn.Module (policy interface above)
    tokenizer: Any  # the text tokenizer the model's prompt uses
    action_tokenizer: Any  # actions <-> what the model emits (tokens, or normalised values for flow)
    family: "Family"  # the family that loaded or built it (and saves it)

    def __iter__(self):  # model, tokenizer, action_tokenizer = loaded
        return iter((self.model, self.tokenizer, self.action_tokenizer))


@dataclass(frozen=True)
class Supervised:
    loss: Callable[..., torch.Tensor]  # (model, inputs, actions (B, A), action_tokenizer, generator) -> (B,)
    lr: float  # default learning rate for `python -m vlarl.sft`


class FamilyError(ValueError):
    """A folder or config that does not fit a family, said in one sentence with the fix."""


class Family:
    name = ""  # registry key and `model.family` value
    serves_vllm = True  # whether rollout.engine=vllm can serve it (its actions are decoder tokens)
    builds_tiny = False  # whether `build_tiny` makes a model from config alone (model.path=null)
    action_expert = False  # an action expert at `model.expert_name`: model.value_from=expert, model.expert_lora_rank

    def recognises(self, config: dict, folder: Path | None = None) -> bool:
        """Whether config.json (and, where the config does not say, the folder's files) is this family's."""
        raise NotImplementedError

    def check(self, folder: Path, model_cfg) -> None:
        """Cheap checks of a folder against the run's model settings (FamilyError), before actors load it."""

    def actions_per_call(self, folder: Path, model_cfg) -> int:
        """7-D actions the folder's model emits per policy call (must equal env.action_chunk), read cheaply."""
        return 1

    def load(self, folder: Path, model_cfg) -> Loaded:
        raise NotImplementedError

    def save(self, folder: Path, loaded: Loaded, state_dict: dict | None = None) -> None:
        raise NotImplementedError

    def export(self, folder: Path, loaded: Loaded, base: Path, max_shard_size: str) -> None:
        """The deployable folder; by default the family's own layout."""
        self.save(folder, loaded)

    def frame_transform(self, env_name: str, model_cfg) -> Callable[[dict], np.ndarray] | None:
        """What the rollout worker makes of an observation batch's cameras before the model and the
        batch see them: obs dict -> images (N, H, W', 3) uint8 (per-benchmark preprocessing such as
        OpenVLA's LIBERO resize; a multi-camera family lays its cameras side by side). None: obs["image"]."""
        return None

    def build_tiny(self, model_cfg, image_size: int, instructions: list[str], seed: int, action_chunk: int) -> Loaded:
        raise FamilyError(f"the {self.name} family loads checkpoints only; set model.path to a checkpoint folder "
                          "of that family.")

    supervised: Supervised | None = None
