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


def _check(w: torch.Tensor, order: int, param: int) -> None:
    """The compiled core's rules (fragment_layout.hpp's pack_shape_problem), for either path."""
    if w.dim() != 2:
        raise ValueError(f"a packed matrix is 2-D, got shape {tuple(w.shape)}")
    problem = _core.load().pack_shape_problem(*w.shape, order, param)
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
