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


def test_compiled_shards_are_the_reference_paths_splits():
    """The megakernel's tensor-parallel shards (model_traits.hpp's kShardedConfigs) are the shapes
    shard_spec gives one rank of their model, and whole-model lookups never see them."""
    from flashformer.megakernel import compiled_configs, match_config, sharded_configs

    whole = {c["name"]: c for c in compiled_configs()}
    shards = sharded_configs()
    assert {(c["model"], c["world"]) for c in shards} >= {("tiny-gqa", 2), ("llama-3.1-8b", 2), ("llama-3.1-70b", 8)}
    for c in shards:
        assert c["name"] == f"{c['model']}-tp{c['world']}" and c["name"] not in whole
        spec = spec_from_dict(shape_config(c["model"]))
        assert split_problem(spec, c["world"]) is None
        part = shard_spec(spec, c["world"])
        assert (c["num_heads"], c["num_kv_heads"], c["intermediate_size"], c["hidden_size"], c["vocab_size"]) == (
            part.num_heads, part.num_kv_heads, part.intermediate_size, part.hidden_size, part.vocab_size)
        assert match_config(part) is None  # a one-GPU engine of that shape gets no exchanging kernel
    assert all(c["world"] == 1 and c["model"] == c["name"] for c in whole.values())


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, QuantizedMatrix):
        return isinstance(b, QuantizedMatrix) and a.block == b.block and torch.equal(a.data, b.data) and torch.equal(
            a.scale, b.scale)
    return torch.equal(a, b)


def _device_bytes(weights) -> int:
    """Bytes of a Weights' distinct tensors (a tied LM head once), FP8 scales included."""
    seen, total = set(), 0
    for m in [weights.embed, weights.final_norm, weights.lm_head] + [
            getattr(layer, f.name) for layer in weights.layers for f in dataclasses.fields(layer)]:
        for t in (m.data, m.scale) if isinstance(m, QuantizedMatrix) else (m,):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.nbytes
    return total


@pytest.mark.parametrize("fmt", ["bf16", "quantize-at-load", "compressed-tensors"])
def test_a_rank_loads_its_part_layer_by_layer(tmp_path, fmt):
    """build_rank cuts each layer as soon as it is read (load_weights' layer_hook): a rank never holds
    the whole model, and gets exactly shard_weights of the whole load; the size check counts a
    rank's part (Checkpoint.nbytes(world=))."""
    from test_fp8 import write_compressed_tensors

    from flashformer.config import load_spec
    from flashformer.tensor_parallel import RankSetup, build_rank, shard_layer
    from flashformer.weights import COLUMN_SPLIT_FIELDS, ROW_SPLIT_FIELDS, inspect_checkpoint, load_weights

    path = make_checkpoint(tmp_path / "ckpt", "llama3")[1]
    if fmt == "compressed-tensors":
        write_compressed_tensors(path, "channel")
    quantization = "fp8" if fmt == "quantize-at-load" else None
    spec = load_spec(path)
    whole = load_weights(path, spec, dtype=torch.float32, progress=False, quantization=quantization)
    hooked = []
    shard = load_weights(path, spec, dtype=torch.float32, progress=False, quantization=quantization,
                         layer_hook=lambda i, layer: hooked.append(i) or shard_layer(spec, layer, 1, 2))
    assert sorted(hooked) == list(range(spec.num_layers))  # each layer once, when whole
    setup = RankSetup(str(path), torch.float32, "cpu", 2, MAX_SEQ, "auto", quantization, False)
    nbytes = inspect_checkpoint(path, spec).nbytes(torch.float32, quantize=quantization == "fp8", world=2)
    for rank in range(2):
        _, got, cache = build_rank(setup, rank, 2)
        want = shard_weights(spec, whole, rank, 2)
        for a, b in zip(got.layers, want.layers):
            for f in dataclasses.fields(a):
                assert _same(getattr(a, f.name), getattr(b, f.name)), (rank, f.name)
        assert torch.equal(got.embed, whole.embed) and torch.equal(got.lm_head, whole.lm_head)
        assert cache.kv.shape[3] == spec.num_kv_heads // 2
        if rank == 0:  # (rank 0 holds the O and down biases too: the whole's counted there)
            assert _device_bytes(got) == nbytes, (_device_bytes(got), nbytes)
    for a, b in zip(shard.layers, shard_weights(spec, whole, 1, 2).layers):
        assert all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    # the fields shard_layer cuts are the ones the size check divides
    first = shard_weights(spec, whole, 0, 2).layers[0]
    cut = {f.name for f in dataclasses.fields(first) if getattr(first, f.name) is not getattr(whole.layers[0], f.name)}
    assert {"wqkv", "wo", "w_gate_up", "w_down"} <= cut <= ROW_SPLIT_FIELDS | COLUMN_SPLIT_FIELDS


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
