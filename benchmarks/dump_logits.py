"""The megakernel's logits and fused arg-max over a few decode steps of random weights of compiled
shapes, saved to a file, and two such files compared value for value: whether a change to the
kernel that should not move a value (a new synchronization, an order of work) left every logit
as it was. Run it under each build in one lease (scripts/gpu_check.sh's bases are on PYTHONPATH):

    python benchmarks/dump_logits.py --out head.pt [--models tiny-gqa,llama-3.1-8b] [--layers 4]
        [--batch 1,8] [--ctx 200] [--steps 3] [--quantization fp8] [--kv-cache-dtype fp8]
    python benchmarks/dump_logits.py --compare base.pt head.pt

The weights, the KV cache's past positions and the tokens come from one seeded generator, so every
build sees the same inputs on the same GPU and software.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from flashformer.bench import shape_config
from profile_step import random_model  # (beside this script)


def dump(args) -> dict[str, torch.Tensor]:
    out = {}
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    batches = [int(b) for b in args.batch.split(",")]
    for model in args.models.split(","):
        layers = min(args.layers, shape_config(model)["num_hidden_layers"]) if args.layers else None
        spec, w, cache, mk = random_model(model, layers, args.quantization, max(batches), args.ctx + args.steps + 8,
                                          args.kv_cache_dtype, gen)
        for batch in batches:
            start = time.perf_counter()
            tokens = torch.randint(0, spec.vocab_size, (args.steps, batch), device="cuda", generator=gen)
            for s in range(args.steps):
                positions = torch.full((batch,), args.ctx + s, dtype=torch.long, device="cuda")
                logits, next_tokens = mk.decode_step(tokens[s], positions)
                key = f"{model}/b{batch}/step{s}"
                out[key + "/logits"] = logits.detach().cpu().clone()
                out[key + "/argmax"] = next_tokens.detach().cpu().clone()
            mk.synchronize()
            # (as it goes: a step that never ends shows where, under a caller's timeout)
            print(f"{model}{':' + args.quantization if args.quantization else ''} batch {batch}: {args.steps} steps "
                  f"in {time.perf_counter() - start:.2f} s", flush=True)
        del mk, w, cache
        torch.cuda.empty_cache()
    return out


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    if a.keys() != b.keys():
        print(f"different entries: only in {a_path}: {sorted(a.keys() - b.keys())[:5]}, "
              f"only in {b_path}: {sorted(b.keys() - a.keys())[:5]}")
        return 1
    differ = 0
    for key in sorted(a):
        x, y = a[key], b[key]
        if torch.equal(x, y):
            continue
        differ += 1
        if x.is_floating_point():
            d = (x.double() - y.double()).abs()
            print(f"{key}: {int((d > 0).sum())} of {d.numel()} differ, largest by {float(d.max()):.3e} "
                  f"(values up to {float(x.abs().max()):.3e})")
        else:
            print(f"{key}: {int((x != y).sum())} of {x.numel()} differ")
    print(f"{len(a) - differ} of {len(a)} entries identical" + ("" if differ else ": every value equal"))
    return 1 if differ else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    ap.add_argument("--models", default="tiny-gqa,tiny-qk-norm,tiny-bias,llama-3.2-1b,llama-3.1-8b,qwen3-8b")
    ap.add_argument("--layers", type=int, default=4, help="at most this many layers of each shape")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--ctx", type=int, default=200, help="the first step's position (the past is random)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantization", default=None, choices=["fp8"])
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        ap.error("--out (or --compare A B)")
    torch.save(dump(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
