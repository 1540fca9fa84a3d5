"""OpenVLA checkpoints (the openvla/openvla-7b folder layout) as vlarl token policies, without remote code.

config.py      config.json -> typed record (tower sizes, LLaMA config, norm_stats, unnorm_key choice)
vision.py      the DINOv2 / SigLIP towers from transformers modules + timm <-> ours key maps
processing.py  prompt, encode_instruction, pixel preprocessing, per-benchmark frame transforms
modeling.py    OpenVLAPolicy: prefix / forward / bin_logits / reference_actions
checkpoint.py  load_openvla / save_openvla (upstream key names, shards, value head beside)
action_tokenizer.py  OpenVLA's token <-> action mapping
tiny.py        a tiny random folder in the real layout (python -m vlarl.models.openvla.tiny OUT)
"""

from vlarl.models.openvla.action_tokenizer import OpenVLAActionTokenizer
from vlarl.models.openvla.checkpoint import load_openvla, save_openvla
from vlarl.models.openvla.config import OpenVLAConfigError, read_config, select_unnorm_key
from vlarl.models.openvla.modeling import OpenVLAPolicy
from vlarl.models.openvla.processing import benchmark_image_transform, encode_instruction

__all__ = ["OpenVLAActionTokenizer", "OpenVLAConfigError", "OpenVLAPolicy", "benchmark_image_transform",
           "encode_instruction", "load_openvla", "read_config", "save_openvla", "select_unnorm_key"]
