"""`flashformer bench`: decode latency of the engine next to its peers, in one process, against the floor.

For each model (a checkpoint directory, or a shape name with random bf16 weights made on the
device) and each (batch, context) the engine's backend decodes one step over a KV cache filled
with random values up to the context; its per-token latency (median, p10, p90 of CUDA-event
intervals after a warm-up) is stated against the floor and against the peers of `baselines.py`,
which run on the same weight tensors in the same process. Time to first token is timed on whole
prompts. Results go to a markdown table, a JSON file and a PNG plot.

The floor of a step is `step_bytes(...)` (the bytes it must read from HBM) over the read bandwidth
of a streaming probe run in the same process (`read_bandwidth`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from itertools import pairwise
from pathlib import Path
from time import perf_counter

import numpy as np
import torch

from .config import ModelSpec, load_spec, spec_from_dict
from .engine import BACKENDS, Engine, select_backend
from .reference import KVCache, quantize_kv
from .sampling import SamplingParams
from . import validate
from .weights import Weights, load_weights, random_weights

# The config.json of each compiled megakernel shape: its dimensions, layer count, tied LM head and
# family (the published model's model_type) come from the compiled core's list (model_traits.hpp);
# the rest is the family's, as its published config.json files have it (RoPE without scaling: the
# tables do not change a step's cost; BOS and EOS ids 1 and 2). The weights are random, nothing is
# downloaded. A family's features (q/k/v biases for qwen2, q/k norm for qwen3) follow from its
# architecture (config.py); test_megakernel.py checks that each shape matches its own config.
_FAMILIES = {
    "llama": dict(architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5, rope_theta=500000.0,
                  max_position_embeddings=131072),
    "mistral": dict(architectures=["MistralForCausalLM"], rms_norm_eps=1e-5, rope_theta=1000000.0,
                    max_position_embeddings=32768, sliding_window=None),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], rms_norm_eps=1e-6, rope_theta=1000000.0,
                  max_position_embeddings=131072, use_sliding_window=False),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], rms_norm_eps=1e-6, rope_theta=1000000.0,
                  max_position_embeddings=40960, use_sliding_window=False, attention_bias=False),
}


def shapes() -> dict[str, dict]:
    """Shape name -> config.json dict, for every compiled megakernel config."""
    from .megakernel import compiled_configs

    return {
        c["name"]: dict(
            _FAMILIES[c["family"]],
            model_type=c["family"],
            hidden_act="silu",
            bos_token_id=1,  # (random weights: any ids inside every vocabulary)
            eos_token_id=2,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["layers"],
            num_attention_heads=c["num_heads"],
            num_key_value_heads=c["num_kv_heads"],
            head_dim=c["head_dim"],
            tie_word_embeddings=c["tied"],
        )
        for c in compiled_configs()
    }


DEFAULT_MODELS = ("llama-3.2-1b", "llama-3.1-8b")
DEFAULT_BATCHES = (1, 2, 4, 8)
DEFAULT_CTXS = (128, 1024, 8192, 32768)
DEFAULT_PROMPT_LENS = (128, 1024, 8192)
# --quick: a tiny compiled shape that the CPU reference path decodes in about a millisecond (on a
# Hopper GPU the quick run uses the kernel).
QUICK_MODELS, QUICK_BATCHES, QUICK_CTXS, QUICK_PROMPT_LENS = ("tiny-gqa",), (1, 2), (32, 128), (32, 128)
PEERS = ("none", "fast", "all")
# Each peer's name in bench.json (`<name>_ms`, `speedup_vs_<name>`) and its label in bench.md. The
# dense ones run on the bf16 model; torchao_fp8, the compiled peer of an FP8 model (with --peers
# fast or all), on the FP8 one.
PEER_LABELS = {"gptfast": "gpt-fast", "hf_eager": "HF eager", "torchao_fp8": "torchao FP8"}
DENSE_PEERS = ("gptfast", "hf_eager")
DEFAULT_OUT = "bench-results"

CPU_NOTE = "CPU reference run: these figures mean nothing for GPU performance"
GPTFAST_CPU_NOTE = "gpt-fast peer not run: its torch.compile mode='reduce-overhead' is CUDA graphs, which need a GPU"
QUICK_NOTE = "quick smoke run on a tiny shape: these figures say nothing about the real model shapes"
FLOOR_DEFINITION = (
    "floor_ms = step_bytes / read_bw; step_bytes = weights streamed per step (every tensor of every layer, "
    "the final norm and the LM head; the embedding table only as the LM head when tied, counted once) "
    "+ KV cache read (layers * 2 * batch * kv_heads * ctx * head_dim * dtype bytes)"
)
WEIGHT_STD = 0.02  # random weights ~ N(0, 0.02^2) as HF initializes them; norms ~ 1 + N(0, 0.02^2)


@dataclass(frozen=True)
class Counts:
    """Untimed warm-up calls, then timed calls, for one measurement."""

    warmup: int
    timed: int


# Full run: >= 100 timed engine tokens per row; the peers get what a stable median needs
# (HF eager costs ~45 ms a token at 8B, gpt-fast up to ~0.3 s at batch 8 x 32K context).
COUNTS = {
    "engine": Counts(10, 100),
    "gptfast": Counts(5, 50),
    "hf_eager": Counts(3, 20),
    "ttft": Counts(1, 5),
    "generate": Counts(1, 3),
}
QUICK_COUNTS = {
    "engine": Counts(3, 100),
    "gptfast": Counts(3, 20),
    "hf_eager": Counts(2, 10),
    "ttft": Counts(1, 3),
    "generate": Counts(1, 2),
}
# The generate table: engine.generate of random prompts of GENERATE_PROMPT tokens, GENERATE_TOKENS
# new tokens per row (EOS ignored), greedy and sampled as issue 18 states them, against the bare
# greedy decode step timed back to back at the generation's mean context.
GENERATE_PROMPT, GENERATE_TOKENS, QUICK_GENERATE_TOKENS = 128, 256, 32
GENERATE_MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.8, top_p=0.95)}


def shape_config(name: str) -> dict:
    """The config.json dict of shape `name` (a key of shapes())."""
    known = shapes()
    if name not in known:
        raise ValueError(
            f"unknown model shape {name!r} (choose from {', '.join(known)}, or pass a checkpoint directory)"
        )
    return known[name]


def weight_bytes(weights: Weights) -> int:
    """Bytes of weights one decode step streams: every tensor of every layer, the final norm and the
    LM head. The embedding table is not streamed (a step reads one row per token) unless it is tied,
    and then it is the LM head, counted once."""
    total = weights.final_norm.nbytes + weights.lm_head.nbytes
    for layer in weights.layers:
        total += sum(t.nbytes for t in vars(layer).values() if t is not None)
    return total


def step_bytes(spec: ModelSpec, weights: Weights, batch: int, ctx: int, kv_cache_dtype: str = "auto") -> int:
    """The bytes a decode step of `batch` rows at context `ctx` must read from HBM: `weight_bytes`
    + the KV cache of the past positions (layers * 2 * batch * kv_heads * ctx * head_dim elements,
    in the model dtype, or in FP8 with their scales). The numerator of the floor, and of the
    achieved GB/s."""
    return weight_bytes(weights) + spec.kv_cache_bytes(batch, ctx, weights.embed.element_size(), kv_cache_dtype)


def read_bandwidth(device: torch.device, nbytes: int = 4 << 30, iters: int = 20) -> tuple[float | None, dict]:
    """Read bandwidth in GB/s (median of `iters` back-to-back passes over `nbytes`, far beyond the L2)
    of the compiled core's streaming probe (16-byte loads from every SM), and how it was measured.
    None on a CPU device: there is no floor there."""
    if device.type != "cuda":
        return None, {"method": "none (no GPU)"}
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = min(nbytes, free // 4) // (1 << 20) * (1 << 20)
    times, method = _probe_times(device, nbytes, Counts(3, iters))
    torch.cuda.empty_cache()
    return nbytes / (float(np.median(times)) * 1e-3) / 1e9, {"method": method, "bytes": nbytes, "iters": iters}


def _probe_times(device: torch.device, nbytes: int, counts: Counts) -> tuple[list[float], str]:
    buf = torch.ones(nbytes, dtype=torch.uint8, device=device)
    sink = torch.zeros(4, dtype=torch.uint8, device=device)
    try:
        from ._core import load

        stream = torch.cuda.current_stream(device).cuda_stream
        read = partial(load().testing.read_probe, buf.data_ptr(), nbytes, sink.data_ptr(), stream)
        method = "flashformer._C.testing.read_probe"
    except (ImportError, AttributeError) as exc:
        read = partial(torch.amax, buf.view(torch.int64))
        method = f"torch.amax over the buffer (the compiled probe is unavailable: {exc})"
    return _time_calls(read, counts, device), method


def _time_calls(fn: Callable[[], object], counts: Counts, device: torch.device, per_call: bool = False) -> list[float]:
    """Milliseconds per call of `fn` after `counts.warmup` untimed calls. On a GPU the intervals
    between CUDA events recorded after consecutive calls (the timer adds no synchronization; a
    callee that waits itself pays for it: the megakernel's decode() waits only for the step
    before it, after queueing its own, as the gpt-fast peer's calls queue theirs); with
    `per_call`, the wall time of each call synchronized at both ends."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(counts.warmup):
        fn()
    sync()
    if per_call or not cuda:
        times = []
        for _ in range(counts.timed):
            start = perf_counter()
            fn()
            sync()
            times.append((perf_counter() - start) * 1e3)
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(counts.timed + 1)]
    events[0].record()
    for event in events[1:]:
        fn()
        event.record()
    sync()
    return [a.elapsed_time(b) for a, b in pairwise(events)]


def git_commit() -> str | None:
    """`git rev-parse --short HEAD` of the source tree, else $FLASHFORMER_COMMIT, else None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("FLASHFORMER_COMMIT") or None


def _load_model(model: str, device: torch.device, generator, quantization: str | None = None
                ) -> tuple[str, ModelSpec, Weights, dict]:
    """(name, spec, weights, config.json dict) of a shape name or a checkpoint directory; with
    `quantization` ("fp8"), its layer matrices quantized per output channel as they are made or
    loaded."""
    path = Path(model)
    if model not in shapes() and path.is_dir():
        spec = load_spec(path)
        weights = load_weights(path, spec, dtype=torch.bfloat16, device=device, progress=False,
                               quantization=quantization)
        return path.name, spec, weights, json.loads((path / "config.json").read_text())
    cfg = shape_config(model)
    spec = spec_from_dict(cfg)
    weights = random_weights(spec, tied=cfg["tie_word_embeddings"], device=device, std=WEIGHT_STD, generator=generator,
                             quantization=quantization)
    return model, spec, weights, cfg


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stats(times: list[float]) -> tuple[float, float, float]:
    p10, median, p90 = np.percentile(np.asarray(times), [10, 50, 90])
    return float(median), float(p10), float(p90)


def _median(times: list[float]) -> float:
    return float(np.median(np.asarray(times)))


def _ints(values: Iterable[int], what: str, minimum: int = 1) -> tuple[int, ...]:
    values = tuple(values)
    if not values or not all(isinstance(v, int) and v >= minimum for v in values):
        raise ValueError(f"{what} must be integers >= {minimum}, got {values!r}")
    return values


def run_bench(
    models: Iterable[str] | None = None,
    *,
    batches: Iterable[int] | None = None,
    ctxs: Iterable[int] | None = None,
    prompt_lens: Iterable[int] | None = None,
    peers: str = "all",
    backend: str = "auto",
    device: str | torch.device | None = None,
    quick: bool = False,
    steps: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
) -> dict:
    """Run the benchmark; return the result (the JSON document) and, when `out` is given, write
    bench.md, bench.json and bench.png there.

    models: shape names (shapes()) or checkpoint directories; batches, ctxs: the decode sweep;
    prompt_lens: time-to-first-token prompts (batch 1; empty for none); peers: "none", "fast"
    (gpt-fast style) or "all" (also HF transformers eager); quick: a tiny shape and a small sweep
    (explicit arguments still win); steps: timed engine tokens per row; quantization "fp8": each
    model also in FP8 (its layer matrices quantized per output channel, as quantize-at-load does),
    as the model "<name>:fp8" with the engine's rows only (the peers stay bf16; its × peer columns
    compare with the bf16 peer's row); a shape whose bf16 weights cannot fit on the device gets
    only its FP8 rows (the reason is in `errors`); kv_cache_dtype "fp8": the engine's rows with an
    FP8 KV cache, as "<name>:kv-fp8" (after ":fp8" for FP8 weights; the peers keep theirs in bf16).
    """
    validate.quantization(quantization)
    kv_cache_dtype = validate.kv_cache_dtype(kv_cache_dtype)
    if peers not in PEERS:
        raise ValueError(f"peers must be one of {', '.join(PEERS)}, got {peers!r}")
    if device is None:
        if not torch.cuda.is_available() and not quick:
            raise ValueError(
                "no CUDA device: the benchmark measures GPU decoding. Use --quick for a smoke run of the "
                "reference path on a tiny shape, or pass --device cpu to run this sweep on the CPU anyway"
            )
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    models = tuple(models or (QUICK_MODELS if quick else DEFAULT_MODELS))
    batches = _ints(batches or (QUICK_BATCHES if quick else DEFAULT_BATCHES), "batch sizes")
    ctxs = _ints(ctxs or (QUICK_CTXS if quick else DEFAULT_CTXS), "contexts")
    if prompt_lens is None:
        prompt_lens = QUICK_PROMPT_LENS if quick else DEFAULT_PROMPT_LENS
    prompt_lens = _ints(prompt_lens, "prompt lengths") if tuple(prompt_lens) else ()
    counts = dict(QUICK_COUNTS if quick else COUNTS)
    if steps is not None:
        counts["engine"] = Counts(counts["engine"].warmup, _ints([steps], "steps")[0])
    for model in models:
        if model not in shapes() and not Path(model).is_dir():
            shape_config(model)
    notes = [CPU_NOTE] if device.type == "cpu" else []
    if quick:
        notes.append(QUICK_NOTE)
    started = perf_counter()
    run_peers = {"none": (), "fast": ("gptfast",), "all": ("gptfast", "hf_eager")}[peers]
    if device.type != "cuda" and "gptfast" in run_peers:
        run_peers = tuple(p for p in run_peers if p != "gptfast")
        notes.append(GPTFAST_CPU_NOTE)
    # the FP8 model's compiled peer goes with the bf16 model's (same CUDA-graph mode)
    fp8_peers = ("torchao_fp8",) if quantization and "gptfast" in run_peers else ()
    result = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "commit": git_commit(),
        "note": "; ".join(notes) or None,
        "device": str(device),
        "backend": None,
        "peers": [*run_peers, *fp8_peers],
        "torch": torch.__version__,
        "transformers": _transformers_version() if "hf_eager" in run_peers else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "seed": seed,
        "counts": {k: vars(v) for k, v in counts.items()},
        "floor_definition": FLOOR_DEFINITION,
        "read_bw_gbs": None,
        "probe": None,
        "models": {},
        "errors": [],
        "rows": [],
        "ttft": [],
        "generate": [],
    }
    generator = torch.Generator(device=device).manual_seed(seed)
    per_model = len(batches) * len(ctxs) * (1 + len(run_peers)) + len(prompt_lens) * (1 + ("hf_eager" in run_peers))
    if quantization:  # (the FP8 model's rows, its peer's, its prompts)
        per_model += len(batches) * len(ctxs) * (1 + len(fp8_peers)) + len(prompt_lens)
    from tqdm.auto import tqdm

    with tqdm(total=1 + per_model * len(models), desc="read probe", unit="run", disable=not progress) as bar:
        result["read_bw_gbs"], result["probe"] = read_bandwidth(device)
        bar.update()
        for model in models:
            skip = _dense_does_not_fit(model, device, max(batches)) if quantization else None
            if skip:  # (its FP8 rows still run)
                result["errors"].append({"model": model, "peer": None, "error": skip})
                warnings.warn(f"{model}: {skip}", stacklevel=2)
            else:
                _bench_model(model, result, device, backend, batches, ctxs, prompt_lens, run_peers, counts, generator,
                             bar, kv_cache_dtype=kv_cache_dtype)
            if quantization:
                _bench_model(model, result, device, backend, batches, ctxs, prompt_lens, fp8_peers, counts, generator,
                             bar, quantization=quantization, kv_cache_dtype=kv_cache_dtype)
                _compare_with_dense_peers(result)
            result["backend"] = ", ".join(dict.fromkeys(m["backend"] for m in result["models"].values()))
            result["wall_s"] = round(perf_counter() - started, 1)
            if out is not None:  # after every model, so a failure later keeps what was measured
                write_outputs(result, out)
    return result


def _dense_does_not_fit(model: str, device: torch.device, batch: int) -> str | None:
    """Why the bf16 weights of shape `model` cannot be benched on `device` (with the KV cache of a
    short sweep), or None (a checkpoint directory, or a CPU: they are tried)."""
    if model not in shapes() or device.type != "cuda":
        return None
    cfg = shape_config(model)
    spec = spec_from_dict(cfg)
    dense = random_weights(spec, tied=cfg["tie_word_embeddings"], device="meta")
    try:
        table = 0 if dense.tied else dense.embed.nbytes  # (weight_bytes counts what a step streams)
        validate.check_model_fits(spec, weight_bytes(dense) + table, device, torch.bfloat16, batch, 1024)
    except ValueError as e:
        return f"its bf16 rows were skipped: {e}"
    return None


def _random_kv(cache: KVCache, generator) -> None:
    """Fill the KV cache with N(0, 1) values (an FP8 one quantized, a layer at a time)."""
    if not cache.fp8:
        cache.kv.normal_(generator=generator)
        return
    for layer in range(cache.kv.shape[0]):
        x = torch.randn(cache.kv.shape[1:], generator=generator, device=cache.kv.device, dtype=cache.dtype)
        cache.kv[layer], cache.scale[layer] = quantize_kv(x)


def _compare_with_dense_peers(result: dict) -> None:
    """Give the rows of quantized models ("<name>:fp8") the bf16 peers' figures of the same row."""
    dense = {(r["model"], r["batch"], r["ctx"]): r for r in result["rows"] if r["weights"] == "bf16"}
    for row in result["rows"]:
        base = dense.get((row["model"].split(":")[0], row["batch"], row["ctx"]))
        if row["weights"] == "bf16" or base is None:
            continue
        for peer in DENSE_PEERS:
            row[f"{peer}_ms"] = base[f"{peer}_ms"]
            row[f"speedup_vs_{peer}"] = base[f"{peer}_ms"] / row["engine_ms"] if base[f"{peer}_ms"] else None


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError(
            "the HF eager peer needs transformers (pip install transformers), or pass --peers fast"
        ) from exc
    return transformers.__version__


def _bench_model(model, result, device, backend_name, batches, ctxs, prompt_lens, run_peers, counts, generator, bar,
                 quantization=None, kv_cache_dtype="auto"):
    name, spec, weights, cfg = _load_model(model, device, generator, quantization)
    if quantization:
        name = f"{name}:{quantization}"
    if kv_cache_dtype != "auto":
        name = f"{name}:kv-{kv_cache_dtype}"
    wbytes = weight_bytes(weights)
    result["models"][name] = {
        "weights_streamed_bytes": wbytes,
        "parameters": sum(t.numel() for t in _all_tensors(weights)),
        "tied": weights.tied,
        "layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "weights": quantization or "bf16",
    }
    grid = [(b, c) for b in batches for c in ctxs]
    new_tokens = QUICK_GENERATE_TOKENS if result["quick"] else GENERATE_TOKENS
    max_seq = -(-max(max(ctxs) + 1, max(prompt_lens, default=0) + 1, GENERATE_PROMPT + new_tokens + 1) // 128) * 128
    backend_cls = select_backend(backend_name, spec, device, dtype=weights.embed.dtype, max_batch_size=max(batches),
                                 quantization=quantization)
    cache = KVCache.allocate(spec, max(batches), max_seq, dtype=weights.embed.dtype, device=device,
                             kv_cache_dtype=kv_cache_dtype)
    backend = backend_cls(spec, weights, cache)
    result["models"][name]["backend"] = backend.name
    result["models"][name]["kv_cache_bytes"] = cache.nbytes
    # everything the engine holds on the device once built: weights, KV cache, RoPE tables, scratch
    result["models"][name]["device_memory_bytes"] = (
        torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    )
    _random_kv(cache, generator)
    rows = {}
    for batch, ctx in grid:
        bar.set_description(f"{name} engine b{batch} ctx{ctx}")
        tokens = torch.randint(spec.vocab_size, (batch,), device=device, generator=generator)
        positions = torch.full((batch,), ctx, dtype=torch.long, device=device)
        median, p10, p90 = _stats(_time_calls(partial(backend.decode, tokens, positions), counts["engine"], device))
        getattr(backend, "synchronize", lambda: None)()  # the last timed step completed (raises if not)
        nbytes = step_bytes(spec, weights, batch, ctx, kv_cache_dtype)
        floor = nbytes / (result["read_bw_gbs"] * 1e9) * 1e3 if result["read_bw_gbs"] else None
        rows[batch, ctx] = {
            "model": name,
            "batch": batch,
            "ctx": ctx,
            "engine_ms": median,
            "engine_p10_ms": p10,
            "engine_p90_ms": p90,
            "engine_tok_s": batch * 1e3 / median,
            "engine_gbs": nbytes / (median * 1e-3) / 1e9,
            "bytes_per_step": nbytes,
            "weights": quantization or "bf16",  # what the matrices stream as (the floor counts their bytes and scales)
            "kv_cache_dtype": "fp8" if cache.fp8 else str(cache.kv.dtype).removeprefix("torch."),
            "floor_ms": floor,
            "floor_fraction": floor / median if floor is not None else None,
            **{f"{peer}_ms": None for peer in PEER_LABELS},
            **{f"speedup_vs_{peer}": None for peer in PEER_LABELS},
        }
        bar.update()
    ttft = {}
    for length in prompt_lens:
        bar.set_description(f"{name} engine prefill {length}")
        prompt = torch.randint(spec.vocab_size, (length,), device=device, generator=generator)
        median = _median(_time_calls(partial(backend.prefill, [prompt]), counts["ttft"], device, per_call=True))
        ttft[length] = {"model": name, "prompt_len": length, "engine_ms": median, "hf_eager_ms": None}
        bar.update()
    generate = []
    for batch in batches:
        bar.set_description(f"{name} generate b{batch}")
        generate += _bench_generate(name, spec, weights, cache, backend, batch, new_tokens, counts, device, generator)
    if hasattr(backend, "release_weights"):  # the peers multiply the same tensors, row-major
        backend.release_weights()
    del backend, cache
    _release()
    for peer in run_peers:
        if peer != "hf_eager":  # (the compiled peers)
            args = (name, spec, weights, grid, rows, counts["gptfast"], device, generator, bar, peer)
            _run_peer(result, name, peer, _run_compiled_peer, *args)
    if "hf_eager" in run_peers:
        args = (name, spec, weights, cfg, grid, rows, ttft, counts, device, generator, bar)
        _run_peer(result, name, "hf_eager", _run_hf, *args)
    for row in rows.values():
        for peer in PEER_LABELS:
            if row[f"{peer}_ms"] is not None:
                row[f"speedup_vs_{peer}"] = row[f"{peer}_ms"] / row["engine_ms"]
    result["rows"].extend(rows.values())
    result["ttft"].extend(ttft.values())
    result["generate"].extend(generate)
    del weights
    _release()


def _bench_generate(name, spec, weights, cache, backend, batch, new_tokens, counts, device, generator) -> list[dict]:
    """The generate rows of one (model, batch): ms per token through Engine.generate, greedy and
    sampled, beside the bare greedy decode step (no logits written where the backend fuses its
    arg-max) timed back to back at the generation's mean context."""
    engine = Engine(spec, weights, cache, backend, tokenizer=None)
    new_tokens = min(new_tokens, (cache.max_seq_len - 2) // 2)  # (a sweep of short contexts: a short cache)
    prompt_len = min(GENERATE_PROMPT, cache.max_seq_len - new_tokens - 1)
    prompts = torch.randint(spec.vocab_size, (batch, prompt_len), generator=generator, device=device).tolist()
    ctx = prompt_len + new_tokens // 2
    tokens = torch.randint(spec.vocab_size, (batch,), device=device, generator=generator)
    positions = torch.full((batch,), ctx, dtype=torch.long, device=device)
    step = getattr(backend, "decode_step", None)
    bare = partial(step, tokens, positions, want_logits=False) if step else partial(backend.decode, tokens, positions)
    kernel_ms = _median(_time_calls(bare, counts["engine"], device))
    getattr(backend, "synchronize", lambda: None)()
    out = []
    for mode, kwargs in GENERATE_MODES.items():
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, seed=0, **kwargs)
        per_token = []
        for i in range(counts["generate"].warmup + counts["generate"].timed):
            outputs = engine.generate(prompt_token_ids=prompts, sampling=params)
            if i >= counts["generate"].warmup:
                per_token.append(float(np.mean([o.metrics.per_token_latency for o in outputs])) * 1e3)
        ms = _median(per_token)
        out.append({"model": name, "batch": batch, "mode": mode, "prompt_len": prompt_len, "new_tokens": new_tokens,
                    "ctx": ctx, "ms_per_token": ms, "kernel_ms": kernel_ms, "ratio": ms / kernel_ms})
    return out


def _all_tensors(weights: Weights):
    seen = {id(t): t for t in (weights.embed, weights.final_norm, weights.lm_head)}
    for layer in weights.layers:
        seen.update((id(t), t) for t in vars(layer).values() if t is not None)
    return seen.values()


def _run_peer(result: dict, model: str, peer: str, run: Callable, *args) -> None:
    """Run one peer's sweep. If it fails, record the error (its figures stay null) and go on: the
    engine's figures and the other peer's still stand. A problem it reports is recorded too."""
    try:
        problem = run(*args)
    except Exception as exc:  # a peer's failure (compile error, OOM, transformers API) must not lose the run
        problem = "failed: " + f"{type(exc).__name__}: {exc}".splitlines()[0][:500] + " (its figures are left empty)"
    if problem:
        result["errors"].append({"model": model, "peer": peer, "error": problem})
        warnings.warn(f"{model}, {peer} peer: {problem}", stacklevel=2)
    _release()


def _run_compiled_peer(name, spec, weights, grid, rows, counts, device, generator, bar, peer_name) -> str | None:
    """A compiled peer over the grid (`peer_name`: gptfast, or torchao_fp8 on FP8 weights), under its
    Inductor settings; returns a problem to record where CUDA graphs were skipped."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from .baselines import GptFast, TorchaoFp8

    label = PEER_LABELS[peer_name]
    cls = {c.name: c for c in (GptFast, TorchaoFp8)}[peer_name]
    skips = counters["inductor"]["cudagraph_skips"]
    peer = cls(spec, weights, max(c for _, c in grid), compile=True)
    try:
        with inductor_config.patch(cls.INDUCTOR_SETTINGS):  # (compiled at the first call of each shape)
            for batch, ctx in grid:
                bar.set_description(f"{name} {label} b{batch} ctx{ctx}")
                peer.setup(batch, ctx, generator=generator)
                tokens = torch.randint(spec.vocab_size, (batch,), device=device, generator=generator)
                position = torch.tensor([ctx], device=device)
                rows[batch, ctx][f"{peer_name}_ms"] = _median(
                    _time_calls(partial(peer.decode, tokens, position), counts, device)
                )
                peer.caches = []
                _release()
                bar.update()
        skipped = counters["inductor"]["cudagraph_skips"] - skips
    finally:
        peer.release()
    if skipped:
        return (
            f"torch.compile skipped CUDA graphs {skipped} time(s) (the log says why): its figures understate {label}"
        )
    return None


def _run_hf(name, spec, weights, cfg, grid, rows, ttft, counts, device, generator, bar):
    from .baselines import HFEager, hf_config

    peer = HFEager(spec, weights, hf_config(cfg))
    try:
        for batch, ctx in grid:
            bar.set_description(f"{name} HF eager b{batch} ctx{ctx}")
            peer.setup(batch, ctx, generator=generator)
            tokens = torch.randint(spec.vocab_size, (batch,), device=device, generator=generator)
            times = _time_calls(partial(peer.decode, tokens), counts["hf_eager"], device)
            rows[batch, ctx]["hf_eager_ms"] = _median(times)
            peer.release()
            _release()
            bar.update()
        for length, entry in ttft.items():
            bar.set_description(f"{name} HF eager prefill {length}")
            prompt = torch.randint(spec.vocab_size, (length,), device=device, generator=generator)
            times = _time_calls(partial(peer.prefill, prompt), counts["ttft"], device, per_call=True)
            entry["hf_eager_ms"] = _median(times)
            bar.update()
    finally:
        peer.release()


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def format_table(result: dict) -> str:
    """The result as markdown (llama-bench style): a header, the decode table, the prefill table."""
    lines = []
    if result["note"]:
        lines.append(f"> **{result['note']}**\n")
    bw = f"{result['read_bw_gbs']:,.0f} GB/s" if result["read_bw_gbs"] else "not measured (no GPU)"
    peers = [*DENSE_PEERS, *(p for p in PEER_LABELS if p not in DENSE_PEERS and p in result.get("peers", ()))]
    lines += [
        f"flashformer bench: {result['gpu'] or result['device']}, commit {result['commit'] or 'unknown'}, "
        f"engine backend `{result['backend']}`, torch {result['torch']}"
        + (f", transformers {result['transformers']}" if result["transformers"] else ""),
        "",
        (
            f"read bandwidth (streaming probe, same process): {bw}. "
            "floor = bytes a step must read (weights streamed + KV cache) / read bandwidth. "
            f"engine: median of {result['counts']['engine']['timed']} tokens (p10–p90); "
            "× peer = peer ms / engine ms (> 1: the engine is faster)."
        ),
        "",
        "| model | batch | ctx | engine ms | p10–p90 ms | tok/s | GB/s | floor ms | % of floor | "
        + "".join(f"{PEER_LABELS[p]} ms | × {PEER_LABELS[p]} | " for p in peers).rstrip(),
        "| --- |" + " ---: |" * (8 + 2 * len(peers)),
    ]
    for r in result["rows"]:
        frac = None if r["floor_fraction"] is None else r["floor_fraction"] * 100
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['ctx']} | {_fmt(r['engine_ms'], 3)} "
            f"| {_fmt(r['engine_p10_ms'], 3)}–{_fmt(r['engine_p90_ms'], 3)} | {_fmt(r['engine_tok_s'], 1)} "
            f"| {_fmt(r['engine_gbs'], 0)} | {_fmt(r['floor_ms'], 3)} | {_fmt(frac, 1)} |"
            + "".join(f" {_fmt(r.get(f'{p}_ms'), 3)} | {_fmt(r.get(f'speedup_vs_{p}'))} |" for p in peers)
        )
    if result["ttft"]:
        lines += [
            "",
            f"Time to first token (batch 1, synchronized wall time, median of {result['counts']['ttft']['timed']}):",
            "",
            "| model | prompt tokens | engine ms | HF eager ms |",
            "| --- | ---: | ---: | ---: |",
        ]
        for t in result["ttft"]:
            lines.append(
                f"| {t['model']} | {t['prompt_len']} | {_fmt(t['engine_ms'], 2)} | {_fmt(t['hf_eager_ms'], 2)} |"
            )
    if result.get("generate"):
        g = result["generate"][0]
        lines += [
            "",
            f"Generation through `engine.generate` ({g['prompt_len']}-token prompts, {g['new_tokens']} new tokens a "
            f"row; sampled: {', '.join(f'{k}={v}' for k, v in GENERATE_MODES['sampled'].items())}; median of "
            f"{result['counts']['generate']['timed']} runs of the mean time per token after the first) against "
            "the bare greedy decode step back to back at the mean context (kernel ms):",
            "",
            "| model | batch | mode | ms per token | kernel ms | ratio |",
            "| --- | ---: | --- | ---: | ---: | ---: |",
        ]
        for r in result["generate"]:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['mode']} | {_fmt(r['ms_per_token'], 3)} | {_fmt(r['kernel_ms'], 3)} "
                f"| {_fmt(r['ratio'], 3)} |"
            )
    for error in result["errors"]:
        lines += ["", f"- {error['model']}, {error['peer']} peer: {error['error']}"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> bool:
    """Latency vs context (one panel per model and batch) for the engine, the peers and the floor,
    as a PNG. Returns False (with a warning) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no PNG plot (pip install matplotlib)", stacklevel=2)
        return False
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    batches = sorted({r["batch"] for r in result["rows"]})
    ctxs = sorted({r["ctx"] for r in result["rows"]})
    fig, axes = plt.subplots(
        len(models), len(batches), figsize=(3.6 * len(batches), 3.2 * len(models) + 1.2), squeeze=False
    )
    series = [
        ("engine_ms", f"engine ({result['backend']})", {"marker": "o", "color": "C0"}),
        ("gptfast_ms", "gpt-fast (torch.compile)", {"marker": "s", "color": "C1"}),
        ("hf_eager_ms", "HF transformers eager", {"marker": "^", "color": "C2"}),
        ("torchao_fp8_ms", "torchao FP8 (torch.compile)", {"marker": "D", "color": "C3"}),
        ("floor_ms", "floor (bytes / read bw)", {"linestyle": "--", "color": "black"}),
    ]
    number = FuncFormatter(lambda v, _: f"{v:g}")
    legend = {}
    for i, model in enumerate(models):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            rows = sorted(
                (r for r in result["rows"] if r["model"] == model and r["batch"] == batch), key=lambda r: r["ctx"]
            )
            for key, label, style in series:
                points = [(r["ctx"], r.get(key)) for r in rows if r.get(key) is not None]
                if points:
                    (legend[label],) = ax.plot(*zip(*points), label=label, **style)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(ctxs))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1024:g}K" if v >= 1024 else f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(number)
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{model}, batch {batch}", fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xlabel("context (tokens)", fontsize=8)
            if j == 0:
                ax.set_ylabel("ms per decode step", fontsize=8)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=4, fontsize=8)
    title = f"flashformer bench: {result['gpu'] or result['device']}, commit {result['commit'] or 'unknown'}"
    notes = [textwrap.fill(n, width=int(20 * len(batches) + 30)) for n in (result["note"] or "").split("; ") if n]
    fig.suptitle("\n".join([title, *notes]), fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(result: dict, out: str | Path) -> dict[str, Path]:
    """Write bench.md, bench.json and (with matplotlib) bench.png under `out`; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "bench.md", "json": out / "bench.json", "plot": out / "bench.png"}
    paths["table"].write_text(format_table(result))
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    if not plot(result, paths["plot"]):
        paths.pop("plot").unlink(missing_ok=True)  # no stale plot of another run next to these results
    return paths


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `flashformer bench`."""
    parser.add_argument(
        "-m",
        "--model",
        action="append",
        help=f"a shape name ({', '.join(shapes())}: random bf16 weights, no download) "
        f"or a checkpoint directory; repeat for several (default: {' and '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument("--batch", type=_int_list, default=None, help="batch sizes (default 1,2,4,8)")
    parser.add_argument("--ctx", type=_int_list, default=None, help="contexts in tokens (default 128,1024,8192,32768)")
    parser.add_argument(
        "--prompt-len",
        type=_int_list,
        default=None,
        help="time-to-first-token prompt lengths (default 128,1024,8192; '' for none)",
    )
    parser.add_argument(
        "--peers", default="all", choices=PEERS, help="none; fast: the gpt-fast-style peer; all: also HF eager"
    )
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--device", default=None, help="torch device (default: cuda; without a GPU only --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed engine tokens per row (default 100)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny shape, a small sweep (< 1 minute)")
    parser.add_argument(
        "--out", default=None, help=f"output directory (default ./{DEFAULT_OUT}; with --render, the JSON's directory)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quantization", default=None, choices=validate.QUANTIZATIONS,
        help="also bench each model with its layer matrices in FP8 e4m3 (per-channel scales), as <model>:fp8",
    )
    parser.add_argument(
        "--kv-cache-dtype", default="auto", choices=validate.KV_CACHE_DTYPES,
        help="the engine's KV cache: auto (the model dtype) or fp8 (e4m3 with a scale per token and kv head), "
        "as <model>:kv-fp8",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--render",
        metavar="JSON",
        default=None,
        help="measure nothing: write bench.md and bench.png from an existing bench.json "
        "(e.g. on a machine with matplotlib, for a run made where it is missing)",
    )


def main(args) -> int:
    """The `flashformer bench` subcommand (see cli._add_bench)."""
    if args.render is not None:
        path = Path(args.render)
        if not path.is_file():
            raise FileNotFoundError(f"no bench result at {path}")
        result = json.loads(path.read_text())
        out = Path(args.out) if args.out is not None else path.parent
        write_outputs(result, out)
    else:
        out = Path(args.out if args.out is not None else DEFAULT_OUT)
        result = run_bench(
            args.model,
            batches=args.batch,
            ctxs=args.ctx,
            prompt_lens=args.prompt_len,
            peers=args.peers,
            backend=args.backend,
            device=args.device,
            quick=args.quick,
            steps=args.steps,
            seed=args.seed,
            out=out,
            progress=not args.no_progress,
            quantization=args.quantization,
            kv_cache_dtype=args.kv_cache_dtype,
        )
    print(format_table(result))
    written = [str(out / name) for name in ("bench.md", "bench.json", "bench.png") if (out / name).is_file()]
    print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 0
