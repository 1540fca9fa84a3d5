"""OpenVLA's towers rebuilt from transformers modules vs timm's own implementation (the upstream one).

timm is a test-only dependency. It imports torchvision at import time (FrozenBatchNorm2d, transforms),
and the PyPI torchvision wheel is a CUDA build that cannot load beside the CPU torch this project uses
(`operator torchvision::nms does not exist`), so when torchvision does not import, timm is imported
behind a throw-away stand-in for torchvision that is removed again right after: the ViT code under
test never calls torchvision.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

import pytest
import torch

from vlarl.models.openvla import vision
from vlarl.models.openvla.config import tower_spec


class _Anything(type):
    """A class whose attributes and instances are more such classes (stands in for any torchvision name)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})

    def __call__(cls, *args, **kwargs):
        return _Anything("instance", (), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _import_timm():
    try:
        import torchvision
    except (ImportError, RuntimeError, OSError):  # absent, or the CUDA wheel failing beside CPU torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        stub = _TorchvisionStub()
        sys.meta_path.insert(0, stub)
        try:
            return pytest.importorskip("timm")
        finally:
            sys.meta_path.remove(stub)
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]
    return pytest.importorskip("timm")


timm = _import_timm()

TIMM_IDS = {"dinov2": "vit_large_patch14_reg4_dinov2.lvd142m", "siglip": "vit_so400m_patch14_siglip_224"}
TINY = {"dinov2": dict(embed_dim=32, depth=3, num_heads=4), "siglip": dict(embed_dim=48, depth=3, num_heads=4)}


def timm_tower(kind: str, meta: bool = False, **override):
    """The tower as upstream builds it (timm.create_model, num_classes=0, img_size=224, act_layer=None),
    with OpenVLA's LayerScale rename gamma -> scale_factor applied to the state dict."""
    with torch.device("meta" if meta else "cpu"):
        model = timm.create_model(TIMM_IDS[kind], pretrained=False, num_classes=0, img_size=224, act_layer=None,
                                  **override)
    return model.eval()


def upstream_state(model) -> dict[str, torch.Tensor]:
    return {k.replace(".gamma", ".scale_factor"): v for k, v in model.state_dict().items()}


def randomise(model, seed: int) -> None:
    """Random values in every tensor (norm weights near 1) so every weight shapes the features."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith(".gamma"):
                p.copy_(0.5 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


@pytest.mark.parametrize("kind", ["dinov2", "siglip"])
def test_real_size_key_set_and_shapes_match_timm(kind):
    model = timm_tower(kind, meta=True)
    spec = tower_spec(TIMM_IDS[kind], 224, None, None)
    state = upstream_state(model)
    ours = vision.upstream_shapes(spec, vision.mlp_width({k: tuple(v.shape) for k, v in state.items()}))
    assert {k: tuple(v.shape) for k, v in state.items()} == ours
    assert (spec.width, spec.depth, spec.heads) == (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads)
    assert spec.prefix_tokens == model.num_prefix_tokens
    assert vision.mlp_width(ours) == (4096 if kind == "dinov2" else 4304)


@pytest.mark.parametrize("kind", ["dinov2", "siglip"])
def test_tower_features_match_timm(kind):
    torch.manual_seed(0)
    ref = timm_tower(kind, **TINY[kind])
    randomise(ref, seed=1)
    state = upstream_state(ref)
    spec = tower_spec(TIMM_IDS[kind], 224, TINY[kind], None)
    mlp = vision.mlp_width(state)
    assert {k: tuple(v.shape) for k, v in state.items()} == vision.upstream_shapes(spec, mlp)

    ours_state, kept = vision.from_upstream(spec, state)
    tower = vision.Tower(spec, mlp).eval()
    tower.load_state_dict(ours_state, strict=True)  # every parameter of ours is set, none left over
    assert set(kept) == {k for k in state if vision.is_passthrough(spec, k)}

    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.get_intermediate_layers(pixels, n=[len(ref.blocks) - 2])[0]  # upstream's call
        got = tower(pixels)
    assert got.shape == expected.shape == (2, 256, spec.width)
    assert (got - expected).abs().max().item() < 1e-5

    # The last block, final norm and pool head do not touch the features: a different last block
    # leaves them unchanged in timm too (so carrying those tensors aside loses nothing).
    with torch.no_grad():
        ref.blocks[-1].mlp.fc1.weight.mul_(3.0)
        again = ref.get_intermediate_layers(pixels, n=[len(ref.blocks) - 2])[0]
    assert torch.equal(again, expected)


@pytest.mark.parametrize("kind", ["dinov2", "siglip"])
def test_key_maps_round_trip_bit_exactly(kind):
    ref = timm_tower(kind, **TINY[kind])
    randomise(ref, seed=3)
    state = {k: v.to(torch.bfloat16) for k, v in upstream_state(ref).items()}
    spec = tower_spec(TIMM_IDS[kind], 224, TINY[kind], None)
    ours, kept = vision.from_upstream(spec, {k: v.float() for k, v in state.items()})
    back = {k: v.to(torch.bfloat16) for k, v in vision.to_upstream(spec, ours, kept).items()}
    assert set(back) == set(state)
    for key in state:
        assert back[key].shape == state[key].shape and torch.equal(back[key], state[key]), key


def test_trained_cls_position_slot_folds_into_cls_token():
    """DINOv2's cls position slot (absent upstream) is folded into cls_token on export, so the
    exported timm tower computes what ours does even after the slot was trained."""
    kind = "dinov2"
    ref = timm_tower(kind, **TINY[kind])
    randomise(ref, seed=4)
    spec = tower_spec(TIMM_IDS[kind], 224, TINY[kind], None)
    ours, kept = vision.from_upstream(spec, upstream_state(ref))
    ours["embeddings.position_embeddings"][:, 0] += 0.3
    tower = vision.Tower(spec, vision.mlp_width(upstream_state(ref))).eval()
    tower.load_state_dict(ours)
    exported = vision.to_upstream(spec, ours, kept)
    ref.load_state_dict({k.replace(".scale_factor", ".gamma"): v for k, v in exported.items()})
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = tower(pixels) - ref.get_intermediate_layers(pixels, n=[len(ref.blocks) - 2])[0]
    assert diff.abs().max().item() < 1e-5
