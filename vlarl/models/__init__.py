"""Policies. Importing this package registers the token and flow VLAs with transformers' Auto classes,
so a folder written by `save_model` or tools/merge_adapters.py loads with `AutoModel.from_pretrained`."""

from vlarl.models.flow import FlowVLA, FlowVLAConfig
from vlarl.models.token_vla import TokenVLA, TokenVLAConfig

__all__ = ["FlowVLA", "FlowVLAConfig", "TokenVLA", "TokenVLAConfig"]
