"""Where a megakernel engine's prefill (its time to first token) goes (developer tool; needs a GPU).

For each model shape (random bf16 weights) and prompt length: the prefill's synchronized wall time
(median, as `flashformer bench` times TTFT), then one prefill under torch.profiler, its GPU time
per kernel summed by name, biggest first, with each kernel's share of the profiled prefill.

  python benchmarks/profile_prefill.py [--models SHAPE[,SHAPE]] [--prompt-lens 1024] [--out DIR]

(default: the bench's largest default shape)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from flashformer.bench import DEFAULT_MODELS, WEIGHT_STD, shape_config
from flashformer.config import spec_from_dict
from flashformer.megakernel import MegakernelBackend
from flashformer.reference import KVCache
from flashformer.weights import random_weights


def profile(model: str, length: int, timed: int, top: int) -> dict:
    cfg = shape_config(model)
    spec = spec_from_dict(cfg)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = random_weights(spec, tied=cfg["tie_word_embeddings"], device="cuda", std=WEIGHT_STD, generator=gen)
    cache = KVCache.allocate(spec, 1, length + 128, dtype=torch.bfloat16, device="cuda")
    backend = MegakernelBackend(spec, weights, cache)
    prompt = torch.randint(0, spec.vocab_size, (length,), device="cuda", generator=gen)
    times = []
    for i in range(2 + timed):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        backend.prefill([prompt])
        torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        backend.prefill([prompt])
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(e.name, []).append(e.device_time_total / 1e3)
    rows = sorted(((sum(v), len(v), k) for k, v in kernels.items()), reverse=True)
    total = sum(r[0] for r in rows)
    print(f"\n{model} prompt {length}: prefill wall {statistics.median(times):.2f} ms (median of {timed}); "
          f"GPU kernels {total:.2f} ms in {sum(r[1] for r in rows)} launches")
    print(f"{'ms':>8} {'share':>6} {'calls':>6}  kernel")
    for ms, calls, name in rows[:top]:
        print(f"{ms:8.3f} {100 * ms / total:5.1f}% {calls:6d}  {name[:110]}")
    del backend, weights, cache
    torch.cuda.empty_cache()
    return {"model": model, "prompt_len": length, "wall_ms": times, "gpu_ms": total,
            "kernels": [{"name": n, "ms": ms, "calls": c} for ms, c, n in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS[-1])
    ap.add_argument("--prompt-lens", default="1024")
    ap.add_argument("--timed", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = [profile(m, int(n), args.timed, args.top) for m in args.models.split(",") for n in args.prompt_lens.split(",")]
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile_prefill.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
