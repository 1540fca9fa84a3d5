"""Unit tests for vlarl.config.load_config and the `python -m vlarl.main` command line."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf.errors import ReadonlyConfigError

from vlarl.config import GROUPS, ConfigError, group_options, help_text, load_config, warm_start_lr
from vlarl.preflight import load_run_config

REPO = Path(__file__).resolve().parents[2]


def config_error(argv: list[str]) -> str:
    """The ConfigError message a run with argv stops with (schema and component checks, as
    `python -m vlarl.main` does; fails the test if none is raised)."""
    with pytest.raises(ConfigError) as err:
        load_run_config(argv)
    return str(err.value)


# ---- composition ------------------------------------------------------------------------------------
def test_defaults_load():
    cfg = load_config([])
    assert cfg.algo.name == "ppo" and cfg.algo.advantage == "gae" and cfg.algo.group_size == 1
    assert cfg.model.name == "tiny_token" and cfg.model.path is None
    assert cfg.env.name == "libero_spatial" and cfg.cluster.name == "local_cpu"
    assert cfg.env.max_steps == 220 and cfg.env.num_tasks == 10 and cfg.env.num_init_states == 40
    assert cfg.rollout.num_envs == 2  # the default run is sized for a 2-core CPU machine
    assert cfg.rollout.engine == "hf"
    assert cfg.trainer.iterations == 2 and cfg.trainer.run_dir == "runs/default"  # from conf/config.yaml
    assert list(cfg.defaults) == [{"algo": "ppo"}, {"model": "tiny_token"}, {"env": "libero_spatial"},
                                 {"cluster": "local_cpu"}, {"reward": "success"}]


def test_group_options_are_the_yaml_files():
    assert group_options("algo") == ["grpo", "ppo"]
    for group in GROUPS:
        assert group_options(group), group
        for option in group_options(group):
            assert (REPO / "conf" / group / f"{option}.yaml").is_file()


def test_algo_grpo_group():
    cfg = load_config(["algo=grpo", "rollout.num_envs=16"])
    assert cfg.algo.name == "grpo" and cfg.algo.advantage == "grpo"
    assert cfg.algo.group_size == 8
    assert cfg.algo.vf_coef == 0.0
    assert cfg.defaults[0] == {"algo": "grpo"}
    assert load_config([]).algo.group_size == 1  # the group choice does not leak into later loads


def test_dotted_overrides_parse_types():
    cfg = load_config(["trainer.iterations=7", "algo.gamma=0.5", "algo.tis_cap=2", "trainer.resume=false",
                       "cluster.dashboard=false", "model.path=null", "trainer.run_dir=/tmp/x=y",
                       "model.tiny.hidden=32", "cluster.cpus_per_learner=2"])
    assert cfg.trainer.iterations == 7 and type(cfg.trainer.iterations) is int
    assert cfg.algo.gamma == 0.5 and type(cfg.algo.gamma) is float
    assert cfg.algo.tis_cap == 2.0 and type(cfg.algo.tis_cap) is float  # int promoted for a float field
    assert cfg.trainer.resume is False and cfg.cluster.dashboard is False
    assert cfg.model.path is None
    assert cfg.trainer.run_dir == "/tmp/x=y"  # only the first '=' splits
    assert cfg.model.tiny.hidden == 32
    assert cfg.cluster.cpus_per_learner == 2.0


def test_override_after_group_wins_and_later_override_wins():
    cfg = load_config(["algo.group_size=4", "algo=grpo", "rollout.num_envs=32", "rollout.num_envs=16"])
    assert cfg.algo.group_size == 4  # dotted overrides apply after the group files
    assert cfg.rollout.num_envs == 16


def test_model_path_to_a_saved_folder_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert load_config([f"model.path={tmp_path}"]).model.path == str(tmp_path)


def test_warm_start_rate_defaults_by_policy_and_an_explicit_rate_wins():
    assert load_config([]).trainer.bc_lr is None
    assert warm_start_lr(load_config([])) == 2e-3  # token policies
    assert warm_start_lr(load_config(["model=tiny_flow"])) == 5e-4  # flow matching stalls at 2e-3
    assert warm_start_lr(load_config(["model=tiny_flow", "trainer.bc_lr=1e-3"])) == 1e-3
    assert load_config(["model=tiny_flow"]).model.flow.method == "sde_all"


def test_config_is_read_only():
    cfg = load_config([])
    with pytest.raises(ReadonlyConfigError):
        cfg.trainer.iterations = 5
    with pytest.raises(ReadonlyConfigError):
        cfg.algo["gamma"] = 0.1
    assert cfg.trainer.iterations == 2 and cfg.algo.gamma == 0.99


# ---- errors: one line, naming the key --------------------------------------------------------------
@pytest.mark.parametrize("argv, key", [
    (["trainer.bogus=1"], "trainer.bogus"),
    (["model.tiny.bogus=3"], "model.tiny.bogus"),
    (["bogus=1"], "bogus"),
    (["algo=xx"], "algo"),
    (["env=libero_99"], "env"),
    (["env.num_tasks=11"], "env.num_tasks"),
    (["env.num_init_states=50"], "env.num_init_states"),
    (["env=toy", "env.action_chunk=0"], "env.action_chunk"),
    (["env=toy", "env.action_chunk=2", "env.replan_steps=3"], "env.replan_steps"),
    (["model=tiny_flow", "model.flow.method=ode"], "model.flow.method"),
    (["model=tiny_flow", "model.flow.noise_min=0.2"], "noise_min"),
    (["model=tiny_flow", "model.flow.std_floor=0"], "model.flow.std_floor"),
    (["model=tiny_flow", "model.lora_rank=4"], "model.lora_rank"),
    (["algo.kl_coef=-1"], "algo.kl_coef"),
    (["trainer.bc_lr=0"], "trainer.bc_lr"),
    (["trainer.bc_warmup_steps=100", "trainer.bc_target_success=1.5"], "trainer.bc_target_success"),
    (["trainer.bc_target_success=0.3"], "trainer.bc_warmup_steps"),  # a target needs a warm start to stop
    (["trainer.bc_check_every=0"], "trainer.bc_check_every"),
    (["algo=grpo"], "rollout.num_envs"),
    (["rollout.engine=xx"], "rollout.engine"),
    (["model.dtype=fp16"], "model.dtype"),
    (["cluster.device=tpu"], "cluster.device"),
    (["trainer.iterations=abc"], "trainer.iterations"),
    (["trainer.iterations=1.5"], "trainer.iterations"),
    (["trainer.resume=maybe"], "trainer.resume"),
    (["algo.gamma=abc"], "algo.gamma"),
    (["trainer.run_dir=null"], "trainer.run_dir"),
    (["trainer.iterations=0"], "trainer.iterations"),
    (["rollout.temperature=-1"], "rollout.temperature"),
    (["rollout.num_envs=0"], "rollout.num_envs"),
    (["cluster.num_rollout_workers=0"], "cluster.num_rollout_workers"),
    (["trainer.iterations"], "trainer.iterations"),
    (["algo=grpo", "algo.group_size=1"], "algo.group_size"),
    (["algo.advantage=grpo"], "algo.advantage"),
    (["algo=grpo", "rollout.num_envs=12"], "rollout.num_envs"),
    (["cluster.num_rollout_workers=3"], "rollout.num_envs"),
    (["model=openvla"], "model.path"),  # a checkpoint family with nothing to load
    (["model.family=nonesuch"], "model.family"),
])
def test_mistakes_raise_one_line_config_error_naming_the_key(argv, key):
    message = config_error(argv)
    assert "\n" not in message
    assert key in message
    assert len(message) < 400


def test_model_path_without_config_json(tmp_path):
    message = config_error([f"model.path={tmp_path}"])
    assert "\n" not in message and "model.path" in message and "config.json" in message


def test_unknown_key_lists_valid_keys():
    message = config_error(["trainer.iteratons=3"])
    assert "iterations" in message and "run_dir" in message


def test_unknown_group_option_lists_choices():
    message = config_error(["algo=ppo2"])
    assert "ppo" in message and "grpo" in message


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("argv, key", [(["trainer=3"], "trainer"), (["model.tiny=3"], "model.tiny")])
def test_section_assigned_a_scalar_names_the_key(argv, key):
    message = config_error(argv)
    assert "'?'" not in message and key in message


def test_empty_key_and_negative_eval_every_are_refused():
    assert "no key" in config_error(["=3"])
    assert "rollout.eval_every" in config_error(["rollout.eval_every=-1"])


# ---- the command line --------------------------------------------------------------------------------
def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlarl.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_help_lists_groups_and_keys():
    proc = run_main("--help")
    assert proc.returncode == 0, proc.stderr
    for group in GROUPS:
        assert f"{group}=" in proc.stdout
    for option in ("algo={grpo,ppo}", "env={libero_10,libero_90,libero_goal,libero_object,libero_spatial,toy}", "model={openvla,openvla_oft,pi0,pi05,smolvla,tiny_flow,tiny_token}", "cluster={local_cpu,multi_node,node_colocated,node_split,one_gpu}", "--dry-run"):
        assert option in proc.stdout
    for key in ("trainer.iterations=2", "rollout.num_envs=2", "algo.group_size=1", "model.tiny.hidden=",
                "model.path=null", "env.max_steps=", "cluster.device=cpu"):
        assert key in proc.stdout
    assert proc.stdout.strip() == help_text().strip()


def test_bad_key_exits_2_with_one_stderr_line():
    proc = run_main("trainer.bogus=1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "trainer.bogus" in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_bad_type_exits_2_without_traceback():
    proc = run_main("algo=grpo", "trainer.iterations=abc")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "trainer.iterations" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wandb_without_the_package_is_refused_at_start():
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert "pip install" in config_error(["trainer.wandb=true"])
    else:
        assert load_config(["trainer.wandb=true"]).trainer.wandb is True


def test_algorithm_name_and_estimator_must_agree():
    assert "algo.advantage" in config_error(["algo.name=grpo"])
