"""Where the time of a sampled token goes beyond the bare decode step (issue 18): the decode
step with and without its logits written, and the device sampler alone on logits of the same
spread, per kernel (torch.profiler), at batch 1 and 8.

    python benchmarks/profile_sampler.py [--model SHAPE] [--steps 50]   (default: the bench's smallest default shape)
"""

from __future__ import annotations

import argparse

import torch

from flashformer.bench import DEFAULT_MODELS, _load_model
from flashformer.megakernel import MegakernelBackend
from flashformer.reference import KVCache
from flashformer.sampling import BatchSampler, SamplingParams

SAMPLED = dict(temperature=0.8, top_p=0.95)


def kernel_us(fn, steps: int) -> dict[str, float]:
    """Mean device time per call of each kernel `fn` launches (us)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.count:
            out[e.key[:60]] = e.device_time_total / steps
    return out


def wall_us(fn, steps: int) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODELS[0])
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    name, spec, weights, _ = _load_model(args.model, device, gen)
    cache = KVCache.allocate(spec, 8, 1024, dtype=torch.bfloat16, device=device)
    backend = MegakernelBackend(spec, weights, cache)
    for b in (1, 8):
        tokens = torch.randint(spec.vocab_size, (b,), device=device, generator=gen)
        positions = torch.full((b,), 200, dtype=torch.long, device=device)
        for want in (False, True):
            step = lambda: backend.decode_step(tokens, positions, want_logits=want)  # noqa: E731
            print(f"{name} b{b} decode_step want_logits={want}: wall {wall_us(step, args.steps):.1f} us/step;",
                  {k: round(v, 1) for k, v in kernel_us(step, args.steps).items()})
        logits, _ = backend.decode_step(tokens, positions, want_logits=True)
        logits = logits.clone()
        sampler = BatchSampler(8, spec.vocab_size, 1024, device)
        for mode, kw in (("greedy", dict(temperature=0.0)), ("sampled", SAMPLED), ("top-k 50", dict(temperature=0.8, top_k=50))):
            params = [SamplingParams(max_tokens=1 << 30, ignore_eos=True, seed=i, **kw) for i in range(b)]
            sampler.start([[1, 2, 3]] * b, params, list(range(b)), [set()] * b)
            pending = []

            def one():
                pending.append(sampler.step(logits))
                if len(pending) >= 2:
                    sampler.read(pending.pop(0))

            print(f"{name} b{b} sampler {mode}: wall {wall_us(one, args.steps):.1f} us/step;",
                  {k: round(v, 1) for k, v in kernel_us(one, args.steps).items()})
            for h in pending:
                sampler.read(h)


if __name__ == "__main__":
    main()
