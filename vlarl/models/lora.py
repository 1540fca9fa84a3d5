"""LoRA on any family's decoder: inject adapters (peft) and fold them back into plain weights."""

from __future__ import annotations


def apply_lora(model, rank: int, alpha: int, expert_rank: int = 0):
    """Wrap the decoder's `model.lora_targets` projections with LoRA adapters; everything else but
    `model.lora_trainable` (small modules trained from scratch, e.g. the value head) stays frozen.
    expert_rank > 0 (flow policies with an action expert, `model.expert_name`): the expert's projections
    get adapters of that rank too, and the expert stops training fully."""
    from peft import LoraConfig, inject_adapter_in_model

    def config(r: int):
        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(model.lora_targets))

    model.language_model = inject_adapter_in_model(config(rank), model.language_model)
    trainable = tuple(model.lora_trainable)
    if expert_rank > 0:
        inject_adapter_in_model(config(expert_rank), model.get_submodule(model.expert_name))
        trainable = tuple(t for t in trainable if t != model.expert_name)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or name.startswith(trainable)
    return model


def merge_lora_state_dict(state: dict, scaling: float | None = None, alpha: float | None = None) -> dict:
    """Fold LoRA pairs into their base weights: W = W_base + scaling * B @ A, original names back. With
    `alpha` instead of `scaling`, each pair's scaling is alpha / its own rank (the decoder's and the
    action expert's adapters may differ in rank).

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
                scale = alpha / a.shape[0] if alpha is not None else scaling
                value = value + scale * (b.float() @ a.float()).to(value.dtype)
            merged[name] = value
        else:
            merged[key] = value
    return merged
