"""`flashformer bench`: the CPU smoke run and its outputs, the floor's bytes, the real shapes, and
that the peers compute what the reference decoder computes (so the comparison is fair)."""

import importlib.util
import json
import math
import sys

import pytest
import torch

from flashformer.weights import random_weights
from tqdm import tqdm

from flashformer import bench
from flashformer.baselines import GptFast, HFEager, TorchaoFp8, cache_len, hf_config, torchao_fp8_weights
from flashformer.cli import main
from flashformer.config import spec_from_dict
from flashformer.reference import ReferenceBackend
from flashformer.weights import load_weights

from checkpoints import kv_cache

ROW_FIELDS = {
    "model": str,
    "batch": int,
    "ctx": int,
    "engine_ms": float,
    "engine_p10_ms": float,
    "engine_p90_ms": float,
    "engine_tok_s": float,
    "engine_gbs": float,
    "bytes_per_step": int,
}
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run on a machine without a GPU")


@NO_GPU
def test_quick_run_on_cpu_writes_table_json_and_plot_and_says_they_mean_nothing(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert bench.CPU_NOTE in result["note"] and bench.GPTFAST_CPU_NOTE in result["note"]
    assert result["gpu"] is None and result["read_bw_gbs"] is None and result["backend"] == "reference"
    assert result["commit"] is None or isinstance(result["commit"], str)
    assert result["errors"] == [] and result["peers"] == ["hf_eager"]
    assert result["counts"]["engine"]["timed"] >= 100
    assert len(result["rows"]) == len(bench.QUICK_BATCHES) * len(bench.QUICK_CTXS)
    assert {(r["batch"], r["ctx"]) for r in result["rows"]} == {
        (b, c) for b in bench.QUICK_BATCHES for c in bench.QUICK_CTXS
    }
    for row in result["rows"]:
        for field, kind in ROW_FIELDS.items():
            assert isinstance(row[field], kind), (field, row[field])
        assert row["model"] == "tiny-gqa"
        assert 0 < row["engine_p10_ms"] <= row["engine_ms"] <= row["engine_p90_ms"]
        assert row["floor_ms"] is None and row["floor_fraction"] is None  # no probe on a CPU
        assert row["gptfast_ms"] is None and row["speedup_vs_gptfast"] is None
        assert row["hf_eager_ms"] > 0
        assert row["speedup_vs_hf_eager"] == pytest.approx(row["hf_eager_ms"] / row["engine_ms"])
    assert [t["prompt_len"] for t in result["ttft"]] == list(bench.QUICK_PROMPT_LENS)
    for entry in result["ttft"]:
        assert entry["model"] == "tiny-gqa" and entry["engine_ms"] > 0 and entry["hf_eager_ms"] > 0
    model = result["models"]["tiny-gqa"]
    spec = spec_from_dict(bench.shape_config("tiny-gqa"))
    max_seq = model["kv_cache_bytes"] // (spec.num_layers * 2 * max(bench.QUICK_BATCHES) * spec.num_kv_heads * spec.head_dim * 2)
    assert max_seq > max(bench.QUICK_CTXS) and model["device_memory_bytes"] is None  # (no device to measure)

    assert {(g["batch"], g["mode"]) for g in result["generate"]} == {
        (b, m) for b in bench.QUICK_BATCHES for m in bench.GENERATE_MODES
    }
    for g in result["generate"]:
        assert g["model"] == "tiny-gqa" and g["new_tokens"] == bench.QUICK_GENERATE_TOKENS
        assert g["ms_per_token"] > 0 and g["kernel_ms"] > 0
        assert g["ratio"] == pytest.approx(g["ms_per_token"] / g["kernel_ms"])

    table = (tmp_path / "bench.md").read_text()
    assert table.startswith(f"> **{result['note']}**")
    assert table.count("| tiny-gqa |") == len(result["rows"]) + len(result["ttft"]) + len(result["generate"])
    assert "| model | batch | mode | ms per token | kernel ms | ratio |" in table
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    captured = capsys.readouterr()
    assert bench.CPU_NOTE in captured.out and "bench.png" in captured.err


@NO_GPU
def test_full_sweep_without_a_gpu_says_to_use_quick(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path)]) == 1
    assert "--quick" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_a_failing_peer_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no such attention implementation")

    monkeypatch.setattr("flashformer.baselines.HFEager", broken)
    with pytest.warns(UserWarning, match="hf_eager peer: failed"):
        result = bench.run_bench(
            quick=True, device="cpu", batches=[1], ctxs=[16], prompt_lens=[], out=tmp_path, progress=False
        )
    assert result["errors"] == [
        {
            "model": "tiny-gqa",
            "peer": "hf_eager",
            "error": "failed: RuntimeError: no such attention implementation (its figures are left empty)",
        }
    ]
    (row,) = result["rows"]
    assert row["engine_ms"] > 0 and row["hf_eager_ms"] is None and result["ttft"] == []
    assert json.loads((tmp_path / "bench.json").read_text())["errors"] == result["errors"]
    assert "- tiny-gqa, hf_eager peer: failed: RuntimeError" in (tmp_path / "bench.md").read_text()


def test_a_checkpoint_directory_is_benchmarked_with_its_own_config(tmp_path):
    """A Qwen3 checkpoint (q/k norms) runs with the HF peer built from its own config.json."""
    pytest.importorskip("transformers")
    from checkpoints import make_checkpoint

    arch = "qwen3"
    path = make_checkpoint(tmp_path / arch, arch)[1]
    result = bench.run_bench([str(path)], device="cpu", batches=[2], ctxs=[16], prompt_lens=[8], progress=False)
    assert result["errors"] == [] and result["models"][arch]["backend"] == "reference"
    (row,) = result["rows"]
    assert row["model"] == arch and row["engine_ms"] > 0 and row["hf_eager_ms"] > 0
    assert result["ttft"][0]["hf_eager_ms"] > 0


def test_fp8_rows_stream_half_the_weight_bytes_and_borrow_the_bf16_peers(tmp_path):
    """--quantization fp8: each model again as "<name>:fp8", its layer matrices in e4m3 (a byte an
    element plus a scale per row, what its floor counts), compared with the bf16 row's peer."""
    result = bench.run_bench(["tiny-gqa"], device="cpu", batches=[1], ctxs=[16], prompt_lens=[], peers="all",
                             quantization="fp8", progress=False)
    dense, fp8 = result["rows"]
    assert (dense["model"], dense["weights"]) == ("tiny-gqa", "bf16") and (fp8["model"], fp8["weights"]) == ("tiny-gqa:fp8", "fp8")
    assert dense["kv_cache_dtype"] == fp8["kv_cache_dtype"] == "bfloat16"
    m = result["models"]
    spec = bench.spec_from_dict(bench.shape_config("tiny-gqa"))
    layer_elems = spec.num_layers * (spec.hidden_size * (spec.q_size + 2 * spec.kv_size) + spec.hidden_size * spec.q_size
                                     + 3 * spec.hidden_size * spec.intermediate_size)
    layer_rows = spec.num_layers * (spec.q_size + 2 * spec.kv_size + 2 * spec.hidden_size + 2 * spec.intermediate_size)
    assert m["tiny-gqa"]["weights_streamed_bytes"] - m["tiny-gqa:fp8"]["weights_streamed_bytes"] == layer_elems - 4 * layer_rows
    assert fp8["hf_eager_ms"] == dense["hf_eager_ms"] and fp8["speedup_vs_hf_eager"] == dense["hf_eager_ms"] / fp8["engine_ms"]


def test_fp8_kv_rows_count_a_byte_an_element_and_the_scales(tmp_path):
    """--kv-cache-dtype fp8: the engine's rows as "<name>:kv-fp8" ("<name>:fp8:kv-fp8" with FP8
    weights), their KV cache in e4m3 with a 4-byte scale per token and kv head, what the floor counts."""
    result = bench.run_bench(["tiny-gqa"], device="cpu", batches=[2], ctxs=[16], prompt_lens=[], peers="none",
                             quantization="fp8", kv_cache_dtype="fp8", progress=False)
    dense, fp8 = result["rows"]
    assert (dense["model"], dense["weights"], dense["kv_cache_dtype"]) == ("tiny-gqa:kv-fp8", "bf16", "fp8")
    assert (fp8["model"], fp8["weights"], fp8["kv_cache_dtype"]) == ("tiny-gqa:fp8:kv-fp8", "fp8", "fp8")
    spec = bench.spec_from_dict(bench.shape_config("tiny-gqa"))
    vectors = spec.num_layers * 2 * 2 * spec.num_kv_heads * 16
    m = result["models"]["tiny-gqa:kv-fp8"]
    assert dense["bytes_per_step"] - m["weights_streamed_bytes"] == vectors * (spec.head_dim + 4)
    assert m["kv_cache_bytes"] == spec.kv_cache_bytes(2, m["kv_cache_bytes"] // (vectors // 16 * (spec.head_dim + 4)),
                                                      2, "fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        bench.run_bench(["tiny-gqa"], device="cpu", kv_cache_dtype="int8", progress=False)


def test_bad_arguments_are_refused_before_anything_runs(tmp_path, capsys):
    assert main(["bench", "--quick", "-m", "llama-9b", "--out", str(tmp_path)]) == 1
    assert "unknown model shape 'llama-9b'" in capsys.readouterr().err
    assert main(["bench", "--quick", "--batch", "0", "--out", str(tmp_path)]) == 1
    assert "batch sizes must be integers >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--ctx", "1k"])
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--peers", "vllm"])
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize(
    "shape, params, weights_gb",
    [
        ("llama-3.2-1b", 1_235_814_400, 2.47),
        ("llama-3.2-3b", 3_212_749_824, 6.43),
        ("llama-3.1-8b", 8_030_261_248, 15.01),
    ],
)
def test_shapes_are_the_real_models_and_the_floor_counts_their_bytes(shape, params, weights_gb):
    """Parameter counts as published; weights streamed per token as in ANCHORS.md (8B: 15.01 GB)."""
    transformers = pytest.importorskip("transformers")
    cfg = bench.shape_config(shape)
    spec = spec_from_dict(cfg)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(cfg))
    assert sum(p.numel() for p in hf.parameters()) == params
    weights = random_weights(spec, tied=cfg["tie_word_embeddings"], device="meta")
    assert weights.tied == (shape != "llama-3.1-8b")
    embed = weights.embed.nbytes
    assert bench.weight_bytes(weights) == 2 * params - (0 if weights.tied else embed)  # the table is not streamed
    assert bench.weight_bytes(weights) / 1e9 == pytest.approx(weights_gb, abs=0.005)
    kv = spec.num_layers * 2 * 4 * spec.num_kv_heads * 8192 * spec.head_dim * 2
    assert bench.step_bytes(spec, weights, 4, 8192) == bench.weight_bytes(weights) + kv


def test_floor_of_the_8b_shape_matches_the_anchor():
    """ANCHORS.md: Llama-3.1-8B at batch 1, ctx 8192, 4.65 TB/s -> 3.46 ms."""
    cfg = bench.shape_config("llama-3.1-8b")
    spec = spec_from_dict(cfg)
    weights = random_weights(spec, tied=False, device="meta")
    assert bench.step_bytes(spec, weights, 1, 8192) / 4.65e12 * 1e3 == pytest.approx(3.46, abs=0.01)


def test_random_weights_are_random_and_tied_when_asked():
    spec = spec_from_dict(bench.shape_config("tiny-gqa"))
    weights = random_weights(spec, tied=True, device="cpu", generator=torch.Generator().manual_seed(1))
    assert weights.tied and weights.embed.dtype == torch.bfloat16
    tensors = [
        weights.embed,
        weights.final_norm,
        *(t for l in weights.layers for t in vars(l).values() if t is not None),
    ]
    for t in tensors:
        assert t.float().std() > 0.01 and torch.isfinite(t.float()).all()
    assert not torch.equal(weights.layers[0].wqkv, weights.layers[1].wqkv)


def _tiny_fp32():
    cfg = bench.shape_config("tiny-gqa")
    spec = spec_from_dict(cfg)
    generator = torch.Generator().manual_seed(0)
    weights = random_weights(spec, tied=False, device="cpu", dtype=torch.float32, generator=generator)
    return cfg, spec, weights, generator


def _fp32_model(name, tmp_path):
    """(config.json dict, spec, fp32 weights on the CPU, generator): the tiny shape, or a checkpoint."""
    if name == "tiny-gqa":
        return _tiny_fp32()
    from checkpoints import make_checkpoint

    path = make_checkpoint(tmp_path / name, name)[1]
    cfg = json.loads((path / "config.json").read_text())
    spec = spec_from_dict(cfg)
    return cfg, spec, load_weights(path, spec, dtype=torch.float32, progress=False), torch.Generator().manual_seed(0)


@pytest.mark.parametrize("name", ["tiny-gqa", "llama3", "llama_tied", "qwen3"])
def test_peers_compute_what_the_reference_computes(name, tmp_path):
    """Same weights, same cache contents: the gpt-fast model (run eagerly here) and HF transformers
    return the reference decoder's logits, step after step (biases, tied embeddings, q/k norms too)."""
    pytest.importorskip("transformers")
    cfg, spec, weights, generator = _fp32_model(name, tmp_path)
    batch, ctx = 2, 40
    reference = ReferenceBackend(spec, weights, kv_cache(spec, weights, batch, 64))
    reference.kv_cache.normal_(generator=generator)
    source = reference.kv_cache.clone()
    fast = GptFast(spec, weights, 64, compile=False)
    fast.setup(batch, ctx, source=source)
    hf = HFEager(spec, weights, hf_config(cfg))
    hf.setup(batch, ctx, source=source)
    k_proj = hf.model.model.layers[0].self_attn.k_proj.weight
    assert k_proj.data_ptr() == weights.layers[0].wqkv[spec.q_size :].data_ptr()  # bound, not copied
    for step in range(3):
        tokens = torch.randint(spec.vocab_size, (batch,), generator=generator)
        expected = reference.decode(tokens, torch.full((batch,), ctx + step))
        assert torch.isfinite(expected).all() and expected.std() > 0.1
        torch.testing.assert_close(fast.decode(tokens, torch.tensor([ctx + step])), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hf.decode(tokens), expected, atol=1e-4, rtol=1e-4)


def test_torchao_fp8_peer_computes_what_the_reference_computes_on_the_fp8_weights():
    """The torchao FP8 peer (run eagerly here) multiplies the FP8 model's own e4m3 matrices (the
    same bytes and scales, not copies), so it returns the reference decoder's logits on them."""
    pytest.importorskip("torchao")
    from torchao.quantization import Float8Tensor

    spec = spec_from_dict(bench.shape_config("tiny-gqa"))
    generator = torch.Generator().manual_seed(0)
    weights = random_weights(spec, tied=False, device="cpu", dtype=torch.float32, std=0.1, generator=generator,
                             quantization="fp8")
    batch, ctx = 2, 40
    reference = ReferenceBackend(spec, weights, kv_cache(spec, weights, batch, 64))
    reference.kv_cache.normal_(generator=generator)
    peer = TorchaoFp8(spec, weights, 64, compile=False)
    peer.setup(batch, ctx, source=reference.kv_cache)
    wqkv = peer.model.blocks[0].wqkv
    assert isinstance(wqkv, Float8Tensor) and wqkv.qdata.data_ptr() == weights.layers[0].wqkv.data.data_ptr()
    for step in range(3):
        tokens = torch.randint(spec.vocab_size, (batch,), generator=generator)
        expected = reference.decode(tokens, torch.full((batch,), ctx + step))
        assert torch.isfinite(expected).all() and expected.std() > 0.1
        torch.testing.assert_close(peer.decode(tokens, torch.tensor([ctx + step])), expected, atol=1e-4, rtol=1e-4)


def test_torchao_fp8_peer_needs_fp8_weights_and_says_when_torchao_is_missing(monkeypatch):
    _, spec, dense, _ = _tiny_fp32()
    pytest.importorskip("torchao")
    with pytest.raises(ValueError, match="needs a model with FP8 layer matrices"):
        torchao_fp8_weights(dense)
    monkeypatch.setitem(sys.modules, "torchao", None)  # (import torchao raises ImportError)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(RuntimeError, match=r"the torchao FP8 peer needs torchao >= 0.17 \(pip install torchao\)"):
        torchao_fp8_weights(dense)


def test_hf_prefill_matches_the_reference():
    pytest.importorskip("transformers")
    cfg, spec, weights, generator = _tiny_fp32()
    prompt = torch.randint(spec.vocab_size, (24,), generator=generator)
    expected = ReferenceBackend(spec, weights, kv_cache(spec, weights, 1, 64)).prefill([prompt])
    torch.testing.assert_close(HFEager(spec, weights, hf_config(cfg)).prefill(prompt), expected, atol=1e-4, rtol=1e-4)


def test_gptfast_cache_is_sized_to_the_context():
    assert cache_len(128) == 136 and cache_len(129) == 144 and cache_len(32768) == 32776
    _, spec, weights, _ = _tiny_fp32()
    fast = GptFast(spec, weights, 256, compile=False)
    fast.setup(3, 100)
    assert len(fast.caches) == spec.num_layers
    assert fast.caches[0][0].shape == (3, spec.num_kv_heads, cache_len(100), spec.head_dim)
    assert fast.caches[0][0].float().std() > 0.5  # random, never zeros


@NO_GPU
@pytest.mark.parametrize("peer", ["gptfast", "torchao_fp8"])
def test_compiled_peer_runs_and_says_when_cuda_graphs_were_skipped(peer):
    """On a CPU `mode="reduce-overhead"` cannot use CUDA graphs: the peer must say its figures
    understate it. The torchao FP8 peer compiles (fullgraph) over torchao's tensors, on FP8 weights."""
    if peer == "torchao_fp8":
        pytest.importorskip("torchao")
    spec = spec_from_dict(bench.shape_config("tiny-gqa"))
    weights = random_weights(spec, tied=False, device="cpu", dtype=torch.float32, generator=torch.Generator().manual_seed(0),
                             quantization="fp8" if peer == "torchao_fp8" else None)
    rows = {(1, 16): {}}
    with tqdm(disable=True) as bar:
        problem = bench._run_compiled_peer(
            "tiny-gqa", spec, weights, [(1, 16)], rows, bench.Counts(1, 3), torch.device("cpu"), None, bar, peer
        )
    assert "skipped CUDA graphs" in problem and f"understate {bench.PEER_LABELS[peer]}" in problem
    assert rows[1, 16][f"{peer}_ms"] > 0


def test_time_calls_gives_one_non_negative_time_per_timed_call():
    calls = []
    times = bench._time_calls(lambda: calls.append(1), bench.Counts(2, 7), torch.device("cpu"))
    assert len(calls) == 9 and len(times) == 7 and all(t >= 0 for t in times)


def test_commit_falls_back_to_the_environment(monkeypatch):
    def no_git(*args, **kwargs):
        raise OSError("git is not installed")

    monkeypatch.setattr(bench.subprocess, "run", no_git)
    monkeypatch.setenv("FLASHFORMER_COMMIT", "abc1234")
    assert bench.git_commit() == "abc1234"
    monkeypatch.delenv("FLASHFORMER_COMMIT")
    assert bench.git_commit() is None


def _result():
    row = dict.fromkeys(["floor_ms", "floor_fraction", "gptfast_ms", "speedup_vs_gptfast"])
    row.update(model="m", batch=1, ctx=128, engine_ms=2.0, engine_p10_ms=1.9, engine_p90_ms=2.2)
    row.update(
        engine_tok_s=500.0, engine_gbs=10.0, bytes_per_step=20_000_000, hf_eager_ms=40.0, speedup_vs_hf_eager=20.0
    )
    return {
        "gpu": None,
        "device": "cpu",
        "commit": None,
        "note": None,
        "backend": "reference",
        "torch": torch.__version__,
        "transformers": None,
        "read_bw_gbs": None,
        "counts": {"engine": {"warmup": 1, "timed": 100}, "ttft": {"warmup": 1, "timed": 5}},
        "rows": [row],
        "ttft": [],
        "errors": [],
    }


def test_without_matplotlib_the_plot_is_skipped_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    (tmp_path / "bench.png").write_bytes(b"a plot of an earlier run")
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        paths = bench.write_outputs(_result(), tmp_path)
    assert set(paths) == {"table", "json"} and not (tmp_path / "bench.png").exists()
    assert (
        "| m | 1 | 128 | 2.000 | 1.900–2.200 | 500.0 | 10 | — | — | — | — | 40.000 | 20.00 |"
        in paths["table"].read_text()
    )


def test_render_rewrites_table_and_plot_from_a_json_without_measuring(tmp_path, capsys):
    (tmp_path / "bench.json").write_text(json.dumps(_result()))
    assert main(["bench", "--render", str(tmp_path / "bench.json")]) == 0
    assert (tmp_path / "bench.md").read_text() == bench.format_table(_result())
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "| m | 1 | 128 |" in capsys.readouterr().out
    assert main(["bench", "--render", str(tmp_path / "missing.json")]) == 1


def test_the_table_has_the_torchao_fp8_columns_when_that_peer_ran():
    result = _result()
    assert "torchao" not in bench.format_table(result)  # (nor in a bench.json from before it)
    fp8 = dict(result["rows"][0], model="m:fp8", torchao_fp8_ms=1.5, speedup_vs_torchao_fp8=0.75)
    result.update(peers=["gptfast", "torchao_fp8"], rows=[dict(result["rows"][0]), fp8])
    header, rule, dense_line, fp8_line = bench.format_table(result).splitlines()[4:8]
    assert header.endswith("| HF eager ms | × HF eager | torchao FP8 ms | × torchao FP8 |")
    assert rule.count("|") == header.count("|")
    assert dense_line.endswith("| 40.000 | 20.00 | — | — |") and fp8_line.endswith("| 1.500 | 0.75 |")


@pytest.mark.gpu
def test_quick_run_on_the_gpu_has_a_floor_and_both_peers(tmp_path):
    result = bench.run_bench(quick=True, out=tmp_path, progress=False)
    assert result["gpu"] and bench.CPU_NOTE not in result["note"]
    assert result["probe"]["method"] == "flashformer._C.testing.read_probe"
    assert 500 < result["read_bw_gbs"] < 20_000
    assert result["errors"] == []
    model = result["models"]["tiny-gqa"]
    assert model["backend"] == "megakernel"
    assert model["device_memory_bytes"] >= model["kv_cache_bytes"] + 2 * model["parameters"]  # bf16 weights + cache
    for row in result["rows"]:
        assert 0 < row["floor_fraction"] <= 1.1
        assert row["gptfast_ms"] > 0 and row["hf_eager_ms"] > 0
        assert math.isclose(row["floor_ms"], row["bytes_per_step"] / (result["read_bw_gbs"] * 1e9) * 1e3)
    assert (tmp_path / "bench.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)
