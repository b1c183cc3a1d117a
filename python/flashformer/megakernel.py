"""The megakernel decode backend: each decode step is one persistent-kernel launch of the
compiled core (cpp/include/flashformer/megakernel.cuh), over the Engine's KV cache.

At construction the matrices are reordered in place into the kernel's fragment order
(packing.py), one at a time: the device then holds one copy of the weights, the kernel's. A
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
from .packing import gather_rows, pack, row_orders, unpack
from .reference import KVCache, Transformer, prefill_logits
from .weights import LayerWeights, Weights

# Architectures whose decode step is exactly the Llama one the kernel implements.
LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM")

_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size")


def compiled_configs() -> list[dict]:
    """The compiled megakernel configs (name and shape of each)."""
    return list(_core.load().configs())


# The kernel's name of each per-layer weight (compiled core: configs()[i]["layer_weights"]) -> the
# LayerWeights field holding it.
LAYER_FIELDS = {
    "qkv": "wqkv",
    "o": "wo",
    "gate_up": "w_gate_up",
    "down": "w_down",
    "attn_norm": "attn_norm",
    "mlp_norm": "mlp_norm",
}


def config_named(name: str) -> dict:
    for c in compiled_configs():
        if c["name"] == name:
            return c
    raise ValueError(f"no compiled megakernel config named {name!r} (compiled: {config_names()})")


def config_names() -> str:
    return ", ".join(c["name"] for c in compiled_configs())


def _has_extras(spec: ModelSpec) -> bool:
    """Biases or q/k norms: parts of a decoder layer the kernel does not implement."""
    return spec.qkv_bias or spec.o_bias or spec.mlp_bias or spec.qk_norm


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def match_config(spec: ModelSpec) -> str | None:
    """The compiled config whose shape is `spec`'s (any layer count), or None."""
    if spec.architecture not in LLAMA_LIKE or _has_extras(spec):
        return None
    for c in compiled_configs():
        if all(getattr(spec, f) == c[f] for f in _SHAPE_FIELDS):
            return c["name"]
    return None


def unavailable_reason(spec: ModelSpec, device: torch.device, dtype: torch.dtype, max_batch_size: int) -> str | None:
    """Why the megakernel cannot decode this model here, or None when it can."""
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
    if match_config(spec) is None:
        shape = ", ".join(f"{f}={getattr(spec, f)}" for f in _SHAPE_FIELDS)
        return (
            f"no compiled config matches {spec.architecture} ({shape}"
            f"{', with biases or q/k norm' if _has_extras(spec) else ''}); "
            f"compiled: {config_names()}"
        )
    return None


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
                out.append(unpack(packed, order, param, out=view))
                at += packed.numel()
            yield out

    def layer_weights(self) -> Iterator[LayerWeights]:
        jobs = [[(getattr(layer, attr), order, param) for attr, order, param in self.matrices] for layer in self.weights.layers]
        for layer, mats in zip(self.weights.layers, self._unpacked(jobs)):
            yield dataclasses.replace(layer, **{attr: m for (attr, _, _), m in zip(self.matrices, mats)})

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.weights.tied:  # the table is the packed LM head
            return gather_rows(self.weights.embed, tokens)
        return F.embedding(tokens, self.weights.embed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head, step = self.weights.lm_head, self.lm_head_rows
        identity = row_orders()["identity"]
        # rows r0..r1 of a packed matrix (row blocks outermost) are the packed form of those rows
        jobs = [[(head[r0 : r0 + step], identity, 0)] for r0 in range(0, head.shape[0], step)]
        return torch.cat([F.linear(hidden, mats[0]) for mats in self._unpacked(jobs)], dim=-1).float()


def _reorder_in_place(weights: Weights, layer_weights: list[dict], reorder) -> None:
    """Replace every matrix of `weights` by reorder(matrix, row order, its parameter), one at a time
    (each old tensor is freed as its new one replaces it: never two copies of the model)."""
    for layer in weights.layers:
        for f in layer_weights:
            if f["packed"]:
                attr = LAYER_FIELDS[f["name"]]
                setattr(layer, attr, reorder(getattr(layer, attr), f["row_order"], f["order_param"]))
    tied = weights.tied
    weights.lm_head = reorder(weights.lm_head, row_orders()["identity"], 0)
    if tied:  # the table is the LM head, in whichever order
        weights.embed = weights.lm_head


def pack_in_place(weights: Weights, layer_weights: list[dict]) -> None:
    """Reorder every matrix of `weights` (and a tied embedding table) into fragment order."""
    if weights.fragment_order:
        raise ValueError("these weights are already in fragment order")
    _reorder_in_place(weights, layer_weights, pack)
    weights.fragment_order = True


def unpack_in_place(weights: Weights, layer_weights: list[dict]) -> None:
    """The inverse of pack_in_place: row-major again."""
    if not weights.fragment_order:
        raise ValueError("these weights are already row-major")
    _reorder_in_place(weights, layer_weights, unpack)
    weights.fragment_order = False


class MegakernelBackend:
    """Decode with the compiled megakernel; prefill with the reference decoder over the same,
    packed weights, into the same cache."""

    name = "megakernel"
    checks_logits = True  # a step with non-finite logits raises (the kernel checks beside its arg-max)

    def __init__(self, spec: ModelSpec, weights: Weights, cache: KVCache):
        device = weights.embed.device
        reason = unavailable_reason(spec, device, weights.embed.dtype, cache.max_batch_size)
        if reason:
            raise RuntimeError(f"the megakernel backend cannot run this model: {reason}")
        C = _core.load()
        config = config_named(match_config(spec))
        self.device, self.cache, self.spec = device, cache, spec
        self.layer_weights = config["layer_weights"]
        self.engine = C.MegakernelEngine(config["name"], _device_index(device), spec.num_layers, cache.max_batch_size,
                                         cache.max_seq_len)
        self.engine.timeout_ms = float(os.environ.get("FLASHFORMER_WATCHDOG_MS", self.engine.timeout_ms))
        self.scratch = torch.zeros(self.engine.scratch_bytes, dtype=torch.uint8, device=device)  # counters start at 0
        pack_in_place(weights, self.layer_weights)
        self.weights = weights  # keep every pointer the kernel reads alive
        self.prefill_model = PackedTransformer(spec, weights, cache, self.layer_weights)
        half = spec.head_dim // 2
        self.rope_cos, self.rope_sin = cache.cos[:, :half].contiguous(), cache.sin[:, :half].contiguous()
        self.engine.bind(
            self.scratch.data_ptr(),
            [{f["name"]: getattr(layer, LAYER_FIELDS[f["name"]]).data_ptr() for f in self.layer_weights}
             for layer in weights.layers],
            weights.embed.data_ptr(),
            weights.tied,
            weights.final_norm.data_ptr(),
            weights.lm_head.data_ptr(),
            self.rope_cos.data_ptr(),
            self.rope_sin.data_ptr(),
            cache.kv.data_ptr(),
            spec.rms_norm_eps,
        )
        b = cache.max_batch_size
        self.tokens = torch.zeros(b, dtype=torch.int64, device=device)
        self.positions = torch.zeros(b, dtype=torch.int64, device=device)
        self.next_tokens = torch.zeros(b, dtype=torch.int32, device=device)
        self.logits = torch.empty(b, spec.vocab_size, dtype=torch.float32, device=device)

    def release_weights(self) -> Weights:
        """Hand the weights back in row-major order (in place, one matrix at a time), e.g. to run
        another decoder on them; this backend cannot decode afterwards."""
        self.synchronize()
        unpack_in_place(self.weights, self.layer_weights)
        self.engine = None
        return self.weights

    def _live_engine(self):
        if self.engine is None:
            raise RuntimeError("this megakernel backend released its weights (release_weights) and cannot run")
        return self.engine

    def greedy_tokens(self, batch: int) -> list[int]:
        """The last decode step's arg-max token of rows 0..batch-1 (the kernel's fused arg-max over
        the logits it wrote: the lowest index among equal maxima, as torch.argmax). Waits for that
        step (raising as synchronize() does); decode() already queued the tokens' copy to the host."""
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
    def prefill(self, prompts: list[torch.Tensor]) -> torch.Tensor:
        self._live_engine()
        return prefill_logits(self.prefill_model, prompts)

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
