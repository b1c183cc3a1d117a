"""Tensor parallelism's arithmetic on the reference path (issue 21), on the CPU: each rank's shard
of a random model, the ranks' partial sums added between them, against the whole model
(teacher-forced logits in fp32); ranks as threads sharing an in-process sum, then two processes
over torch.distributed's gloo."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from checkpoints import rel_l2, teacher_forced
from flashformer.bench import shape_config
from flashformer.config import spec_from_dict
from flashformer.quantization import QuantizedMatrix
from flashformer.reference import KVCache, ReferenceBackend
from flashformer.tensor_parallel import (
    ShardedTransformer,
    TensorParallelBackend,
    _take,
    follow,
    shard_spec,
    shard_weights,
    split_problem,
)
from flashformer.weights import random_weights

MAX_SEQ = 48
PROMPTS = [[5, 9, 2, 7, 1], [3, 8]]
FORCED = torch.tensor([[4, 6], [11, 2], [7, 7], [1, 30]])


def _spec(**kw):
    """tiny-gqa with 8 q heads and 4 kv heads of 32 (splits over 1, 2 and 4 ranks)."""
    return dataclasses.replace(spec_from_dict(shape_config("tiny-gqa")), num_heads=8, num_kv_heads=4, head_dim=32,
                               num_layers=2, **kw)


CASES = {
    "plain": _spec(),
    "biases": _spec(qkv_bias=True, o_bias=True, mlp_bias=True),
    "qk-norm": _spec(qk_norm=True),
}


def _weights(spec, quantization=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return random_weights(spec, tied=False, device="cpu", dtype=torch.float32, std=0.1, generator=gen,
                          quantization=quantization)


class _RankBackend(ReferenceBackend):
    def __init__(self, model):
        self.model = model


class _ThreadSum:
    """An in-place sum over `world` threads (each calls it with its rank's tensor, in the same order),
    added in rank order so every rank gets the same bits."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world, timeout=60)
        self.parts = [None] * world

    def for_rank(self, rank: int):
        def all_reduce(t: torch.Tensor) -> None:
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = self.parts[0].clone()
            for p in self.parts[1:]:
                total += p
            self.barrier.wait()  # every rank has read the parts before any overwrites its own
            t.copy_(total)
        return all_reduce


def _tp_logits(spec, weights, world):
    """Every rank's teacher-forced logits, the ranks as threads."""
    part, reduce = shard_spec(spec, world), _ThreadSum(world)

    def rank(r):
        cache = KVCache.allocate(part, len(PROMPTS), MAX_SEQ, dtype=torch.float32, device="cpu")
        model = ShardedTransformer(spec, shard_weights(spec, weights, r, world), cache, world, reduce.for_rank(r))
        return teacher_forced(_RankBackend(model), PROMPTS, FORCED)

    with ThreadPoolExecutor(world) as pool:
        return [f.result(timeout=120) for f in [pool.submit(rank, r) for r in range(world)]]


def _whole_logits(spec, weights):
    cache = KVCache.allocate(spec, len(PROMPTS), MAX_SEQ, dtype=torch.float32, device="cpu")
    return teacher_forced(ReferenceBackend(spec, weights, cache), PROMPTS, FORCED)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_ranks_of_a_split_model_give_its_logits(case, world):
    spec = CASES[case]
    weights = _weights(spec)
    want = _whole_logits(spec, weights)
    got = _tp_logits(spec, weights, world)
    for r, logits in enumerate(got):
        assert rel_l2(logits, want) < 1e-5, (r, rel_l2(logits, want))
        assert torch.equal(logits, got[0])  # every rank holds the same hidden states


def test_per_channel_fp8_weights_split_with_their_scales():
    spec = CASES["biases"]
    weights = _weights(spec, quantization="fp8")
    assert isinstance(weights.layers[0].wqkv, QuantizedMatrix)
    shard = shard_weights(spec, weights, 1, 2)
    assert isinstance(shard.layers[0].w_down, QuantizedMatrix) and shard.layers[0].w_down.shape == (spec.hidden_size, 256)
    assert rel_l2(_tp_logits(spec, weights, 2)[0], _whole_logits(spec, weights)) < 1e-5


def test_splits_that_cannot_be_made_are_refused():
    spec = CASES["plain"]
    assert split_problem(spec, 2) is None
    assert "num_key_value_heads=4" in split_problem(spec, 8) and "num_attention_heads" not in split_problem(spec, 8)
    assert "an int >= 1" in split_problem(spec, 0)
    with pytest.raises(ValueError, match="cannot split this model over 3 ranks: num_attention_heads=8"):
        shard_spec(spec, 3)
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        shard_weights(spec, _weights(spec), 2, 2)
    blocks = QuantizedMatrix(torch.zeros(256, 256, dtype=torch.float8_e4m3fn), torch.ones(2, 2), (128, 128))
    assert _take(blocks, [(128, 256)], (0, 128)).scale.shape == (1, 1)
    with pytest.raises(ValueError, match="do not fall on its 128x128 scale blocks"):
        _take(blocks, [(64, 192)])
    with pytest.raises(ValueError, match="columns 0..64"):
        _take(blocks, cols=(0, 64))


def _gloo_rank(rank: int, world: int, rendezvous: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        spec = CASES["biases"]
        weights = _weights(spec)
        cache = KVCache.allocate(shard_spec(spec, world), len(PROMPTS), MAX_SEQ, dtype=torch.float32, device="cpu")
        shard = shard_weights(spec, weights, rank, world)
        if rank == 0:
            backend = TensorParallelBackend(spec, shard, cache, world)
            try:
                got = teacher_forced(backend, PROMPTS, FORCED)
            finally:
                backend.close()
            torch.save({"got": got, "want": _whole_logits(spec, weights)}, out)
        else:
            follow(ShardedTransformer(spec, shard, cache, world, lambda t: dist.all_reduce(t)))
    finally:
        dist.destroy_process_group()


def test_two_processes_over_gloo_give_the_models_logits(tmp_path):
    """Rank 0's backend broadcasts each prefill and decode; rank 1 follows on its shard."""
    import torch.multiprocessing as mp

    out = tmp_path / "logits.pt"
    mp.spawn(_gloo_rank, args=(2, str(tmp_path / "rendezvous"), str(out)), nprocs=2, join=True)
    result = torch.load(out)
    assert rel_l2(result["got"], result["want"]) < 1e-5
