"""OpenVLA's two vision towers rebuilt from transformers' own modules, and the key maps to timm's names.

Upstream (prismatic/extern/hf/modeling_prismatic.py) creates each tower with `timm.create_model` and
reads `get_intermediate_layers(n={len(blocks) - 2})`: the output of the SECOND-TO-LAST block, before
the final norm, with timm's prefix tokens (DINOv2: cls + 4 registers; SigLIP: none) dropped. So each
tower here runs transformers' embeddings + the first depth-1 encoder layers and nothing else: the
last block, the final norm and SigLIP's attention-pool head never influence OpenVLA's output. Their
tensors are not modules here; the loader keeps them aside (bit-exact) so an export writes the exact
upstream key set back.

Numerical equivalence with timm (tests/unit/test_openvla_vision.py checks it on random weights):
- DINOv2 (`Dinov2WithRegistersModel` parts). timm's reg4 DINOv2 uses `no_embed_class=True`: its
  `pos_embed` covers the patches only and cls/registers get no position, while transformers keeps a
  position slot for cls. Loading puts zeros in that slot; exporting folds the slot into `cls_token`
  (cls + slot), so even a trained slot exports to the same function. Registers sit between cls and
  patches in both. At 224 px the grid equals the position table, so neither side interpolates.
  timm's LayerScale `gamma` is saved upstream as `scale_factor` (the remote code renames it because
  old transformers rewrote parameters named gamma); it maps to transformers' `lambda1`.
- SigLIP (`SiglipVisionModel` parts). timm's so400m SigLIP uses exact-erf GELU (timm's default
  act_layer, and OpenVLA's override is None), not the tanh approximation transformers' SigLIP config
  defaults to, so hidden_act is set to "gelu". No cls token; pos_embed (1, N, D) is transformers'
  position table (N, D).
- Fused `attn.qkv` (3D, D) splits into q/k/v rows [0:D], [D:2D], [2D:3D]; export concatenates.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipVisionConfig, SiglipVisionModel

from vlarl.models.openvla.config import TowerSpec

ACTS = {None: "gelu", "gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
LN_EPS = 1e-6  # timm ViT's LayerNorm eps

# (timm name inside a block, ours inside a layer); attn.qkv is split separately.
DINO_BLOCK = {"norm1": "norm1", "attn.proj": "attention.o_proj", "norm2": "norm2", "mlp.fc1": "mlp.fc1",
              "mlp.fc2": "mlp.fc2"}
SIGLIP_BLOCK = {"norm1": "layer_norm1", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
QKV = {"dinov2": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
       "siglip": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
LAYER_PREFIX = {"dinov2": "encoder.layer", "siglip": "encoder.layers"}


class Tower(nn.Module):
    """One ViT: patch features of timm block depth-2, prefix tokens dropped.

    Holds only transformers' `embeddings` and `encoder` (depth-1 layers); the final norm, pooling
    head and DINOv2's (pre-training only) mask token are left out so every parameter here is used.
    """

    def __init__(self, spec: TowerSpec, mlp: int):
        super().__init__()
        self.spec = spec
        act = ACTS.get(spec.act)
        if act is None:
            raise ValueError(f"timm_override_act_layers entry {spec.act!r} is not supported; use one of {list(ACTS)}.")
        if spec.kind == "dinov2":
            if mlp % spec.width:  # the config takes an integer mlp_ratio
                raise ValueError(f"DINOv2 tower MLP width {mlp} is not a multiple of its width {spec.width}.")
            cfg = Dinov2WithRegistersConfig(
                hidden_size=spec.width, num_hidden_layers=spec.depth - 1, num_attention_heads=spec.heads,
                mlp_ratio=mlp // spec.width,
                image_size=spec.image_size, patch_size=spec.patch, num_register_tokens=spec.registers,
                hidden_act=act, layer_norm_eps=LN_EPS, qkv_bias=True, use_swiglu_ffn=False, drop_path_rate=0.0)
            full = Dinov2WithRegistersModel(cfg)
            del full.embeddings.mask_token  # only read with bool_masked_pos (masked pre-training)
        elif spec.kind == "siglip":
            cfg = SiglipVisionConfig(
                hidden_size=spec.width, intermediate_size=mlp, num_hidden_layers=spec.depth - 1,
                num_attention_heads=spec.heads, image_size=spec.image_size, patch_size=spec.patch,
                hidden_act=act, layer_norm_eps=LN_EPS, vision_use_head=False)
            full = SiglipVisionModel(cfg)
        else:
            raise ValueError(f"unknown tower kind {spec.kind!r}.")
        self.config = cfg
        self.embeddings, self.encoder = full.embeddings, full.encoder

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer if self.spec.kind == "dinov2" else self.encoder.layers

    def forward(self, pixels: torch.Tensor, between: list | None = None) -> torch.Tensor:
        """pixels  # (B, 3, S, S) normalised for this tower -> features (B, N, D)

        between: None runs transformers' encoder as is (OpenVLA). Otherwise one function h -> h per
        layer, applied to the residual stream between the layer's attention and MLP halves, as
        OpenVLA-OFT's FiLM does (vlarl/models/openvla_oft/film.py); the halves are the layer's own
        modules in the order of its forward, so identity functions give the same result."""
        h = self.embeddings(pixels)  # both cast pixels to their patch conv's dtype
        if between is not None:
            for layer, modulate in zip(self.layers, between, strict=True):
                h = self._mlp_half(layer, modulate(self._attention_half(layer, h)))
        elif self.spec.kind == "dinov2":
            h = self.encoder(h).last_hidden_state
        else:
            h = self.encoder(inputs_embeds=h).last_hidden_state
        return h[:, self.spec.prefix_tokens:]

    def _attention_half(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """h  # (B, T, D) -> h + attention(norm1(h)), the first residual half of the layer's forward."""
        if self.spec.kind == "dinov2":
            return layer.drop_path(layer.layer_scale1(layer.attention(layer.norm1(h))[0])) + h
        return h + layer.self_attn(hidden_states=layer.layer_norm1(h))[0]

    def _mlp_half(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """h  # (B, T, D) -> h + mlp(norm2(h)), the second residual half."""
        if self.spec.kind == "dinov2":
            return layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(h)))) + h
        return h + layer.mlp(layer.layer_norm2(h))


def upstream_shapes(spec: TowerSpec, mlp: int) -> dict[str, tuple[int, ...]]:
    """Every tensor name (relative to the tower) and shape in an upstream OpenVLA checkpoint."""
    d, n, p = spec.width, spec.num_patches, spec.patch
    shapes: dict[str, tuple[int, ...]] = {}
    if spec.cls_token:
        shapes["cls_token"] = (1, 1, d)
    if spec.registers:
        shapes["reg_token"] = (1, spec.registers, d)
    shapes.update({"pos_embed": (1, n, d), "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,)})
    for i in range(spec.depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                       b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,)})
        if spec.layer_scale:
            shapes[b + "ls1.scale_factor"] = (d,)
        shapes.update({b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (mlp, d),
                       b + "mlp.fc1.bias": (mlp,), b + "mlp.fc2.weight": (d, mlp), b + "mlp.fc2.bias": (d,)})
        if spec.layer_scale:
            shapes[b + "ls2.scale_factor"] = (d,)
    shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
    if spec.attn_pool:
        a = "attn_pool."
        shapes.update({a + "latent": (1, 1, d), a + "q.weight": (d, d), a + "q.bias": (d,), a + "kv.weight": (2 * d, d),
                       a + "kv.bias": (2 * d,), a + "proj.weight": (d, d), a + "proj.bias": (d,),
                       a + "norm.weight": (d,), a + "norm.bias": (d,), a + "mlp.fc1.weight": (mlp, d),
                       a + "mlp.fc1.bias": (mlp,), a + "mlp.fc2.weight": (d, mlp), a + "mlp.fc2.bias": (d,)})
    return shapes


def is_passthrough(spec: TowerSpec, key: str) -> bool:
    """Upstream tensors OpenVLA's features never read: the last block, the final norm, the pool head."""
    return key.startswith((f"blocks.{spec.depth - 1}.", "norm.", "attn_pool."))


def _renames(spec: TowerSpec) -> dict[str, str]:
    """Plain one-to-one names (upstream -> ours) of a tower's used tensors."""
    out = {}
    if spec.kind == "dinov2":
        out.update({"cls_token": "embeddings.cls_token", "reg_token": "embeddings.register_tokens",
                    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias"})
        block = {**DINO_BLOCK, "ls1.scale_factor": "layer_scale1.lambda1", "ls2.scale_factor": "layer_scale2.lambda1"}
    else:
        out.update({"patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                    "patch_embed.proj.bias": "embeddings.patch_embedding.bias"})
        block = SIGLIP_BLOCK
    for i in range(spec.depth - 1):
        for theirs, ours in block.items():
            suffixes = ("",) if theirs.startswith("ls") else (".weight", ".bias")
            for s in suffixes:
                out[f"blocks.{i}.{theirs}{s}"] = f"{LAYER_PREFIX[spec.kind]}.{i}.{ours}{s}"
    return out


def from_upstream(spec: TowerSpec, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Upstream tensors of one tower (names relative to it) -> (our state dict, passthrough tensors)."""
    ours, passthrough = {}, {}
    renames = _renames(spec)
    for key, value in tensors.items():
        if is_passthrough(spec, key):
            passthrough[key] = value
        elif key in renames:
            ours[renames[key]] = value
        elif key.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            i, kind = key.split(".")[1], key.rsplit(".", 1)[1]
            for name, part in zip(QKV[spec.kind], value.chunk(3, 0)):
                ours[f"{LAYER_PREFIX[spec.kind]}.{i}.{name}.{kind}"] = part.clone()
        elif key == "pos_embed":
            if spec.kind == "dinov2":  # no_embed_class: a zero position for cls, folded back on export
                ours["embeddings.position_embeddings"] = torch.cat([torch.zeros_like(value[:, :1]), value], 1)
            else:
                ours["embeddings.position_embedding.weight"] = value[0]
        else:
            raise KeyError(f"upstream tower tensor {key!r} has no place in the {spec.kind} tower.")
    return ours, passthrough


def to_upstream(spec: TowerSpec, ours: dict[str, torch.Tensor], passthrough: dict[str, torch.Tensor]) -> dict:
    """Inverse of `from_upstream`: our state dict (+ the kept tensors) -> upstream names and layout."""
    out = {theirs: ours[mine] for theirs, mine in _renames(spec).items()}
    p = LAYER_PREFIX[spec.kind]
    for i in range(spec.depth - 1):
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([ours[f"{p}.{i}.{n}.{kind}"] for n in QKV[spec.kind]], 0)
    if spec.kind == "dinov2":
        pos = ours["embeddings.position_embeddings"]
        out["pos_embed"] = pos[:, 1:]
        cls = ours["embeddings.cls_token"]
        out["cls_token"] = (cls.float() + pos[:, :1].float()).to(cls.dtype)  # cls carries its slot (0 if untrained)
    else:
        out["pos_embed"] = ours["embeddings.position_embedding.weight"][None]
    out.update(passthrough)
    return out


def mlp_width(tensors_or_shapes: dict, prefix: str = "") -> int:
    """MLP hidden width from blocks.0.mlp.fc1.weight (tensor or shape) of an upstream tower."""
    w = tensors_or_shapes[f"{prefix}blocks.0.mlp.fc1.weight"]
    return int(w[0] if isinstance(w, (tuple, list)) else w.shape[0])
