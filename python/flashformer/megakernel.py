"""The megakernel decode backend: each decode step is one persistent-kernel launch of the
compiled core (cpp/include/flashformer/megakernel.cuh). Prefill and the KV cache are the
reference backend's (the same cache layout), so only the decode step changes.

At construction the matrices are packed once into the kernel's fragment order (a second copy
of the weights: the reference prefill keeps reading the originals).

A step whose inter-SM dependency does not complete within the watchdog (5 s, or the
FLASHFORMER_WATCHDOG_MS environment variable: raise it under compute-sanitizer) raises
RuntimeError instead of hanging the GPU.
"""

from __future__ import annotations

import os

import torch

from . import _core
from .config import ModelSpec
from .reference import ReferenceBackend
from .weights import Weights

# Architectures whose decode step is exactly the Llama one the kernel implements.
LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM")

_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size")


def compiled_configs() -> list[dict]:
    """The compiled megakernel configs (name and shape of each)."""
    return list(_core.load().configs())


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


class MegakernelBackend:
    """Decode with the compiled megakernel; prefill with the reference path into the same cache."""

    name = "megakernel"

    def __init__(self, spec: ModelSpec, weights: Weights, max_batch_size: int, max_seq_len: int):
        device = weights.embed.device
        reason = unavailable_reason(spec, device, weights.embed.dtype, max_batch_size)
        if reason:
            raise RuntimeError(f"the megakernel backend cannot run this model: {reason}")
        C = _core.load()
        self.reference = ReferenceBackend(spec, weights, max_batch_size, max_seq_len)
        self.device = device
        self.engine = C.MegakernelEngine(match_config(spec), _device_index(device), spec.num_layers, max_batch_size,
                                         max_seq_len)
        self.engine.timeout_ms = float(os.environ.get("FLASHFORMER_WATCHDOG_MS", self.engine.timeout_ms))
        self.scratch = torch.zeros(self.engine.scratch_bytes, dtype=torch.uint8, device=device)  # counters start at 0

        order = C.ROW_ORDERS
        self.packed = [
            (
                self._pack(layer.wqkv, order["rope_pairs"], spec.head_dim),
                self._pack(layer.wo, order["identity"]),
                self._pack(layer.w_gate_up, order["gate_up"], spec.intermediate_size),
                self._pack(layer.w_down, order["identity"]),
            )
            for layer in weights.layers
        ]
        self.lm_head = self._pack(weights.lm_head, order["identity"])
        half = spec.head_dim // 2
        model = self.reference.model
        self.rope_cos, self.rope_sin = model.cos[:, :half].contiguous(), model.sin[:, :half].contiguous()
        self.engine.bind(
            self.scratch.data_ptr(),
            [
                (qkv.data_ptr(), o.data_ptr(), gu.data_ptr(), down.data_ptr(), lw.attn_norm.data_ptr(), lw.mlp_norm.data_ptr())
                for (qkv, o, gu, down), lw in zip(self.packed, weights.layers)
            ],
            weights.embed.data_ptr(),
            weights.final_norm.data_ptr(),
            self.lm_head.data_ptr(),
            self.rope_cos.data_ptr(),
            self.rope_sin.data_ptr(),
            self.kv_cache.data_ptr(),
            spec.rms_norm_eps,
        )
        self.weights = weights  # keep every pointer the kernel reads alive
        self.tokens = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.next_tokens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        self.logits = torch.empty(max_batch_size, spec.vocab_size, dtype=torch.float32, device=device)

    def greedy_tokens(self, batch: int) -> list[int]:
        """The last decode step's arg-max token of rows 0..batch-1 (the kernel's fused arg-max over
        the logits it wrote: the lowest index among equal maxima, as torch.argmax). Waits for that
        step (raising as synchronize() does); decode() already queued the tokens' copy to the host."""
        self.synchronize()
        tokens = self.engine.checked_next_tokens
        if batch > len(tokens):
            raise ValueError(f"greedy_tokens: the last decode step had {len(tokens)} rows, asked for {batch}")
        return tokens[:batch]

    def synchronize(self) -> None:
        """Wait for the last decode step; raise RuntimeError if it aborted (a dependency inside the
        kernel never completed within the watchdog, FLASHFORMER_WATCHDOG_MS: its logits are invalid,
        and the engine has reset itself so the next step runs clean)."""
        self.engine.check_recorded()

    def _int64_on_device(self, values: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """`values` itself when the kernel can read it (int64, contiguous, on this device: no copy
        launch per step), else a copy in `buffer`. The kernel reads either in stream order, as a
        torch op would: the caching allocator reuses a freed input only for work queued after it."""
        if values.dtype == torch.int64 and values.is_contiguous() and values.device == buffer.device:
            return values
        return buffer[: values.shape[0]].copy_(values)

    def _pack(self, w: torch.Tensor, row_order: int, order_param: int = 0) -> torch.Tensor:
        w = w.contiguous()
        out = torch.empty_like(w)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        _core.load().pack_weight(w.data_ptr(), out.data_ptr(), w.shape[0], w.shape[1], row_order, order_param, stream)
        return out

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.reference.kv_cache

    def prefill(self, prompts: list[torch.Tensor]) -> torch.Tensor:
        return self.reference.prefill(prompts)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One megakernel launch for rows 0..B-1; returns logits [B, vocab] fp32, on the current
        stream like any torch op: the call does not wait for its step, so the next call's launch
        queues behind it and the GPU runs steps back to back. Whether a step completed is checked
        at the next decode() (after its launch), greedy_tokens() or synchronize(): a step that
        aborted raises RuntimeError there. The kernel's fused arg-max of each row is left in
        `self.next_tokens[:B]`."""
        b = tokens.shape[0]
        tokens, positions = self._int64_on_device(tokens, self.tokens), self._int64_on_device(positions, self.positions)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self.engine.step(
            tokens.data_ptr(), positions.data_ptr(), self.next_tokens.data_ptr(), self.logits.data_ptr(), b, stream
        )
        try:
            self.engine.check_recorded()  # the previous step, which ran before this one
        except RuntimeError as e:
            raise RuntimeError(f"{e} (the decode step before this call; this call's step ran after it and is invalid "
                               "too)") from None
        self.engine.record(stream)  # this step's outcome, read by the next check
        return self.logits[:b].clone()
