"""Safetensors checkpoints (one file or sharded), streamed tensor by tensor to the target device.

`inspect_checkpoint` checks a checkpoint from its headers alone (no tensor data is read): every
tensor the model needs is there with its shape and a floating dtype, and no tensor is left over.
`load_weights` then reads each tensor by `safe_open(..., device=...)` straight onto the device,
casts it to the model dtype, checks that it is finite and copies it into its final (packed)
place, so neither host RAM nor the device ever holds a second full copy of the model. q|k|v and
gate|up are packed here, once.

FP8: a published FP8 checkpoint (config.json's quantization_config, config.WeightQuantization)
has e4m3 matrices beside their scales; each lands in a `QuantizedMatrix` (e4m3 data, fp32
scales) as it is, packed like the dense ones. `quantization="fp8"` quantizes a dense
checkpoint's layer matrices per output channel instead, tensor by tensor as they stream in. The
embedding table, the norms, the biases and the LM head stay in the model dtype (an FP8 LM head in
a checkpoint is dequantized at load).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .config import ModelSpec, WeightQuantization
from .quantization import FP8_DTYPE, FP8_MAX, QuantizedMatrix, cdiv, fp8_nans, quantize_per_channel
from . import validate
from .validate import DTYPE_NAMES, show

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# safetensors dtype names of the floating-point tensors a checkpoint may hold (cast at load).
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
# Tensors that checkpoints carry and that no model needs: old Llama exports saved RoPE's inverse
# frequencies as a buffer (transformers ignores them on load too).
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")
# FP8 checkpoints' static activation scales (compressed-tensors input_scale, transformers'
# activation_scale): activations stay in the model dtype, so they are not needed.
_IGNORED_FP8 = re.compile(r"\.(input_scale|activation_scale)$")
FP8_DTYPE_NAME = "F8_E4M3"  # safetensors' name of float8_e4m3fn
SCALE_DTYPES = ("F32", "BF16", "F16")
# The fields (of LayerWeights, or of Weights for the LM head) that are matrices: FP8 may hold them.
LAYER_MATRICES = ("wqkv", "wo", "w_gate_up", "w_down")
Matrix = torch.Tensor | QuantizedMatrix


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {show(dtype)} (supported: {', '.join(DTYPES)})")


@dataclass
class LayerWeights:
    """One decoder layer. Matrices are [out_features, in_features], as in nn.Linear: dense in the
    model dtype, or QuantizedMatrix (FP8; any of the four, independently)."""

    attn_norm: torch.Tensor  # [hidden]
    wqkv: Matrix  # [(n_heads + 2 * n_kv_heads) * head_dim, hidden]: q rows, then k, then v
    wo: Matrix  # [hidden, n_heads * head_dim]
    mlp_norm: torch.Tensor  # [hidden]
    w_gate_up: Matrix  # [2 * intermediate, hidden]: gate rows, then up
    w_down: Matrix  # [hidden, intermediate]
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

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype: of the activations, the dense weights and what FP8 dequantizes to."""
        return self.embed.dtype

    @property
    def quantized(self) -> bool:
        """Whether any layer matrix is FP8 (a QuantizedMatrix)."""
        return any(isinstance(getattr(l, a), QuantizedMatrix) for l in self.layers for a in LAYER_MATRICES)

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


# The layer fields tensor parallelism splits, by rows and by columns; the norms, and the O and
# down biases (rank 0's), stay whole.
ROW_SPLIT_FIELDS = frozenset({"wqkv", "bqkv", "w_gate_up", "b_gate_up"})
COLUMN_SPLIT_FIELDS = frozenset({"wo", "w_down"})


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
    """A checked checkpoint: where each tensor the model needs is (`files`) and goes (`slots`);
    for each FP8 matrix, the name of its scale tensor (`fp8`; the scales are in `files` too)."""

    model_dir: Path
    files: dict[str, Path]  # tensor name -> safetensors file, for the tensors in `slots` and their scales
    slots: dict[str, _Slot]
    quantization: WeightQuantization | None = None
    fp8: dict[str, str] = field(default_factory=dict)  # FP8 weight name -> its scale tensor's name

    def __post_init__(self):
        self.parts: dict[tuple[int | None, str], list[str]] = {}  # (layer, field) -> its tensors' names
        for name, slot in self.slots.items():
            self.parts.setdefault((slot.layer, slot.attr), []).append(name)
        # whether every packed part of each field starts on a row of the checkpoint's scale blocks
        b0 = self.quantization.block_size[0] if self.quantization and self.quantization.block_size else 1
        self._aligned = {s.attr: True for s in self.slots.values()}
        for s in self.slots.values():
            self._aligned[s.attr] &= s.rows is None or s.rows[0] % b0 == 0

    def fp8_block(self, slot: _Slot, quantize: bool = False) -> tuple[int, int] | None:
        """The scale block of the QuantizedMatrix that `slot`'s field becomes, or None when it stays
        dense: per output channel (1, cols) for per-tensor and per-channel scales and for
        quantize-at-load; the checkpoint's (b0, b1) blocks where every packed part starts on a
        block row, else (1, b1) (each row given its block's scales: packing stays exact)."""
        if slot.attr not in LAYER_MATRICES:
            return None
        cols = slot.shape[1]
        if not any(n in self.fp8 for n in self.parts[slot.layer, slot.attr]):
            return (1, cols) if quantize else None
        q = self.quantization
        if q.strategy != "block":
            return (1, cols)
        b0, b1 = q.block_size
        return (b0, b1) if self._aligned[slot.attr] else (1, b1)

    def nbytes(self, dtype: torch.dtype, quantize: bool = False, world: int = 1) -> int:
        """Bytes of the weights on the device once loaded in `dtype` (a tied LM head counted once):
        FP8 matrices one byte an element plus their fp32 scales (with `quantize`, the layer
        matrices of a dense checkpoint too). With `world` > 1, one tensor-parallel rank's: a
        1/world part of each layer's split fields (a column split keeps its rows' scales whole
        where they span the row), the rest whole."""
        total, seen = 0, set()
        for slot in self.slots.values():
            block = self.fp8_block(slot, quantize)
            in_layer = slot.layer is not None
            rows_split = in_layer and slot.attr in ROW_SPLIT_FIELDS
            cols_split = in_layer and slot.attr in COLUMN_SPLIT_FIELDS
            split = world if rows_split or cols_split else 1
            if block is None:
                total += math.prod(slot.part_shape) * dtype.itemsize // split
            elif (slot.layer, slot.attr) not in seen:  # a packed field counted once, whole
                seen.add((slot.layer, slot.attr))
                rows, cols = slot.shape
                scales = cdiv(rows, block[0]) * cdiv(cols, block[1]) * 4
                total += rows * cols // split + (scales if cols_split and block[1] == cols else scales // split)
        return total


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
    q = spec.quantization
    scales = {}  # every matrix's possible scale tensor: weight name -> scale name, where it exists
    if q is not None:
        for name, slot in slots.items():
            scale = name.removesuffix(".weight") + "." + q.scale_name
            if (slot.attr in LAYER_MATRICES or slot.attr == "lm_head") and scale in all_files:
                scales[name] = scale

    def known(n: str) -> bool:
        return n in slots or bool(_IGNORED.search(n)) or (q is not None and bool(_IGNORED_FP8.search(n)))

    unused = sorted((n for n in all_files if not known(n) and n not in scales.values()), key=_natural)
    if unused and not allow_unused_tensors:
        raise ValueError(_unused_message(model_dir, spec, unused))
    files = {name: all_files[name] for name in (*slots, *scales.values())}
    fp8 = {}
    for path in sorted(set(files.values())):
        with _open(path, "cpu") as f:
            for name in (n for n, p in files.items() if p == path and n in slots):
                if _check_header(f, name, path, slots[name], q):
                    if name not in scales:
                        raise ValueError(
                            f"tensor {name} in {path.name} is FP8 ({FP8_DTYPE_NAME}) but the checkpoint has no "
                            f"{name.removesuffix('.weight')}.{q.scale_name} (config.json quant_method {q.method!r})"
                        )
                    fp8[name] = scales[name]
    for name, scale in fp8.items():
        with _open(files[scale], "cpu") as f:
            _check_scale_header(f, scale, files[scale], slots[name].part_shape, q)
    checkpoint = Checkpoint(model_dir, files, slots, q, fp8)
    for parts in checkpoint.parts.values():  # a packed field is FP8 in all of its parts or in none
        if len({n in fp8 for n in parts}) > 1:
            raise ValueError(
                f"checkpoint in {model_dir}: {', '.join(n for n in parts if n in fp8)} "
                f"{'is' if sum(n in fp8 for n in parts) == 1 else 'are'} FP8 but "
                f"{', '.join(n for n in parts if n not in fp8)} not; tensors packed together must be both or neither"
            )
    return checkpoint


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


def _header(f, name: str, path: Path) -> tuple[tuple[int, ...], str]:
    try:
        header = f.get_slice(name)
        return tuple(header.get_shape()), header.get_dtype()
    except Exception as exc:
        raise ValueError(f"tensor {name} is not in {path.name} (as its index says) or is unreadable: {exc}") from exc


def _check_header(f, name: str, path: Path, slot: _Slot, q: WeightQuantization | None) -> bool:
    """Check tensor `name`'s shape and dtype against its slot; whether it is FP8."""
    shape, dtype = _header(f, name, path)
    if shape != slot.part_shape:
        raise ValueError(
            f"tensor {name} in {path.name} has shape {shape}, expected {slot.part_shape} from config.json"
        )
    if dtype == FP8_DTYPE_NAME:
        if q is None:
            raise ValueError(
                f"tensor {name} in {path.name} has dtype {dtype} (FP8) but config.json has no quantization_config "
                "saying how it is scaled"
            )
        if slot.attr not in LAYER_MATRICES and slot.attr != "lm_head":
            raise ValueError(f"tensor {name} in {path.name} has dtype {dtype}; only linear layers' matrices may be FP8")
        return True
    if dtype not in FLOAT_DTYPES:
        fp8 = f"{FP8_DTYPE_NAME} matrices with a quantization_config" if q is not None else "FP8 checkpoints need a quantization_config"
        raise ValueError(
            f"tensor {name} in {path.name} has dtype {dtype}; weights must be floating point "
            f"({', '.join(FLOAT_DTYPES)}, or {fp8}; other quantized formats are not supported)"
        )
    return False


def _scale_shapes(q: WeightQuantization, shape: tuple[int, int]) -> list[tuple[int, ...]]:
    """The shapes a scale of `q`'s strategy may have for a [rows, cols] FP8 matrix."""
    rows, cols = shape
    if q.strategy == "tensor":
        return [(), (1,)]
    if q.strategy == "channel":
        return [(rows, 1)]
    return [(cdiv(rows, q.block_size[0]), cdiv(cols, q.block_size[1]))]


def _check_scale_header(f, name: str, path: Path, shape: tuple[int, int], q: WeightQuantization) -> None:
    got, dtype = _header(f, name, path)
    expected = _scale_shapes(q, shape)
    if got not in expected:
        what = f"{q.strategy} scales" + (f" of {q.block_size[0]}x{q.block_size[1]} blocks" if q.block_size else "")
        raise ValueError(
            f"tensor {name} in {path.name} has shape {got}, expected {' or '.join(map(str, expected))} "
            f"({what} of a {shape[0]}x{shape[1]} matrix, config.json quant_method {q.method!r})"
        )
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"tensor {name} in {path.name} has dtype {dtype}; scales must be {', '.join(SCALE_DTYPES)}")


def _part_scales(scale: torch.Tensor, q: WeightQuantization | None, shape: tuple[int, int], block: tuple[int, int]):
    """A part's scales (as the checkpoint stores them, fp32) as rows of the packed matrix's scale
    grid of `block`: [cdiv(part rows, block[0]), cdiv(cols, block[1])]."""
    rows = shape[0]
    if q.strategy == "tensor":
        return scale.reshape(1, 1).expand(rows, 1)
    if q.strategy == "channel":
        return scale.reshape(rows, 1)
    if block[0] == 1:  # blocks given per row: the part does not start on a block row of the packed matrix
        return scale.repeat_interleave(q.block_size[0], dim=0)[:rows]
    return scale


def load_weights(
    model_dir: str | Path,
    spec: ModelSpec,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: bool = True,
    allow_unused_tensors: bool = False,
    quantization: str | None = None,
    layer_hook: Callable[[int, LayerWeights], LayerWeights] | None = None,
) -> Weights:
    """Stream the checkpoint in `model_dir` onto `device` as `dtype`, packing fused matrices.

    `layer_hook(i, layer)`, when given, is called as soon as every tensor of layer i is in, and
    what it returns is kept instead (tensor parallelism keeps its rank's part: so at most the
    layers being read are there whole, never the whole model).

    The checkpoint is checked first (`inspect_checkpoint`); a tensor with a NaN or an infinity,
    in the file or after the cast to `dtype`, is a ValueError naming it. The output embedding is
    tied to the input one exactly when the checkpoint has no lm_head.weight.

    FP8 matrices of a published FP8 checkpoint load as QuantizedMatrix (e4m3 data as stored,
    fp32 scales); with `quantization="fp8"` the dense layer matrices are quantized per output
    channel as they stream in (`quantize_per_channel`); a published FP8 checkpoint loads as
    published whatever `quantization` says (the matrices it left dense stay dense). Either way no
    dense copy of an FP8 matrix is made beyond the one tensor being read.
    """
    validate.quantization(quantization)
    device = torch.device(device)
    checkpoint = inspect_checkpoint(model_dir, spec, allow_unused_tensors=allow_unused_tensors)
    files, slots, fp8, q = checkpoint.files, checkpoint.slots, checkpoint.fp8, checkpoint.quantization
    quantize = quantization == "fp8" and q is None  # a published FP8 checkpoint loads as published
    scales = _read_scales(checkpoint, device, dtype)
    by_file: dict[Path, list[str]] = {}
    for name in slots:
        by_file.setdefault(files[name], []).append(name)
    top: dict[str, Matrix] = {}
    layers: list[dict[str, Matrix]] = [{} for _ in range(spec.num_layers)]
    built: list[LayerWeights | None] = [None] * spec.num_layers
    unread = [0] * spec.num_layers  # each layer's tensors not yet in
    for slot in slots.values():
        if slot.layer is not None:
            unread[slot.layer] += 1
    with tqdm(total=len(slots), desc="loading weights", unit="tensor", disable=not progress) as bar:
        for path in sorted(by_file):
            with _open(path, str(device)) as f:
                ranges = []  # (min, max) of each tensor, on the device: one transfer per file
                for name in by_file[path]:
                    slot = slots[name]
                    dest = top if slot.layer is None else layers[slot.layer]
                    block = checkpoint.fp8_block(slot, quantize)
                    if block is None and name not in fp8:  # dense
                        tensor = _get(f, name, path).to(dtype)
                        ranges.append(torch.stack(torch.aminmax(tensor)))  # NaN propagates into both
                        _place(dest, slot, tensor)
                    elif block is None:  # an FP8 LM head: dequantized at load (it stays dense)
                        data = _get(f, name, path)
                        ranges.append(_fp8_ok(data, dtype))
                        stored = _stored_block(q, slot.part_shape)
                        scale = _part_scales(scales[fp8[name]], q, slot.part_shape, stored).contiguous()
                        dest[slot.attr] = QuantizedMatrix(data, scale, stored).dequantize(dtype)
                    else:
                        if name in fp8:
                            data = _get(f, name, path)
                            ranges.append(_fp8_ok(data, dtype))
                            scale = _part_scales(scales[fp8[name]], q, slot.part_shape, block)
                        else:  # quantize at load, per output channel
                            source = _get(f, name, path)
                            ranges.append(torch.stack(torch.aminmax(source)).to(dtype))
                            data, scale = quantize_per_channel(source)
                            del source
                        if slot.attr not in dest:
                            rows, cols = slot.shape
                            dest[slot.attr] = QuantizedMatrix(
                                torch.empty(slot.shape, dtype=FP8_DTYPE, device=device),
                                torch.empty(cdiv(rows, block[0]), cdiv(cols, block[1]), dtype=torch.float32, device=device),
                                block,
                            )
                        matrix = dest[slot.attr]
                        r0, r1 = slot.rows or (0, slot.shape[0])
                        matrix.data[r0:r1].copy_(data)
                        matrix.scale[r0 // block[0] : cdiv(r1, block[0])].copy_(scale)
                    if slot.layer is not None:
                        unread[slot.layer] -= 1
                        if not unread[slot.layer]:  # the layer is whole
                            built[slot.layer] = LayerWeights(**layers[slot.layer])
                            layers[slot.layer] = {}
                            if layer_hook is not None:
                                built[slot.layer] = layer_hook(slot.layer, built[slot.layer])
                    bar.update()
                finite = torch.stack(ranges).isfinite().all(-1).tolist()
                for name, ok in zip(by_file[path], finite):
                    if not ok:
                        raise ValueError(_non_finite_message(f, name, path, dtype))
    return Weights(
        embed=top["embed"],
        final_norm=top["final_norm"],
        lm_head=top.get("lm_head", top["embed"]),
        layers=built,
    )


def _place(dest: dict, slot: _Slot, tensor: torch.Tensor) -> None:
    """Put a dense tensor into its field (its rows of it, for a part of a packed field)."""
    if slot.rows is None:
        dest[slot.attr] = tensor
        return
    if slot.attr not in dest:
        dest[slot.attr] = torch.empty(slot.shape, dtype=tensor.dtype, device=tensor.device)
    dest[slot.attr][slot.rows[0] : slot.rows[1]].copy_(tensor)


def _stored_block(q: WeightQuantization, shape: tuple[int, int]) -> tuple[int, int]:
    """The block of one unpacked matrix's scales as `q` stores them."""
    return q.block_size if q.strategy == "block" else (1, shape[1])


def _fp8_ok(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[0, 0] when FP8 `data` holds no NaN, else [NaN, NaN], in `dtype`: the finiteness check's
    entry for it (its scales are checked as they are read)."""
    return torch.where(fp8_nans(data).any(), float("nan"), 0.0).expand(2).to(dtype)


def _read_scales(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every FP8 matrix's scales, fp32 on `device` (small: a scale per row or per block), checked to
    be finite and small enough that data * scale fits `dtype`."""
    names: dict[Path, list[str]] = {}
    for scale in checkpoint.fp8.values():
        names.setdefault(checkpoint.files[scale], []).append(scale)
    limit = torch.finfo(dtype).max / FP8_MAX
    scales = {}
    for path in sorted(names):
        with _open(path, str(device)) as f:
            for name in names[path]:
                scales[name] = _get(f, name, path).to(torch.float32)
            largest = torch.stack([scales[n].abs().max() for n in names[path]]).tolist()
            for name, big in zip(names[path], largest):
                if not math.isfinite(big):
                    raise ValueError(f"tensor {name} in {path.name} has non-finite scales (NaN or inf)")
                if big > limit:
                    raise ValueError(
                        f"tensor {name} in {path.name} has a scale of {big:.4g}: its matrix reaches {big * FP8_MAX:.4g}, "
                        f"beyond the range of {str(dtype).removeprefix('torch.')}: load it with another dtype"
                    )
    return scales


def _non_finite_message(f, name: str, path: Path, dtype: torch.dtype) -> str:
    """Why tensor `name` is not finite as `dtype`: NaN/inf in the file, or values beyond `dtype`'s range."""
    source = _get(f, name, path)
    if source.dtype == FP8_DTYPE:
        count = int(fp8_nans(source).sum())
        return f"tensor {name} in {path.name} has {count} NaN values (FP8 e4m3 has no infinity)"
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
    spec: ModelSpec,
    *,
    tied: bool,
    device,
    dtype: torch.dtype = torch.bfloat16,
    std: float = 0.02,
    generator=None,
    quantization: str | None = None,
) -> Weights:
    """Random weights of `spec`'s shapes made directly on `device` (benchmarks and tests of real
    shapes without a checkpoint; "meta" works too): matrices and biases ~ N(0, std^2) as HF
    initializes them, norms ~ 1 + N(0, std^2). Never zeros: zeros hide unwritten outputs.
    `tied`: the LM head is the embedding table itself, as in a checkpoint without lm_head.
    `quantization="fp8"`: each layer matrix quantized per output channel as soon as it is made, as
    quantize-at-load does (only one dense matrix at a time: a model whose dense weights do not fit
    on the device still can)."""
    validate.quantization(quantization)

    def randn(*shape, mean: float = 0.0) -> torch.Tensor:
        t = torch.randn(shape, dtype=dtype, device=device, generator=generator).mul_(std)
        return t.add_(mean) if mean else t

    def matrix(rows: int, cols: int):
        w = randn(rows, cols)
        return QuantizedMatrix(*quantize_per_channel(w), (1, cols)) if quantization else w

    h, inter = spec.hidden_size, spec.intermediate_size
    qkv = spec.q_size + 2 * spec.kv_size
    layers = [
        LayerWeights(
            attn_norm=randn(h, mean=1.0),
            wqkv=matrix(qkv, h),
            wo=matrix(h, spec.q_size),
            mlp_norm=randn(h, mean=1.0),
            w_gate_up=matrix(2 * inter, h),
            w_down=matrix(h, inter),
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
