"""The megakernel decode backend: each decode step is one persistent-kernel launch of the
compiled core (cpp/include/flashformer/megakernel.cuh), over the Engine's KV cache.

At construction the matrices are reordered in place into the kernel's fragment order
(packing.py), one at a time: the device then holds one copy of the weights, the kernel's (the LM
head padded with zero rows to a multiple of 16 where the vocabulary is not one). A
tied embedding table is the packed LM head itself (the kernel's embedding lookup reads it in
that order). Prefill runs the reference decoder over that copy: each layer's matrices are
unpacked into one reusable buffer just before its matmuls.

A step whose inter-SM dependency does not complete within the watchdog (5 s, or the
FLASHFORMER_WATCHDOG_MS environment variable: raise it under compute-sanitizer) raises
RuntimeError instead of hanging the GPU.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from . import _core
from .config import ModelSpec
from .packing import cuda_stream, dequantize_packed, gather_rows, pack, pack_fp8, row_orders, unpack, unpack_fp8
from .quantization import QuantizedMatrix
from .reference import KVCache, Transformer, prefill_logits
from .weights import LAYER_MATRICES, LayerWeights, Weights

# What a compiled config fixes about a model, beyond its layer count: the shape, and the
# features (biases on q/k/v, per-head q/k RMSNorm) compiled into its kernel.
_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size")
_FEATURE_FIELDS = ("qkv_bias", "qk_norm")
_MATCHED_FIELDS = _SHAPE_FIELDS + _FEATURE_FIELDS


def compiled_configs() -> list[dict]:
    """The compiled megakernel configs (name, shape and features of each), whole models only."""
    return [c for c in _core.load().configs() if c["world"] == 1]


def sharded_configs() -> list[dict]:
    """The compiled tensor-parallel shards: one rank's shape of config `model` split over `world`
    ranks (issue 21; named `<model>-tp<world>`, bf16 weights only)."""
    return [c for c in _core.load().configs() if c["world"] > 1]


# The kernel's name of each per-layer weight (compiled core: configs()[i]["layer_weights"], the
# ones that config uses) -> the LayerWeights field holding it.
LAYER_FIELDS = {
    "qkv": "wqkv",
    "o": "wo",
    "gate_up": "w_gate_up",
    "down": "w_down",
    "attn_norm": "attn_norm",
    "mlp_norm": "mlp_norm",
    "qkv_bias": "bqkv",
    "q_norm": "q_norm",
    "k_norm": "k_norm",
}


def config_named(name: str) -> dict:
    """A compiled config or shard (sharded_configs()) by name."""
    for c in _core.load().configs():
        if c["name"] == name:
            return c
    raise ValueError(f"no compiled megakernel config named {name!r} (compiled: {config_names()})")


def config_names() -> str:
    return ", ".join(c["name"] for c in compiled_configs())


def _unsupported_parts(spec: ModelSpec) -> list[str]:
    """Parts of `spec`'s decoder layer that no compiled kernel implements."""
    return [what for what, present in (("an o_proj bias", spec.o_bias), ("MLP biases", spec.mlp_bias)) if present]


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def match_config(spec: ModelSpec) -> str | None:
    """The compiled config whose shape and features are `spec`'s (any layer count), or None."""
    if _unsupported_parts(spec):
        return None
    for c in compiled_configs():
        if all(getattr(spec, f) == c[f] for f in _MATCHED_FIELDS):
            return c["name"]
    return None


def no_match_reason(spec: ModelSpec) -> str:
    """Why no compiled config runs `spec`: its unsupported parts, or the nearest configs (fewest
    differing fields) and how they differ."""
    unsupported = _unsupported_parts(spec)
    if unsupported:
        return f"{spec.architecture} has {' and '.join(unsupported)}, which no compiled kernel implements"
    configs = compiled_configs()
    differs = {c["name"]: [f for f in _MATCHED_FIELDS if getattr(spec, f) != c[f]] for c in configs}
    fewest = min(len(d) for d in differs.values())
    nearest = "; ".join(
        f"{name} has " + ", ".join(f"{f}={c[f]}" for f in differs[name])
        for c in configs
        for name in [c["name"]]
        if len(differs[name]) == fewest
    )
    shape = ", ".join(f"{f}={getattr(spec, f)}" for f in _MATCHED_FIELDS)
    return f"no compiled config matches {spec.architecture} ({shape}); nearest: {nearest}; compiled: {config_names()}"


def unavailable_reason(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype, max_batch_size: int, *, quantization: str | None = None,
    shard: str | None = None,
) -> str | None:
    """Why the megakernel cannot decode this model here, or None when it can. `quantization`: the
    weights' format as loaded ("fp8", or None for dense weights in `dtype`). (The KV cache's format
    is not a reason here: the kernel reads bf16 and FP8 caches, but a shard's kernel only bf16 ones,
    which the engine's bind checks.) `shard`: `spec` is one rank's part, to run on that sharded
    config (sharded_configs())."""
    q = spec.quantization
    if quantization == "fp8" and q is not None and q.strategy == "block":
        return (
            f"it takes one FP8 scale per output row (per channel or per tensor), not {q.block_size[0]}x"
            f"{q.block_size[1]} block scales (those run on the reference path)"
        )
    if device.type != "cuda":
        return f"it needs a CUDA device, not {device}"
    if not _core.cuda_available():
        return "it needs a Hopper GPU (compute capability 9.0), and none is visible"
    index = _device_index(device)
    if torch.cuda.get_device_capability(index) != (9, 0):
        return f"{torch.cuda.get_device_name(index)} is not a Hopper GPU (compute capability 9.0)"
    if dtype != torch.bfloat16:
        return f"it runs bfloat16 weights, not {dtype}"
    max_batch = _core.load().MAX_BATCH
    if max_batch_size > max_batch:
        return f"it decodes at most {max_batch} rows, and max_batch_size is {max_batch_size}"
    if shard is not None:
        c = next((c for c in sharded_configs() if c["name"] == shard), None)
        if c is None:
            return f"no compiled shard named {shard!r} (compiled: {', '.join(c['name'] for c in sharded_configs())})"
        if quantization == "fp8":
            return "shards are compiled with bf16 weights only"
        differs = [f"{f}={getattr(spec, f)} (the shard's: {c[f]})" for f in _MATCHED_FIELDS if getattr(spec, f) != c[f]]
        return f"this rank's part is not {shard}'s shape: {', '.join(differs)}" if differs else None
    if match_config(spec) is None:
        return no_match_reason(spec)
    return None


def weight_format(weights: Weights) -> str:
    """The WEIGHT_FORMATS name of the layers' matrices: "fp8" when every one is an e4m3
    QuantizedMatrix with one scale per row (or per tensor), "bf16" when none is one; else
    ValueError saying why the kernel cannot stream them (it reads one format for all layers)."""
    matrices = [getattr(layer, a) for layer in weights.layers for a in LAYER_MATRICES]
    fp8 = [isinstance(m, QuantizedMatrix) for m in matrices]
    if not any(fp8):
        return "bf16"
    if not all(fp8):
        raise ValueError(f"{sum(fp8)} of the {len(fp8)} layer matrices are FP8 and the others dense; the megakernel "
                         "streams one format for every layer (backend='reference' runs this mix)")
    blocks = {m.block for m in matrices if m.block[1] < m.shape[1]}
    if blocks:
        b = blocks.pop()
        raise ValueError(f"the megakernel takes one FP8 scale per output row, not {b[0]}x{b[1]} block scales "
                         "(backend='reference' runs them)")
    return "fp8"


class PackedTransformer(Transformer):
    """The reference decoder over weights in fragment order. Each layer's matrices (and the LM head,
    in row chunks) are unpacked into one reusable buffer just before they are multiplied; a tied
    embedding table is read from the packed LM head. (On the stream of the compute, in its order:
    measured on the H200, a second buffer filled on a side stream hid none of the unpacking behind
    the matmuls, which occupy every SM, and slowed the 1B prefill by the events; NOTES.md.)"""

    def __init__(self, spec: ModelSpec, weights: Weights, cache: KVCache, layer_weights: list[dict]):
        super().__init__(spec, weights, cache)
        self.matrices = [(LAYER_FIELDS[f["name"]], f["row_order"], f["order_param"]) for f in layer_weights if f["packed"]]
        first = weights.layers[0]
        elems = sum(getattr(first, attr).numel() for attr, _, _ in self.matrices)
        self.buffer = torch.empty(elems, dtype=weights.lm_head.dtype, device=weights.lm_head.device)
        self.lm_head_rows = max(16, elems // spec.hidden_size // 16 * 16)  # LM-head rows per unpacking

    def check_layout(self) -> None:
        if not self.weights.fragment_order:
            raise ValueError("these weights are row-major again (release_weights): the packed decoder cannot read them")

    def _unpacked(self, jobs: list[list[tuple[torch.Tensor, int, int]]]) -> Iterator[list[torch.Tensor]]:
        """For each job (packed matrices with their row order and its parameter), the row-major
        matrices in the buffer, valid until the next job (stream order keeps the caller's work on
        one job ahead of the next job's unpacking)."""
        for job in jobs:
            at, out = 0, []
            for packed, order, param in job:
                view = self.buffer[at : at + packed.numel()].view(packed.shape)
                if isinstance(packed, QuantizedMatrix):  # e4m3: dequantized as the reference does
                    out.append(dequantize_packed(packed, order, param, out=view))
                else:
                    out.append(unpack(packed, order, param, out=view))
                at += packed.numel()
            yield out

    def layer_weights(self) -> Iterator[LayerWeights]:
        jobs = [[(getattr(layer, attr), order, param) for attr, order, param in self.matrices] for layer in self.weights.layers]
        for layer, mats in zip(self.weights.layers, self._unpacked(jobs)):
            yield dataclasses.replace(layer, **{attr: m for (attr, _, _), m in zip(self.matrices, mats)})

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The reference's RMSNorm in one kernel (its roundings; measured on the H200 it was seven
        torch kernels and ~6% of an 8B prefill's GPU time)."""
        if not _fusable(x):
            return super().norm(x, weight)
        y = torch.empty_like(x)
        _core.load().rms_norm_rows(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1],
                                   x.shape[-1], self.spec.rms_norm_eps, cuda_stream(x.device))
        return y

    def activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The reference's silu(gate) * up in one kernel (its roundings)."""
        if not _fusable(gate_up):
            return super().activation(gate_up)
        out = gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
        _core.load().silu_mul_rows(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // gate_up.shape[-1],
                                   out.shape[-1], cuda_stream(gate_up.device))
        return out

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.weights.tied:  # the table is the packed LM head
            return gather_rows(self.weights.embed, tokens)
        return F.embedding(tokens, self.weights.embed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head, step = self.weights.lm_head, self.lm_head_rows
        identity = row_orders()["identity"]
        # rows r0..r1 of a packed matrix (row blocks outermost) are the packed form of those rows
        jobs = [[(head[r0 : r0 + step], identity, 0)] for r0 in range(0, head.shape[0], step)]
        logits = torch.cat([F.linear(hidden, mats[0]) for mats in self._unpacked(jobs)], dim=-1)
        return logits[..., : self.spec.vocab_size].float()  # (past it: the LM head's padding rows)


def _fusable(x: torch.Tensor) -> bool:
    """Whether prefill's fused kernels take x: contiguous bf16 on a CUDA device."""
    return x.is_cuda and x.dtype == torch.bfloat16 and x.is_contiguous()


def _reorder_in_place(weights: Weights, layer_weights: list[dict], reorder, reorder_fp8) -> None:
    """Replace every matrix of `weights` by reorder(matrix, row order, its parameter) (an FP8 one,
    a QuantizedMatrix, by reorder_fp8), one at a time (each old tensor is freed as its new one
    replaces it: never two copies of the model)."""
    for layer in weights.layers:
        for f in layer_weights:
            if f["packed"]:
                attr = LAYER_FIELDS[f["name"]]
                m = getattr(layer, attr)
                setattr(layer, attr, (reorder_fp8 if isinstance(m, QuantizedMatrix) else reorder)(m, f["row_order"],
                                                                                                   f["order_param"]))
    weights.replace_lm_head(reorder(weights.lm_head, row_orders()["identity"], 0))  # (a tied table with it)


def pad_lm_head(weights: Weights, rows: int) -> None:
    """Give the LM head (and a tied table, the same tensor) zero rows up to `rows`, the kernel's
    padded vocabulary (a multiple of 16; configs()[i]["padded_vocab_size"]). The padding rows are
    multiplied but never logits."""
    head = weights.lm_head
    if head.shape[0] == rows:
        return
    padded = torch.zeros(rows, head.shape[1], dtype=head.dtype, device=head.device)
    padded[: head.shape[0]] = head
    weights.replace_lm_head(padded)


def unpad_lm_head(weights: Weights, vocab: int) -> None:
    """The inverse of pad_lm_head: the LM head's first `vocab` rows (a view), a tied table too."""
    if weights.lm_head.shape[0] == vocab:
        return
    weights.replace_lm_head(weights.lm_head[:vocab])


def pack_in_place(weights: Weights, layer_weights: list[dict]) -> None:
    """Reorder every matrix of `weights` (and a tied embedding table) into fragment order."""
    if weights.fragment_order:
        raise ValueError("these weights are already in fragment order")
    _reorder_in_place(weights, layer_weights, pack, pack_fp8)
    weights.fragment_order = True


def unpack_in_place(weights: Weights, layer_weights: list[dict]) -> None:
    """The inverse of pack_in_place: row-major again."""
    if not weights.fragment_order:
        raise ValueError("these weights are already row-major")
    _reorder_in_place(weights, layer_weights, unpack, unpack_fp8)
    weights.fragment_order = False


class MegakernelBackend:
    """Decode with the compiled megakernel; prefill with the reference decoder over the same,
    packed weights, into the same cache."""

    name = "megakernel"
    checks_logits = True  # a step with non-finite logits raises (the kernel checks beside its arg-max)

    def __init__(self, spec: ModelSpec, weights: Weights, cache: KVCache, *, shard: str | None = None,
                 sm_count: int = 0):
        """`shard`: `spec` and `weights` are one tensor-parallel rank's part (tensor_parallel.shard_spec,
        shard_weights), decoded by that sharded config's kernel, which exchanges the O and down
        projections' partial sums with the other ranks' kernels: connect() them before the first
        step, and step every rank alike. `sm_count` > 0: the kernel runs on that many SMs (two ranks
        sharing one GPU)."""
        device = weights.embed.device
        reason = unavailable_reason(spec, device, weights.dtype, cache.max_batch_size,
                                    quantization="fp8" if weights.quantized else None, shard=shard)
        if reason:
            raise RuntimeError(f"the megakernel backend cannot run this model: {reason}")
        try:
            self.weight_format = weight_format(weights)
        except ValueError as e:
            raise RuntimeError(f"the megakernel backend cannot run this model: {e}") from None
        C = _core.load()
        config = config_named(shard or match_config(spec))
        self.device, self.cache, self.spec, self.shard = device, cache, spec, shard
        self.layer_weights = config["layer_weights"]
        formats = C.WEIGHT_FORMATS
        self.engine = C.MegakernelEngine(config["name"], _device_index(device), spec.num_layers, cache.max_batch_size,
                                         cache.max_seq_len, weights=formats[self.weight_format], lm_head=formats["bf16"],
                                         sm_count=sm_count)
        self.engine.timeout_ms = float(os.environ.get("FLASHFORMER_WATCHDOG_MS", self.engine.timeout_ms))
        self.scratch = torch.zeros(self.engine.scratch_bytes, dtype=torch.uint8, device=device)  # counters start at 0
        # a shard's exchange buffer, which the other ranks' kernels write into (zeroed: no exchange yet)
        self.exchange = torch.zeros(self.engine.exchange_bytes, dtype=torch.uint8, device=device) if shard else None
        pad_lm_head(weights, config["padded_vocab_size"])
        pack_in_place(weights, self.layer_weights)
        self.weights = weights  # keep every pointer the kernel reads alive
        self.prefill_model = PackedTransformer(spec, weights, cache, self.layer_weights)
        half = spec.head_dim // 2
        self.rope_cos, self.rope_sin = cache.cos[:, :half].contiguous(), cache.sin[:, :half].contiguous()
        self.engine.bind(
            self.scratch.data_ptr(),
            [self._layer_pointers(layer) for layer in weights.layers],
            weights.embed.data_ptr(),
            weights.tied,
            weights.final_norm.data_ptr(),
            weights.lm_head.data_ptr(),
            self.rope_cos.data_ptr(),
            self.rope_sin.data_ptr(),
            cache.kv.data_ptr(),
            spec.rms_norm_eps,
            kv_scale=cache.scale.data_ptr() if cache.fp8 else 0,
        )
        b = cache.max_batch_size
        self.tokens = torch.zeros(b, dtype=torch.int64, device=device)
        self.positions = torch.zeros(b, dtype=torch.int64, device=device)
        self.next_tokens = torch.zeros(b, dtype=torch.int32, device=device)
        self.logits = torch.empty(b, spec.vocab_size, dtype=torch.float32, device=device)

    def _layer_pointers(self, layer: LayerWeights) -> dict[str, int]:
        """{kernel name: device pointer} of a layer's weights; an FP8 matrix's scales as "<name>.scale"."""
        out = {}
        for f in self.layer_weights:
            w = getattr(layer, LAYER_FIELDS[f["name"]])
            if isinstance(w, QuantizedMatrix):
                out[f["name"]], out[f["name"] + ".scale"] = w.data.data_ptr(), w.scale.data_ptr()
            else:
                out[f["name"]] = w.data_ptr()
        return out

    def connect(self, rank: int, exchanges: list[torch.Tensor]) -> None:
        """A shard's place among its ranks: this backend is rank `rank` and exchanges[q] is rank q's
        `exchange` buffer as this process reaches it (the same process and GPU, or a CUDA IPC
        mapping of another GPU's over NVLink)."""
        if self.shard is None:
            raise RuntimeError("connect: this backend decodes a whole model, not a tensor-parallel shard")
        self._live_engine().set_tensor_parallel(rank, [t.data_ptr() for t in exchanges])

    def release_weights(self) -> Weights:
        """Hand the weights back in row-major order (in place, one matrix at a time), e.g. to run
        another decoder on them; this backend cannot decode afterwards."""
        self.synchronize()
        unpack_in_place(self.weights, self.layer_weights)
        unpad_lm_head(self.weights, self.spec.vocab_size)
        self.engine = None
        return self.weights

    def _live_engine(self):
        if self.engine is None:
            raise RuntimeError("this megakernel backend released its weights (release_weights) and cannot run")
        return self.engine

    def greedy_tokens(self, batch: int) -> list[int]:
        """The last decode step's arg-max token of rows 0..batch-1 (the kernel's fused arg-max over
        the logits it wrote: the lowest index among equal maxima, as torch.argmax). Waits for that
        step (raising as synchronize() does); the kernel's last CTA out wrote them to the host."""
        self.synchronize()
        tokens = self._live_engine().checked_next_tokens
        if batch > len(tokens):
            raise ValueError(f"greedy_tokens: the last decode step had {len(tokens)} rows, asked for {batch}")
        return tokens[:batch]

    def synchronize(self) -> None:
        """Wait for the last decode step; raise RuntimeError if it failed: a dependency inside the
        kernel never completed within the watchdog (FLASHFORMER_WATCHDOG_MS; the engine has reset
        itself so the next step runs clean), or a row's logits were not finite. Its logits are then
        invalid."""
        if self.engine is not None:
            self.engine.check_recorded()

    def _int64_on_device(self, values: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """`values` itself when the kernel can read it (int64, contiguous, on this device: no copy
        launch per step), else a copy in `buffer`. The kernel reads either in stream order, as a
        torch op would: the caching allocator reuses a freed input only for work queued after it."""
        if values.dtype == torch.int64 and values.is_contiguous() and values.device == buffer.device:
            return values
        return buffer[: values.shape[0]].copy_(values)

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.cache.kv

    @torch.inference_mode()
    def prefill(self, prompts: list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        self._live_engine()
        if self.shard:
            raise RuntimeError(f"a tensor-parallel shard ({self.shard}) does not prefill yet: its reference prefill "
                               "would need the ranks' partial sums (decode the prompt token by token instead)")
        return prefill_logits(self.prefill_model, prompts, rows)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One megakernel launch for rows 0..B-1; returns logits [B, vocab] fp32, on the current
        stream like any torch op: the call does not wait for its step, so the next call's launch
        queues behind it and the GPU runs steps back to back. Whether a step completed is checked
        at the next decode() (after its launch), greedy_tokens() or synchronize(): a step that
        failed raises RuntimeError there. The kernel's fused arg-max of each row is left in
        `self.next_tokens[:B]`."""
        logits, _ = self.decode_step(tokens, positions)
        return logits.clone()

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, want_logits: bool = True):
        """decode() without the copy of its logits, for the engine's loop: returns (the logits
        buffer's rows 0..B-1, valid until the next step, or None when not `want_logits`: the kernel
        then writes none; the fused arg-max, int32 [B] on the device). tokens/positions: int64 [B]
        on this device, read by the kernel in stream order (the sampler writes the next ones)."""
        engine = self._live_engine()
        b = tokens.shape[0]
        tokens, positions = self._int64_on_device(tokens, self.tokens), self._int64_on_device(positions, self.positions)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        engine.step(tokens.data_ptr(), positions.data_ptr(), self.next_tokens.data_ptr(),
                    self.logits.data_ptr() if want_logits else 0, b, stream)
        try:
            engine.check_recorded()  # the previous step, which ran before this one
        except RuntimeError as e:
            raise RuntimeError(f"{e} (the decode step before this call; this call's step ran after it and is invalid "
                               "too)") from None
        engine.record(stream)
        return (self.logits[:b] if want_logits else None), self.next_tokens[:b]
