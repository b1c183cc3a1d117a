"""The peers `flashformer bench` runs next to the engine, on the very same weight tensors.

`GptFast`: a gpt-fast-style decoder (github.com/pytorch-labs/gpt-fast): static KV cache per layer
`[batch, kv_heads, cache_len, head_dim]`, the whole step under
`torch.compile(mode="reduce-overhead", fullgraph=True)` (Inductor kernels replayed as CUDA graphs),
grouped-query attention as gpt-fast does it (`repeat_interleave` of the cache, then SDPA with a
position mask over the whole cache). As in gpt-fast the cache is sized to the context being run
(here `ctx + 8` rounded up to a multiple of 8), so a step reads that cache and no more.

`TorchaoFp8`: the FP8 counterpart of `GptFast` for models with FP8 weights: the same compiled
decoder, each e4m3 layer matrix a torchao FP8 weight-only tensor (`Float8Tensor`, the format of
torchao's `Float8WeightOnlyConfig`) over the engine's own e4m3 values and scales.

`HFEager`: HF transformers' own model class (LlamaForCausalLM, ...) run eagerly with its default
attention (SDPA) and a `DynamicCache`, its parameters bound to the same tensors (no copy).

Both compute what `reference.py` computes (tests/test_bench.py compares their logits).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelSpec
from .quantization import QuantizedMatrix
from .reference import apply_rope, rms_norm, rope_tables
from .weights import LayerWeights, Weights, _layer_slots


def cache_len(ctx: int) -> int:
    """The static cache length gpt-fast would set up for a context of `ctx` tokens plus the new one."""
    return (ctx + 8 + 7) // 8 * 8


class _Block(nn.Module):
    def __init__(self, layer: LayerWeights):
        super().__init__()
        for name, tensor in vars(layer).items():
            self.register_buffer(name, tensor, persistent=False)  # shares the storage (or None)


class GptFastModel(nn.Module):
    """One decode step over per-layer static caches; weights are buffers aliasing `Weights`."""

    def __init__(self, spec: ModelSpec, weights: Weights, max_seq_len: int):
        super().__init__()
        self.spec = spec
        self.register_buffer("embed", weights.embed, persistent=False)
        self.register_buffer("final_norm", weights.final_norm, persistent=False)
        self.register_buffer("lm_head", weights.lm_head, persistent=False)
        cos, sin = rope_tables(spec, max_seq_len, weights.embed.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.blocks = nn.ModuleList(_Block(layer) for layer in weights.layers)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]]):
        """tokens [B, T] at positions input_pos [T] (the same for every row, as in gpt-fast);
        caches: per layer (k, v), each [B, kv_heads, cache_len, head_dim]. Returns logits [B, vocab] fp32."""
        spec, eps = self.spec, self.spec.rms_norm_eps
        B, T = tokens.shape
        length = caches[0][0].shape[2]
        mask = (torch.arange(length, device=tokens.device) <= input_pos[:, None])[None, None]  # (1, 1, T, L)
        cos = self.cos[input_pos].to(self.embed.dtype)[None, :, None]  # (1, T, 1, D)
        sin = self.sin[input_pos].to(self.embed.dtype)[None, :, None]
        x = F.embedding(tokens, self.embed)
        for block, (k_cache, v_cache) in zip(self.blocks, caches):
            h = rms_norm(x, block.attn_norm, eps)
            q, k, v = F.linear(h, block.wqkv, block.bqkv).split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
            q = q.view(B, T, spec.num_heads, spec.head_dim)
            k = k.view(B, T, spec.num_kv_heads, spec.head_dim)
            v = v.view(B, T, spec.num_kv_heads, spec.head_dim)
            if block.q_norm is not None:
                q, k = rms_norm(q, block.q_norm, eps), rms_norm(k, block.k_norm, eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            k_cache[:, :, input_pos] = k
            v_cache[:, :, input_pos] = v
            group = spec.num_heads // spec.num_kv_heads
            keys, values = k_cache.repeat_interleave(group, dim=1), v_cache.repeat_interleave(group, dim=1)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=spec.head_dim**-0.5)
            x = x + F.linear(y.transpose(1, 2).reshape(B, T, spec.q_size), block.wo, block.bo)
            h = rms_norm(x, block.mlp_norm, eps)
            gate, up = F.linear(h, block.w_gate_up, block.b_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, block.w_down, block.b_down)
        return F.linear(rms_norm(x[:, -1], self.final_norm, eps), self.lm_head).float()


class GptFast:
    """The gpt-fast-style peer: `setup(batch, ctx)` makes the static caches, `decode` runs one step.

    One `torch.compile` per instance. The cache length is marked dynamic up front, so one graph
    serves every context and the batch dimension turns dynamic by itself at the first batch > 1
    (two compilations per model in all); the CUDA graphs are recorded once per shape. The caches
    are passed in as inputs with static addresses, so the CUDA graphs update them in place.
    """

    name = "gptfast"
    # Inductor settings the peer is compiled and run under (bench.py scopes them to its sweep).
    INDUCTOR_SETTINGS: dict = {}

    def __init__(self, spec: ModelSpec, weights: Weights, max_seq_len: int, *, compile: bool = True):
        self.spec = spec
        self.model = GptFastModel(spec, weights, cache_len(max_seq_len))
        self.compiled = compile
        if compile:
            import torch._inductor.config as inductor_config

            # A benchmark sweep records one CUDA graph per (batch, cache length) on purpose: no warning.
            inductor_config.triton.cudagraph_dynamic_shape_warn_limit = None
        self._step = torch.compile(self.model, mode="reduce-overhead", fullgraph=True) if compile else self.model
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self, batch: int, ctx: int, source: torch.Tensor | None = None, generator=None) -> None:
        """Static caches for `batch` rows holding `ctx` past positions: random (never zeros), or copied
        from `source`, a cache in the engine's layout [layers, 2, >= batch, kv_heads, >= ctx, head_dim]."""
        self.caches = []
        spec, dtype, device = self.spec, self.model.embed.dtype, self.model.embed.device
        shape = (batch, spec.num_kv_heads, cache_len(ctx), spec.head_dim)
        for layer in range(spec.num_layers):
            pair = []
            for kv in range(2):
                cache = torch.randn(shape, dtype=dtype, device=device, generator=generator)
                if source is not None:
                    cache[:, :, :ctx] = source[layer, kv, :batch, :, :ctx]
                if self.compiled:
                    torch._dynamo.mark_static_address(cache, guard=False)
                    torch._dynamo.maybe_mark_dynamic(cache, 2)
                pair.append(cache)
            self.caches.append((pair[0], pair[1]))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """tokens [B] at one shared position (int64 [1]); returns logits [B, vocab] fp32."""
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        return self._step(tokens[:, None], position, self.caches)

    def release(self) -> None:
        """Drop the caches, the compiled graphs and their CUDA graph pools."""
        self.caches = []
        if self.compiled:
            torch._dynamo.reset()


class TorchaoFp8(GptFast):
    """The gpt-fast peer of a model with FP8 weights, through torchao (>= 0.17): every e4m3 layer
    matrix becomes a torchao FP8 weight-only tensor over the same bytes (torchao_fp8_weights), which
    torchao multiplies in the activations' dtype, and the step is compiled as GptFast's under
    torchao's recommended Inductor settings (those its Float8WeightOnlyConfig applies). So it
    computes what the engine computes on those weights; the LM head stays bf16, as the engine's."""

    name = "torchao_fp8"
    INDUCTOR_SETTINGS = {  # (torchao.quantization.utils.recommended_inductor_config_setter's)
        "coordinate_descent_tuning": True,
        "coordinate_descent_check_all_directions": True,
        "force_fuse_int_mm_with_mul": True,
        "fx_graph_cache": True,
        "triton.unique_kernel_names": True,
    }

    def __init__(self, spec: ModelSpec, weights: Weights, max_seq_len: int, *, compile: bool = True):
        super().__init__(spec, torchao_fp8_weights(weights), max_seq_len, compile=compile)


def torchao_fp8_weights(weights: Weights) -> Weights:
    """`weights` with each FP8 layer matrix (QuantizedMatrix) as a torchao Float8Tensor: per output
    channel over the same e4m3 data and scales (no copy); block-scaled, dequantized and quantized
    again per output channel by torchao. Dense matrices and the rest are the same tensors."""
    try:
        from torchao.quantization import Float8Tensor
    except ImportError as exc:
        raise RuntimeError("the torchao FP8 peer needs torchao >= 0.17 (pip install torchao)") from exc
    if not any(isinstance(v, QuantizedMatrix) for layer in weights.layers for v in vars(layer).values()):
        raise ValueError("the torchao FP8 peer needs a model with FP8 layer matrices; these are all dense")
    dtype = weights.embed.dtype

    def convert(m):
        if not isinstance(m, QuantizedMatrix):
            return m
        if m.per_channel:  # scale [rows, 1]: torchao's per-row layout
            return Float8Tensor(m.data, m.scale, block_size=[1, m.shape[1]], dtype=dtype)
        return Float8Tensor.from_hp(m.dequantize(dtype))

    layers = [dataclasses.replace(layer, **{k: convert(v) for k, v in vars(layer).items()}) for layer in weights.layers]
    return dataclasses.replace(weights, layers=layers)


def hf_config(cfg: dict):
    """A transformers config object from a config.json dict."""
    import transformers

    cfg = dict(cfg)
    model_type = cfg.pop("model_type", "llama")
    return transformers.AutoConfig.for_model(model_type, **cfg)


class HFEager:
    """HF transformers' model run eagerly, its parameters bound to the tensors of `weights`."""

    name = "hf_eager"

    def __init__(self, spec: ModelSpec, weights: Weights, config):
        import transformers

        self.spec, self.device = spec, weights.embed.device
        config.tie_word_embeddings = weights.tied
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=weights.embed.dtype)
        _bind(model, spec, weights)
        self.model = model.eval()
        self.cache = None
        parameters = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5.x

    def setup(self, batch: int, ctx: int, source: torch.Tensor | None = None, generator=None) -> None:
        """A DynamicCache holding `ctx` past positions of `batch` rows: random, or copied from `source`
        (the engine's layout [layers, 2, >= batch, kv_heads, >= ctx, head_dim])."""
        from transformers import DynamicCache

        self.cache = None
        spec, dtype = self.spec, self.model.dtype
        cache = DynamicCache(config=self.model.config)
        shape = (batch, spec.num_kv_heads, ctx, spec.head_dim)
        for layer in range(spec.num_layers):
            if source is not None:
                k, v = (source[layer, kv, :batch, :, :ctx].clone() for kv in range(2))
            else:
                k, v = (torch.randn(shape, dtype=dtype, device=self.device, generator=generator) for _ in range(2))
            cache.update(k, v, layer)
        self.cache = cache

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step for every row at the next position of the cache; returns logits [B, vocab] fp32."""
        out = self.model(input_ids=tokens[:, None], use_cache=True, **{self._cache_kwarg: self.cache})
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Prefill one prompt (1-D token ids) into a fresh cache; returns its last-position logits [1, vocab]."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=prompt[None], use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
        return out.logits[:, -1].float()

    def release(self) -> None:
        self.cache = None


def _bind(model: nn.Module, spec: ModelSpec, weights: Weights) -> None:
    """Point every parameter of the HF model (built on the meta device) at the matching tensor of
    `weights` (row slices of the packed q|k|v and gate|up are contiguous views, not copies), and
    rebuild on the real device the modules whose buffers are computed at construction (RoPE)."""
    device = weights.embed.device
    tensors = {
        "model.embed_tokens.weight": weights.embed,
        "model.norm.weight": weights.final_norm,
        "lm_head.weight": weights.lm_head,
    }
    for suffix, (attr, _, rows) in _layer_slots(spec).items():
        for i, layer in enumerate(weights.layers):
            tensor = getattr(layer, attr)
            tensors[f"model.layers.{i}.{suffix}"] = tensor if rows is None else tensor[rows[0] : rows[1]]
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    unknown = names - set(tensors)
    if unknown:
        raise RuntimeError(f"HF peer: no flashformer tensor for parameter {min(unknown)}")
    for name in sorted(names):
        owner, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(owner), leaf, nn.Parameter(tensors[name], requires_grad=False))
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            owner, leaf = name.rsplit(".", 1)
            with torch.device(device):
                setattr(model.get_submodule(owner), leaf, type(module)(config=module.config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"HF peer: {left[0]} was left on the meta device")
