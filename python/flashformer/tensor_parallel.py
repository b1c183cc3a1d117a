"""Tensor parallelism's arithmetic on the reference path (issue 21; the megakernel's comes later).

Megatron's splits over `world` ranks: rank r holds the q heads r*H/N .. (r+1)*H/N - 1 and the kv
heads r*KV/N .. with them (rows of q|k|v), the matching columns of the output projection, the
intermediate rows r*I/N .. of gate and of up, and the matching columns of down; the embeddings,
norms and the LM head are whole on every rank. A rank's attention and MLP then give partial sums
of the hidden state, which `ShardedTransformer` sums over the ranks (`all_reduce`, in fp32, once
per attention and once per MLP) before the residual add, so every rank holds the same hidden state
after every layer. The output-projection and down biases live on rank 0 alone (added once). Each
rank's KV cache holds its own kv heads (`shard_spec(spec, world).kv_cache_shape`).

`TensorParallelBackend` is rank 0's decode backend over torch.distributed: each prefill and
decode is broadcast to the other ranks (`follow`), which run the same forward on their shards;
rank 0 alone computes the logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .config import ModelSpec
from .quantization import QuantizedMatrix, cdiv
from .reference import KVCache, ReferenceBackend, Transformer, prefill_hidden, prefill_logits
from .weights import LayerWeights, Matrix, Weights

def split_problem(spec: ModelSpec, world: int) -> str | None:
    """Why `spec` cannot be split over `world` ranks, or None."""
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        return f"the tensor-parallel size must be an int >= 1, got {world!r}"
    parts = [(name, n) for name, n in (("num_attention_heads", spec.num_heads), ("num_key_value_heads", spec.num_kv_heads),
                                       ("intermediate_size", spec.intermediate_size)) if n % world]
    if parts:
        return f"{', '.join(f'{name}={n}' for name, n in parts)} not divisible by the tensor-parallel size {world}"
    return None


def shard_spec(spec: ModelSpec, world: int) -> ModelSpec:
    """The architecture one rank of `world` computes: its heads, kv heads and intermediate rows."""
    problem = split_problem(spec, world)
    if problem:
        raise ValueError(f"cannot split this model over {world} ranks: {problem}")
    return dataclasses.replace(spec, num_heads=spec.num_heads // world, num_kv_heads=spec.num_kv_heads // world,
                               intermediate_size=spec.intermediate_size // world)


def _take(m: Matrix, rows: list[tuple[int, int]] | None = None, cols: tuple[int, int] | None = None) -> Matrix:
    """The row ranges `rows` (concatenated) and the column range `cols` of a matrix. An FP8 one keeps
    its scales: ranges must start (and end, but at the matrix's edge) on its scale blocks."""
    n_rows, n_cols = m.shape
    rows = rows or [(0, n_rows)]
    c0, c1 = cols or (0, n_cols)
    if not isinstance(m, QuantizedMatrix):
        return torch.cat([m[r0:r1, c0:c1] for r0, r1 in rows]).contiguous()
    b0, b1 = m.block
    if b1 == n_cols:  # one scale per row: any columns
        col_scales, block = slice(0, 1), (b0, c1 - c0)
    else:
        if c0 % b1 or (c1 % b1 and c1 != n_cols):
            raise ValueError(f"columns {c0}..{c1} of a {n_rows}x{n_cols} FP8 matrix do not fall on its {b0}x{b1} scale blocks")
        col_scales, block = slice(c0 // b1, cdiv(c1, b1)), m.block
    for r0, r1 in rows:
        if r0 % b0 or (r1 % b0 and r1 != n_rows):
            raise ValueError(f"rows {r0}..{r1} of a {n_rows}x{n_cols} FP8 matrix do not fall on its {b0}x{b1} scale blocks")
    data = torch.cat([m.data[r0:r1, c0:c1] for r0, r1 in rows]).contiguous()
    scale = torch.cat([m.scale[r0 // b0 : cdiv(r1, b0), col_scales] for r0, r1 in rows]).contiguous()
    return QuantizedMatrix(data, scale, block)


def _rows(v: torch.Tensor | None, rows: list[tuple[int, int]]) -> torch.Tensor | None:
    return None if v is None else torch.cat([v[r0:r1] for r0, r1 in rows]).contiguous()


def shard_weights(spec: ModelSpec, weights: Weights, rank: int, world: int) -> Weights:
    """Rank `rank`'s part of row-major `weights` (new tensors; the embeddings, norms and LM head are
    shared with `weights`)."""
    part = shard_spec(spec, world)
    if weights.fragment_order:
        raise ValueError("tensor parallelism splits row-major weights; these are in the megakernel's fragment order")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
    q, kv, inter = part.q_size, part.kv_size, part.intermediate_size
    qkv = [(rank * q, (rank + 1) * q), (spec.q_size + rank * kv, spec.q_size + (rank + 1) * kv),
           (spec.q_size + spec.kv_size + rank * kv, spec.q_size + spec.kv_size + (rank + 1) * kv)]
    gate_up = [(rank * inter, (rank + 1) * inter),
               (spec.intermediate_size + rank * inter, spec.intermediate_size + (rank + 1) * inter)]
    layers = []
    for layer in weights.layers:
        layers.append(LayerWeights(
            attn_norm=layer.attn_norm,
            wqkv=_take(layer.wqkv, qkv),
            wo=_take(layer.wo, cols=(rank * q, (rank + 1) * q)),
            mlp_norm=layer.mlp_norm,
            w_gate_up=_take(layer.w_gate_up, gate_up),
            w_down=_take(layer.w_down, cols=(rank * inter, (rank + 1) * inter)),
            bqkv=_rows(layer.bqkv, qkv),
            bo=layer.bo if rank == 0 else None,
            q_norm=layer.q_norm,
            k_norm=layer.k_norm,
            b_gate_up=_rows(layer.b_gate_up, gate_up),
            b_down=layer.b_down if rank == 0 else None,
        ))
    return Weights(embed=weights.embed, final_norm=weights.final_norm, lm_head=weights.lm_head, layers=layers)


def distributed_all_reduce(group=None) -> Callable[[torch.Tensor], None]:
    """An in-place sum over the ranks of `group` through torch.distributed."""
    import torch.distributed as dist

    return lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


class ShardedTransformer(Transformer):
    """One rank's decoder: `spec` is the whole model's, `weights` and `cache` this rank's part
    (shard_weights; a KVCache of shard_spec's shape); `all_reduce` sums a tensor over the ranks in
    place, every rank calling it in the same order."""

    def __init__(self, spec: ModelSpec, weights: Weights, cache: KVCache, world: int,
                 all_reduce: Callable[[torch.Tensor], None]):
        super().__init__(shard_spec(spec, world), weights, cache)
        self.full_spec, self.world, self.all_reduce = spec, world, all_reduce

    def _sum(self, partial: torch.Tensor) -> torch.Tensor:
        total = partial.float().contiguous()
        self.all_reduce(total)
        return total.to(partial.dtype)

    def _attention(self, layer, x, cache, positions, cos, sin, mask, last_only=False):
        return self._sum(super()._attention(layer, x, cache, positions, cos, sin, mask, last_only))

    def _mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        return self._sum(super()._mlp(layer, x))


# The commands rank 0 broadcasts to the others (TensorParallelBackend -> follow).
_PREFILL, _DECODE, _STOP = "prefill", "decode", "stop"


class TensorParallelBackend(ReferenceBackend):
    """Rank 0's decode backend (engine.Backend) over `group`: every prefill and decode runs on all
    ranks, rank 0 computing the logits. close() releases the other ranks."""

    name = "reference-tp"

    def __init__(self, spec: ModelSpec, weights: Weights, cache: KVCache, world: int, group=None):
        import torch.distributed as dist

        if dist.get_rank(group) != 0:
            raise ValueError("TensorParallelBackend runs on rank 0; the other ranks run follow()")
        self.group, self.world = group, world
        self.model = ShardedTransformer(spec, weights, cache, world, distributed_all_reduce(group))

    def _command(self, *command) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([command], src=0, group=self.group)

    @torch.inference_mode()
    def prefill(self, prompts: list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        self._command(_PREFILL, [p.cpu() for p in prompts], rows)
        return prefill_logits(self.model, prompts, rows)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._command(_DECODE, tokens.cpu(), positions.cpu())
        return super().decode(tokens, positions)

    def close(self) -> None:
        self._command(_STOP)


@torch.inference_mode()
def follow(model: ShardedTransformer, group=None) -> None:
    """Ranks 1..world-1: run rank 0's prefills and decodes on this rank's shard until it closes."""
    import torch.distributed as dist

    device = model.cache.kv.device
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        command, *args = box[0]
        if command == _STOP:
            return
        if command == _PREFILL:
            prompts, rows = args
            prefill_hidden(model, [p.to(device) for p in prompts], rows)
        elif command == _DECODE:
            tokens, positions = args
            model.forward(tokens.to(device)[:, None], positions.to(device))
        else:
            raise RuntimeError(f"tensor parallelism: rank {dist.get_rank(group)} got an unknown command {command!r}")
