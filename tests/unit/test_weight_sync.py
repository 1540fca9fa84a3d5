"""Bucket layout of the GPU weight-sync transports, and the transport choice (pure, on CPU)."""

import pytest
import torch

from vlarl.config import ConfigError, load_config
from vlarl.rollout.weight_sync import (ALIGN, decoder_weights, pack, plan_buckets, prefix_weights, resolve_transport,
                                       unpack)


def test_buckets_round_trip_mixed_dtypes_and_shapes():
    g = torch.Generator().manual_seed(0)
    pairs = [("a", torch.randn(3, 5, generator=g)), ("b", torch.randn(7, generator=g).to(torch.bfloat16)),
             ("c", torch.randint(0, 9, (2, 2, 3), generator=g)), ("d", torch.randn(300, generator=g))]
    metas = plan_buckets(pairs, bucket_bytes=1000)
    assert [[m.name for m in b.tensors] for b in metas] == [["a", "b", "c"], ["d"]]  # d (1200 B) goes alone
    assert all(m.offset % ALIGN == 0 for b in metas for m in b.tensors)
    source = dict(pairs)
    out = [kv for meta in metas for kv in unpack(pack(source, meta, "cpu"), meta)]
    assert [n for n, _ in out] == [n for n, _ in pairs]
    for (_, got), (_, want) in zip(out, pairs):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_the_prefix_copy_gets_everything_but_the_decoder_plus_its_embeddings():
    state = {"vision.w": 1, "projector.w": 2, "language_model.model.embed_tokens.weight": 3,
             "language_model.model.layers.0.q.weight": 4, "language_model.lm_head.weight": 5}
    assert set(prefix_weights(state)) == {"vision.w", "projector.w", "language_model.model.embed_tokens.weight"}
    assert [n for n, _ in decoder_weights(state)] == ["model.embed_tokens.weight", "model.layers.0.q.weight",
                                                      "lm_head.weight"]


def test_auto_transport_follows_device_engine_and_colocation():
    assert resolve_transport("auto", "vllm", "cpu", False) == "object_store"
    assert resolve_transport("auto", "hf", "cuda", True) == "object_store"
    assert resolve_transport("auto", "vllm", "cuda", True) == "cuda_ipc"
    assert resolve_transport("auto", "vllm", "cuda", False) == "nccl"
    assert resolve_transport("nccl", "vllm", "cuda", True) == "nccl"


@pytest.mark.parametrize("args, words", [
    (["rollout.weight_transport=nccl"], "needs cluster.device=cuda"),
    (["rollout.weight_transport=cuda_ipc"], "needs cluster.device=cuda"),
    (["cluster.colocate=true"], "needs cluster.device=cuda"),
    (["rollout.weight_transport=gloo"], "choose one of auto, object_store, cuda_ipc, nccl"),
    (["cluster.device=cuda", "rollout.weight_transport=cuda_ipc"], "feeds a vLLM engine"),
    (["cluster.device=cuda", "cluster.colocate=true", "cluster.num_learners=2"], "make cluster.num_learners equal"),
    (["cluster.device=cuda", "rollout.engine=vllm", "rollout.weight_transport=cuda_ipc"], "set cluster.colocate=true"),
])
def test_transport_mistakes_stop_with_one_sentence(args, words):
    with pytest.raises(ConfigError, match=words):
        load_config(["env=toy", *args])
