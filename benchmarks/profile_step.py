"""Where a megakernel decode step's time goes (developer tool; needs a Hopper GPU).

For each model shape (random bf16 weights) and (batch, context) case:
  - kernel time of the normal step and of timing variants (MegakernelEngine.timing_variant: parts
    of the step left out; outputs are garbage), launches interleaved round-robin; with --sweep, at
    every combination of engine tuning attributes' values (e.g. inflight_stages_limit), each with
    its own trace summary;
  - the step trace (cpp/include/flashformer/trace.hpp): per SM and op, when the consumers started,
    met the dependency, finished and signalled; cycles they waited for weight stages to land; and
    cycles the producer waited for free stages (slot_wait) and for in-flight copies to land
    (land_wait). Summarized per op type as wall-clock time on the critical path (an op's span =
    its last SM's completion - the previous op's).

  python benchmarks/profile_step.py --models SHAPE[,SHAPE] --cases 1x128,8x1024 --out DIR
  python benchmarks/profile_step.py --ncu-step ...   # warm up, then one untraced step for ncu (gpu_check.sh)

Prints compact tables; writes DIR/profile.json with every figure and the trace summaries, and
DIR/trace-<model>-<batch>x<ctx>.npz with each case's raw trace.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from flashformer import _core
from flashformer.bench import DEFAULT_MODELS, WEIGHT_STD, git_commit, shape_config, step_bytes
from flashformer.config import spec_from_dict
from flashformer.megakernel import MegakernelBackend
from flashformer.reference import KVCache
from flashformer.weights import random_weights


def random_model(model: str, layers: int | None, quantization: str | None, max_batch: int, max_seq: int,
                 kv_cache_dtype: str, gen: torch.Generator):
    """(spec, weights, cache, backend) of shape `model` on random weights (`layers` of them if given),
    the megakernel's KV cache filled with uniform(-1, 1) past positions (FP8 has no uniform_: drawn in
    bf16, then rounded; the scales stay 1), all drawn from `gen`. (Also dump_logits.py's.)"""
    cfg = shape_config(model)
    if layers:
        cfg["num_hidden_layers"] = layers
    spec = spec_from_dict(cfg)
    w = random_weights(spec, tied=cfg["tie_word_embeddings"], device="cuda", std=WEIGHT_STD, generator=gen,
                       quantization=quantization)
    cache = KVCache.allocate(spec, max_batch, max_seq, dtype=w.embed.dtype, device="cuda",
                             kv_cache_dtype=kv_cache_dtype)
    mk = MegakernelBackend(spec, w, cache)
    kv = mk.kv_cache
    if kv.element_size() == 1:
        kv.copy_(torch.empty(kv.shape, dtype=torch.bfloat16, device="cuda").uniform_(-1, 1, generator=gen))
    else:
        kv.uniform_(-1, 1, generator=gen)
    return spec, w, cache, mk


def launch(mk: MegakernelBackend, batch: int, stream: int) -> None:
    """One step launched from the backend's own input buffers (filled by the caller)."""
    mk.engine.step(mk.tokens.data_ptr(), mk.positions.data_ptr(), mk.next_tokens.data_ptr(), mk.logits.data_ptr(),
                   batch, stream)


def kernel_ms(mk: MegakernelBackend, batch: int, n: int = 30) -> float:
    """Median CUDA-event time of the step launch alone (inputs already in place)."""
    e, stream = mk.engine, torch.cuda.current_stream().cuda_stream
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        start.record()
        launch(mk, batch, stream)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    e.check(stream)
    return statistics.median(times)


def interleaved_ms(mk: MegakernelBackend, batch: int, variants: dict[str, int], rounds: int = 40) -> dict[str, float]:
    """Median kernel time of each timing variant, launches interleaved round-robin so that clock
    and thermal drift hit every variant alike."""
    e, stream = mk.engine, torch.cuda.current_stream().cuda_stream
    events = {name: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
              for name in variants}
    for r in range(rounds):
        for name, v in variants.items():
            e.timing_variant = v
            start, end = events[name][r]
            start.record()
            launch(mk, batch, stream)
            end.record()
    e.timing_variant = 0
    torch.cuda.synchronize()
    e.check(stream)
    return {name: statistics.median(a.elapsed_time(b) for a, b in pairs) for name, pairs in events.items()}


def decode_ms(mk: MegakernelBackend, tokens, positions, n: int = 30) -> float:
    """Median time of the backend's decode() (the launch, the error check, the logits copy)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        start.record()
        mk.decode(tokens, positions)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def task_ops(layers: int) -> list[tuple[str, int]]:
    """(op name, layer) of each trace task, in the kernel's order (ops.hpp, through the core)."""
    return [tuple(t) for t in _core.load().step_tasks(layers)]


def traced(mk: MegakernelBackend, fn, variant: int = 0) -> np.ndarray:
    """fn() with the step trace on (under timing variant `variant`); every traced step overwrites
    the buffer, so it holds the last one's: [sms, header + tasks * fields] uint64."""
    e = mk.engine
    buf = torch.zeros(e.trace_words, dtype=torch.int64, device=mk.device)
    e.trace = buf.data_ptr()
    e.timing_variant = variant
    try:
        fn()
        return buf.view(e.num_sms, -1).cpu().numpy().view(np.uint64)  # (the copy waits for fn's steps)
    finally:
        e.trace = 0
        e.timing_variant = 0


def take_trace(mk: MegakernelBackend, batch: int, variant: int = 0) -> np.ndarray:
    """One traced step (under timing variant `variant`): [sms, header + tasks * fields] uint64."""
    stream = torch.cuda.current_stream().cuda_stream

    def step():
        launch(mk, batch, stream)
        mk.engine.check(stream)

    return traced(mk, step, variant)


def summarize_trace(raw: np.ndarray, layers: int) -> dict:
    """Per op type: critical-path wall time and per-SM means of each phase (ms)."""
    layout = _core.load().TRACE_LAYOUT
    nh, fields = len(layout["header"]), layout["fields"]
    head = raw[:, :nh].astype(np.float64)
    h = dict(zip(layout["header"], head.T))
    t0 = h["start_ns"].min()
    ghz = (h["end_cycles"] - h["start_cycles"]) / np.maximum(h["end_ns"] - h["start_ns"], 1)  # cycles per ns, per SM
    tasks = raw[:, nh:].reshape(raw.shape[0], -1, len(fields)).astype(np.float64)
    f = {name: tasks[:, :, i] for i, name in enumerate(fields)}
    ran = f["task_start_ns"] > 0  # (sm, task): this SM had units of the task
    ns = lambda key: np.where(ran, f[key] - t0, np.nan)  # noqa: E731
    start, ready, computed, signalled = ns("task_start_ns"), ns("ready_ns"), ns("computed_ns"), ns("signalled_ns")
    synced = ns("synced_ns")
    produce_start = ns("produce_start_ns")
    data_wait = np.where(ran, f["data_wait_cycles"] / ghz[:, None], np.nan)
    slot_wait = np.where(ran, f["slot_wait_cycles"] / ghz[:, None], np.nan)
    # (older builds have no land_wait field: their slot_wait includes it)
    land_wait = np.where(ran, f.get("land_wait_cycles", np.zeros_like(ran)) / ghz[:, None], np.nan)
    done = np.nanmax(signalled, axis=0)  # each task's completion (its last SM)
    ops = task_ops(layers)
    per_op: dict[str, dict] = {}
    prev_done = 0.0
    for i, (name, _) in enumerate(ops):
        d = per_op.setdefault(name, dict(span=0.0, dep_wait=0.0, compute=0.0, compute_max=0.0, signal=0.0, fence=0.0,
                                         data_wait=0.0, slot_wait=0.0, land_wait=0.0, gap=0.0, lead=0.0, tasks=0))
        d["span"] += done[i] - prev_done
        prev_done = done[i]
        d["dep_wait"] += np.nanmean(ready[:, i] - start[:, i])
        d["compute"] += np.nanmean(computed[:, i] - ready[:, i])
        d["compute_max"] += np.nanmax(computed[:, i] - ready[:, i])
        d["signal"] += np.nanmean(signalled[:, i] - computed[:, i])
        d["fence"] += np.nanmean(signalled[:, i] - synced[:, i])  # the release (fence + reduction) alone
        d["data_wait"] += np.nanmean(data_wait[:, i])
        d["slot_wait"] += np.nanmean(slot_wait[:, i])
        d["land_wait"] += np.nanmean(land_wait[:, i])
        if i:  # consumers' time between the previous task's signal and this task's start
            d["gap"] += np.nanmean(start[:, i] - np.where(ran[:, :i], signalled[:, :i], 0.0).max(axis=1))
        d["lead"] += np.nanmean(ready[:, i] - produce_start[:, i])  # how far ahead the producer was
        d["tasks"] += 1
    for d in per_op.values():
        for k in ("span", "dep_wait", "compute", "compute_max", "signal", "fence", "data_wait", "slot_wait", "land_wait",
                  "gap", "lead"):
            d[k] = float(d[k]) / 1e6
        d["lead"] /= d["tasks"]  # mean per task, ms
    return dict(
        span_ms=float((h["end_ns"].max() - t0) / 1e6),
        sm_end_spread_ms=float((h["end_ns"].max() - h["end_ns"].min()) / 1e6),
        clock_ghz=float(np.median(ghz)),
        per_op=per_op,
    )


def format_trace(s: dict) -> str:
    cols = ("span", "dep_wait", "compute", "compute_max", "data_wait", "slot_wait", "land_wait", "signal", "fence", "gap",
            "lead")
    lines = [
        f"  trace: span {s['span_ms']:.3f} ms, SM end spread {s['sm_end_spread_ms']:.3f} ms, clock {s['clock_ghz']:.2f} GHz",
        "  op         " + " ".join(f"{c:>9}" for c in cols) + "   (ms; per-SM means summed over layers; lead: mean per task)",
    ]
    for name, d in s["per_op"].items():
        lines.append(f"  {name:<10} " + " ".join(f"{d[c]:9.3f}" for c in cols))
    total = {c: sum(d[c] for d in s["per_op"].values()) for c in cols}
    lines.append(f"  {'total':<10} " + " ".join(f"{total[c]:9.3f}" for c in cols))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(reversed(DEFAULT_MODELS)), help="shape names (flashformer bench's)")
    ap.add_argument("--cases", default="1x128,8x1024", help="comma-separated BATCHxCONTEXT")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (ncu runs)")
    ap.add_argument("--variants", default="all", help="'all', 'none', or comma-separated TIMING_VARIANTS sums by name")
    ap.add_argument("--sweep", action="append", default=[], metavar="ATTR=V1,V2",
                    help="time the step at each value of a MegakernelEngine tuning attribute (repeatable: every "
                    "combination), e.g. inflight_stages_limit=2,4 --sweep weight_l2_policy=0,1")
    ap.add_argument("--sweep-variants", default="all,stream_only",
                    help="timing variants measured at each swept combination (comma-separated names)")
    ap.add_argument("--trace-variants", default="",
                    help="timing variants (comma-separated names) whose step trace is also summarized, e.g. "
                    "handshake_only: its slot_wait and data_wait tell whether the producer or the consumers set the pace")
    ap.add_argument("--ncu-step", action="store_true", help="warm up, then one step per case (for ncu --launch-skip)")
    ap.add_argument("--quantization", default=None, choices=["fp8"],
                    help="the layer matrices in FP8 e4m3, per-channel scales (as flashformer bench --quantization)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                    help="the KV cache: the model dtype, or FP8 e4m3 with scales (as flashformer bench --kv-cache-dtype)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    C = _core.load()
    if not C.INSTRUMENTED and not args.ncu_step:
        ap.error("timing variants and the step trace need the instrumented kernels: build with "
                 "-Ccmake.define.FLASHFORMER_INSTRUMENTED=ON (scripts/gpu_check.sh does)")
    V = C.TIMING_VARIANTS
    four = V["skip_waits"] | V["skip_attention"] | V["skip_norm"] | V["skip_epilogue"]
    known = {
        **V,  # every single flag by its own name
        "all": 0,
        "no_waits": V["skip_waits"],
        "no_attention": V["skip_attention"],
        "no_norm": V["skip_norm"],
        "no_epilogue": V["skip_epilogue"],
        "none_of_four": four,
        "stream_only": four | V["skip_math"],
        "no_loads": V["skip_loads"],  # no weight traffic: dependencies and the consumers' own pace
        "consumers_only": four | V["skip_loads"],  # no weight traffic, no waits: the consumers' own pace
        "no_reduce": V["skip_reduce"],
        "consumers_no_reduce": four | V["skip_loads"] | V["skip_reduce"],  # the stage loop alone
        "handshake_only": four | V["skip_loads"] | V["skip_math"],  # the ring's barriers alone, no data
    }
    known["no_fence"] = V["relaxed_signals"]  # op signals without their release fence
    variants = known
    if args.variants == "none":
        variants = {"all": 0}
    elif args.variants != "all":
        # (a variant this build does not know is left out: `compare` runs older builds with the same arguments)
        variants = {"all": 0, **{k: known[k] for k in args.variants.split(",") if k in known}}
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    sweeps = [(a, [int(v) for v in vs.split(",")]) for a, vs in (sw.split("=") for sw in args.sweep)]
    sweep_variants = args.sweep_variants.split(",")
    trace_variants = [k for k in args.trace_variants.split(",") if k]
    for flag, names in (("--sweep-variants", sweep_variants), ("--trace-variants", trace_variants)):
        unknown = [k for k in names if k not in known]
        if unknown:
            ap.error(f"unknown {flag} {unknown}; known: {sorted(known)}")
    result = {"commit": git_commit(), "device": torch.cuda.get_device_name(), "models": {}}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for model in args.models.split(","):
        max_ctx = max(ctx for _, ctx in cases)
        spec, w, cache, mk = random_model(model, args.layers, args.quantization, max(b for b, _ in cases), max_ctx + 8,
                                          args.kv_cache_dtype, gen)
        label = model + (f":{args.quantization}" if args.quantization else "")
        label += f":kv-{args.kv_cache_dtype}" if args.kv_cache_dtype != "auto" else ""
        rows = result["models"].setdefault(label, {})
        for batch, ctx in cases:
            tokens = torch.randint(0, spec.vocab_size, (batch,), device="cuda", generator=gen)
            positions = torch.full((batch,), ctx, device="cuda")
            for _ in range(3):
                mk.decode(tokens, positions)
            # kernel_ms and take_trace launch from the backend's own input buffers
            mk.tokens[:batch].copy_(tokens)
            mk.positions[:batch].copy_(positions)
            torch.cuda.synchronize()
            if args.ncu_step:
                mk.decode(tokens, positions)
                continue
            row: dict = {"decode_ms": decode_ms(mk, tokens, positions)}
            row.update(interleaved_ms(mk, batch, variants))
            if sweeps:  # every combination of the swept values: the chosen variants and a trace
                attrs = [a for a, _ in sweeps]
                defaults = [getattr(mk.engine, a) for a in attrs]
                swept = {}
                for values in itertools.product(*(vs for _, vs in sweeps)):
                    for a, v in zip(attrs, values):
                        setattr(mk.engine, a, v)
                    key = ",".join(f"{a}={v}" for a, v in zip(attrs, values))
                    times = interleaved_ms(mk, batch, {k: known[k] for k in sweep_variants})
                    summary = summarize_trace(take_trace(mk, batch), spec.num_layers)
                    swept[key] = {**times, "trace": summary}
                    print(f"{label} batch {batch} ctx {ctx} {key}: "
                          + " ".join(f"{k} {v:.3f}" for k, v in times.items()), flush=True)
                    print(format_trace(summary), flush=True)
                for a, v in zip(attrs, defaults):
                    setattr(mk.engine, a, v)
                row["sweep"] = swept
            floor_bytes = step_bytes(spec, w, batch, ctx, args.kv_cache_dtype)
            row["bytes"] = floor_bytes
            raw = take_trace(mk, batch)
            row["trace"] = summarize_trace(raw, spec.num_layers)
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                np.savez_compressed(Path(args.out, f"trace-{model}-{batch}x{ctx}.npz"), raw=raw)
            rows[f"{batch}x{ctx}"] = row
            times = " ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
            print(f"{label} batch {batch} ctx {ctx} ({floor_bytes / 1e9:.2f} GB): {times}", flush=True)
            print(format_trace(row["trace"]), flush=True)
            for name in trace_variants:
                row[f"trace_{name}"] = summarize_trace(take_trace(mk, batch, known[name]), spec.num_layers)
                print(f"  under {name}:\n{format_trace(row[f'trace_{name}'])}", flush=True)
        del mk, w
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "profile.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
