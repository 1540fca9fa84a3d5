"""Which attention kernel the transformers modules inside a policy use (model.attn_implementation).

`auto` takes FlashAttention-2 where it applies (CUDA, bfloat16 weights, a token policy, the
`flash-attn` package importable) and PyTorch's SDPA otherwise. Flow policies always use SDPA or
eager: their prefix/suffix attention is a 4-D block mask that FlashAttention-2 does not take; so is
OpenVLA-OFT's (bidirectional placeholders).
"""

from __future__ import annotations

import importlib.util

import torch

CHOICES = ("auto", "eager", "sdpa", "flash_attention_2")


def resolve_attention(name: str, device: str, dtype: torch.dtype, action_kind: str) -> str:
    """The kernel `name` means for this policy on `device`; raises ValueError for one that cannot run."""
    if name not in CHOICES:
        raise ValueError(f"model.attn_implementation={name} is not valid; choose one of {', '.join(CHOICES)}.")
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        fits = device == "cuda" and dtype in (torch.bfloat16, torch.float16) and action_kind == "token"
        return "flash_attention_2" if fits and has_flash else "sdpa"
    if name == "flash_attention_2":
        problem = ("this policy attends through a 4-D block mask FlashAttention-2 does not take" if action_kind != "token"
                   else "it runs on CUDA only (cluster.device=cuda)" if device != "cuda"
                   else "it needs half-precision weights (model.dtype=bfloat16)" if dtype not in (torch.bfloat16, torch.float16)
                   else "the flash-attn package is not installed (pip install 'vlarl[gpu]')" if not has_flash
                   else None)
        if problem:
            raise ValueError(f"model.attn_implementation=flash_attention_2 cannot be used here: {problem}; "
                             "use sdpa (or auto).")
    return name


SUPPORT = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}


def _attending(model: torch.nn.Module) -> list:
    """The transformers models inside `model` that have attention layers of their own (Llama, Gemma,
    SigLIP, ...; not vlarl's wrappers around them, which only hold such models)."""
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel) and m._supports_sdpa]


def set_attention(model: torch.nn.Module, name: str, device: str) -> str:
    """Switch every transformers model with attention inside `model` to the kernel `name` resolves
    to; returns that kernel."""
    dtype = next(model.parameters()).dtype
    impl = resolve_attention(name, device, dtype, getattr(model, "action_kind", "token"))
    for module in _attending(model):
        if impl != "eager" and not getattr(module, SUPPORT[impl]):
            raise ValueError(f"{type(module).__name__} has no {impl} attention in transformers; set "
                             "model.attn_implementation=sdpa (or auto).")
        module.set_attn_implementation(impl)
    return impl


def attention_of(model: torch.nn.Module) -> set[str]:
    """The kernels the transformers models with attention inside `model` use (for tests and logs)."""
    return {m.config._attn_implementation for m in _attending(model)}
