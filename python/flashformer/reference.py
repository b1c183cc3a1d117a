"""The pure-PyTorch decoder: the semantic ground truth for the megakernel.

One `forward` serves prefill and decode: it appends the keys/values of `tokens` to the static KV
cache `[layers, 2, batch, kv_heads, max_seq, head_dim]` (DESIGN.md §2) at each row's own
positions, then attends over everything that row has cached. The math follows HF transformers:
matmuls in the weights' dtype, RMSNorm in fp32 cast back before the weight, RoPE tables in fp32
cast to the model dtype, rotate_half (non-interleaved) RoPE, softmax in fp32 (inside SDPA).
FP8 matrices (`QuantizedMatrix`) are dequantized to the model dtype one layer at a time, just
before that layer's matmuls, into one reusable buffer: the math is then that of the dense model
whose weights are the dequantized ones.

The KV cache and the RoPE tables (`KVCache`) belong to the Engine, which hands them to its
backend; a backend never makes its own. An FP8 KV cache (`kv_cache_dtype="fp8"`) holds each
(token, kv head) vector of K and of V in e4m3 with one fp32 scale, absmax / 448, taken when the
vector is written; attention reads them dequantized to the model dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import dataclasses

import torch
import torch.nn.functional as F

from .config import ModelSpec, RopeSpec
from .quantization import FP8_DTYPE, QuantizedMatrix, quantize_per_channel
from .weights import LAYER_MATRICES, LayerWeights, Weights

FP32_QUERY_BLOCK = 1024  # queries an attention call of an fp32 prompt (Transformer._attention)


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, computed exactly as HF transformers does."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_context = rope.original_max_position_embeddings
        low_freq_wavelen = old_context / rope.low_freq_factor
        high_freq_wavelen = old_context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_tables(spec: ModelSpec, max_seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim] in fp32, halves repeated (rotate_half layout)."""
    inv_freq = rope_inv_freq(spec.rope, spec.head_dim).to(device)
    freqs = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@dataclass
class KVCache:
    """What a decode step reads and writes besides the weights: the KV cache
    `kv` [layers, 2, max_batch_size, kv_heads, max_seq_len, head_dim] (the one layout of the
    reference path and the megakernel) in the model dtype, or in FP8 e4m3 with `scale`
    [layers, 2, max_batch_size, kv_heads, max_seq_len] fp32 (a scale per token and kv head: the
    vector kv[..., t, :] stands for kv[..., t, :] * scale[..., t]); and the RoPE tables `cos`,
    `sin` [max_seq_len, head_dim] in fp32 (halves repeated, rotate_half layout). `dtype` is the
    model dtype, what attention computes in."""

    kv: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    scale: torch.Tensor | None = None
    dtype: torch.dtype | None = None  # (None: kv's own dtype, a dense cache)

    def __post_init__(self):
        if self.dtype is None:
            self.dtype = self.kv.dtype
        if (self.kv.dtype == FP8_DTYPE) != (self.scale is not None):
            raise ValueError("an FP8 KV cache needs its scales, and only an FP8 one has them")

    @classmethod
    def allocate(cls, spec: ModelSpec, max_batch_size: int, max_seq_len: int, *, dtype: torch.dtype, device,
                 kv_cache_dtype: str = "auto") -> KVCache:
        """An empty cache; `kv_cache_dtype` "auto" (the model dtype `dtype`) or "fp8" (e4m3 with scales)."""
        cos, sin = rope_tables(spec, max_seq_len, device)
        shape = spec.kv_cache_shape(max_batch_size, max_seq_len)
        if kv_cache_dtype == "fp8":
            # (4 floats of padding after the scales: the megakernel copies a row's scales in 16-byte
            # pieces from the boundary below the first, which may reach past the last row's end)
            scales = math.prod(shape[:-1])
            scale = torch.ones(scales + 4, dtype=torch.float32, device=device)[:scales].view(shape[:-1])
            return cls(torch.zeros(shape, dtype=FP8_DTYPE, device=device), cos, sin, scale=scale, dtype=dtype)
        return cls(torch.zeros(shape, dtype=dtype, device=device), cos, sin)

    @property
    def fp8(self) -> bool:
        return self.scale is not None

    @property
    def max_batch_size(self) -> int:
        return self.kv.shape[2]

    @property
    def max_seq_len(self) -> int:
        return self.kv.shape[4]

    @property
    def nbytes(self) -> int:
        """Bytes of the KV cache itself, scales included (the RoPE tables are small beside it)."""
        return self.kv.nbytes + (0 if self.scale is None else self.scale.nbytes)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 of K or V vectors x [..., head_dim]: (data [..., head_dim] e4m3, scale [...] fp32),
    one scale per vector, as quantize_per_channel takes per row."""
    data, scale = quantize_per_channel(x.reshape(-1, x.shape[-1]))
    return data.view(x.shape), scale.view(x.shape[:-1])


def dequantize_kv(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """data [..., head_dim] e4m3 times scale [...], in fp32, rounded to `dtype`."""
    return (data.float() * scale[..., None]).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos, sin [B, 1, T, D] in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# One group of rows forward together: tokens [B, T] at positions start[b] .. start[b] + T - 1 of
# cache rows row0 .. row0 + B - 1.
Segment = tuple[torch.Tensor, torch.Tensor, int]


class Transformer:
    """A Llama-family decoder over row-major `Weights` and a `KVCache`. Layers run one after the
    other for every segment (each layer's weights are taken once per forward, `layer_weights`)."""

    def __init__(self, spec: ModelSpec, weights: Weights, cache: KVCache):
        self.spec, self.weights, self.cache = spec, weights, cache
        self.check_layout()
        self._dequant_buffer: torch.Tensor | None = None  # one layer's FP8 matrices, dequantized

    def check_layout(self) -> None:
        """Raise unless the weights are in the order this decoder reads (row-major)."""
        if self.weights.fragment_order:
            raise ValueError("the reference decoder needs row-major weights; these are in the megakernel's fragment order")

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.cache.kv

    def layer_weights(self) -> Iterator[LayerWeights]:
        """Each layer's weights, in order (row-major: what F.linear multiplies by). A layer's FP8
        matrices come dequantized to the model dtype, in a buffer that the next layer reuses (the
        caller is done with a layer before it asks for the next)."""
        if not self.weights.quantized:
            yield from self.weights.layers
            return
        for layer in self.weights.layers:
            fp8 = [(a, m) for a in LAYER_MATRICES if isinstance(m := getattr(layer, a), QuantizedMatrix)]
            elems = sum(m.numel() for _, m in fp8)
            if self._dequant_buffer is None or self._dequant_buffer.numel() < elems:
                self._dequant_buffer = None  # (freed before its replacement is allocated)
                self._dequant_buffer = torch.empty(elems, dtype=self.weights.dtype, device=self.weights.embed.device)
            at, dense = 0, {}
            for attr, m in fp8:
                dense[attr] = m.dequantize(self.weights.dtype, out=self._dequant_buffer[at : at + m.numel()].view(m.shape))
                at += m.numel()
            yield dataclasses.replace(layer, **dense)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weights.embed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weights.lm_head).float()

    def forward(self, tokens: torch.Tensor, start: torch.Tensor, row0: int = 0) -> torch.Tensor:
        """tokens [B, T] at positions start[b] .. start[b] + T - 1 of cache rows row0 .. row0 + B - 1.

        Returns the final-normed hidden states [B, T, hidden] in the model dtype.
        """
        return self.forward_segments([(tokens, start, row0)])[0]

    def forward_segments(self, segments: list[Segment], last_only: bool = False) -> list[torch.Tensor]:
        """`forward` of several segments (ragged prompts, say), layer by layer. With `last_only`
        each segment's hidden state comes back for its last position alone [B, 1, hidden]: the last
        layer still writes every position's K and V, but its attention output and MLP run for that
        position only (what a prefill needs)."""
        self.check_layout()  # (a backend may have reordered them since this decoder was made)
        dtype = self.cache.dtype
        xs, views = [], []
        for tokens, start, row0 in segments:
            B, T = tokens.shape
            positions = start[:, None] + torch.arange(T, device=tokens.device)  # (B, T)
            length = int(positions.max()) + 1
            mask = torch.arange(length, device=tokens.device) <= positions[:, :, None]  # (B, T, length)
            cos = self.cache.cos[positions][:, None].to(dtype)  # (B, 1, T, D)
            sin = self.cache.sin[positions][:, None].to(dtype)
            xs.append(self.embed(tokens))
            views.append((slice(row0, row0 + B), length, positions, cos, sin, mask))
        for i, layer in enumerate(self.layer_weights()):
            last = last_only and i == self.spec.num_layers - 1
            for s, (rows, length, positions, cos, sin, mask) in enumerate(views):
                cache = self.cache.kv[i, :, rows, :, :length]  # (2, B, kv_heads, length, D)
                if self.cache.fp8:  # (and its scales, (2, B, kv_heads, length))
                    cache = (cache, self.cache.scale[i, :, rows, :, :length])
                x = xs[s]
                h = self._attention(layer, self.norm(x, layer.attn_norm), cache, positions, cos, sin, mask, last)
                x = (x[:, -1:] if last else x) + h
                xs[s] = x + self._mlp(layer, self.norm(x, layer.mlp_norm))
        return [self.norm(x, self.weights.final_norm) for x in xs]

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of the hidden states x [..., hidden] (a subclass may fuse it: same roundings)."""
        return rms_norm(x, weight, self.spec.rms_norm_eps)

    def activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of the MLP's [..., gate | up] (a subclass may fuse it: same roundings)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _attention(self, layer: LayerWeights, x, cache, positions, cos, sin, mask, last_only=False) -> torch.Tensor:
        """Appends the K and V of every position of x to the cache (`cache`: this layer's view of
        the KV cache, or of an FP8 one and its scales); the output of every position, or of the
        last one alone (`last_only`)."""
        spec = self.spec
        B, T, _ = x.shape
        q, k, v = F.linear(x, layer.wqkv, layer.bqkv).split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
        q = q.view(B, T, spec.num_heads, spec.head_dim)
        k = k.view(B, T, spec.num_kv_heads, spec.head_dim)
        if layer.q_norm is not None:
            q, k = rms_norm(q, layer.q_norm, spec.rms_norm_eps), rms_norm(k, layer.k_norm, spec.rms_norm_eps)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        rows = torch.arange(B, device=x.device)[:, None]
        new = (k.transpose(1, 2), v.view(B, T, spec.num_kv_heads, spec.head_dim))  # (B, T, kv_heads, D) each
        if isinstance(cache, tuple):  # FP8: each vector quantized as it is written, read back dequantized
            cache, scale = cache
            for j, vectors in enumerate(new):
                cache[j, rows, :, positions], scale[j, rows, :, positions] = quantize_kv(vectors)
            keys, values = (dequantize_kv(cache[j], scale[j], x.dtype) for j in (0, 1))
        else:
            cache[0, rows, :, positions], cache[1, rows, :, positions] = new
            keys, values = cache[0], cache[1]  # (kv heads: SDPA's enable_gqa shares each among its q heads)
        length = cache.shape[3]
        if last_only:  # each row's last position (one row: the last of the cache, which sees all of it)
            q, T, attn = q[:, :, -1:], 1, dict(attn_mask=mask[:, None, -1:] if B > 1 else None)
        elif length == T:  # the rows start at position 0 (a prompt from scratch): the mask is causal
            attn = dict(is_causal=True)
        else:
            attn = dict(attn_mask=mask[:, None])
        gqa = spec.num_heads != spec.num_kv_heads

        def attend(q, attn):
            return F.scaled_dot_product_attention(q, keys, values, scale=spec.head_dim**-0.5, enable_gqa=gqa, **attn)

        if x.dtype == torch.float32 and T > FP32_QUERY_BLOCK:
            # On CUDA no fused attention kernel takes fp32 with GQA, and SDPA's math path holds the scores
            # and their softmax (B x heads x T x length each: 8.6 GB for an 8K prompt of 32 heads), so a
            # long fp32 prompt attends in blocks of queries (the same sums, row by row)
            blocks = [slice(a, a + FP32_QUERY_BLOCK) for a in range(0, T, FP32_QUERY_BLOCK)]
            out = torch.cat([attend(q[:, :, b], dict(attn_mask=mask[:, None, b])) for b in blocks], dim=2)
        else:
            out = attend(q, attn)
        return F.linear(out.transpose(1, 2).reshape(B, T, spec.q_size), layer.wo, layer.bo)

    def _mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.activation(F.linear(x, layer.w_gate_up, layer.b_gate_up)), layer.w_down, layer.b_down)


class ReferenceBackend:
    """The decode backend in plain PyTorch (see `flashformer.engine.Backend` for the interface)."""

    name = "reference"

    def __init__(self, spec: ModelSpec, weights: Weights, cache: KVCache):
        self.model = Transformer(spec, weights, cache)

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.model.kv_cache

    @torch.inference_mode()
    def prefill(self, prompts: list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        """Prompt b (1-D token ids) fills cache row rows[b] (default: b) from position 0; returns
        last-position logits [B, vocab] in fp32. Each prompt is its own segment, so ragged prompts
        need no padding."""
        return prefill_logits(self.model, prompts, rows)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One step for cache rows 0 .. B-1: tokens[b] at positions[b]; returns logits [B, vocab] fp32."""
        return self.model.logits(self.model.forward(tokens[:, None], positions))[:, 0]


def prefill_logits(model: Transformer, prompts: list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
    """Prompt b into cache row rows[b] (default: b) from position 0, the other rows untouched; the
    last position's logits of each [B, vocab] fp32."""
    return model.logits(prefill_hidden(model, prompts, rows))


def prefill_hidden(model: Transformer, prompts: list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
    """prefill_logits without the LM head: the last position's final-normed hidden state of each
    prompt [B, hidden]."""
    rows = range(len(prompts)) if rows is None else rows
    if len(rows) != len(prompts) or len(set(rows)) != len(rows):
        raise ValueError(
            f"prefill: rows must name one distinct cache row per prompt, got {list(rows)} for {len(prompts)} prompts"
        )
    batch = model.kv_cache.shape[2]
    if any(not 0 <= r < batch for r in rows):
        raise ValueError(f"prefill: rows {list(rows)} must be cache rows, 0..{batch - 1}")
    start = torch.zeros(1, dtype=torch.long, device=model.kv_cache.device)
    hidden = model.forward_segments([(p[None], start, r) for r, p in zip(rows, prompts)], last_only=True)
    return torch.cat([h[:, -1] for h in hidden])
