"""Policies. Importing this package registers the token VLA with transformers' Auto classes, so a
folder written by `save_model` or tools/merge_adapters.py loads with `AutoModel.from_pretrained`."""

from vlarl.models.token_vla import TokenVLA, TokenVLAConfig

__all__ = ["TokenVLA", "TokenVLAConfig"]
