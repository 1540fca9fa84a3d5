"""Checks that need the components themselves, run before any actor starts.

`vlarl.config` validates the schema alone (it sits at the bottom of the layers and imports nothing
of vlarl); what only the environment, the reward function or the model folder can tell (the toy's
block layout, an installed simulator, a reward function that imports, a checkpoint folder some family
recognises, an OpenVLA `unnorm_key` that exists) is checked here, by the entry points
(`python -m vlarl.main`, `vlarl.sft`, `vlarl.eval`) through `load_run_config`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from vlarl.config import ConfigError, load_config


def load_run_config(argv: list[str]) -> DictConfig:
    """`load_config(argv)` plus the component checks; raises ConfigError with one sentence."""
    cfg = load_config(argv)
    check_components(cfg)
    return cfg


def check_components(cfg: DictConfig) -> None:
    check_reward(cfg)
    check_env(cfg)
    check_robustness_suites(cfg)
    check_model_folder(cfg)


def check_robustness_suites(cfg: DictConfig) -> None:
    """rollout.eval_robustness's suites exist here and none of them is trained on."""
    from vlarl.robustness import check_robustness

    try:
        check_robustness(cfg)
    except ValueError as e:
        raise ConfigError(f"rollout.eval_robustness_variants: {e}") from None


def check_reward(cfg: DictConfig) -> None:
    """The external function imports and returns finite numbers, composites are well formed."""
    from vlarl.rewards import check_reward_config

    try:
        check_reward_config(cfg.reward)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_env(cfg: DictConfig) -> None:
    """The environment's own constraints (e.g. the toy's block layout) and its packages."""
    from vlarl.envs import make_env

    try:
        make_env(cfg.env, 1, cfg.trainer.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except ImportError as e:
        raise ConfigError(f"env={cfg.env.name} needs the LIBERO simulator ({e.name} is not installed): "
                          "bash launch/setup.sh libero, or pip install 'vlarl[libero]'.") from None


def check_model_folder(cfg: DictConfig) -> None:
    """model.path belongs to a family that fits the run (detected, or model.family), before actors load it."""
    from vlarl.models.family import FamilyError
    from vlarl.models.registry import family_named, family_of_folder

    try:
        if cfg.model.path is None:
            if cfg.model.family is not None and not family_named(cfg.model.family).builds_tiny:
                raise FamilyError(f"model.family={cfg.model.family} loads checkpoints only; set model.path to a "
                                  "checkpoint folder of that family.")
            if cfg.model.expert_lora_rank > 0:
                raise FamilyError("model.expert_lora_rank is for pi0, pi05 and smolvla checkpoints (an action expert); "
                                  "set model.expert_lora_rank=0 for the tiny models.")
            if cfg.model.value_from != "prefix":
                raise FamilyError(f"model.value_from={cfg.model.value_from} is for pi0, pi05 and smolvla checkpoints; "
                                  "the tiny models read values from the prefix: set model.value_from=prefix.")
            return
        family = family_of_folder(cfg.model.path, cfg.model.family)
        if not family.action_expert:
            if cfg.model.expert_lora_rank > 0:
                raise FamilyError(f"model.expert_lora_rank is for models with an action expert (pi0, pi05, smolvla); "
                                  f"{cfg.model.path} holds a {family.name} model: set model.expert_lora_rank=0.")
            if cfg.model.value_from != "prefix":
                raise FamilyError(f"model.value_from={cfg.model.value_from} is not available for {family.name} "
                                  "models; choose model.value_from=prefix.")
        family.check(cfg.model.path, cfg.model)
        per_call = family.actions_per_call(cfg.model.path, cfg.model)
    except FamilyError as e:
        raise ConfigError(str(e)) from None
    if per_call != cfg.env.action_chunk:
        raise ConfigError(f"{cfg.model.path} emits {per_call} action(s) per call but env.action_chunk="
                          f"{cfg.env.action_chunk}; set env.action_chunk={per_call}.")
    if cfg.rollout.engine == "vllm" and not family.serves_vllm:
        raise ConfigError(f"rollout.engine=vllm serves token policies; {cfg.model.path} is a {family.name} model, "
                          "use rollout.engine=hf.")
