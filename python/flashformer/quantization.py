"""FP8 weights: e4m3 matrices with fp32 scales (`QuantizedMatrix`) and per-output-channel
quantization of a dense matrix (`quantize_per_channel`, what `quantization="fp8"` does at load).

A quantized matrix stands for data * scale, the scale shared by each `block` of elements: per
output channel (a scale per row), or per 128x128 block as transformers' `fp8` checkpoints store
it. The reference decoder dequantizes each layer's matrices to the model dtype just before its
matmuls (reference.py); the checkpoint formats that hold such matrices are read in weights.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Rows dequantized at once: bounds the fp32 intermediate to about 64 MB whatever the matrix.
_DEQUANT_ELEMS = 1 << 24


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class QuantizedMatrix:
    """An [out_features, in_features] matrix in FP8: element (i, j) is
    data[i, j] * scale[i // block[0], j // block[1]], computed in fp32.

    data: [rows, cols] float8_e4m3fn, row-major.
    scale: [cdiv(rows, block[0]), cdiv(cols, block[1])] float32, row-major.
    block: (1, cols) is one scale per output channel (scale [rows, 1]); (128, 128) is
    transformers' block format (the last block row / column may be partial)."""

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]

    def __post_init__(self):
        rows, cols = self.data.shape
        expected = (cdiv(rows, self.block[0]), cdiv(cols, self.block[1]))
        if self.data.dtype != FP8_DTYPE or self.scale.dtype != torch.float32 or tuple(self.scale.shape) != expected:
            raise ValueError(
                f"a QuantizedMatrix holds float8_e4m3fn data and float32 scales of shape {expected} for "
                f"{self.block} blocks of a {rows}x{cols} matrix; got {self.data.dtype} data and "
                f"{self.scale.dtype} scales of shape {tuple(self.scale.shape)}"
            )

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def per_channel(self) -> bool:
        return self.block == (1, self.data.shape[1])

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def numel(self) -> int:
        return self.data.numel()

    def row_scales(self, r0: int, r1: int) -> torch.Tensor:
        """The scales of rows r0..r1-1, one row of scales per matrix row: [r1 - r0, scale columns]."""
        br = self.block[0]
        return self.scale[r0 // br : cdiv(r1, br)].repeat_interleave(br, dim=0)[r0 % br : r0 % br + r1 - r0]

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """data * scale as a dense [rows, cols] `dtype` matrix (into `out` when given): the product
        in fp32, rounded once to `dtype`. Done in row chunks, so the fp32 intermediate stays small."""
        rows, cols = self.data.shape
        bc = self.block[1]
        if out is None:
            out = torch.empty(rows, cols, dtype=dtype, device=self.device)
        step = max(self.block[0], _DEQUANT_ELEMS // max(cols, 1) // self.block[0] * self.block[0])
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            values = self.data[r0:r1].to(torch.float32)
            scale = self.row_scales(r0, r1)  # [r1 - r0, cdiv(cols, bc)]
            full = cols // bc * bc
            if full:  # whole column blocks: a view (rows, blocks, bc) times one scale per block
                values[:, :full].view(r1 - r0, full // bc, bc).mul_(scale[:, : full // bc, None])
            if full < cols:  # a partial last column block
                values[:, full:].mul_(scale[:, -1:])
            out[r0:r1].copy_(values)
        return out


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric FP8 e4m3 quantization of a [rows, cols] matrix, one scale per row: scale =
    absmax(row) / 448 (1 for an all-zero row), data = weight / scale rounded to the nearest e4m3
    (torch's cast, ties to even). Returns (data [rows, cols] e4m3, scale [rows, 1] fp32)."""
    w = weight.to(torch.float32)
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
    # (w / scale can round a hair past 448; e4m3fn has no infinity, so clamp before the cast)
    return (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale  # (not in place: w may be `weight`)


def fp8_nans(data: torch.Tensor) -> torch.Tensor:
    """Where e4m3fn `data` holds a NaN (exponent and mantissa bits all ones): a bool tensor of its shape."""
    return (data.view(torch.uint8) & 0x7F) == 0x7F

