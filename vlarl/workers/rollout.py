"""RolloutWorker: owns an inference engine and a set of environments, and collects episodes.

`collect` runs every environment to the end of one episode from the given (task, init state)
pairs and returns a TrajectoryBatch. Sampling noise comes from one generator per environment seeded
with (seed, iteration, worker, mode, environment), so a resumed run draws the same actions an
uninterrupted one would.

Pipelining: the environments are split into `rollout.pipeline_stages` groups visited in a fixed
round: the worker sends one stage's actions and, while its simulators step, generates the next
stage's (auto: 2 stages for LIBERO, whose simulators step in subprocesses; 1 for the toy env, which
steps in this process, so stages would only split the engine's batch). The schedule never depends on
which reply comes first, and every environment has its own generator, so the batch is the same for
any number of stages (a flow policy's continuous actions to float rounding: a batched matmul rounds
differently at another batch size).
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf

from vlarl.data.batch import EvalEpisodes, TrajectoryBatch
from vlarl.data.spec import ACTION_DIM
from vlarl.envs import make_env
from vlarl.models.registry import load_model
from vlarl.rollout.flow_engine import make_engine


class RolloutWorker:
    def __init__(self, cfg: dict, index: int, model_folder: str, num_envs: int):
        self.cfg = OmegaConf.create(cfg)
        self.index = index
        torch.set_num_threads(self.cfg.cluster.torch_threads)
        device = "cuda" if self.cfg.cluster.device == "cuda" else "cpu"
        loaded = load_model(model_folder, self.cfg.model, device)
        model, tokenizer, action_tokenizer = loaded
        # Per-benchmark image preprocessing the family asks for (e.g. OpenVLA's LIBERO resize), applied once
        # per frame here so the engine, the stored batch and hence the learner all see the same pixels.
        self.frame_transform = loaded.family.frame_transform(self.cfg.env.name, self.cfg.model)
        want = ACTION_DIM * self.cfg.env.action_chunk
        if model.config.action_dim != want:
            raise ValueError(f"the model emits {model.config.action_dim} action values per call but env.action_chunk="
                             f"{self.cfg.env.action_chunk} needs {want}; match env.action_chunk to the model.")
        if self.cfg.rollout.engine == "vllm":
            from vlarl.rollout.vllm_engine import VLLMEngine
            from vlarl.rollout.weight_sync import resolve_transport

            transport = resolve_transport(self.cfg.rollout.weight_transport, "vllm", device, self.cfg.cluster.colocate)
            self.engine = VLLMEngine(model, tokenizer, action_tokenizer, device, self.cfg.rollout.vllm_memory_fraction,
                                     self.cfg.rollout.sync_bucket_mb, sleep_mode=transport == "cuda_ipc")
        else:
            self.engine = make_engine(model, tokenizer, action_tokenizer, device, self.cfg.rollout.compile)
        self.env = make_env(self.cfg.env, num_envs, self.cfg.trainer.seed)
        self.suite_envs: dict = {}  # other LIBERO suites evaluated on (robustness), built on first use
        self.num_envs = num_envs
        self.weights_version = 0
        self.weight_group = None  # token of the learner's NCCL weight-sync group this engine joined

    @property
    def pipeline_stages(self) -> int:
        """rollout.pipeline_stages, with 0 (auto) resolved: stages pay only where envs step in the background."""
        return self.cfg.rollout.pipeline_stages or (2 if self.env.steps_in_background else 1)

    def load_weights(self, state_dict: dict, version: int) -> int:
        """Take a weight push from learner rank 0 (object-store transport); returns the new version."""
        self.engine.load_state_dict(state_dict)
        self.weights_version = version
        return version

    def load_weights_ipc(self, prefix_state: dict, payload: list, uuid: str, version: int) -> int:
        """cuda_ipc transport: the decoder's buckets as IPC handles of the learner's GPU buffers."""
        self.engine.receive_ipc(prefix_state, payload, uuid)
        self.weights_version = version
        return version

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, token: str) -> None:
        """nccl transport: join learner rank 0's broadcast group (collective with the learner)."""
        self.engine.join_nccl(host, port, rank, world_size, token)
        self.weight_group = token

    def load_weights_nccl(self, prefix_state: dict, metas: list, token: str, version: int) -> int:
        """nccl transport: receive the decoder's buckets from the learner's broadcasts."""
        self.engine.receive_nccl(prefix_state, metas, token)
        self.weights_version = version
        return version

    def weight_group_token(self) -> str | None:
        """The NCCL weight-sync group this engine is in (None: none, e.g. a replacement worker before its first push)."""
        return self.weight_group

    def sleep(self) -> None:
        """Colocated vLLM engine: give the GPU to the learner until the next weight push or rollout."""
        sleep = getattr(self.engine, "sleep", None)
        if sleep:
            sleep()

    def shutdown(self) -> None:
        """Close the environments (LIBERO: stop the simulator processes) and the engine before the actor goes."""
        for thing in (self.env, *self.suite_envs.values(), self.engine):
            close = getattr(thing, "close", None)
            if close:
                close()

    def node_id(self) -> str:
        """The Ray node this worker runs on (also a liveness ping)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def env_for(self, suite: str | None):
        """The environment of `suite` (None: the one trained on); another LIBERO suite (env.name too when
        training on a mixture) gets envs of its own (rollout.eval_robustness), configured by suite_env."""
        if suite is None or (suite == self.cfg.env.name and not self.cfg.env.train_suites):
            return self.env
        if suite not in self.suite_envs:
            from vlarl.envs.libero import suite_env

            env_cfg = OmegaConf.merge(self.cfg.env, suite_env(self.cfg.env, suite))
            self.suite_envs[suite] = make_env(env_cfg, self.num_envs, self.cfg.trainer.seed)
        return self.suite_envs[suite]

    def env_shape(self, suite: str | None = None) -> dict:
        """What the driver needs to plan episodes: task and init-state counts, step limit."""
        e = self.env_for(suite)
        return {"num_tasks": e.num_tasks, "num_init_states": e.num_init_states,
                "num_held_out_states": e.num_held_out_states, "max_steps": e.max_steps,
                "instructions": e.instructions(),
                "task_suites": e.task_suites() if hasattr(e, "task_suites") else None}

    def collect(self, task_ids: list[int], init_state_ids: list[int], group_ids: list[int],
                iteration: int, greedy: bool = False, record: int = 0) -> TrajectoryBatch:
        """One episode per environment with the current policy (sampled, or greedy); the first `record`
        come back with their frames in batch.videos (for rewards that need them, e.g. human labels)."""
        batch, videos = self._episodes(task_ids, init_state_ids, group_ids, self._policy(iteration, greedy), record)
        batch.videos = videos
        return batch

    def evaluate(self, task_ids: list[int], init_state_ids: list[int], iteration: int, record: int = 0,
                 suite: str | None = None) -> EvalEpisodes:
        """Greedy episodes (on another LIBERO suite with `suite`); the first `record` come back with
        their frames for videos."""
        batch, videos = self._episodes(task_ids, init_state_ids, list(range(len(task_ids))),
                                       self._policy(iteration, True), record, self.env_for(suite))
        return EvalEpisodes(task_ids=batch.task_ids, init_state_ids=batch.init_state_ids, success=batch.success,
                            returns=batch.episode_returns, lengths=batch.lengths, videos=videos,
                            weights_version=batch.weights_version, env_restarts=batch.env_restarts)

    def _policy(self, iteration: int, greedy: bool):
        seeds = [np.random.SeedSequence([self.cfg.trainer.seed, iteration, self.index, int(greedy), i])
                 for i in range(self.num_envs)]
        generators = [torch.Generator().manual_seed(int(s.generate_state(1)[0])) for s in seeds]  # one per env
        temperature = self.cfg.rollout.temperature

        def policy(obs, env_ids):
            out = self.engine.generate(obs, temperature, greedy, [generators[i] for i in env_ids])
            return out.record(), out.logprobs, out.actions

        return policy

    def demonstrations(self, task_ids: list[int], init_state_ids: list[int]) -> TrajectoryBatch:
        """One scripted expert episode per environment (for the behaviour-cloning warm start)."""
        if not hasattr(self.env, "expert_actions"):
            raise ValueError(f"env={self.cfg.env.name} has no scripted expert; set trainer.bc_warmup_steps=0.")

        def policy(obs, env_ids):
            return self.engine.demonstration(self.env.expert_actions()[env_ids])

        return self._episodes(task_ids, init_state_ids, list(range(len(task_ids))), policy)[0]

    def _observe(self, obs: dict) -> dict:
        """The observation with its images made by the family's frame transform (if any)."""
        if self.frame_transform is None:
            return obs
        return {**obs, "image": self.frame_transform(obs)}

    def _episodes(self, task_ids, init_state_ids, group_ids, policy, record: int = 0, env=None
                  ) -> tuple[TrajectoryBatch, dict]:
        """Run every environment to the end of one episode, stage by stage (module docstring). `policy`
        maps (observation rows, their env ids) to (record, logprobs, actions). Returns the batch and, for
        the first `record` episodes, their frames (camera frames where the env renders them, else model
        images)."""
        n, env = self.num_envs, env or self.env
        if len(task_ids) != n:
            raise ValueError(f"worker {self.index} runs {n} environments but was given {len(task_ids)} tasks.")
        restarts = getattr(env, "restarts", 0)
        obs = self._observe(env.reset(task_ids, init_state_ids, record=record))
        videos = {i: [_frame(obs, i, i)] for i in range(min(record, n))}
        horizon = env.max_steps
        images = np.zeros((n, horizon + 1, *obs["image"].shape[1:]), np.uint8)
        proprio = np.zeros((n, horizon + 1, obs["proprio"].shape[1]), np.float32)
        d = self.engine.model.config.action_dim
        records: dict[str, np.ndarray] = {}  # per-step policy records (action tokens or flow chains), (n, horizon, ...)
        logprobs = None
        sent = np.zeros((n, horizon, d), np.float32)  # what the environments executed (reward providers)
        rewards = np.zeros((n, horizon), np.float32)
        mask, dones, terminated, timeouts = (np.zeros((n, horizon), bool) for _ in range(4))
        executed = np.zeros((n, horizon), np.int64)  # actions of each call's chunk the environment ran
        success = np.zeros(n, bool)
        images[:, 0], proprio[:, 0] = obs["image"], obs["proprio"]
        # Each stage: its running env ids and their observation rows (None once all its episodes ended).
        stages = np.array_split(np.arange(n), min(self.pipeline_stages, n))
        running: list[tuple[np.ndarray, dict] | None] = [(ids, _select(obs, ids)) for ids in stages]
        t = [0] * len(stages)  # each stage's step

        def act(k: int) -> None:  # generate for stage k and send it off
            nonlocal logprobs
            ids, stage_obs = running[k]
            step_record, step_logprobs, step_actions = policy(stage_obs, ids)
            env.step_send(step_actions, ids)
            logprobs = _store(records, step_record, step_logprobs, ids, t[k], n, horizon, logprobs)
            sent[ids, t[k]] = step_actions

        for k in range(len(stages)):
            act(k)
        while any(running):
            for k, stage in enumerate(running):
                if stage is None:
                    continue
                ids, step = stage[0], t[k]
                res = env.step_recv(ids)
                res = res._replace(obs=self._observe(res.obs))
                ended = res.terminated | res.truncated
                rewards[ids, step], mask[ids, step] = res.reward, True
                dones[ids, step], terminated[ids, step] = ended, res.terminated
                # the step limit, not a restart (an env with per-episode limits says which)
                timeouts[ids, step] = res.info.get("timeout", res.truncated & (step + 1 >= horizon))
                success[ids] |= res.info["success"]
                executed[ids, step] = res.info.get("executed", self.cfg.env.action_chunk)
                images[ids, step + 1], proprio[ids, step + 1] = res.obs["image"], res.obs["proprio"]
                for row, i in enumerate(ids):
                    if i in videos:
                        videos[i].append(_frame(res.obs, i, row))
                t[k] = step + 1
                keep = np.nonzero(~ended)[0]
                running[k] = (ids[keep], _select(res.obs, keep)) if len(keep) and t[k] < horizon else None
                if running[k] is not None:
                    act(k)
        steps = max(t)
        batch = TrajectoryBatch(
            images=images[:, :steps + 1], proprio=proprio[:, :steps + 1],
            instructions=[env.instructions()[k] for k in task_ids],
            task_ids=np.asarray(task_ids, np.int64), init_state_ids=np.asarray(init_state_ids, np.int64),
            group_ids=np.asarray(group_ids, np.int64),
            **{"action_tokens": np.zeros((n, steps, 0), np.int64), **{k: v[:, :steps] for k, v in records.items()}},
            rollout_logprobs=logprobs[:, :steps], rewards=rewards[:, :steps], mask=mask[:, :steps],
            dones=dones[:, :steps], terminated=terminated[:, :steps], timeouts=timeouts[:, :steps], success=success,
            weights_version=self.weights_version, env_restarts=getattr(env, "restarts", 0) - restarts,
            actions=sent[:, :steps], executed=executed[:, :steps],
        )
        return batch, {i: np.stack(f) for i, f in videos.items()}


def _store(records: dict, step_record: dict, step_logprobs: np.ndarray, ids: np.ndarray, t: int, n: int,
           horizon: int, logprobs: np.ndarray | None) -> np.ndarray:
    """Write one step's policy record and log-probs into (n, horizon, ...) arrays, allocating them
    from the first step's shapes (token ids (B, D), or a flow chain (B, K+1, A) and its SDE step).
    Returns the log-prob array."""
    for key, value in step_record.items():
        if key not in records:
            records[key] = np.zeros((n, horizon, *value.shape[1:]), value.dtype)
        records[key][ids, t] = value
    if logprobs is None:
        logprobs = np.zeros((n, horizon, *step_logprobs.shape[1:]), np.float32)
    logprobs[ids, t] = step_logprobs
    return logprobs


def _select(obs: dict, rows: np.ndarray) -> dict:
    """Rows of an observation batch, without the video frames (the engine's input)."""
    return {k: ([v[i] for i in rows] if isinstance(v, list) else v[rows]) for k, v in obs.items() if k != "frames"}


def _frame(obs: dict, i: int, row: int) -> np.ndarray:
    """Video frame of env i, at `row` of the observation batch."""
    return obs["frames"][i] if i in obs.get("frames", {}) else obs["image"][row]
