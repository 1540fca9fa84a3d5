"""Learner group: N FSDP2 ranks that recompute old log-probs/values, compute advantages and run PPO.

Each `LearnerWorker` is one rank. The ranks form their own process group (gloo on CPU, NCCL on
GPU) and shard the model with `fully_shard` per transformer layer. Every rank sees the whole
batch through Ray's object store and works on its slice of each minibatch; losses are divided by
the global element count and multiplied by the world size (FSDP averages gradients), so one rank
and N ranks take the same step on the same batch.

Checkpoints are written shard by shard (`save_shards`, in the background over a gloo group of its
own); `shards_written` runs in a concurrency group of its own, so waiting for the writes does not
hold up the next call. Make the actor with `LearnerActor.options(...)`, which declares that group.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import ray
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from vlarl.algo.advantages import EPISODE_ADVANTAGES, gae, group_filter_mask, masked_mean, masked_whiten
from vlarl.algo.guards import clip_log_ratio, kl_to_reference
from vlarl.algo.losses import policy_loss, ratio_units, truncated_is_weights, value_loss
from vlarl.data.batch import TrajectoryBatch
from vlarl.data.spec import ACTION_DIM
from vlarl.models.lora import apply_lora, merge_lora_state_dict
from vlarl.models.registry import load_model
from vlarl.models.flow_policy import pack_chains
from vlarl.rollout.hf_engine import InstructionCache
from vlarl.rollout.weight_sync import (broadcast_buckets, decoder_weights, export_ipc, gpu_uuid, nccl_group,
                                       plan_buckets, prefix_weights, resolve_transport)
from vlarl.workers import checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _register_forward_methods(model) -> None:
    """FSDP2 gathers parameters around forward(); methods a model names in `fsdp_forward_methods`
    (the flow VLA's flow-matching loss) get the same treatment."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    for name in getattr(model, "fsdp_forward_methods", ()):
        register_fsdp_forward_method(model, name)


def shard(model, mesh, model_cfg):
    """FSDP2 over the model's own units (`fsdp_units`: transformer layers and ViT blocks), each
    gathered only while it runs. model.activation_checkpointing recomputes each unit's activations in
    backward instead of keeping them; model.mixed_precision computes in bf16 over float32 parameters
    (gradients reduced in float32)."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if model_cfg.mixed_precision else MixedPrecisionPolicy()
    for unit in model.fsdp_units():
        if model_cfg.activation_checkpointing:
            checkpoint(unit)
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


class StepInputs:
    """Per-step model inputs gathered from a TrajectoryBatch by (episode, step) indices."""

    def __init__(self, batch: TrajectoryBatch, instructions: InstructionCache):
        self.batch = batch
        self.ids, self.text_mask = instructions.encode(batch.instructions)  # (N, Li)

    def take(self, ep: np.ndarray, t: np.ndarray, tokens: np.ndarray, device) -> tuple:
        """ep, t (B,) indices; tokens (B, D) -> model forward arguments"""
        b, to = self.batch, lambda x: torch.as_tensor(x).to(device)  # noqa: E731
        return (to(b.images[ep, t]), to(b.proprio[ep, t]), to(self.ids[ep]), to(self.text_mask[ep]), to(tokens))


def step_actions(batch: TrajectoryBatch, ep: np.ndarray, t: np.ndarray) -> np.ndarray:
    """What the model scores at steps (ep, t): token ids (S, D), a Gaussian policy's draws (S, D), or
    for a flow policy the packed chains and SDE step indices (S, (K+1)*A + 1) (vlarl.models.flow_policy.pack_chains)."""
    if batch.sampled_actions is not None:
        return batch.sampled_actions[ep, t]
    if batch.chains is None:
        return batch.action_tokens[ep, t]
    return pack_chains(torch.from_numpy(batch.chains[ep, t]), torch.from_numpy(batch.sde_steps[ep, t])).numpy()


class LearnerWorker:
    def __init__(self, cfg: dict, rank: int, world_size: int, model_folder: str):
        self.cfg = OmegaConf.create(cfg)
        self.rank, self.world_size = rank, world_size
        self.model_folder = model_folder
        self._bc = None  # a piecewise warm start's optimizer and streams (behaviour_clone(keep=True))
        self.device = "cuda" if self.cfg.cluster.device == "cuda" else "cpu"
        torch.set_num_threads(self.cfg.cluster.torch_threads)
        self._nccl, self._nccl_token = None, None  # weight-sync NCCL group with the engines (nccl transport)
        self._shards = None  # the future of a checkpoint shard still being written (save_shards)

    # ---- setup -----------------------------------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        """Called on rank 0: this node's address and a free port the group can meet at."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def node_id(self) -> str:
        """The Ray node this rank runs on (also a liveness ping)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def setup(self, master_addr: str, master_port: int) -> int:
        backend = "nccl" if self.device == "cuda" else "gloo"
        # A collective that waits longer than this raises instead of hanging: the trainer recovers.
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                world_size=self.world_size,
                                timeout=timedelta(seconds=self.cfg.cluster.collective_timeout_s))
        # Checkpoint shards are written in a background thread: its collectives get a group of their own.
        self._checkpoint_group = dist.new_group(backend="gloo",
                                                timeout=timedelta(seconds=self.cfg.cluster.collective_timeout_s))
        from torch.distributed.device_mesh import init_device_mesh

        model, tokenizer, self.action_tokenizer = load_model(self.model_folder, self.cfg.model, self.device)
        self.ref_model = None  # the frozen policy RL starts from, taken at the first update (algo.kl_coef > 0)
        if self.cfg.model.lora_rank > 0:
            model = apply_lora(model, self.cfg.model.lora_rank, self.cfg.model.lora_alpha,
                               self.cfg.model.expert_lora_rank)
        model.to(self.device)
        self.model = shard(model, init_device_mesh(self.device, (self.world_size,)), self.cfg.model)
        _register_forward_methods(self.model)
        self.instructions = InstructionCache(tokenizer, model)
        critic = [p for n, p in model.named_parameters() if n.startswith("value_head")]
        actor = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("value_head")]
        a = self.cfg.algo
        # foreach=True: one fused update per group; the per-tensor default costs 4x on FSDP's DTensors.
        self.optimizer = torch.optim.AdamW([{"params": actor, "lr": a.actor_lr}, {"params": critic, "lr": a.critic_lr}],
                                           weight_decay=0.0, foreach=True)
        return sum(p.numel() for p in model.parameters())

    # ---- helpers -----------------------------------------------------------------------------
    def _my_slice(self, idx: np.ndarray) -> np.ndarray:
        return np.array_split(idx, self.world_size)[self.rank]

    @torch.no_grad()
    def _score_all(self, inputs: StepInputs, ep, t, tokens, temperature, chunk: int = 256):
        """Log-probs (S, D) and values (S,) of every listed step, sharded over ranks and gathered."""
        n = len(ep)
        per_rank = -(-n // self.world_size)
        order = np.arange(per_rank * self.world_size) % max(n, 1)  # pad by wrapping
        mine = order[self.rank * per_rank:(self.rank + 1) * per_rank]
        logps, vals = [], []
        n_chunks = -(-per_rank // chunk)  # equal on every rank: FSDP needs matching forward calls
        for c in range(n_chunks):
            sel = mine[c * chunk:(c + 1) * chunk]
            lp, _, v, *_ = self.model(*inputs.take(ep[sel], t[sel], tokens[sel], self.device), temperature=temperature)
            logps.append(lp.cpu())
            vals.append(v.cpu())
        lp, v = torch.cat(logps), torch.cat(vals)
        if self.world_size > 1:
            lp_all, v_all = [torch.empty_like(lp) for _ in range(self.world_size)], [torch.empty_like(v) for _ in range(self.world_size)]
            dist.all_gather(lp_all, lp.to(self.device))
            dist.all_gather(v_all, v.to(self.device))
            lp, v = torch.cat(lp_all).cpu(), torch.cat(v_all).cpu()
        return lp[:n], v[:n]

    # ---- the update ----------------------------------------------------------------------------
    def update(self, batch: TrajectoryBatch, iteration: int) -> dict:
        a, temp = self.cfg.algo, self.cfg.rollout.temperature
        self.model.train()
        inputs = StepInputs(batch, self.instructions)
        ep, t = batch.flat_steps()
        tokens = step_actions(batch, ep, t)  # (S, D) token ids or (S, X) packed flow chains
        if a.kl_coef > 0 and self.ref_model is None:
            self.ref_model = self._reference_model()
        old_logprobs, old_values = self._score_all(inputs, ep, t, tokens, temp)
        rollout_logprobs = torch.from_numpy(batch.rollout_logprobs[ep, t])
        # (S, W) the log-prob elements of actions the environments ran; the rest had no effect on the return
        executed = torch.from_numpy(batch.executed_mask(ep, t, old_logprobs.shape[1], ACTION_DIM * self.cfg.env.action_chunk))
        units = ratio_units(old_logprobs, a.logprob_level, executed)[1]  # (S, U) the ratio units that count
        metrics = {"rollout/logprob_abs_diff": masked_mean((old_logprobs - rollout_logprobs).abs(), executed).item(),
                   "rollout/executed_fraction": executed.float().mean().item()}

        advantages, returns, keep = self._advantages(batch, inputs, ep, t, tokens, old_values, temp)
        is_weights = None
        if a.tis_cap > 0:
            is_weights = truncated_is_weights(ratio_units(old_logprobs, a.logprob_level, executed)[0],
                                              ratio_units(rollout_logprobs, a.logprob_level, executed)[0], a.tis_cap)
        warmup = iteration < a.critic_warmup_iters
        steps = np.nonzero(keep.numpy())[0]
        for epoch in range(a.epochs):
            rng = np.random.default_rng((self.cfg.trainer.seed, iteration, epoch))
            perm = steps[rng.permutation(len(steps))]
            n_mb = max(1, len(perm) // a.minibatch_size)
            for mb in np.array_split(perm, n_mb):
                if len(mb) < self.world_size:
                    continue
                m = self._minibatch_step(inputs, ep, t, tokens, mb, old_logprobs, old_values, advantages,
                                         returns, is_weights, (executed, units), warmup, temp)
                for k, v in m.items():
                    metrics.setdefault(k, []).append(v)
        out = {k: float(np.mean(v)) for k, v in metrics.items()}
        out["actor/kept_steps"] = float(len(steps))
        out["critic/warmup"] = float(warmup)
        return out

    def _advantages(self, batch, inputs, ep, t, tokens, old_values, temp):
        """-> advantages (S,), returns (S,), keep (S,) bool for the flattened steps."""
        a = self.cfg.algo
        n_steps = len(ep)
        keep = torch.ones(n_steps, dtype=torch.bool)
        if a.advantage == "gae":
            n, width = batch.mask.shape
            last_t = batch.last_obs_steps()
            _, last_values = self._score_all(inputs, np.arange(n), last_t, step_actions(batch, np.arange(n), 0 * last_t), temp)
            values = torch.zeros(n, width)
            values[ep, t] = old_values
            adv, ret = gae(torch.tensor(batch.rewards), values, torch.tensor(batch.dones),
                           torch.tensor(batch.no_bootstrap(a.bootstrap_time_limit)), last_values,
                           torch.tensor(batch.mask), a.gamma, a.lam)
            advantages, returns = adv[ep, t], ret[ep, t]
        else:
            ep_returns = torch.tensor(batch.episode_returns)
            group_ids = torch.tensor(batch.group_ids)
            advantages = EPISODE_ADVANTAGES[a.advantage](ep_returns, group_ids)[ep]
            returns = ep_returns[ep]
            if a.group_filter:
                keep = group_filter_mask(ep_returns, group_ids, a.filter_low, a.filter_high)[ep]
        if a.normalize_advantages and keep.any():
            advantages = masked_whiten(advantages, keep.float())
        return advantages, returns, keep

    def _microbatches(self, mine: np.ndarray, global_size: int) -> list[np.ndarray]:
        """This rank's share of a minibatch in algo.microbatch_size pieces (one piece when 0). Every rank
        makes the same number of pieces (FSDP needs matching forward calls): as many as the smallest
        share needs, so none is empty."""
        micro = self.cfg.algo.microbatch_size
        pieces = 1 if micro <= 0 else max(1, -(-(global_size // self.world_size) // micro))
        return np.array_split(mine, pieces)

    def _minibatch_step(self, inputs, ep, t, tokens, mb, old_logprobs, old_values, advantages, returns,
                        is_weights, masks, warmup, temp) -> dict:
        """One optimizer step on minibatch `mb` (global step indices), its gradient accumulated over
        micro-batches: each piece's losses are divided by the whole minibatch's element counts (executed
        elements and ratio units, `masks` (S, W) and (S, U) over the whole batch, so every rank agrees), so the
        pieces add up to the full-minibatch gradient."""
        a = self.cfg.algo
        executed, units = masks
        mine = self._my_slice(mb)
        counts = (float(executed[mb].sum().clamp(min=1)), float(units[mb].sum().clamp(min=1)))
        parts = [((len(piece), float(units[piece].sum())),
                  self._micro_step(inputs, ep, t, tokens, piece, len(mb), counts, old_logprobs, old_values, advantages,
                                   returns, is_weights, executed, warmup, temp))
                 for piece in self._microbatches(mine, len(mb))]
        if warmup:  # critic warmup: only the value head moves (VLA-RL)
            for group in self.optimizer.param_groups[:1]:
                for p in group["params"]:
                    p.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], a.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # Each piece's metrics are means over its steps (critic/) or its executed ratio units (the rest):
        # weighted by those counts they give the minibatch's means, however it was split.
        metrics = {}
        for k in parts[0][1]:
            w = [n[0] if k.startswith("critic/") else n[1] for n, _ in parts]
            metrics[k] = sum(wi * m[k] for wi, (_, m) in zip(w, parts)) / max(sum(w), 1e-12)
        return {**metrics, "actor/grad_norm": float(grad_norm)}

    def _micro_step(self, inputs, ep, t, tokens, piece, global_size, counts, old_logprobs, old_values, advantages,
                    returns, is_weights, executed, warmup, temp) -> dict:
        """Forward and backward of one micro-batch (`piece`: global step indices on this rank); the loss is
        normalised by the minibatch's global counts (`global_size` steps; `counts`, its executed elements and
        ratio units). Returns its metrics."""
        a = self.cfg.algo
        step_inputs = inputs.take(ep[piece], t[piece], tokens[piece], self.device)
        logprobs, entropy, values, *stats = self.model(*step_inputs, temperature=temp)
        dev = lambda x: x[piece].to(self.device)  # noqa: E731
        n_tok, n_ratio = counts  # global counts, so every rank divides alike
        old, mask = dev(old_logprobs), dev(executed)
        guard_loss, guard_metrics = self._guards(step_inputs, logprobs, old, mask, n_tok, temp)
        logprobs, units = ratio_units(logprobs, a.logprob_level, mask)
        old, _ = ratio_units(old, a.logprob_level, mask)
        adv = dev(advantages)[:, None].expand_as(logprobs)
        if a.log_ratio_clip > 0:
            logprobs, clip_metrics = clip_log_ratio(logprobs, old, units, a.log_ratio_clip)
            guard_metrics.update(clip_metrics)
        pg, pm = policy_loss(logprobs, old, adv, units, a.clip_low, a.clip_high,
                             is_weights=None if is_weights is None else dev(is_weights), normalizer=n_ratio)
        vf, vm = value_loss(values, dev(old_values), dev(returns), torch.ones_like(values), a.vf_clip,
                            normalizer=global_size)
        ent = torch.where(mask, entropy, torch.zeros_like(entropy)).sum() / n_tok
        loss = vf * a.vf_coef if warmup else pg + a.vf_coef * vf - a.entropy_coef * ent + guard_loss
        (loss * self.world_size).backward()  # FSDP averages gradients over ranks
        model_stats = {k: float(v) for k, v in stats[0].items()} if stats else {}
        return {**pm, **vm, **guard_metrics, **model_stats, "actor/entropy": masked_mean(entropy.detach(), mask).item()}

    def _guards(self, step_inputs, logprobs, old_logprobs, mask, n_tok, temp) -> tuple[torch.Tensor, dict]:
        """KL penalty to the initial policy (algo.kl_coef), scored by the frozen reference copy."""
        a = self.cfg.algo
        if self.ref_model is None:
            return logprobs.new_zeros(()), {}
        with torch.no_grad():
            ref_logprobs = self.ref_model(*step_inputs, temperature=temp)[0]
        kl, metrics = kl_to_reference(logprobs, ref_logprobs, mask, normalizer=n_tok)
        return a.kl_coef * kl, metrics

    def _reference_model(self):
        """Collective: a frozen, unsharded copy of the current weights (the policy RL starts from,
        after any warm start; a resumed run takes its checkpoint's) for the KL penalty."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        state = merge_lora_state_dict(state, alpha=self.cfg.model.lora_alpha)
        ref, _, _ = load_model(self.model_folder, self.cfg.model, self.device)
        ref.load_state_dict(state)
        return ref.to(self.device).eval().requires_grad_(False)

    # ---- behaviour cloning warm start ---------------------------------------------------------
    def behaviour_clone(self, batch: TrajectoryBatch, steps: int, minibatch: int, lr: float,
                        after_step: Callable[[int], None] | None = None, keep: bool = False,
                        total: int | None = None) -> dict:
        """Supervised warm start on demonstration episodes: maximise log-prob of their tokens.
        `after_step(n)` runs after step n (in-process diagnostics: bench/greedy_gap.py evaluates the
        policy part-way through one warm start). A warm start can run in pieces (the trainer checks
        trainer.bc_target_success between them): `keep=True` holds this call's optimizer, minibatch
        order and noise stream, and the next call continues with them, so the pieces take the same steps
        as one call would (end_behaviour_clone drops them: Adam's moments are twice the trainable weights);
        `total` is the whole warm start's length, for the progress line."""
        inputs = StepInputs(batch, self.instructions)
        ep, t = batch.flat_steps()
        tokens = step_actions(batch, ep, t)
        if self._bc is None:
            opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                                    foreach=True)
            # The flow-matching loss draws its times and noise from this (per rank), so a warm start repeats.
            seed = int(np.random.SeedSequence((self.cfg.trainer.seed, 2**31, self.rank)).generate_state(1)[0])
            self._bc = {"opt": opt, "rng": np.random.default_rng((self.cfg.trainer.seed, 2**31)),  # a stream no iteration uses
                        "noise": torch.Generator().manual_seed(seed), "losses": []}
        opt, rng, noise, losses = (self._bc[k] for k in ("opt", "rng", "noise", "losses"))
        total = total or len(losses) + steps
        self.model.train()
        for _ in range(steps):
            mb = rng.choice(len(ep), size=min(minibatch, len(ep)), replace=False)
            mine = self._my_slice(mb)
            loss = self._bc_loss(inputs.take(ep[mine], t[mine], tokens[mine], self.device), len(mb), noise)
            (loss * self.world_size).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().item() * self.world_size)
            if after_step is not None:
                after_step(len(losses))
            if self.rank == 0 and (len(losses) % 200 == 0 or len(losses) == total):
                print(f"vlarl: warm start {len(losses)}/{total} steps, loss {np.mean(losses[-50:]):.3f}", flush=True)
        if not keep:
            self._bc = None
        return {"bc/loss_first": losses[0], "bc/loss_last": float(np.mean(losses[-10:])), "bc/steps": len(losses)}

    def end_behaviour_clone(self) -> None:
        """Drop the optimizer and streams a piecewise warm start kept (behaviour_clone(keep=True))."""
        self._bc = None

    def _bc_loss(self, step_inputs: tuple, global_count: int, generator: torch.Generator) -> torch.Tensor:
        """Negative log-likelihood of demo tokens (token VLA) or flow matching (flow VLA, its draws from
        `generator`), divided by the global element count so ranks add up to one full-batch mean."""
        if hasattr(self.model, "flow_matching_loss"):
            return self.model.flow_matching_loss(*step_inputs, generator=generator).sum() / global_count
        logprobs = self.model(*step_inputs, temperature=1.0)[0]
        return -logprobs.sum() / (global_count * logprobs.shape[1])

    # ---- weights out and in -------------------------------------------------------------------
    def full_state(self) -> tuple[dict, dict]:
        """Collective: full model and optimizer state dicts on rank 0 (empty elsewhere), on CPU."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(self.model, self.optimizer, options=opts)

    def load_full_state(self, model_state: dict, optimizer_state: dict | None) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        opts = StateDictOptions(full_state_dict=True)
        set_state_dict(self.model, self.optimizer, model_state_dict=model_state,
                       optim_state_dict=optimizer_state or {}, options=opts)

    def push_weights(self, rollout_workers: list, version: int) -> float:
        """Collective: gather full weights, merge LoRA, and push them to the rollout workers over
        rollout.weight_transport (vlarl/rollout/weight_sync.py). Returns the GB this rank pushed."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        r, c = self.cfg.rollout, self.cfg.cluster
        transport = resolve_transport(r.weight_transport, r.engine, c.device, c.colocate)
        # GPU transports read the gathered tensors where they are; object_store needs them in host memory.
        on_host = transport == "object_store"
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=on_host))
        if transport != "cuda_ipc" and self.rank != 0:
            return 0.0  # cuda_ipc: every rank feeds its colocated worker; otherwise rank 0 feeds them all
        state = merge_lora_state_dict(state, alpha=self.cfg.model.lora_alpha)
        gb = float(sum(v.numel() * v.element_size() for v in state.values())) / 1e9
        PUSH[transport](self, state, rollout_workers, version)
        return gb

    def _push_object_store(self, state: dict, workers: list, version: int) -> None:
        import ray

        ref = ray.put(state)
        ray.get([w.load_weights.remote(ref, version) for w in workers])

    def _push_cuda_ipc(self, state: dict, workers: list, version: int) -> None:
        """Hand this rank's colocated rollout worker IPC handles of bucket buffers on our GPU."""
        import ray

        if len(workers) != self.world_size:
            raise RuntimeError(f"cuda_ipc pairs each learner rank with one rollout worker, got {len(workers)} workers "
                               f"for {self.world_size} ranks.")
        prefix = ray.put({k: v.cpu() for k, v in prefix_weights(state).items()})
        pairs = decoder_weights(state)
        state.clear()  # the buckets take over the decoder tensors: about one copy on the GPU at a time
        payload, buffers = export_ipc(pairs, int(self.cfg.rollout.sync_bucket_mb * 2**20))
        ray.get(workers[self.rank].load_weights_ipc.remote(prefix, payload, gpu_uuid(), version))
        del buffers, payload
        torch.cuda.ipc_collect()  # release the exported blocks the engine has let go of

    def _push_nccl(self, state: dict, workers: list, version: int) -> None:
        """Broadcast bucket buffers to every engine over a NCCL group of rank 0 and the engines;
        the bucket layout goes through Ray with the call that makes each engine receive."""
        import ray

        token = self._weight_group(workers)
        metas = plan_buckets(decoder_weights(state), int(self.cfg.rollout.sync_bucket_mb * 2**20))
        prefix = ray.put({k: v.cpu() for k, v in prefix_weights(state).items()})
        pending = [w.load_weights_nccl.remote(prefix, metas, token, version) for w in workers]
        broadcast_buckets(self._nccl, decoder_weights(state), metas)
        ray.get(pending)

    def _weight_group(self, workers: list) -> str:
        """The NCCL group of rank 0 and every worker's engine, formed again when a worker is not in it
        (first push, a replaced worker, another set of workers)."""
        import ray

        token = self._nccl_token
        if token is not None and all(t == token for t in ray.get([w.weight_group_token.remote() for w in workers])):
            return token
        token = f"{socket.gethostname()}-{free_port()}-{len(workers)}"
        host, port = ray.util.get_node_ip_address(), free_port()
        joins = [w.join_weight_group.remote(host, port, i + 1, len(workers) + 1, token) for i, w in enumerate(workers)]
        self._nccl = nccl_group(host, port, 0, len(workers) + 1, torch.device("cuda", torch.cuda.current_device()))
        ray.get(joins)
        self._nccl_token = token
        return token

    def checkpoint_state(self):
        """Collective: (model_state, optimizer_state) for the CheckpointActor, filled on rank 0
        (trainer.checkpoint_format=full)."""
        return self.full_state()

    def save_shards(self, state_dir: str) -> None:
        """Collective: start writing this rank's shard of the model and optimizer state into state_dir;
        returns once it is copied to host memory (training may go on), shards_written says when it is
        on disk."""
        self.shards_written()  # one save at a time (the trainer commits each before the next)
        self._shards = checkpoint.save_shards(self.model, self.optimizer, state_dir, self._checkpoint_group)

    @ray.method(concurrency_group="io")
    def shards_written(self) -> int:
        """Blocks until this rank's last save_shards is on disk (raising what the write raised); returns the rank."""
        future = self._shards
        if future is not None:
            future.result()
        return self.rank

    def load_shards(self, state_dir: str) -> None:
        """Collective: load a sharded checkpoint (written by any number of ranks) into this rank's shards."""
        checkpoint.load_shards(self.model, self.optimizer, state_dir, self._checkpoint_group)

    def shutdown(self) -> None:
        if self._shards is not None:
            self._shards.exception()  # let a write in flight finish before its process group goes
        if dist.is_initialized():
            dist.destroy_process_group()


# The Ray actor class of a learner rank: shards_written runs beside the other calls.
LearnerActor = ray.remote(concurrency_groups={"io": 1})(LearnerWorker)

# One push method per rollout.weight_transport (resolved; `auto` never reaches here).
PUSH = {"object_store": LearnerWorker._push_object_store, "cuda_ipc": LearnerWorker._push_cuda_ipc,
        "nccl": LearnerWorker._push_nccl}
