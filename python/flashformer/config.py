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

    def kv_cache_shape(self, max_batch_size: int, max_seq_len: int) -> tuple[int, ...]:
        """The KV cache's one layout (DESIGN.md §2), shared by the reference path and the kernel."""
        return (self.num_layers, 2, max_batch_size, self.num_kv_heads, max_seq_len, self.head_dim)

    def kv_cache_bytes(self, max_batch_size: int, max_seq_len: int, itemsize: int) -> int:
        """Bytes of a KV cache of kv_cache_shape (or of `max_seq_len` positions of one)."""
        return math.prod(self.kv_cache_shape(max_batch_size, max_seq_len)) * itemsize

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


def spec_from_dict(cfg: dict, generation_config: dict | None = None) -> ModelSpec:
    """Validate a parsed config.json (and generation_config.json) and build the ModelSpec."""
    quantization = cfg.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise ValueError(
            f"config.json has a quantization_config (quant_method {method!r}); quantized checkpoints are not supported"
        )
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
