"""FP8 weights on the CPU: QuantizedMatrix, the two published checkpoint formats (written here with
their tensor names and config fields), quantize-at-load, the reference decoder over FP8 weights,
and what the megakernel takes."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints import (kv_cache, load_cpu_engine, make_checkpoint, make_shape_checkpoint, prompt_logits, random_prompt,
                         rel_l2)
from flashformer.engine import select_backend
from flashformer.config import WeightQuantization
from flashformer.megakernel import unavailable_reason, weight_format
from flashformer.quantization import FP8_DTYPE, QuantizedMatrix, quantize_per_channel
from flashformer.reference import ReferenceBackend, Transformer
from flashformer.weights import LAYER_MATRICES, Weights

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Per-channel e4m3 rounding: relative RMS error of each dequantized matrix against the original
# (3 mantissa bits: about 2^-4 / sqrt(3) = 3.6% for normal values; measured 2.3-2.6% on the tiny
# models' N(0, 0.2^2) weights).
MATRIX_BOUND = 0.03
# Teacher-forced logits of a quantize-at-load engine against the fp32 original, relative L2: the
# 14 matrices' errors add up (about sqrt(14) x 2.5%) through random 2-layer models; measured
# 13.5-14.6% on llama3, qwen2 and llama_tied.
QUANTIZE_AT_LOAD_BOUND = 0.2
# A shape with partial 128-blocks: q 256 rows, k and v 128 (packed on block rows), gate and up 320
# (up starts mid-block: its scales go per row), down 320 columns (a partial column block).
BLOCK_SHAPE = dict(
    model_type="llama", hidden_size=256, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, vocab_size=320, max_position_embeddings=128, tie_word_embeddings=False,
)


def _tensors(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _rewrite(path, tensors, quantization_config):
    """Replace the checkpoint's safetensors by one file of `tensors`; set its quantization_config."""
    for file in list(path.glob("model*.safetensors*")):
        file.unlink()
    save_file(tensors, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))


def _blocks_absmax(w, b0, b1):
    rows, cols = w.shape
    padded = torch.zeros(-(-rows // b0) * b0, -(-cols // b1) * b1)
    padded[:rows, :cols] = w.abs()
    return padded.view(padded.shape[0] // b0, b0, padded.shape[1] // b1, b1).amax(dim=(1, 3))


def _dequant(data, scale, block):
    """The test's own dequantization: data * scale broadcast over its block (fp32)."""
    rows, cols = data.shape
    full = scale.float().reshape(-1, 1) if scale.numel() == rows and block[0] == 1 else scale.float()
    full = full.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return data.float() * full


def write_compressed_tensors(path, strategy, *, scale_dtype=torch.float32, quantize_lm_head=False):
    """Turn the dense checkpoint at `path` into compressed-tensors float-quantized FP8 (weights as
    llm-compressor saves them: `weight` F8_E4M3, `weight_scale` [rows, 1] per channel or [1] per
    tensor, in the dtype of the original weights); returns the dequantized tensors (fp32)."""
    dense, out, ref = _tensors(path), {}, {}
    for name, w in dense.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and (module.endswith(LINEAR) or (quantize_lm_head and module == "lm_head")):
            w = w.float()
            scale = (w.abs().amax(1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)) / 448
            data = (w / scale).to(FP8_DTYPE)
            out[name], out[f"{module}.weight_scale"] = data, scale.to(scale_dtype)
            out[f"{module}.input_scale"] = torch.ones(1)  # static activation scales: not needed
            shape = scale.shape if strategy == "channel" else (1, 1)
            ref[name] = data.float() * scale.to(scale_dtype).float().reshape(shape)
        else:
            out[name] = ref[name] = w
    group = {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False,
                    "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                              "dynamic": False},
        "output_activations": None,
    }
    config = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": group}, "ignore": [] if quantize_lm_head else ["lm_head"],
        "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
    }
    _rewrite(path, out, config)
    return ref


def write_transformers_fp8(path, block=(128, 128)):
    """Turn the dense checkpoint at `path` into transformers' fp8 format (FineGrainedFP8, DeepSeek-V3
    style): `weight` F8_E4M3 and `weight_scale_inv` fp32 [cdiv(rows, 128), cdiv(cols, 128)], the
    LM head left dense (modules_to_not_convert); returns the dequantized tensors (fp32)."""
    dense, out, ref = _tensors(path), {}, {}
    for name, w in dense.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.endswith(LINEAR):
            w = w.float()
            scale = _blocks_absmax(w, *block) / 448  # [cdiv(rows, b0), cdiv(cols, b1)]
            full = scale.repeat_interleave(block[0], 0)[: w.shape[0]].repeat_interleave(block[1], 1)[:, : w.shape[1]]
            data = (w / full).to(FP8_DTYPE)
            out[name], out[f"{module}.weight_scale_inv"] = data, scale
            ref[name] = data.float() * full
        else:
            out[name] = ref[name] = w
    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
              "weight_block_size": list(block), "modules_to_not_convert": ["lm_head"]}
    _rewrite(path, out, config)
    return ref


def write_dense(path, source, tensors):
    """A dense checkpoint at `path` with `source`'s config (no quantization_config) and `tensors`."""
    path.mkdir()
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


# --- QuantizedMatrix ------------------------------------------------------------------------


@pytest.mark.parametrize("block", [(1, 70), (16, 32), (32, 16), (128, 128)])
def test_dequantize_matches_the_block_formula(block):
    rows, cols = 50, 70  # partial blocks in both directions
    data = (torch.randn(rows, cols) * 100).clamp(-448, 448).to(FP8_DTYPE)
    scale = torch.rand(-(-rows // block[0]), -(-cols // block[1])) + 0.01
    m = QuantizedMatrix(data, scale, block)
    assert torch.equal(m.dequantize(torch.float32), _dequant(data, scale, block))
    assert torch.equal(m.dequantize(torch.bfloat16), _dequant(data, scale, block).bfloat16())
    out = torch.empty(rows, cols)
    assert m.dequantize(out=out) is out


def test_quantized_matrix_checks_its_parts():
    with pytest.raises(ValueError, match=r"float32 scales of shape \(4, 1\)"):
        QuantizedMatrix(torch.zeros(4, 8, dtype=FP8_DTYPE), torch.ones(4), (1, 8))
    with pytest.raises(ValueError, match="float8_e4m3fn data"):
        QuantizedMatrix(torch.zeros(4, 8), torch.ones(4, 1), (1, 8))


def test_quantize_per_channel():
    w = torch.randn(64, 96) * torch.logspace(-3, 2, 64)[:, None]  # rows of very different scales
    w[5] = 0
    data, scale = quantize_per_channel(w)
    assert data.dtype == FP8_DTYPE and scale.shape == (64, 1) and scale.dtype == torch.float32
    assert torch.equal(scale[:, 0], torch.where(w.abs().amax(1) > 0, w.abs().amax(1) / 448, 1.0))
    assert (data.float().abs().amax(1)[w.abs().amax(1) > 0] == 448).all()  # each row's absmax maps to 448
    deq = data.float() * scale
    # round to nearest e4m3: relative error <= 2^-4 (3 mantissa bits), subnormal spacing 2^-9 * scale
    assert ((deq - w).abs() <= w.abs() * 2**-4 + scale * 2**-10).all()
    exact = torch.tensor([[448.0, -1.0, 0.5, 0.015625]]) * 3  # e4m3 values times a scale: exact
    assert torch.equal(quantize_per_channel(exact)[0].float() * quantize_per_channel(exact)[1], exact)


# --- published FP8 checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, strategy, scale_dtype, fp8_head",
    [("llama3", "channel", torch.bfloat16, False), ("qwen3", "tensor", torch.float32, True),
     ("llama_tied", "channel", torch.float32, False)],
)
def test_compressed_tensors_checkpoint(tmp_path, arch, strategy, scale_dtype, fp8_head):
    """An FP8 checkpoint runs exactly as the dense model whose weights are its dequantized ones."""
    _, path = make_checkpoint(tmp_path / "fp8", arch)
    ref = write_compressed_tensors(path, strategy, scale_dtype=scale_dtype, quantize_lm_head=fp8_head)
    fp8 = load_cpu_engine(path, max_seq_len=48)
    dense = load_cpu_engine(write_dense(tmp_path / "dense", path, ref), max_seq_len=48)
    layer = fp8.weights.layers[0]
    for attr in LAYER_MATRICES:
        m = getattr(layer, attr)
        assert isinstance(m, QuantizedMatrix) and m.per_channel and m.data.dtype == FP8_DTYPE
    assert not isinstance(fp8.weights.lm_head, QuantizedMatrix) and fp8.weights.tied == dense.weights.tied
    assert fp8.spec.quantization.method == "compressed-tensors" and fp8.spec.quantization.strategy == strategy
    assert fp8.backend.name == "reference"
    tokens = random_prompt(24)
    ours, theirs = prompt_logits(fp8, tokens), prompt_logits(dense, tokens)
    assert rel_l2(ours, theirs) < 1e-6, rel_l2(ours, theirs)
    assert fp8.generate(prompt_token_ids=tokens[:8])[0].token_ids == dense.generate(prompt_token_ids=tokens[:8])[0].token_ids


def test_transformers_fp8_block_checkpoint(tmp_path):
    path = make_shape_checkpoint(tmp_path / "fp8", BLOCK_SHAPE)
    ref = write_transformers_fp8(path)
    fp8 = load_cpu_engine(path, max_seq_len=48)
    dense = load_cpu_engine(write_dense(tmp_path / "dense", path, ref), max_seq_len=48)
    layer = fp8.weights.layers[0]
    assert layer.wqkv.block == (128, 128) and layer.wqkv.scale.shape == (4, 2)  # q 2 block rows, k 1, v 1
    assert layer.w_gate_up.block == (1, 128) and layer.w_gate_up.scale.shape == (640, 2)  # up starts mid-block
    assert layer.w_down.block == (128, 128) and layer.w_down.scale.shape == (2, 3)  # 320 columns: 3 blocks
    assert fp8.spec.quantization.scale_name == "weight_scale_inv" and fp8.spec.quantization.ignore == ("lm_head",)
    # every packed matrix dequantizes to exactly the packed dequantized checkpoint tensors
    for attr in LAYER_MATRICES:
        assert torch.equal(getattr(layer, attr).dequantize(), getattr(dense.weights.layers[0], attr)), attr
    tokens = random_prompt(20)
    assert rel_l2(prompt_logits(fp8, tokens), prompt_logits(dense, tokens)) < 1e-6


def test_fp8_checkpoint_bytes_on_the_device(tmp_path):
    """The size check counts FP8 matrices at a byte an element plus their fp32 scales."""
    from flashformer.config import load_spec
    from flashformer.weights import inspect_checkpoint

    path = make_shape_checkpoint(tmp_path / "fp8", BLOCK_SHAPE)
    write_transformers_fp8(path)
    spec = load_spec(path)
    checkpoint = inspect_checkpoint(path, spec)
    weights = load_cpu_engine(path, max_seq_len=16).weights
    dense = [weights.embed, weights.final_norm, weights.lm_head]
    for layer in weights.layers:
        dense += [layer.attn_norm, layer.mlp_norm]
    expected = sum(t.nbytes for t in dense) + sum(getattr(l, a).nbytes for l in weights.layers for a in LAYER_MATRICES)
    assert checkpoint.nbytes(torch.float32) == expected


# --- quantize at load -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "llama_tied"])
def test_quantize_at_load(tmp_path, arch):
    _, path = make_checkpoint(tmp_path / arch, arch)
    original = load_cpu_engine(path, max_seq_len=48)
    fp8 = load_cpu_engine(path, max_seq_len=48, quantization="fp8")
    # per output channel, exactly quantize_per_channel of each checkpoint tensor, packed
    tensors = _tensors(path)
    qkv = fp8.weights.layers[1].wqkv
    parts = [quantize_per_channel(tensors[f"model.layers.1.self_attn.{p}_proj.weight"]) for p in "qkv"]
    assert qkv.per_channel and torch.equal(qkv.data.view(torch.uint8), torch.cat([d for d, _ in parts]).view(torch.uint8))
    assert torch.equal(qkv.scale, torch.cat([s for _, s in parts]))
    assert fp8.weights.quantized and not original.weights.quantized
    assert fp8.weights.embed.dtype == torch.float32 and fp8.weights.tied == original.weights.tied
    for layer, dense in zip(fp8.weights.layers, original.weights.layers):
        for attr in LAYER_MATRICES:
            assert rel_l2(getattr(layer, attr).dequantize(), getattr(dense, attr)) < MATRIX_BOUND
    # exact against the dense model of the dequantized weights ...
    deq = Weights(embed=fp8.weights.embed, final_norm=fp8.weights.final_norm, lm_head=fp8.weights.lm_head,
                  layers=[type(l)(**{**l.__dict__, **{a: getattr(l, a).dequantize() for a in LAYER_MATRICES}})
                          for l in fp8.weights.layers])
    dequantized = ReferenceBackend(fp8.spec, deq, kv_cache(fp8.spec, deq, 1, 48))
    tokens = random_prompt(32)
    ours = prompt_logits(fp8, tokens)
    assert torch.equal(ours, prompt_logits(type("E", (), {"backend": dequantized})(), tokens))
    # ... and within the FP8 bound of the original
    error = rel_l2(ours, prompt_logits(original, tokens))
    assert 0 < error < QUANTIZE_AT_LOAD_BOUND, error


def test_quantize_at_load_leaves_a_published_fp8_checkpoint_as_it_is(tmp_path):
    _, path = make_checkpoint(tmp_path / "fp8", "qwen2")
    write_compressed_tensors(path, "channel")
    as_is, asked = load_cpu_engine(path, max_seq_len=16), load_cpu_engine(path, max_seq_len=16, quantization="fp8")
    for attr in LAYER_MATRICES:
        assert torch.equal(getattr(as_is.weights.layers[0], attr).dequantize(), getattr(asked.weights.layers[0], attr).dequantize())


def test_reference_decoder_dequantizes_one_layer_at_a_time(tmp_path):
    _, path = make_checkpoint(tmp_path / "m", "llama3")
    engine = load_cpu_engine(path, max_seq_len=16, quantization="fp8")
    model = Transformer(engine.spec, engine.weights, engine.cache)
    seen = [layer.wqkv.data_ptr() for layer in model.layer_weights()]
    layer = engine.weights.layers[0]
    assert len(set(seen)) == 1  # one buffer, reused by every layer
    assert model._dequant_buffer.numel() == sum(getattr(layer, a).numel() for a in LAYER_MATRICES)


# --- what the megakernel takes ------------------------------------------------------------------


def test_megakernel_takes_per_channel_fp8_and_refuses_block_scales(tmp_path):
    """Quantize-at-load and per-channel or per-tensor checkpoints reach the kernel (only the device
    rules remain on a CPU); 128x128 block scales do not (auto falls back to the reference path)."""
    _, path = make_checkpoint(tmp_path / "m", "llama_tied")
    engine = load_cpu_engine(path, max_seq_len=16, quantization="fp8")
    spec = engine.spec
    reason = unavailable_reason(spec, torch.device("cuda:0"), torch.bfloat16, 1, quantization="fp8")
    assert reason is None or "FP8" not in reason
    assert weight_format(engine.weights) == "fp8"
    assert weight_format(load_cpu_engine(path, max_seq_len=16).weights) == "bf16"
    block = dataclasses.replace(spec, quantization=WeightQuantization("fp8", "weight_scale_inv", "block", (128, 128)))
    reason = unavailable_reason(block, torch.device("cuda"), torch.bfloat16, 1, quantization="fp8")
    assert "not 128x128 block scales" in reason and "reference path" in reason
    assert select_backend("auto", block, torch.device("cpu"), quantization="fp8") is ReferenceBackend
    with pytest.raises(RuntimeError, match="megakernel backend cannot run this model: .*CUDA device"):
        select_backend("megakernel", spec, torch.device("cpu"), quantization="fp8")


def test_the_kernel_streams_one_format_for_every_layer(tmp_path):
    _, path = make_checkpoint(tmp_path / "m", "llama3")
    weights = load_cpu_engine(path, max_seq_len=16, quantization="fp8").weights
    layer = weights.layers[1]
    layer.wo = layer.wo.dequantize(torch.bfloat16)
    with pytest.raises(ValueError, match="7 of the 8 layer matrices are FP8 and the others dense"):
        weight_format(weights)
    rows, cols = layer.wqkv.shape
    blocks = QuantizedMatrix(layer.wqkv.data, torch.ones(-(-rows // 16), -(-cols // 32)), (16, 32))
    layer.wo = weights.layers[0].wo
    layer.wqkv = blocks
    with pytest.raises(ValueError, match="one FP8 scale per output row, not 16x32 block scales"):
        weight_format(weights)


# --- errors -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    _, path = make_checkpoint(root / "ct", "llama_tied")
    write_compressed_tensors(path, "channel")
    return path


@pytest.fixture
def fp8_ckpt(fp8_pristine, tmp_path):
    return shutil.copytree(fp8_pristine, tmp_path / "ct")


def _edit_quantization(path, **changes):
    config = json.loads((path / "config.json").read_text())
    q = config["quantization_config"]
    for key, value in changes.items():
        if key == "weights":
            q["config_groups"]["group_0"]["weights"].update(value)
        else:
            q[key] = value
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(format="pack-quantized"), "format 'pack-quantized' is not supported .*only 'float-quantized'"),
        (dict(weights={"type": "int"}), r"config_groups.group_0.weights.type 'int' is not supported"),
        (dict(weights={"num_bits": 4}), r"weights.num_bits 4 is not supported"),
        (dict(weights={"strategy": "group", "group_size": 128}), "strategy 'group' is not supported .*tensor, channel or block"),
        (dict(weights={"symmetric": False}), "symmetric False is not supported"),
        (dict(kv_cache_scheme={"num_bits": 8, "type": "float"}), "'kv_cache_scheme' is set; an FP8 KV cache is not supported"),
        (dict(quantization_status="frozen"), "quantization_status 'frozen' is not supported"),
        (dict(config_groups={}), "'config_groups' must be a non-empty object"),
    ],
)
def test_unsupported_compressed_tensors_configs(fp8_ckpt, changes, message):
    _edit_quantization(fp8_ckpt, **changes)
    with pytest.raises(ValueError, match=r"config.json quantization_config \(quant_method 'compressed-tensors'\).*" + message):
        load_cpu_engine(fp8_ckpt)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "weight_block_size None is not supported"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}, "scale_fmt 'ue8m0'"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}, "fmt 'e5m2'"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128},
         r"quant_method 'gptq' \(fields: bits, group_size, quant_method\), which is not supported"),
        ({"bits": 4}, r"quant_method None \(fields: bits\), which is not supported"),
    ],
)
def test_unsupported_quantization_configs(fp8_ckpt, config, message):
    _edit_quantization(fp8_ckpt, **{k: None for k in json.loads((fp8_ckpt / "config.json").read_text())["quantization_config"]})
    cfg = json.loads((fp8_ckpt / "config.json").read_text())
    cfg["quantization_config"] = config
    (fp8_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_cpu_engine(fp8_ckpt)


def _edit_tensors(path, edit):
    tensors = _tensors(path)
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_fp8_tensor_without_scale(fp8_ckpt):
    _edit_tensors(fp8_ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight in model.safetensors is FP8 .* has no "
                                         "model.layers.1.mlp.up_proj.weight_scale"):
        load_cpu_engine(fp8_ckpt)


def test_scale_of_the_wrong_shape(fp8_ckpt):
    def edit(t):
        t["model.layers.0.self_attn.o_proj.weight_scale"] = torch.ones(1, 64)

    _edit_tensors(fp8_ckpt, edit)
    with pytest.raises(ValueError, match=r"o_proj.weight_scale in model.safetensors has shape \(1, 64\), expected "
                                         r"\(64, 1\) \(channel scales of a 64x64 matrix"):
        load_cpu_engine(fp8_ckpt)


def test_fp8_tensor_without_quantization_config(fp8_ckpt):
    cfg = json.loads((fp8_ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (fp8_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has dtype F8_E4M3 \\(FP8\\) but config.json has no quantization_config"):
        load_cpu_engine(fp8_ckpt, allow_unused_tensors=True)


def test_half_packed_fp8(fp8_ckpt):
    def edit(t):
        name = "model.layers.0.self_attn.k_proj"
        t[f"{name}.weight"] = t[f"{name}.weight"].float() * t.pop(f"{name}.weight_scale")

    _edit_tensors(fp8_ckpt, edit)
    with pytest.raises(ValueError, match="q_proj.weight, .*v_proj.weight are FP8 but model.layers.0.self_attn.k_proj.weight not"):
        load_cpu_engine(fp8_ckpt)


def test_nan_in_fp8_data(fp8_ckpt):
    def edit(t):
        data = t["model.layers.1.mlp.down_proj.weight"].view(torch.uint8).clone()
        data[3, 5] = 0x7F
        t["model.layers.1.mlp.down_proj.weight"] = data.view(FP8_DTYPE)

    _edit_tensors(fp8_ckpt, edit)
    with pytest.raises(ValueError, match="tensor model.layers.1.mlp.down_proj.weight in model.safetensors has 1 NaN values"):
        load_cpu_engine(fp8_ckpt)


def test_scales_beyond_the_dtype(fp8_ckpt):
    def edit(t):
        t["model.layers.0.mlp.gate_proj.weight_scale"] = t["model.layers.0.mlp.gate_proj.weight_scale"] * 1e6

    _edit_tensors(fp8_ckpt, edit)
    load_cpu_engine(fp8_ckpt)  # fine in float32
    with pytest.raises(ValueError, match="gate_proj.weight_scale in model.safetensors has a scale of .* beyond the range of float16"):
        load_cpu_engine(fp8_ckpt, dtype="float16")


@pytest.mark.parametrize("value", ["int8", "FP8", "", 8, True, ["fp8"]])
def test_bad_quantization_argument(fp8_ckpt, value):
    with pytest.raises(ValueError, match=r"quantization must be None or one of 'fp8', got"):
        load_cpu_engine(fp8_ckpt, quantization=value)


def test_quantize_at_load_checks_the_source(tmp_path):
    _, path = make_checkpoint(tmp_path / "m", "llama_tied")
    _edit_tensors(path, lambda t: t["model.layers.0.mlp.up_proj.weight"].__setitem__((0, 0), math.inf))
    with pytest.raises(ValueError, match="up_proj.weight in model.safetensors has 1 non-finite values"):
        load_cpu_engine(path, quantization="fp8")
