"""Weight-sync transports from learner rank 0 to the vLLM engines (`rollout.weight_transport`).

- object_store: the merged state travels through Ray's object store (shared memory on one node);
  the rollout worker hands vLLM safetensors blobs, one RPC per bucket. CPU or GPU.
- cuda_ipc: learner and engine share a GPU (cluster.colocate). The learner packs each bucket of
  decoder weights into one contiguous CUDA buffer and sends only its IPC handle and metadata; the
  vLLM worker maps the learner's memory and reads the weights in place, with no copy through the
  host. vLLM sleeps (sleep mode level 1) while the learner trains, so the two fit on one GPU.
- nccl: learner and engines on different GPUs. Learner rank 0 and every engine's vLLM worker form
  their own NCCL group (vLLM's StatelessProcessGroup + PyNcclCommunicator, outside the learners'
  FSDP group) and the learner broadcasts bucket buffers; only the metadata goes through Ray.

On both GPU paths the vLLM worker receives every bucket inside one `collective_rpc` call and feeds
a generator over them to `reload_weights` (vLLM's in-place reload needs all of a model's weights in
one call; reloading bucket by bucket corrupts the model on vllm 0.32), so a sync is one RPC however
many buckets it has, and the engine never stages a second copy of the decoder. The functions named
`_..._in_worker` run inside vLLM's worker process (sent by `collective_rpc`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TRANSPORTS = ("auto", "object_store", "cuda_ipc", "nccl")
ALIGN = 256  # bytes; every tensor starts aligned in a bucket buffer so a typed view of it is legal


DECODER_PREFIX = "language_model."  # TokenVLA parameter names of the decoder
EMBED_KEY = "language_model.model.embed_tokens.weight"  # the one decoder tensor the PyTorch prefix also reads


def decoder_weights(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The decoder's (name, tensor) pairs under LlamaForCausalLM's names (what vLLM loads)."""
    return [(k[len(DECODER_PREFIX):], v) for k, v in state.items() if k.startswith(DECODER_PREFIX)]


def prefix_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the rollout worker's PyTorch prefix copy loads: everything but the decoder, plus the
    decoder's input embedding table."""
    return {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIX) or k == EMBED_KEY}


def resolve_transport(transport: str, engine: str, device: str, colocate: bool) -> str:
    """The transport a run uses. `auto` -> object_store on CPU or for the hf engine, cuda_ipc when
    learner and engine share a GPU (cluster.colocate), else nccl."""
    if transport != "auto":
        return transport
    if device != "cuda" or engine != "vllm":
        return "object_store"
    return "cuda_ipc" if colocate else "nccl"


def describe_transport(cfg) -> str:
    """The weight-sync path of a run in words, for the start-up log and --dry-run."""
    r, c = cfg.rollout, cfg.cluster
    transport = resolve_transport(r.weight_transport, r.engine, c.device, c.colocate)
    how = {"object_store": f"learner rank 0 -> Ray's object store -> {c.num_rollout_workers} rollout worker(s)",
           "cuda_ipc": "each learner rank hands its GPU's engine CUDA IPC handles (same GPU)",
           "nccl": f"NCCL broadcast from learner rank 0 to {c.num_rollout_workers} engine(s), across GPUs and nodes"}
    return f"{transport} ({how[transport]})"


@dataclass
class TensorMeta:
    name: str  # parameter name under LlamaForCausalLM's names
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # byte offset of the tensor in its bucket buffer


@dataclass
class BucketMeta:
    nbytes: int  # size of the bucket buffer in bytes
    tensors: list[TensorMeta]


def plan_buckets(pairs: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[BucketMeta]:
    """Consecutive groups of (name, tensor) of at most bucket_bytes each (a larger tensor goes
    alone), laid out in flat byte buffers."""
    out, cur, size = [], [], 0
    for name, t in pairs:
        n = t.numel() * t.element_size()
        if cur and size + n > bucket_bytes:
            out.append(BucketMeta(size, cur))
            cur, size = [], 0
        cur.append(TensorMeta(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), size))
        size += -(-n // ALIGN) * ALIGN
    if cur:
        out.append(BucketMeta(size, cur))
    return out


def pack(tensors: dict[str, torch.Tensor], meta: BucketMeta, device) -> torch.Tensor:
    """One bucket's tensors -> a flat uint8 buffer (meta.nbytes,) on `device`."""
    buf = torch.empty(meta.nbytes, dtype=torch.uint8, device=device)
    for m in meta.tensors:
        t = tensors[m.name].detach().contiguous().reshape(-1)
        n = t.numel() * t.element_size()
        buf[m.offset:m.offset + n].copy_(t.view(torch.uint8), non_blocking=True)
    return buf


def unpack(buf: torch.Tensor, meta: BucketMeta) -> list[tuple[str, torch.Tensor]]:
    """A bucket buffer (meta.nbytes,) uint8 -> (name, view) pairs; the views share buf's memory."""
    out = []
    for m in meta.tensors:
        dtype = getattr(torch, m.dtype)
        n = int(torch.Size(m.shape).numel()) * dtype.itemsize
        out.append((m.name, buf[m.offset:m.offset + n].view(dtype).view(m.shape)))
    return out


def _worker_device(worker) -> int:
    """The CUDA device index the vLLM worker's model lives on (not the ambient current device)."""
    device = getattr(worker, "device", None)
    index = getattr(device, "index", None)
    return torch.cuda.current_device() if index is None else index


# ---- CUDA IPC ------------------------------------------------------------------------------------
def gpu_uuid(device: int | None = None) -> str:
    return str(torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device).uuid)


def export_ipc(pairs: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> tuple[list, list[torch.Tensor]]:
    """Pack CUDA tensors into bucket buffers and export them. Returns ([(BucketMeta, ipc args)], the
    buffers); the caller keeps the buffers alive until the engine has loaded them. Each source
    tensor is dropped from `pairs` once packed, so the peak is about one copy plus one bucket."""
    from torch.multiprocessing.reductions import reduce_tensor

    metas = plan_buckets(pairs, bucket_bytes)
    by_name, bufs, payload = dict(pairs), [], []
    pairs.clear()
    for meta in metas:
        buf = pack(by_name, meta, torch.cuda.current_device())
        for m in meta.tensors:
            del by_name[m.name]
        bufs.append(buf)
        payload.append((meta, reduce_tensor(buf)[1]))
    torch.cuda.synchronize()  # the buffers are complete before another process reads them
    return payload, bufs


def _receive_ipc_in_worker(worker, payload: list, uuid: str) -> int:
    """Map every bucket the learner exported and reload the model from views into them."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    device = _worker_device(worker)
    if gpu_uuid(device) != uuid:
        raise RuntimeError(f"rollout.weight_transport=cuda_ipc needs the learner and the engine on one GPU, but the "
                           f"learner is on {uuid} and the engine on {gpu_uuid(device)}; set cluster.colocate=true "
                           "or use rollout.weight_transport=nccl.")

    def weights():
        for meta, args in payload:
            args = list(args)
            args[6] = device  # storage_device: the sender's index means nothing in this process
            yield from unpack(rebuild_cuda_tensor(*args), meta)

    worker.reload_weights(weights_iterator=weights())
    torch.cuda.synchronize(device)  # done reading the learner's buffers before it frees them
    return sum(len(meta.tensors) for meta, _ in payload)


# ---- NCCL ----------------------------------------------------------------------------------------
def nccl_group(host: str, port: int, rank: int, world_size: int, device):
    """A PyNcclCommunicator over a StatelessProcessGroup (independent of any torch.distributed
    group this process is in). Collective: every rank calls it at the same time."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(group, device=device)


def broadcast_buckets(comm, pairs: list[tuple[str, torch.Tensor]], metas: list[BucketMeta]) -> None:
    """Learner side (rank 0): pack each bucket on the communicator's device and broadcast it."""
    by_name = dict(pairs)
    for meta in metas:
        comm.broadcast(pack(by_name, meta, comm.device), src=0)
    torch.cuda.current_stream(comm.device).synchronize()


def _join_nccl_in_worker(worker, host: str, port: int, rank: int, world_size: int, token: str) -> str:
    worker._vlarl_nccl = nccl_group(host, port, rank, world_size, torch.device("cuda", _worker_device(worker)))
    worker._vlarl_nccl_token = token
    return token


def _receive_nccl_in_worker(worker, metas: list[BucketMeta], token: str) -> int:
    """Receive every bucket from the learner's broadcasts and reload the model from them."""
    if getattr(worker, "_vlarl_nccl_token", None) != token:
        raise RuntimeError("this vLLM worker is not in the learner's weight-sync group; it must join first.")
    comm = worker._vlarl_nccl

    def weights():
        for meta in metas:
            buf = torch.empty(meta.nbytes, dtype=torch.uint8, device=comm.device)
            comm.broadcast(buf, src=0)
            yield from unpack(buf, meta)

    worker.reload_weights(weights_iterator=weights())
    torch.cuda.synchronize(comm.device)
    return sum(len(m.tensors) for m in metas)
