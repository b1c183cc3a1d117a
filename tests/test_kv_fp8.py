"""The FP8 KV cache (kv_cache_dtype="fp8"): e4m3 K and V vectors with one fp32 scale per token
and kv head, on the reference path (CPU tests), and backend="auto" choosing the megakernel for it
(a GPU test; the megakernel's numerics are tested in test_megakernel.py)."""

import pytest
import torch

from checkpoints import load_cpu_engine, make_checkpoint, make_shape_checkpoint, prompt_logits, random_prompt, rel_l2
from flashformer.cli import main
from flashformer.config import spec_from_dict
from flashformer.quantization import FP8_DTYPE, FP8_MAX
from flashformer.reference import KVCache, dequantize_kv, quantize_kv
from flashformer.bench import shape_config

# e4m3 keeps 3 mantissa bits: rounding to nearest moves a normal value by at most 2^-4 of itself; a
# subnormal one (below 2^-6 x scale) by at most half its step, 2^-10 x scale.
E4M3_REL, E4M3_SUBNORMAL_ABS = 2.0**-4, 2.0**-10
# Teacher-forced logits of the FP8-KV engine against the dense one on the tiny random 2-layer
# models below (fp32 otherwise, 32 tokens): measured 5.8-9.5% relative L2, from K and V rounded by
# 2.2-2.4% RMS (the random models' flat logits magnify it; quantize-at-load's weights, rounded
# by 2.3-2.6%, move them by 13.5-14.6%). The bound is quantize-at-load's.
KV_LOGITS_BOUND = 0.2


def test_quantize_kv_round_trip():
    gen = torch.Generator().manual_seed(0)
    # vectors of very different magnitudes, one all zero
    x = torch.randn(3, 4, 7, 64, generator=gen) * torch.logspace(-4, 3, 7)[None, None, :, None]
    x[0, 0, 0] = 0
    data, scale = quantize_kv(x)
    assert data.dtype == FP8_DTYPE and data.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    assert scale[0, 0, 0] == 1 and (data[0, 0, 0].float() == 0).all()
    amax = x.abs().amax(-1)
    assert torch.allclose(scale[amax > 0], amax[amax > 0] / FP8_MAX)
    assert (data.float().abs().amax(-1)[amax > 0] == FP8_MAX).all()  # each vector's largest element maps to 448
    back = dequantize_kv(data, scale, torch.float32)
    bound = E4M3_REL * x.abs() + E4M3_SUBNORMAL_ABS * scale[..., None]
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    assert dequantize_kv(data, scale, torch.bfloat16).dtype == torch.bfloat16


def test_fp8_cache_layout_and_bytes():
    spec = spec_from_dict(shape_config("tiny-gqa"))
    cache = KVCache.allocate(spec, 3, 40, dtype=torch.bfloat16, device="cpu", kv_cache_dtype="fp8")
    dense = KVCache.allocate(spec, 3, 40, dtype=torch.bfloat16, device="cpu")
    assert cache.fp8 and not dense.fp8
    assert cache.kv.dtype == FP8_DTYPE and cache.kv.shape == dense.kv.shape
    assert cache.scale.shape == dense.kv.shape[:-1] and cache.dtype == torch.bfloat16
    assert cache.nbytes == spec.kv_cache_bytes(3, 40, 2, "fp8") == dense.nbytes // 2 + dense.nbytes // 2 // spec.head_dim * 4
    assert (cache.max_batch_size, cache.max_seq_len) == (dense.max_batch_size, dense.max_seq_len)
    with pytest.raises(ValueError, match="an FP8 KV cache needs its scales"):
        KVCache(cache.kv, cache.cos, cache.sin)
    with pytest.raises(ValueError, match="only an FP8 one has them"):
        KVCache(dense.kv, dense.cos, dense.sin, scale=cache.scale)


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "qwen3", "llama_tied"])
def test_fp8_kv_cache_decodes_within_its_rounding(tmp_path, arch):
    _, path = make_checkpoint(tmp_path / arch, arch)
    dense = load_cpu_engine(path, max_seq_len=48)
    fp8 = load_cpu_engine(path, max_seq_len=48, kv_cache_dtype="fp8")
    assert fp8.backend.name == "reference" and fp8.backend.kv_cache.dtype == FP8_DTYPE
    tokens = random_prompt(32)
    ours, ref = prompt_logits(fp8, tokens), prompt_logits(dense, tokens)
    error = rel_l2(ours, ref)
    assert 0 < error < KV_LOGITS_BOUND, error
    # Layer 0 sees the same inputs in both engines: its FP8 cache is exactly the dense cache's K and V
    # quantized, and the scales of the positions never written are still 1.
    cache, reference = fp8.cache, dense.cache.kv[0, :, :, :, : len(tokens)]
    data, scale = quantize_kv(reference)
    assert torch.equal(cache.kv[0, :, :, :, : len(tokens)].view(torch.uint8), data.view(torch.uint8))
    assert torch.equal(cache.scale[0, :, :, :, : len(tokens)], scale)
    assert (cache.scale[:, :, :, :, len(tokens):] == 1).all()
    # every layer: the dequantized cache is the dense one within e4m3's rounding and what the
    # different activations of later layers moved
    for layer in range(fp8.spec.num_layers):
        back = dequantize_kv(cache.kv[layer, :, :, :, : len(tokens)], cache.scale[layer, :, :, :, : len(tokens)],
                             torch.float32)
        assert rel_l2(back, dense.cache.kv[layer, :, :, :, : len(tokens)]) < 0.1


def test_fp8_kv_cache_with_fp8_weights_generates(tmp_path):
    _, path = make_checkpoint(tmp_path / "m", "llama_tied")
    engine = load_cpu_engine(path, max_seq_len=64, max_batch_size=2, quantization="fp8", kv_cache_dtype="fp8_e4m3")
    assert engine.weights.quantized and engine.cache.fp8
    from flashformer import SamplingParams

    outs = engine.generate(prompt_token_ids=[[5, 6, 7], [9, 10]], sampling=SamplingParams(max_tokens=6, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [6, 6]
    # batch independence: the second prompt alone decodes the same tokens
    alone = engine.generate(prompt_token_ids=[[9, 10]], sampling=SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert alone.token_ids == outs[1].token_ids


@pytest.mark.gpu
def test_auto_decodes_an_fp8_kv_cache_on_the_megakernel(tmp_path):
    """The megakernel reads an FP8 KV cache too (its GPU tests: test_megakernel.py): backend="auto"
    picks it for a compiled shape whatever the cache's dtype."""
    from flashformer import Engine

    path = make_shape_checkpoint(tmp_path, shape_config("tiny-gqa"))
    engine = Engine.from_pretrained(path, device="cuda", kv_cache_dtype="fp8", max_seq_len=64, progress=False)
    assert engine.backend.name == "megakernel" and engine.cache.fp8


@pytest.mark.parametrize("value", ["int8", "fp8_e5m2", "FP8", "", None, 8, True])
def test_bad_kv_cache_dtype(tmp_path, value):
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of 'auto', 'fp8', 'fp8_e4m3' \(e5m2 is not "
                                         r"supported\), got"):
        load_cpu_engine(tmp_path, kv_cache_dtype=value)  # (refused before the path is read)


def test_the_cli_takes_the_kv_cache_dtype_and_quantization(tmp_path, capsys):
    _, path = make_checkpoint(tmp_path / "m", "llama_tied")
    cpu = ["--device", "cpu", "--dtype", "float32", "--max-seq-len", "64"]
    args = ["generate", str(path), "--token-ids", "5,6,7", "--max-tokens", "4", "--ignore-eos", *cpu]
    assert main([*args, "--kv-cache-dtype", "fp8", "--quantization", "fp8"]) == 0
    engine = load_cpu_engine(path, max_seq_len=64, quantization="fp8", kv_cache_dtype="fp8")
    from flashformer import SamplingParams

    expected = engine.generate(prompt_token_ids=[[5, 6, 7]], sampling=SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert capsys.readouterr().out == " ".join(map(str, expected.token_ids)) + "\n"
    with pytest.raises(SystemExit):
        main([*args, "--kv-cache-dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
