"""Host time of one BatchSampler.step() (issue 18): the Python around the compiled sampler's
launch, and the launch itself, at batch 1 and 8 (sampled: temperature 0.8, top_p 0.95).

    python benchmarks/profile_sampler_host.py [--steps 500]

"python" is step() with the launch replaced by a no-op; "launch" is the rest. The device runs
behind: the host's time per step is what a decode loop that runs ahead pays on its own thread.
"""

from __future__ import annotations

import argparse
import statistics
from time import perf_counter

import torch

from flashformer import _core
from flashformer.sampling import BatchSampler, SamplingParams

VOCAB = 128256  # (Llama 3's)


class _NoLaunch:
    """The compiled core with its sampler launch a no-op."""

    def __init__(self, core):
        self._core = core

    def __getattr__(self, name):
        return getattr(self._core, name)

    def sample_tokens(self, *args):
        pass


def host_us(sampler: BatchSampler, logits: torch.Tensor, steps: int) -> float:
    """Median host time of step() (us), reading each step two behind."""
    times, pending = [], []
    for _ in range(steps):
        t0 = perf_counter()
        pending.append(sampler.step(logits))
        times.append(perf_counter() - t0)
        if len(pending) >= 2:
            sampler.read(pending.pop(0))
    for h in pending:
        sampler.read(h)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    args = ap.parse_args()
    device = torch.device("cuda")
    core, load = _core.load(), _core.load
    for b in (1, 8):
        logits = torch.randn(b, VOCAB, device=device)
        sampler = BatchSampler(8, VOCAB, 1024, device)
        params = [SamplingParams(max_tokens=1 << 30, ignore_eos=True, seed=i, temperature=0.8, top_p=0.95)
                  for i in range(b)]
        sampler.start([[1, 2, 3]] * b, params, list(range(b)), [set()] * b)
        host_us(sampler, logits, 50)  # (warm-up)
        whole = host_us(sampler, logits, args.steps)
        _core.load = lambda: _NoLaunch(core)  # noqa: E731
        try:
            python = host_us(sampler, logits, args.steps)
        finally:
            _core.load = load
        print(f"b{b} step host us: whole {whole:.1f}, python {python:.1f}, launch {whole - python:.1f}", flush=True)


if __name__ == "__main__":
    main()
