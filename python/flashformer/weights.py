"""Safetensors checkpoints (one file or sharded), streamed tensor by tensor to the target device.

`inspect_checkpoint` checks a checkpoint from its headers alone (no tensor data is read): every
tensor the model needs is there with its shape and a floating dtype, and no tensor is left over.
`load_weights` then reads each tensor by `safe_open(..., device=...)` straight onto the device,
casts it to the model dtype, checks that it is finite and copies it into its final (packed)
place, so neither host RAM nor the device ever holds a second full copy of the model. q|k|v and
gate|up are packed here, once.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .config import ModelSpec
from .validate import DTYPE_NAMES, show

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# safetensors dtype names of the floating-point tensors a checkpoint may hold (cast at load).
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
# Tensors that checkpoints carry and that no model needs: old Llama exports saved RoPE's inverse
# frequencies as a buffer (transformers ignores them on load too).
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {show(dtype)} (supported: {', '.join(DTYPES)})")


@dataclass
class LayerWeights:
    """One decoder layer. Matrices are [out_features, in_features], as in nn.Linear."""

    attn_norm: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [(n_heads + 2 * n_kv_heads) * head_dim, hidden]: q rows, then k, then v
    wo: torch.Tensor  # [hidden, n_heads * head_dim]
    mlp_norm: torch.Tensor  # [hidden]
    w_gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate rows, then up
    w_down: torch.Tensor  # [hidden, intermediate]
    bqkv: torch.Tensor | None = None  # [(n_heads + 2 * n_kv_heads) * head_dim]
    bo: torch.Tensor | None = None  # [hidden]
    q_norm: torch.Tensor | None = None  # [head_dim], Qwen3
    k_norm: torch.Tensor | None = None  # [head_dim], Qwen3
    b_gate_up: torch.Tensor | None = None  # [2 * intermediate]
    b_down: torch.Tensor | None = None  # [hidden]


@dataclass
class Weights:
    embed: torch.Tensor  # [vocab, hidden]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the very tensor `embed` when the checkpoint ties them
    layers: list[LayerWeights] = field(default_factory=list)
    # The matrices (and a tied embedding table) are in the megakernel's fragment order: the
    # megakernel backend reorders them in place, so the device holds one copy (megakernel.py).
    fragment_order: bool = False

    @property
    def tied(self) -> bool:
        return self.lm_head is self.embed

    def replace_lm_head(self, lm_head: torch.Tensor) -> None:
        """Make `lm_head` the LM head, and the embedding table too when they are tied (tying is
        being the same tensor, so a replaced head would otherwise untie them)."""
        if self.tied:
            self.embed = lm_head
        self.lm_head = lm_head


@dataclass(frozen=True)
class _Slot:
    """Where a checkpoint tensor goes: field `attr` (of layer `layer`, or of Weights when None),
    whose full shape is `shape`, at rows `rows` when it is one part of a packed tensor."""

    layer: int | None
    attr: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None

    @property
    def part_shape(self) -> tuple[int, ...]:
        return self.shape if self.rows is None else (self.rows[1] - self.rows[0], *self.shape[1:])


def _layer_slots(spec: ModelSpec) -> dict[str, tuple[str, tuple[int, ...], tuple[int, int] | None]]:
    """Checkpoint name suffix (after `model.layers.{i}.`) -> (LayerWeights field, full shape, rows)."""
    h, d, inter, q, kv = spec.hidden_size, spec.head_dim, spec.intermediate_size, spec.q_size, spec.kv_size
    slots = {
        "input_layernorm.weight": ("attn_norm", (h,), None),
        "post_attention_layernorm.weight": ("mlp_norm", (h,), None),
        "self_attn.o_proj.weight": ("wo", (h, q), None),
        "mlp.down_proj.weight": ("w_down", (h, inter), None),
    }
    packed = [  # (weight field, bias field, has bias, {checkpoint name: rows}) in packing order
        ("wqkv", "bqkv", spec.qkv_bias, {"self_attn.q_proj": q, "self_attn.k_proj": kv, "self_attn.v_proj": kv}),
        ("w_gate_up", "b_gate_up", spec.mlp_bias, {"mlp.gate_proj": inter, "mlp.up_proj": inter}),
    ]
    for weight, bias, has_bias, parts in packed:
        total, start = sum(parts.values()), 0
        for name, n in parts.items():
            rows, start = (start, start + n), start + n
            slots[f"{name}.weight"] = (weight, (total, h), rows)
            if has_bias:
                slots[f"{name}.bias"] = (bias, (total,), rows)
    if spec.o_bias:
        slots["self_attn.o_proj.bias"] = ("bo", (h,), None)
    if spec.mlp_bias:
        slots["mlp.down_proj.bias"] = ("b_down", (h,), None)
    if spec.qk_norm:
        slots["self_attn.q_norm.weight"] = ("q_norm", (d,), None)
        slots["self_attn.k_norm.weight"] = ("k_norm", (d,), None)
    return slots


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {exc}") from exc
        files = {name: model_dir / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"shard {shard.name} listed in {index.name} is missing from {model_dir}")
        return files
    if single.is_file():
        with _open(single, "cpu") as f:
            return {name: single for name in f.keys()}
    other = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt*"))
    hint = f" (found {', '.join(other)}: only safetensors checkpoints are supported)" if other else ""
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}{hint}")


def _open(path: Path, device: str):
    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        raise ValueError(f"{path} is truncated or not a valid safetensors file: {exc}") from exc


def _slots(spec: ModelSpec, names) -> dict[str, _Slot]:
    """Checkpoint tensor name -> destination, for every tensor the model needs (lm_head if present)."""
    vocab, h = (spec.vocab_size, spec.hidden_size), (spec.hidden_size,)
    slots = {
        "model.embed_tokens.weight": _Slot(None, "embed", vocab),
        "model.norm.weight": _Slot(None, "final_norm", h),
    }
    if "lm_head.weight" in names:
        slots["lm_head.weight"] = _Slot(None, "lm_head", vocab)
    for suffix, (attr, shape, rows) in _layer_slots(spec).items():
        for i in range(spec.num_layers):
            slots[f"model.layers.{i}.{suffix}"] = _Slot(i, attr, shape, rows)
    return slots


@dataclass
class Checkpoint:
    """A checked checkpoint: where each tensor the model needs is (`files`) and goes (`slots`)."""

    model_dir: Path
    files: dict[str, Path]  # tensor name -> safetensors file, for the tensors in `slots`
    slots: dict[str, _Slot]

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of the weights on the device once cast to `dtype` (a tied LM head counted once)."""
        return sum(math.prod(slot.part_shape) for slot in self.slots.values()) * dtype.itemsize


def inspect_checkpoint(model_dir: str | Path, spec: ModelSpec, *, allow_unused_tensors: bool = False) -> Checkpoint:
    """Check the checkpoint in `model_dir` against `spec` from the safetensors headers alone: every
    tensor the model needs is there with the shape config.json implies and a floating dtype, and
    (unless `allow_unused_tensors`) the checkpoint holds no tensor the model does not use."""
    model_dir = Path(model_dir)
    all_files = checkpoint_files(model_dir)
    slots = _slots(spec, all_files)
    missing = sorted(set(slots) - set(all_files), key=_natural)
    if spec.tie_word_embeddings is False and "lm_head.weight" not in all_files:
        missing.insert(0, "lm_head.weight")
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        untied = " (config.json has tie_word_embeddings=false)" if missing[0] == "lm_head.weight" else ""
        raise ValueError(f"checkpoint in {model_dir} is missing tensor {missing[0]}{untied}{more}")
    unused = sorted((n for n in all_files if n not in slots and not _IGNORED.search(n)), key=_natural)
    if unused and not allow_unused_tensors:
        raise ValueError(_unused_message(model_dir, spec, unused))
    files = {name: all_files[name] for name in slots}
    for path in sorted(set(files.values())):
        with _open(path, "cpu") as f:
            for name in (n for n, p in files.items() if p == path):
                _check_header(f, name, path, slots[name])
    return Checkpoint(model_dir, files, slots)


def _unused_message(model_dir: Path, spec: ModelSpec, unused: list[str]) -> str:
    layers = {int(m.group(1)) for m in map(re.compile(r"model\.layers\.(\d+)\.").match, unused) if m}
    extra_layers = sorted(i for i in layers if i >= spec.num_layers)
    if extra_layers:
        what = (
            f"tensors of layers up to model.layers.{extra_layers[-1]}, but config.json has "
            f"num_hidden_layers={spec.num_layers}"
        )
    else:
        what = "tensors the model does not use"
    shown = ", ".join(unused[:3]) + (f" (and {len(unused) - 3} more)" if len(unused) > 3 else "")
    return (
        f"checkpoint in {model_dir} has {len(unused)} {what}: {shown}; "
        "pass allow_unused_tensors=True (--allow-unused-tensors) to load it without them"
    )


def _check_header(f, name: str, path: Path, slot: _Slot) -> None:
    try:
        header = f.get_slice(name)
        shape, dtype = tuple(header.get_shape()), header.get_dtype()
    except Exception as exc:
        raise ValueError(f"tensor {name} is not in {path.name} (as its index says) or is unreadable: {exc}") from exc
    if shape != slot.part_shape:
        raise ValueError(
            f"tensor {name} in {path.name} has shape {shape}, expected {slot.part_shape} from config.json"
        )
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"tensor {name} in {path.name} has dtype {dtype}; weights must be floating point "
            f"({', '.join(FLOAT_DTYPES)}; quantized checkpoints are not supported)"
        )


def load_weights(
    model_dir: str | Path,
    spec: ModelSpec,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: bool = True,
    allow_unused_tensors: bool = False,
) -> Weights:
    """Stream the checkpoint in `model_dir` onto `device` as `dtype`, packing fused matrices.

    The checkpoint is checked first (`inspect_checkpoint`); a tensor with a NaN or an infinity,
    in the file or after the cast to `dtype`, is a ValueError naming it. The output embedding is
    tied to the input one exactly when the checkpoint has no lm_head.weight.
    """
    device = torch.device(device)
    checkpoint = inspect_checkpoint(model_dir, spec, allow_unused_tensors=allow_unused_tensors)
    files, slots = checkpoint.files, checkpoint.slots
    by_file: dict[Path, list[str]] = {}
    for name in slots:
        by_file.setdefault(files[name], []).append(name)
    top: dict[str, torch.Tensor] = {}
    layers: list[dict[str, torch.Tensor]] = [{} for _ in range(spec.num_layers)]
    with tqdm(total=len(slots), desc="loading weights", unit="tensor", disable=not progress) as bar:
        for path in sorted(by_file):
            with _open(path, str(device)) as f:
                ranges = []  # (min, max) of each tensor, on the device: one transfer per file
                for name in by_file[path]:
                    slot = slots[name]
                    tensor = _get(f, name, path).to(dtype)
                    ranges.append(torch.stack(torch.aminmax(tensor)))  # NaN propagates into both
                    dest = top if slot.layer is None else layers[slot.layer]
                    if slot.rows is None:
                        dest[slot.attr] = tensor
                    else:
                        if slot.attr not in dest:
                            dest[slot.attr] = torch.empty(slot.shape, dtype=dtype, device=device)
                        dest[slot.attr][slot.rows[0] : slot.rows[1]].copy_(tensor)
                    bar.update()
                finite = torch.stack(ranges).isfinite().all(-1).tolist()
                for name, ok in zip(by_file[path], finite):
                    if not ok:
                        raise ValueError(_non_finite_message(f, name, path, dtype))
    return Weights(
        embed=top["embed"],
        final_norm=top["final_norm"],
        lm_head=top.get("lm_head", top["embed"]),
        layers=[LayerWeights(**layer) for layer in layers],
    )


def _non_finite_message(f, name: str, path: Path, dtype: torch.dtype) -> str:
    """Why tensor `name` is not finite as `dtype`: NaN/inf in the file, or values beyond `dtype`'s range."""
    source = _get(f, name, path)
    if not bool(torch.isfinite(source).all()):
        count = int((~torch.isfinite(source)).sum())
        return f"tensor {name} in {path.name} has {count} non-finite values (NaN or inf)"
    largest = float(source.abs().max())
    return (
        f"tensor {name} in {path.name} has values beyond the range of {str(dtype).removeprefix('torch.')} "
        f"(largest magnitude {largest:.4g}, at most {torch.finfo(dtype).max:.4g}): load it with another dtype"
    )


def _get(f, name: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as exc:
        raise ValueError(f"{path.name} is truncated or corrupt: reading tensor {name} failed: {exc}") from exc


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]



def random_weights(
    spec: ModelSpec, *, tied: bool, device, dtype: torch.dtype = torch.bfloat16, std: float = 0.02, generator=None
) -> Weights:
    """Random weights of `spec`'s shapes made directly on `device` (benchmarks and tests of real
    shapes without a checkpoint; "meta" works too): matrices and biases ~ N(0, std^2) as HF
    initializes them, norms ~ 1 + N(0, std^2). Never zeros: zeros hide unwritten outputs.
    `tied`: the LM head is the embedding table itself, as in a checkpoint without lm_head."""

    def randn(*shape, mean: float = 0.0) -> torch.Tensor:
        t = torch.randn(shape, dtype=dtype, device=device, generator=generator).mul_(std)
        return t.add_(mean) if mean else t

    h, inter = spec.hidden_size, spec.intermediate_size
    qkv = spec.q_size + 2 * spec.kv_size
    layers = [
        LayerWeights(
            attn_norm=randn(h, mean=1.0),
            wqkv=randn(qkv, h),
            wo=randn(h, spec.q_size),
            mlp_norm=randn(h, mean=1.0),
            w_gate_up=randn(2 * inter, h),
            w_down=randn(h, inter),
            bqkv=randn(qkv) if spec.qkv_bias else None,
            bo=randn(h) if spec.o_bias else None,
            q_norm=randn(spec.head_dim, mean=1.0) if spec.qk_norm else None,
            k_norm=randn(spec.head_dim, mean=1.0) if spec.qk_norm else None,
            b_gate_up=randn(2 * inter) if spec.mlp_bias else None,
            b_down=randn(h) if spec.mlp_bias else None,
        )
        for _ in range(spec.num_layers)
    ]
    embed = randn(spec.vocab_size, h)
    lm_head = embed if tied else randn(spec.vocab_size, h)
    return Weights(embed=embed, final_norm=randn(h, mean=1.0), lm_head=lm_head, layers=layers)
