"""The megakernel's fragment order of weight matrices (cpp/include/flashformer/fragment_layout.hpp),
from PyTorch: packing, unpacking, and reading rows of a packed matrix.

A packed [rows, cols] matrix holds 16x16 tiles, row blocks outermost, each tile laid out so that
lane (g, t) of a warp finds its four mma.m16n8k16 A registers in one 16-byte vector; a row order
(`RowOrder` in kernel_config.hpp: identity, RoPE pairs, gate/up pairs) first permutes the rows so
that each epilogue finds related rows in one thread. The order is a pure permutation of the
matrix's elements, so here it is a view + permute (any device: the CPU tests and the statement
checked against the C++ one); on a GPU the compiled core's kernels do the same much faster.
"""

from __future__ import annotations

import torch

from . import _core
from .quantization import FP8_DTYPE, QuantizedMatrix

# Row orders by name, as the compiled core numbers them.
def row_orders() -> dict[str, int]:
    return dict(_core.load().ROW_ORDERS)


def _split(rows: int, cols: int, order: int, param: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the row-major matrix's shape split into the fragment order's factors, the permutation that
    takes it to fragment order). Row factors: (row block..., row half, row in half); column
    factors: (k block, column half, lane column pair, element of the pair)."""
    names = row_orders()
    cols4 = (cols // 16, 2, 4, 2)  # (kb, colhi, t, collo): col = kb*16 + colhi*8 + t*2 + collo
    if order == names["identity"]:
        # row = rb*16 + rowhi*8 + g; packed (rb, kb, g, t, colhi, rowhi, collo)
        return (rows // 16, 2, 8, *cols4), (0, 3, 2, 5, 4, 1, 6)
    if order == names["rope_pairs"]:
        # source row = head*D + half*(D/2) + 8j + g; packed row block = (head, j), row half = half
        return (rows // param, 2, param // 16, 8, *cols4), (0, 2, 4, 3, 6, 5, 1, 7)
    if order == names["gate_up"]:
        # source row = half*I + 8j + g (gate rows, then up rows); packed row block j, row half = half
        return (2, param // 8, 8, *cols4), (1, 3, 2, 5, 4, 0, 6)
    raise ValueError(f"unknown row order {order}")


def _check(w: torch.Tensor, order: int, param: int, weight_format: str = "bf16") -> None:
    """The compiled core's rules (fragment_layout.hpp's pack_shape_problem), for either path."""
    if w.dim() != 2:
        raise ValueError(f"a packed matrix is 2-D, got shape {tuple(w.shape)}")
    C = _core.load()
    problem = C.pack_shape_problem(*w.shape, order, param, C.WEIGHT_FORMATS[weight_format])
    if problem:
        raise ValueError(problem)


def cuda_stream(device: torch.device) -> int:
    """The handle of torch's current stream on `device` (what the compiled core's launchers take)."""
    return torch.cuda.current_stream(device).cuda_stream


def pack(w: torch.Tensor, order: int, param: int = 0) -> torch.Tensor:
    """A new tensor of w's shape holding row-major `w` [rows, cols] in fragment order."""
    _check(w, order, param)
    w = w.contiguous()
    out = torch.empty_like(w)
    if w.is_cuda and w.dtype == torch.bfloat16:
        _core.load().pack_weight(w.data_ptr(), out.data_ptr(), *w.shape, order, param, cuda_stream(w.device))
        return out
    shape, perm = _split(*w.shape, order, param)
    out.view(-1).copy_(w.view(shape).permute(perm).reshape(-1))
    return out


def unpack(packed: torch.Tensor, order: int, param: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Row-major [rows, cols] from a matrix in fragment order, into `out` when given."""
    _check(packed, order, param)
    if out is None:
        out = torch.empty_like(packed)
    if out.shape != packed.shape or not out.is_contiguous() or out.dtype != packed.dtype:
        raise ValueError(f"unpack: out must be a contiguous {tuple(packed.shape)} {packed.dtype} tensor")
    if packed.is_cuda and packed.dtype == torch.bfloat16:
        _core.load().unpack_weight(packed.data_ptr(), out.data_ptr(), *packed.shape, order, param, cuda_stream(packed.device))
        return out
    shape, perm = _split(*packed.shape, order, param)
    packed_shape = [shape[i] for i in perm]
    out.view(shape).permute(perm).copy_(packed.reshape(packed_shape))
    return out


def gather_rows(packed: torch.Tensor, rows: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Rows `rows` (any shape of indices) of a matrix packed in the identity row order, as
    row-major [*rows.shape, cols]: an embedding lookup in a tied table that is the packed LM head.
    The offset of (row, col) is a sum of a row part and a column part (fragment_layout.hpp)."""
    n_rows, cols = packed.shape
    dev = packed.device
    r = torch.arange(n_rows, device=dev)
    c = torch.arange(cols, device=dev)
    row_part = (r // 16) * (cols // 16) * 256 + (r % 8) * 32 + (r % 16 // 8) * 2
    col_part = (c // 16) * 256 + (c % 8 // 2) * 8 + (c % 16 // 8) * 4 + c % 2
    flat, ids = packed.view(-1), rows.reshape(-1)
    out = torch.empty(ids.numel(), cols, dtype=packed.dtype, device=dev)
    for i in range(0, ids.numel(), chunk):
        out[i : i + chunk] = flat[row_part[ids[i : i + chunk]][:, None] + col_part[None, :]]
    return out.view(*rows.shape, cols)


# --- e4m3 matrices ------------------------------------------------------------------------------
# A packed e4m3 [rows, cols] matrix holds 16x32 tiles, row blocks outermost; lane (g, t) finds the
# tile's mma.m16n8k32 A registers in one 16-byte vector, four elements a register
# (fragment_layout.hpp's fp8_weight_fragment_index). Its row
# scales move with its rows: scale[r] belongs to packed row r.


def source_rows(rows: int, order: int, param: int = 0, device=None) -> torch.Tensor:
    """The source row of each packed row under `order` (int64 [rows])."""
    return torch.from_numpy(_core.load().source_rows(rows, order, param)).to(device)


def _fp8_split(rows: int, cols: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row-major e4m3 [rows, cols] (rows already in packed order) split as (rb, row half, g, kf,
    column half, t, e), and the permutation to fragment order (rb, kf, g, t, column half, row half,
    e): a lane's registers a0..a3, four elements each."""
    return (rows // 16, 2, 8, cols // 32, 2, 4, 4), (0, 3, 2, 5, 4, 1, 6)


def _per_channel(m: QuantizedMatrix) -> QuantizedMatrix:
    """`m` with one scale per row (a per-tensor scale repeated); block scales cannot be."""
    rows, cols = m.shape
    if m.block[1] < cols:
        raise ValueError(f"the megakernel takes one scale per output row, not {m.block[0]}x{m.block[1]} blocks")
    return m if m.block == (1, cols) else QuantizedMatrix(m.data, m.row_scales(0, rows)[:, :1].contiguous(), (1, cols))


def pack_fp8(m: QuantizedMatrix, order: int, param: int = 0) -> QuantizedMatrix:
    """A new QuantizedMatrix holding `m` (row-major, one scale per row or per tensor) in e4m3
    fragment order, its scales [rows, 1] in the packed row order."""
    m = _per_channel(m)
    _check(m.data, order, param, "fp8")
    rows, cols = m.shape
    data, scale = m.data.contiguous(), m.scale.contiguous()
    out, out_scale = torch.empty_like(data), torch.empty_like(scale)
    if data.is_cuda:
        _core.load().pack_weight_fp8(data.data_ptr(), scale.data_ptr(), out.data_ptr(), out_scale.data_ptr(), rows,
                                     cols, order, param, cuda_stream(data.device))
        return QuantizedMatrix(out, out_scale, m.block)
    src = source_rows(rows, order, param, data.device)
    shape, perm = _fp8_split(rows, cols)
    bytes_ = data.view(torch.uint8)[src].view(shape).permute(perm).reshape(rows, cols)
    return QuantizedMatrix(bytes_.contiguous().view(FP8_DTYPE), scale[src].contiguous(), m.block)


def unpack_fp8(packed: QuantizedMatrix, order: int, param: int = 0) -> QuantizedMatrix:
    """The inverse of pack_fp8: row-major again, scales in the source row order."""
    _check(packed.data, order, param, "fp8")
    rows, cols = packed.shape
    shape, perm = _fp8_split(rows, cols)
    packed_shape = [shape[i] for i in perm]
    inverse = [perm.index(i) for i in range(len(perm))]
    by_packed_row = packed.data.view(torch.uint8).reshape(packed_shape).permute(inverse).reshape(rows, cols)
    src = source_rows(rows, order, param, packed.data.device)
    data, scale = torch.empty_like(by_packed_row), torch.empty_like(packed.scale)
    data[src], scale[src] = by_packed_row, packed.scale
    return QuantizedMatrix(data.view(FP8_DTYPE), scale, packed.block)


def dequantize_packed(packed: QuantizedMatrix, order: int, param: int = 0, out: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A packed e4m3 matrix dequantized to row-major `dtype` [rows, cols] (into `out`): the value
    data * scale in fp32, rounded once (what the reference decoder multiplies by)."""
    _check(packed.data, order, param, "fp8")
    if out is None:
        out = torch.empty(packed.shape, dtype=dtype, device=packed.data.device)
    if packed.data.is_cuda and out.dtype == torch.bfloat16 and out.is_contiguous():
        _core.load().unpack_weight_fp8(packed.data.data_ptr(), packed.scale.data_ptr(), out.data_ptr(), *packed.shape,
                                       order, param, cuda_stream(packed.data.device))
        return out
    return unpack_fp8(packed, order, param).dequantize(out.dtype, out=out)
