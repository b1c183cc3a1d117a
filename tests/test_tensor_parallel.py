"""Tensor parallelism's arithmetic on the reference path (issue 21), on the CPU: each rank's shard
of a random model, the ranks' partial sums added between them, against the whole model
(teacher-forced logits in fp32); ranks as threads sharing an in-process sum, then an Engine over
two processes (torch.distributed's gloo)."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from checkpoints import load_cpu_engine, make_checkpoint, prompt_logits, random_prompt, rel_l2, teacher_forced
from flashformer import SamplingParams
from flashformer.bench import shape_config
from flashformer.config import spec_from_dict
from flashformer.quantization import QuantizedMatrix
from flashformer.reference import KVCache, ReferenceBackend
from flashformer.tensor_parallel import ShardedTransformer, _take, shard_spec, shard_weights, split_problem
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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llama3"), "llama3")[1]  # 4 heads, 2 kv heads, biases


def test_an_engine_over_two_processes_decodes_as_one(checkpoint):
    """Engine.from_pretrained(tensor_parallel_size=2) starts rank 1 as a process over gloo: its
    teacher-forced logits are the one-rank engine's, its greedy tokens too; close() stops rank 1,
    and another such engine can start after."""
    tokens = random_prompt(12)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    one = load_cpu_engine(checkpoint, max_batch_size=2)
    want, want_tokens = prompt_logits(one, tokens), one.generate(prompt_token_ids=[tokens[:5]], sampling=params)
    with load_cpu_engine(checkpoint, max_batch_size=2, tensor_parallel_size=2) as two:
        assert two.backend.name == "reference-tp" and two.cache.kv.shape[3] == 1  # its kv head of 2
        procs = list(two._ranks.procs)
        assert rel_l2(prompt_logits(two, tokens), want) < 1e-5
        got = two.generate(prompt_token_ids=[tokens[:5]], sampling=params)
        assert got[0].token_ids == want_tokens[0].token_ids
    assert two._ranks is None and not any(p.is_alive() for p in procs)
    with load_cpu_engine(checkpoint, tensor_parallel_size=2) as again:
        assert again.generate(prompt_token_ids=[tokens[:5]], sampling=params)[0].token_ids == want_tokens[0].token_ids


def test_tensor_parallel_arguments_are_checked(checkpoint):
    with pytest.raises(ValueError, match="tensor_parallel_size=3: num_attention_heads=4, num_key_value_heads=2"):
        load_cpu_engine(checkpoint, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        load_cpu_engine(checkpoint, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="the megakernel does not split"):
        load_cpu_engine(checkpoint, tensor_parallel_size=2, backend="megakernel")
