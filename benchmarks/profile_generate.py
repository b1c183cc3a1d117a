"""Where generate's time per token goes beside the bare decode step (issue 18): the device's
timeline of Engine.generate (torch.profiler's kernel records) split into the decode step's kernel,
the sampler's (or the greedy bookkeeping's) kernel and the idle gaps between them, per step, for
the bare step launched back to back (without logits, and with them written: `bare_logits`, what the
write costs without a sampler after it) and for generate greedy and sampled, at batch 1 and 8.

Beside the medians, each run's per-step mean, 90th percentile and maximum (step start to step
start): a mean above the median says that some steps waited longer than the rest (the host's pauses
show up so, which a median hides and generate's mean time per token does not). With --trace
(instrumented build) each run's steps are traced and the last step's start time of each CTA (one an
SM) is summarized: how far apart the SMs began that step, and which CTAs began last (a reading to
test: after a sampler, those on the SMs that held its CTAs).

    python benchmarks/profile_generate.py [--models llama-3.2-1b] [--batch 1,8] [--new-tokens 128]
        [--trace] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

from flashformer import _core
from flashformer.bench import GENERATE_MODES, GENERATE_PROMPT, _load_model
from flashformer.engine import Engine
from flashformer.megakernel import MegakernelBackend
from flashformer.reference import KVCache
from flashformer.sampling import SamplingParams
from profile_step import traced  # (beside this script)


def kernel_records(fn) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every kernel `fn` runs on the device, in start order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    out = [(e["name"], float(e["ts"]), float(e["ts"]) + float(e["dur"]))
           for e in events if e.get("cat") == "kernel" and "dur" in e]
    return sorted(out, key=lambda r: r[1])


def kind(name: str) -> str:
    if "megakernel" in name:
        return "step"
    if "sample_kernel" in name:
        return "sampler"
    if "commit_kernel" in name:
        return "commit"
    return "other"


def breakdown(records, skip: int = 8) -> dict:
    """Medians over the decode steps (after the first `skip`) of the step kernel's time, the
    kernel after it (sampler or commit), and the gaps: step end -> next kernel start, and the
    kernel after the step's end -> the next step's start; `per_step` is step start to step start."""
    steps = [i for i, r in enumerate(records) if kind(r[0]) == "step"]
    rows = []
    for a, b in zip(steps[skip:], steps[skip + 1:]):
        between = records[a + 1:b]
        row = {"step_us": records[a][2] - records[a][1], "per_step_us": records[b][1] - records[a][1]}
        if between:
            row["after_kind"] = "+".join(sorted({kind(r[0]) for r in between}))
            row["after_us"] = sum(r[2] - r[1] for r in between)
            row["gap_to_after_us"] = between[0][1] - records[a][2]
            row["gap_to_next_us"] = records[b][1] - between[-1][2]
        else:
            row["gap_to_next_us"] = records[b][1] - records[a][2]
        rows.append(row)
    if not rows:
        return {}
    out = {"steps": len(rows)}
    for key in dict.fromkeys(k for r in rows for k in r):  # (every key any step has, in order)
        values = [r[key] for r in rows if key in r]
        out[key] = statistics.mode(values) if key == "after_kind" else round(statistics.median(values), 2)
    per_step = np.array([r["per_step_us"] for r in rows])
    out.update(per_step_mean_us=round(float(per_step.mean()), 2),
               per_step_p90_us=round(float(np.percentile(per_step, 90)), 2),
               per_step_max_us=round(float(per_step.max()), 2))
    return out


def start_spread(raw: np.ndarray, late: int = 8) -> dict:
    """A step trace ([CTAs, words]: trace.hpp, profile_step.traced; a CTA an SM): each CTA's
    start relative to the first one's, as their median and spread, and the `late` CTAs (blockIdx)
    that started last with their delays (us)."""
    start = raw[:, _core.load().TRACE_LAYOUT["header"].index("start_ns")].astype(np.float64)
    rel = (start - start.min()) / 1e3
    order = np.argsort(-rel, kind="stable")[:late]
    return {"start_p50_us": round(float(np.median(rel)), 2), "start_spread_us": round(float(rel.max()), 2),
            "late_ctas": [int(i) for i in order], "late_us": [round(float(rel[i]), 2) for i in order]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-3.2-1b")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--trace", action="store_true", help="also the last step's start of each CTA (instrumented build)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.trace and not _core.load().INSTRUMENTED:
        ap.error("--trace needs the instrumented kernels: build with -Ccmake.define.FLASHFORMER_INSTRUMENTED=ON "
                 "(scripts/gpu_check.sh does)")
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    for model in args.models.split(","):
        name, spec, weights, _ = _load_model(model, device, gen, args.quantization)
        max_seq = GENERATE_PROMPT + args.new_tokens + 8
        batches = [int(b) for b in args.batch.split(",")]
        cache = KVCache.allocate(spec, max(batches), max_seq, dtype=torch.bfloat16, device=device)
        backend = MegakernelBackend(spec, weights, cache)  # (packs the weights in place: one per model)
        engine = Engine(spec, weights, cache, backend, tokenizer=None)
        for batch in batches:
            prompts = torch.randint(spec.vocab_size, (batch, GENERATE_PROMPT), generator=gen, device=device).tolist()
            ctx = GENERATE_PROMPT + args.new_tokens // 2
            tokens = torch.randint(spec.vocab_size, (batch,), device=device, generator=gen)
            positions = torch.full((batch,), ctx, dtype=torch.long, device=device)
            row = {"model": name, "batch": batch}
            for label, want_logits in (("bare", False), ("bare_logits", True)):
                def bare_run(n=args.new_tokens, want_logits=want_logits):
                    for _ in range(n):
                        backend.decode_step(tokens, positions, want_logits=want_logits)

                bare_run(16)
                row[label] = breakdown(kernel_records(bare_run))
                if args.trace:
                    row[label]["last_step"] = start_spread(traced(backend, bare_run))
            for mode, kwargs in GENERATE_MODES.items():
                params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, seed=0, **kwargs)
                engine.generate(prompt_token_ids=prompts, sampling=params)  # warm-up
                run = partial(engine.generate, prompt_token_ids=prompts, sampling=params)
                row[mode] = breakdown(kernel_records(run))
                if args.trace:
                    row[mode]["last_step"] = start_spread(traced(backend, run))
            results.append(row)
            print(json.dumps(row), flush=True)
        del engine, backend, cache, weights
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
