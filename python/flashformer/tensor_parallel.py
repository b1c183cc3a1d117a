"""Tensor parallelism's arithmetic on the reference path (issue 21; the megakernel's comes later).

Megatron's splits over `world` ranks: rank r holds the q heads r*H/N .. (r+1)*H/N - 1 and the kv
heads r*KV/N .. with them (rows of q|k|v), the matching columns of the output projection, the
intermediate rows r*I/N .. of gate and of up, and the matching columns of down; the embeddings,
norms and the LM head are whole on every rank. A rank's attention and MLP then give partial sums
of the hidden state, which `ShardedTransformer` sums over the ranks (`all_reduce`, in fp32, once
per attention and once per MLP) before the residual add, so every rank holds the same hidden state
after every layer. The output-projection and down biases live on rank 0 alone (added once). Each
rank's KV cache holds its own kv heads (`shard_spec(spec, world).kv_cache_shape`).

`TensorParallelBackend` is rank 0's decode backend: each prefill and decode goes to the other
ranks (`follow`), which run the same forward on their shards; rank 0 alone computes the logits.
`RankGroup` starts ranks 1..N-1 as processes of this one (Engine.from_pretrained's
tensor_parallel_size), each loading the checkpoint and keeping its part, and joins them in a
torch.distributed group (gloo on the CPU, NCCL on GPUs 0..N-1).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

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


def shard_layer(spec: ModelSpec, layer: LayerWeights, rank: int, world: int) -> LayerWeights:
    """Rank `rank`'s part of one row-major layer: new tensors for weights.ROW_SPLIT_FIELDS and
    COLUMN_SPLIT_FIELDS, the norms shared, the O and down biases on rank 0 only (the ranks' sums
    are all-reduced)."""
    part = shard_spec(spec, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
    q, kv, inter = part.q_size, part.kv_size, part.intermediate_size
    qkv = [(rank * q, (rank + 1) * q), (spec.q_size + rank * kv, spec.q_size + (rank + 1) * kv),
           (spec.q_size + spec.kv_size + rank * kv, spec.q_size + spec.kv_size + (rank + 1) * kv)]
    gate_up = [(rank * inter, (rank + 1) * inter),
               (spec.intermediate_size + rank * inter, spec.intermediate_size + (rank + 1) * inter)]
    return LayerWeights(
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
    )


def shard_weights(spec: ModelSpec, weights: Weights, rank: int, world: int) -> Weights:
    """Rank `rank`'s part of row-major `weights` (new tensors; the embeddings, norms and LM head are
    shared with `weights`)."""
    if weights.fragment_order:
        raise ValueError("tensor parallelism splits row-major weights; these are in the megakernel's fragment order")
    layers = [shard_layer(spec, layer, rank, world) for layer in weights.layers]
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


# The commands rank 0 sends the others (TensorParallelBackend -> follow), over a queue each: a rank
# waits for the next command as long as the engine idles, and only the collectives inside a
# forward (all the ranks in it together) are bounded by the process group's timeout.
_PREFILL, _DECODE, _STOP = "prefill", "decode", "stop"


class TensorParallelBackend(ReferenceBackend):
    """Rank 0's decode backend (engine.Backend): every prefill and decode runs on all the ranks
    (`commands`: a queue to each other rank), rank 0 computing the logits. (RankGroup.close() stops
    the others.)"""

    name = "reference-tp"

    def __init__(self, spec: ModelSpec, weights: Weights, cache: KVCache, world: int, commands: list, group=None):
        if len(commands) != world - 1:
            raise ValueError(f"a backend over {world} ranks sends to {world - 1} others, got {len(commands)} queues")
        self.world, self.commands = world, commands
        self.model = ShardedTransformer(spec, weights, cache, world, distributed_all_reduce(group))

    def _command(self, *command) -> None:
        for q in self.commands:
            q.put(command)

    @torch.inference_mode()
    def prefill(self, prompts: list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        self._command(_PREFILL, [p.cpu() for p in prompts], rows)
        return prefill_logits(self.model, prompts, rows)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._command(_DECODE, tokens.cpu(), positions.cpu())
        return super().decode(tokens, positions)


@torch.inference_mode()
def follow(model: ShardedTransformer, commands, alive: Callable[[], bool] = lambda: True) -> None:
    """Ranks 1..world-1: run rank 0's prefills and decodes (from the queue `commands`) on this rank's
    shard until it stops, or until `alive()` says rank 0 is gone."""
    import queue

    device = model.cache.kv.device
    while True:
        try:
            command, *args = commands.get(timeout=1.0)
        except queue.Empty:
            if not alive():
                return
            continue
        if command == _STOP:
            return
        if command == _PREFILL:
            prompts, rows = args
            prefill_hidden(model, [p.to(device) for p in prompts], rows)
        elif command == _DECODE:
            tokens, positions = args
            model.forward(tokens.to(device)[:, None], positions.to(device))
        else:
            raise RuntimeError(f"tensor parallelism: unknown command {command!r}")


# How long a rank waits for the others inside a collective before it raises (a lost rank never
# hangs the others), and for the other ranks to load their parts.
COLLECTIVE_TIMEOUT = timedelta(minutes=2)
LOAD_TIMEOUT_S = 30 * 60.0
# NVLink multicast stays off in every process started (issue 21).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclasses.dataclass(frozen=True)
class RankSetup:
    """What every rank needs to build its part of an engine (sent to each process)."""

    model_dir: str
    dtype: torch.dtype
    device_type: str  # "cpu", or "cuda": rank r on GPU r
    max_batch_size: int
    max_seq_len: int
    kv_cache_dtype: str
    quantization: str | None
    allow_unused_tensors: bool

    def device(self, rank: int) -> torch.device:
        return torch.device("cpu") if self.device_type == "cpu" else torch.device("cuda", rank)

    @property
    def backend(self) -> str:
        return "gloo" if self.device_type == "cpu" else "nccl"


def build_rank(setup: RankSetup, rank: int, world: int, progress: bool = False) -> tuple[ModelSpec, Weights, KVCache]:
    """Rank `rank`'s part: the model's spec, its shard of the checkpoint's weights (each layer cut
    as soon as it is read: the rank never holds the whole model) and its KV cache."""
    from .config import load_spec
    from .weights import load_weights

    spec = load_spec(Path(setup.model_dir))
    device = setup.device(rank)
    shard = load_weights(setup.model_dir, spec, dtype=setup.dtype, device=device, progress=progress,
                         allow_unused_tensors=setup.allow_unused_tensors, quantization=setup.quantization,
                         layer_hook=lambda _, layer: shard_layer(spec, layer, rank, world))
    cache = KVCache.allocate(shard_spec(spec, world), setup.max_batch_size, setup.max_seq_len, dtype=setup.dtype,
                             device=device, kv_cache_dtype=setup.kv_cache_dtype)
    return spec, shard, cache


def _rank_main(rank: int, world: int, rendezvous: str, setup: RankSetup, commands, reports, parent: int) -> None:
    """A process of rank >= 1: join the group, build the rank's part, report, follow rank 0."""
    import torch.distributed as dist

    os.environ.update(NO_MULTICAST)
    try:
        if setup.device_type == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(setup.backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
        spec, shard, cache = build_rank(setup, rank, world)
        model = ShardedTransformer(spec, shard, cache, world, distributed_all_reduce())
        reports.put((rank, None))
        follow(model, commands, alive=lambda: os.getppid() == parent)
    except BaseException as exc:  # noqa: BLE001 - told to rank 0, which raises it
        reports.put((rank, f"{type(exc).__name__}: {exc}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankGroup:
    """Ranks 1..world-1 as processes of this one (rank 0), in one torch.distributed group with it.
    start() launches them and joins; wait_ready() returns once each has built its part (raising
    what one of them raised); close() stops them."""

    def __init__(self, setup: RankSetup, world: int):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            raise RuntimeError("a torch.distributed group is already running in this process (another "
                               "tensor-parallel engine?): close() it first; one such engine a process")
        if setup.device_type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"tensor_parallel_size={world} needs {world} GPUs; {torch.cuda.device_count()} are visible")
        self.setup, self.world = setup, world
        self.tmp = tempfile.mkdtemp(prefix="flashformer-tp-")
        ctx = torch.multiprocessing.get_context("spawn")
        self.reports = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(world - 1)]
        rendezvous = os.path.join(self.tmp, "rendezvous")
        os.environ.update(NO_MULTICAST)
        self.procs = [ctx.Process(target=_rank_main, name=f"flashformer-rank{r}", daemon=True,
                                  args=(r, world, rendezvous, setup, self.commands[r - 1], self.reports, os.getpid()))
                      for r in range(1, world)]
        for proc in self.procs:
            proc.start()
        try:
            dist.init_process_group(setup.backend, init_method=f"file://{rendezvous}", rank=0, world_size=world,
                                    timeout=COLLECTIVE_TIMEOUT)
        except Exception as exc:
            self.close()
            raise RuntimeError(f"tensor parallelism: the {world} ranks did not form a group: {exc}") from exc

    def wait_ready(self, timeout: float = LOAD_TIMEOUT_S) -> None:
        """Return once every other rank has built its part; raise RuntimeError (and stop them all)
        when one fails or dies, or past `timeout` seconds."""
        import queue

        ready, deadline = set(), time.monotonic() + timeout
        while len(ready) < self.world - 1:
            try:
                rank, error = self.reports.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    why = f"{', '.join(dead)} exited" if dead else f"not ready within {timeout:.0f} s"
                    raise RuntimeError(f"tensor parallelism: {why} while loading its part of the model") from None
                continue
            if error is not None:
                self.close()
                raise RuntimeError(f"tensor parallelism: rank {rank} failed to load its part of the model: {error}")
            ready.add(rank)

    def close(self) -> None:
        """Stop the other ranks (a stop command, then a kill past a few seconds) and leave the group."""
        import torch.distributed as dist

        for q in self.commands:
            q.put((_STOP,))
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        self.procs = []
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self.tmp, ignore_errors=True)
