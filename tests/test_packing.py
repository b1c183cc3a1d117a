"""The fragment order from PyTorch (packing.py) against the compiled core's statement of it
(fragment_layout.hpp, through _C.fragment_sources), and the reference decoder over packed weights
(megakernel.PackedTransformer) against the plain one, on the CPU; on a GPU the core's pack and
unpack kernels against the PyTorch permutation. The same for e4m3 matrices and their row scales."""

from __future__ import annotations

import pytest
import torch

from flashformer import _core
from flashformer.config import spec_from_dict
from flashformer.megakernel import PackedTransformer, config_named, pack_in_place, unpack_in_place
from flashformer.packing import (dequantize_packed, gather_rows, pack, pack_fp8, row_orders, source_rows, unpack,
                                 unpack_fp8)
from flashformer.quantization import QuantizedMatrix, quantize_per_channel
from flashformer.reference import Transformer, prefill_logits
from flashformer.weights import random_weights

from checkpoints import clone_weights, kv_cache

CASES = [("identity", 48, 80, 0), ("rope_pairs", 3 * 64, 32, 64), ("rope_pairs", 2 * 128, 48, 128), ("gate_up", 2 * 40, 64, 40)]


@pytest.mark.parametrize("order,rows,cols,param", CASES)
def test_pack_is_the_cores_fragment_order_and_unpack_inverts_it(order, rows, cols, param):
    code = row_orders()[order]
    w = torch.randn(rows, cols).to(torch.bfloat16)
    sources = torch.from_numpy(_core.load().fragment_sources(rows, cols, code, param))
    packed = pack(w, code, param)
    assert torch.equal(packed.view(-1), w.view(-1)[sources])
    out = torch.full_like(w, float("nan"))
    assert unpack(packed, code, param, out=out) is out and torch.equal(out, w)


def test_gather_rows_reads_rows_of_a_packed_table():
    w = torch.randn(64, 48).to(torch.bfloat16)
    rows = torch.randint(0, 64, (3, 5))
    assert torch.equal(gather_rows(pack(w, row_orders()["identity"]), rows, chunk=4), w[rows])


def test_packing_refuses_shapes_it_cannot_lay_out():
    with pytest.raises(ValueError, match="not a positive multiple of 16 in both dimensions"):
        pack(torch.zeros(20, 16), row_orders()["identity"])
    with pytest.raises(ValueError, match="rows == 2 \\* intermediate"):
        pack(torch.zeros(64, 16), row_orders()["gate_up"], 16)
    with pytest.raises(ValueError, match="head_dim a multiple of 32"):
        unpack(torch.zeros(64, 16), row_orders()["rope_pairs"], 48)


@pytest.mark.parametrize("name,tied", [("tiny-gqa", False), ("tiny-d128", True)])
def test_prefill_over_packed_weights_is_the_reference_prefill(name, tied):
    """Layer by layer over the unpacked buffer, LM head in row chunks, a tied table read packed: the
    very same logits and KV cache as the reference decoder (CPU, fp32: the same operations)."""
    from flashformer.bench import shape_config

    spec = spec_from_dict(shape_config(name))
    weights = random_weights(spec, tied=tied, device="cpu", dtype=torch.float32, std=0.1)
    original = clone_weights(weights)
    fields = config_named(name)["layer_weights"]
    pack_in_place(weights, fields)
    assert weights.fragment_order and weights.tied == tied
    with pytest.raises(ValueError, match="fragment order"):
        Transformer(spec, weights, kv_cache(spec, weights, 2, 64))
    packed = PackedTransformer(spec, weights, kv_cache(spec, weights, 2, 64), fields)
    packed.lm_head_rows = 48  # several LM-head chunks, the last one short
    plain = Transformer(spec, original, kv_cache(spec, original, 2, 64))
    prompts = [torch.randint(0, spec.vocab_size, (n,)) for n in (5, 23)]
    assert torch.equal(prefill_logits(packed, prompts), prefill_logits(plain, prompts))
    assert torch.equal(packed.kv_cache, plain.kv_cache)
    unpack_in_place(weights, fields)
    assert not weights.fragment_order and torch.equal(weights.layers[1].wqkv, original.layers[1].wqkv)
    assert torch.equal(weights.lm_head, original.lm_head) and (weights.embed is weights.lm_head) == tied
    with pytest.raises(ValueError, match="row-major again"):
        prefill_logits(packed, prompts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("order,rows,cols,param", [*CASES, ("identity", 4096, 1040, 0), ("gate_up", 2 * 14336, 64, 14336)])
def test_the_cores_pack_and_unpack_kernels_are_the_permutation(order, rows, cols, param):
    code = row_orders()[order]
    w = torch.randn(rows, cols, device="cuda").to(torch.bfloat16)
    expected = pack(w.cpu(), code, param)
    packed = pack(w, code, param)  # the core's kernel (bf16 on a GPU)
    assert torch.equal(packed.cpu(), expected)
    out = torch.full_like(w, float("nan"))
    unpack(packed, code, param, out=out)
    torch.cuda.synchronize()
    assert torch.equal(out, w)


# --- e4m3 matrices -----------------------------------------------------------------------------

FP8_CASES = [("identity", 48, 96, 0), ("rope_pairs", 3 * 64, 32, 64), ("rope_pairs", 2 * 128, 64, 128),
             ("gate_up", 2 * 40, 64, 40)]


def random_fp8(rows: int, cols: int, device="cpu") -> QuantizedMatrix:
    data, scale = quantize_per_channel(torch.randn(rows, cols, device=device))
    return QuantizedMatrix(data, scale, (1, cols))


@pytest.mark.parametrize("order,rows,cols,param", FP8_CASES)
def test_pack_fp8_is_the_cores_e4m3_fragment_order_and_unpack_inverts_it(order, rows, cols, param):
    C, code = _core.load(), row_orders()[order]
    m = random_fp8(rows, cols)
    sources = torch.from_numpy(C.fragment_sources(rows, cols, code, param, C.WEIGHT_FORMATS["fp8"]))
    packed = pack_fp8(m, code, param)
    assert torch.equal(packed.data.view(torch.uint8).view(-1), m.data.view(torch.uint8).view(-1)[sources])
    src = source_rows(rows, code, param)
    assert torch.equal(packed.scale[:, 0], m.scale[src, 0])  # each packed row keeps its scale
    back = unpack_fp8(packed, code, param)
    assert torch.equal(back.data.view(torch.uint8), m.data.view(torch.uint8)) and torch.equal(back.scale, m.scale)
    out = torch.full((rows, cols), float("nan"), dtype=torch.bfloat16)
    assert dequantize_packed(packed, code, param, out=out) is out
    assert torch.equal(out, m.dequantize(torch.bfloat16))


def test_pack_fp8_takes_a_per_tensor_scale_and_refuses_blocks():
    code = row_orders()["identity"]
    data, _ = quantize_per_channel(torch.randn(32, 64))
    per_tensor = QuantizedMatrix(data, torch.tensor([[0.01]]), (32, 64))
    packed = pack_fp8(per_tensor, code)
    assert packed.block == (1, 64) and torch.equal(packed.scale, torch.full((32, 1), 0.01))
    with pytest.raises(ValueError, match="one scale per output row, not 16x32 blocks"):
        pack_fp8(QuantizedMatrix(data, torch.ones(2, 2), (16, 32)), code)
    with pytest.raises(ValueError, match="multiple of 32 columns"):
        pack_fp8(random_fp8(32, 48), code)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("order,rows,cols,param", [*FP8_CASES, ("identity", 4096, 1056, 0), ("gate_up", 2 * 14336, 64, 14336)])
def test_the_cores_fp8_pack_and_dequantize_kernels_are_the_permutation(order, rows, cols, param):
    code = row_orders()[order]
    m = random_fp8(rows, cols, device="cuda")
    cpu = QuantizedMatrix(m.data.cpu(), m.scale.cpu(), m.block)
    expected = pack_fp8(cpu, code, param)
    packed = pack_fp8(m, code, param)  # the core's kernel on a GPU
    assert torch.equal(packed.data.view(torch.uint8).cpu(), expected.data.view(torch.uint8))
    assert torch.equal(packed.scale.cpu(), expected.scale)
    out = torch.full((rows, cols), float("nan"), dtype=torch.bfloat16, device="cuda")
    dequantize_packed(packed, code, param, out=out)
    torch.cuda.synchronize()
    assert torch.equal(out, m.dequantize(torch.bfloat16))
