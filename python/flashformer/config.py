"""HF `config.json` (+ `generation_config.json`) -> `ModelSpec`, with validation.

Every error names the file and the field; nothing here imports torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .validate import checkpoint_path

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}  # used when config.json has no 'architectures'
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """RoPE parameters; `rope_type` is "default", "linear" or "llama3" (fields unused by a type are None)."""

    theta: float
    rope_type: str = "default"
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class WeightQuantization:
    """How a published FP8 checkpoint (config.json's quantization_config) stores its matrices: an
    e4m3 `<module>.weight` beside a float scale `<module>.<scale_name>`, the matrix being
    weight * scale per block. Matrices stored dense (the config's `ignore` list) stay dense.

    method: quant_method, "compressed-tensors" (format float-quantized) or "fp8" (transformers'
    FineGrainedFP8). strategy: "tensor" (one scale, shape [] or [1]), "channel" (a scale per
    output row, [rows, 1]) or "block" ([cdiv(rows, b0), cdiv(cols, b1)] for block_size (b0, b1))."""

    method: str
    scale_name: str  # "weight_scale" (compressed-tensors) or "weight_scale_inv" (fp8): both multiply
    strategy: str
    block_size: tuple[int, int] | None = None  # (rows, cols) of a block, for strategy "block"
    ignore: tuple[str, ...] = ()  # modules the config leaves unquantized (as it says; the headers decide)


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a checkpoint's architecture that the decoder and the kernel need."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    tie_word_embeddings: bool | None = None  # as config.json says; None when it does not say
    quantization: WeightQuantization | None = None  # a published FP8 checkpoint's format (config.json)

    def kv_cache_shape(self, max_batch_size: int, max_seq_len: int) -> tuple[int, ...]:
        """The KV cache's one layout (DESIGN.md §2), shared by the reference path and the kernel."""
        return (self.num_layers, 2, max_batch_size, self.num_kv_heads, max_seq_len, self.head_dim)

    def kv_cache_bytes(self, max_batch_size: int, max_seq_len: int, itemsize: int, kv_cache_dtype: str = "auto") -> int:
        """Bytes of a KV cache of kv_cache_shape (or of `max_seq_len` positions of one): in the model
        dtype (`itemsize` bytes an element), or ("fp8") a byte an element and an fp32 scale per
        head_dim vector (KVCache.scale)."""
        elems = math.prod(self.kv_cache_shape(max_batch_size, max_seq_len))
        if kv_cache_dtype == "fp8":
            return elems + elems // self.head_dim * 4
        return elems * itemsize

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def check_max_seq_len(self, max_seq_len: int) -> None:
        """Raise ValueError where this model cannot run exactly with a KV cache of `max_seq_len`."""
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
        if self.sliding_window is not None and self.sliding_window < max_seq_len:
            raise ValueError(
                f"config.json: sliding_window={self.sliding_window} is shorter than "
                f"max_seq_len={max_seq_len}; sliding-window attention is not supported, "
                f"pass max_seq_len <= {self.sliding_window}"
            )


def read_json(path: Path) -> dict:
    """A JSON object from `path` (ValueError naming the file otherwise)."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _field(
    cfg: dict, name: str, kind: type, default=None, *, minimum=None, above=None, where: str = "config.json"
):
    """cfg[name] (or `default` when absent or null) checked to be of `kind`, finite for a float,
    >= `minimum` and > `above` when they are given."""
    value = cfg.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"{where} is missing the required field '{name}'")
        value = default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"{where} field '{name}' must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{where} field '{name}' must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where} field '{name}' must be >= {minimum}, got {value!r}")
    if above is not None and value <= above:
        raise ValueError(f"{where} field '{name}' must be > {above}, got {value!r}")
    return value


def _token_ids(value, source: str, vocab_size: int) -> tuple[int, ...]:
    ids = [] if value is None else [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{source} field 'eos_token_id' must be an int or a list of ints, got {value!r}")
    for i in ids:
        if not 0 <= i < vocab_size:
            raise ValueError(
                f"{source} field 'eos_token_id': token id {i} is outside the vocabulary (vocab_size={vocab_size})"
            )
    return tuple(ids)


def _rope(cfg: dict) -> RopeSpec:
    """RoPE from `rope_parameters` (transformers >= 5) or `rope_scaling` + `rope_theta` (older)."""
    field = "rope_parameters" if cfg.get("rope_parameters") is not None else "rope_scaling"
    params = cfg.get(field) or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json field '{field}' must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"config.json field '{field}': unsupported rope_type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json field '{field}': partial_rotary_factor != 1 is not supported")
    where = f"config.json {field}"
    theta_where = where if "rope_theta" in params else "config.json"
    theta = _field(
        {"rope_theta": cfg.get("rope_theta"), **params}, "rope_theta", float, 10000.0, above=0, where=theta_where
    )
    if rope_type == "default":
        return RopeSpec(theta=theta)
    factor = _field(params, "factor", float, above=0, where=where)
    if rope_type == "linear":
        return RopeSpec(theta=theta, rope_type="linear", factor=factor)
    low = _field(params, "low_freq_factor", float, above=0, where=where)
    high = _field(params, "high_freq_factor", float, where=where)
    if high <= low:  # the llama3 rule interpolates over 1 / (high - low)
        raise ValueError(f"{where} field 'high_freq_factor' must be > low_freq_factor={low}, got {high!r}")
    return RopeSpec(
        theta=theta,
        rope_type="llama3",
        factor=factor,
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=_field(
            params, "original_max_position_embeddings", int, minimum=1, where=where
        ),
    )


def _sliding_window(cfg: dict, architecture: str) -> int | None:
    window = cfg.get("sliding_window")
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        layer_types = cfg.get("layer_types") or []
        if not cfg.get("use_sliding_window", False) and "sliding_attention" not in layer_types:
            return None
    return None if window is None else _field(cfg, "sliding_window", int, minimum=1)


QUANT_METHODS = ("compressed-tensors", "fp8")
_SUPPORTED_QUANTIZATION = (
    "FP8 e4m3 weights as compressed-tensors format 'float-quantized' (strategy tensor, channel or block) "
    "or transformers quant_method 'fp8' with weight_block_size"
)


def weight_quantization(q) -> WeightQuantization | None:
    """config.json's quantization_config -> WeightQuantization (None when there is none); any
    format but FP8 e4m3 weights is a ValueError naming the method and the offending field."""
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ValueError(f"config.json field 'quantization_config' must be an object, got {q!r}")
    method = q.get("quant_method")
    if method not in QUANT_METHODS:
        raise ValueError(
            f"config.json has a quantization_config with quant_method {method!r} (fields: {', '.join(sorted(q))}), "
            f"which is not supported (supported: {_SUPPORTED_QUANTIZATION})"
        )
    where = f"config.json quantization_config (quant_method {method!r})"

    def refuse(field: str, value, supported: str):
        raise ValueError(f"{where}: {field} {value!r} is not supported ({supported}; {_SUPPORTED_QUANTIZATION})")

    if method == "fp8":
        scheme = q.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):  # activations stay in the model dtype either way
            refuse("activation_scheme", scheme, "dynamic or static")
        if q.get("fmt", "e4m3") != "e4m3":
            refuse("fmt", q.get("fmt"), "only e4m3")
        if q.get("scale_fmt", "float") != "float":
            refuse("scale_fmt", q.get("scale_fmt"), "only float scales")
        block = q.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
            refuse("weight_block_size", block, "two positive ints such as [128, 128]; per-tensor fp8 is not read")
        return WeightQuantization("fp8", "weight_scale_inv", "block", tuple(block), _names(q, "modules_to_not_convert"))

    fmt = q.get("format")
    if fmt != "float-quantized":
        refuse("format", fmt, "only 'float-quantized'")
    if q.get("quantization_status", "compressed") != "compressed":
        refuse("quantization_status", q.get("quantization_status"), "only 'compressed'")
    for field, what in (("kv_cache_scheme", "an FP8 KV cache"), ("sparsity_config", "sparsity"),
                        ("transform_config", "transforms")):
        if q.get(field):
            raise ValueError(f"{where}: field '{field}' is set; {what} is not supported yet")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{where}: field 'config_groups' must be a non-empty object, got {groups!r}")
    schemes = set()
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            raise ValueError(f"{where}: config_groups.{name} has no 'weights' object")
        field = f"config_groups.{name}.weights"
        for key, want in (("num_bits", 8), ("type", "float"), ("symmetric", True), ("dynamic", False)):
            if weights.get(key, None if key == "type" else want) != want:  # (the schema's default type is int)
                refuse(f"{field}.{key}", weights.get(key), f"FP8 weights have {key} {want!r}")
        if weights.get("actorder"):
            refuse(f"{field}.actorder", weights.get("actorder"), "no activation reordering")
        strategy = weights.get("strategy")
        if strategy not in ("tensor", "channel", "block"):
            refuse(f"{field}.strategy", strategy, "tensor, channel or block")
        block = None
        if strategy == "block":
            block = weights.get("block_structure")
            if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
                refuse(f"{field}.block_structure", block, "two positive ints such as [128, 128]")
            block = tuple(block)
        for kind in ("input_activations", "output_activations"):
            acts = group.get(kind)  # input activations' FP8 scheme is ignored: they stay in the model dtype
            if acts is not None and (kind == "output_activations" or not isinstance(acts, dict)
                                     or acts.get("type") != "float" or acts.get("num_bits") != 8):
                refuse(f"config_groups.{name}.{kind}", acts, "none, or FP8 input activations")
        schemes.add((strategy, block))
    if len(schemes) > 1:
        raise ValueError(f"{where}: config_groups use different weight schemes {sorted(schemes, key=str)}; one is supported")
    strategy, block = schemes.pop()
    return WeightQuantization("compressed-tensors", "weight_scale", strategy, block, _names(q, "ignore"))


def _names(q: dict, field: str) -> tuple[str, ...]:
    names = q.get(field) or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"config.json quantization_config field '{field}' must be a list of strings, got {names!r}")
    return tuple(names)


def spec_from_dict(cfg: dict, generation_config: dict | None = None) -> ModelSpec:
    """Validate a parsed config.json (and generation_config.json) and build the ModelSpec."""
    quantization = weight_quantization(cfg.get("quantization_config"))
    architectures = cfg.get("architectures")
    if architectures is None and cfg.get("model_type") in MODEL_TYPES:
        architectures = [MODEL_TYPES[cfg["model_type"]]]
    if not isinstance(architectures, list) or not architectures:
        raise ValueError(f"config.json field 'architectures' must be a non-empty list, got {architectures!r}")
    supported = [a for a in architectures if a in ARCHITECTURES]
    if not supported:
        raise ValueError(
            f"config.json: unsupported architecture {', '.join(map(str, architectures))} "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    architecture = supported[0]
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json field 'hidden_act': unsupported activation {act!r} (only silu)")
    if cfg.get("pretraining_tp", 1) != 1:
        raise ValueError("config.json field 'pretraining_tp' must be 1")
    hidden = _field(cfg, "hidden_size", int, minimum=1)
    heads = _field(cfg, "num_attention_heads", int, minimum=1)
    kv_heads = _field(cfg, "num_key_value_heads", int, heads, minimum=1)
    if heads % kv_heads:
        raise ValueError(
            f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    if cfg.get("head_dim") is None and hidden % heads:
        raise ValueError(f"config.json: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    head_dim = _field(cfg, "head_dim", int, hidden // heads, minimum=2)
    if head_dim % 2:
        raise ValueError(f"config.json field 'head_dim' must be even for RoPE, got {head_dim}")
    attention_bias = _field(cfg, "attention_bias", bool, False)
    qwen2 = architecture == "Qwen2ForCausalLM"
    generation_config = generation_config or {}
    vocab_size = _field(cfg, "vocab_size", int, minimum=1)
    eos = _token_ids(cfg.get("eos_token_id"), "config.json", vocab_size)
    eos += _token_ids(generation_config.get("eos_token_id"), "generation_config.json", vocab_size)
    bos = generation_config.get("bos_token_id", cfg.get("bos_token_id"))
    tie = cfg.get("tie_word_embeddings")
    return ModelSpec(
        architecture=architecture,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=_field(cfg, "intermediate_size", int, minimum=1),
        num_layers=_field(cfg, "num_hidden_layers", int, minimum=1),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_field(cfg, "rms_norm_eps", float, 1e-6, above=0),
        rope=_rope(cfg),
        max_position_embeddings=_field(cfg, "max_position_embeddings", int, 4096, minimum=1),
        qkv_bias=qwen2 or attention_bias,
        o_bias=attention_bias and not qwen2,
        mlp_bias=_field(cfg, "mlp_bias", bool, False) if architecture == "LlamaForCausalLM" else False,
        qk_norm=architecture == "Qwen3ForCausalLM",
        sliding_window=_sliding_window(cfg, architecture),
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=tuple(sorted(set(eos))),
        tie_word_embeddings=_field(cfg, "tie_word_embeddings", bool) if tie is not None else None,
        quantization=quantization,
    )


def load_spec(model_dir: str | Path) -> ModelSpec:
    """Read `config.json` and, when present, `generation_config.json` from a checkpoint directory."""
    model_dir = checkpoint_path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    generation_path = model_dir / "generation_config.json"
    generation_config = read_json(generation_path) if generation_path.is_file() else None
    return spec_from_dict(read_json(path), generation_config)
