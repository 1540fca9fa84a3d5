"""Policies, one subpackage per model family (vlarl/models/family.py describes the interface).

Importing this package registers the tiny token and flow VLAs with transformers' Auto classes, so a
folder they were saved to loads with `AutoModel.from_pretrained` and no remote code.
"""

from vlarl.models.tiny_flow.modeling import FlowVLA, FlowVLAConfig
from vlarl.models.tiny_token.modeling import TokenVLA, TokenVLAConfig

__all__ = ["FlowVLA", "FlowVLAConfig", "TokenVLA", "TokenVLAConfig"]
