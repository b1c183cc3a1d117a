"""Load test of `flashformer serve` on a real model shape with random bf16 weights (no download).

  python benchmarks/serve_load.py --out DIR [--model SHAPE] [--clients 8] [--prompt-len 128]
                                  [--max-tokens 256] [--arrivals 5] [--temperature 0.8 --top-p 0.95]
  python benchmarks/serve_load.py --quick --out DIR    # tiny shape, a few tokens: a smoke run, CPU too

1. Starts the server as a subprocess of this script (`--serve`): the shape's random weights, the
   engine with max_batch_size = --clients, and, before it serves, the engine's decode step timed
   at that batch over the contexts the run covers (bench.py's timer: CUDA events between back to
   back steps) and the engine's own generate loop at that batch (ms per token).
2. Steady state: --clients streaming completions start together (token-id prompts, greedy or
   --temperature/--top-p, ignore_eos). Each client's inter-token latency is the gaps between its server-sent events once
   every client has its first token, against the decode step at the run's middle context
   (target: mean <= 1.10x).
3. Arrival under load: clients - 1 streams decode; then one more request arrives (--arrivals
   times, one after the other): its time to first token, the longest gap it causes in the others'
   streams (its prefill runs between their decode steps), and the same request's time to first
   token on an idle server.

Writes DIR/serve_load.json (every figure), DIR/serve_load.md (the tables), DIR/serve.log (the
server's stderr) and DIR/metrics.txt (its /metrics at the end). The server is stopped at the end,
whatever happens; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

TARGET_RATIO = 1.10  # steady-state inter-token latency / engine decode step (issue 19)
TIMEOUT = 120.0  # seconds any single wait may take


# -- the server side (a subprocess) --------------------------------------------------------------


def run_server(args) -> int:
    """Build the engine on random weights, time its decode step, then serve until SIGINT."""
    from functools import partial

    import torch

    from flashformer import serve
    from flashformer.bench import WEIGHT_STD, Counts, _time_calls, shape_config
    from flashformer.config import spec_from_dict
    from flashformer.engine import Engine, select_backend
    from flashformer.reference import KVCache
    from flashformer.sampling import SamplingParams
    from flashformer.weights import random_weights

    sock = serve.bind("127.0.0.1", 0)
    device = torch.device(args.device)
    cfg = shape_config(args.model)
    spec = spec_from_dict(cfg)
    generator = torch.Generator(device=device).manual_seed(0)
    weights = random_weights(spec, tied=cfg["tie_word_embeddings"], device=device, std=WEIGHT_STD, generator=generator)
    backend_cls = select_backend(args.backend, spec, device, dtype=weights.embed.dtype, max_batch_size=args.clients)
    cache = KVCache.allocate(spec, args.clients, args.max_seq_len, dtype=weights.embed.dtype, device=device)
    engine = Engine(spec, weights, cache, backend_cls(spec, weights, cache), tokenizer=None)

    batch = args.clients
    tokens = torch.randint(spec.vocab_size, (batch,), device=device, generator=generator)
    steps = {}
    for ctx in args.contexts:
        positions = torch.full((batch,), ctx, dtype=torch.long, device=device)
        times = _time_calls(partial(engine.backend.decode, tokens, positions), Counts(10, 100), device)
        getattr(engine.backend, "synchronize", lambda: None)()
        steps[ctx] = statistics.median(times)
    prompt = torch.randint(spec.vocab_size, (args.contexts[0],), generator=generator, device=device).tolist()
    out = engine.generate(prompt_token_ids=[prompt] * batch, sampling=SamplingParams(max_tokens=64, ignore_eos=True))
    Path(args.step_json).write_text(json.dumps({
        "backend": engine.backend.name,
        "batch": batch,
        "step_ms_by_ctx": {str(k): v for k, v in steps.items()},
        "engine_generate_ms_per_token": statistics.median(o.metrics.per_token_latency for o in out) * 1e3,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }))
    with sock:
        try:
            serve.serve(engine, sock, model_name=args.model, max_queue=4 * batch, log_level="warning")
        except KeyboardInterrupt:
            pass
    return 0


# -- the clients ----------------------------------------------------------------------------------


class Server:
    """The server subprocess; its URL from the line it prints once ready."""

    def __init__(self, argv: list[str], log: Path):
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", *argv], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.url = None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.log.write(line)
                self.log.flush()
                match = re.search(r"serving \S+ at (http://\S+)", line)
                if match:
                    self.url = match.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(600) or self.url is None:
            self.stop()
            raise RuntimeError(f"the server did not start (its log: {log})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(60)


async def stream(client, model: str, prompt: list[int], max_tokens: int, sampling: dict,
                 started: float | None = None) -> dict:
    """One streaming completion (`sampling`: its temperature and top_p); the time (perf_counter) of
    each token's event."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            **sampling}
    sent = time.perf_counter() if started is None else started
    times = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"the server failed the request: {chunk['error']}")
                times.append(time.perf_counter())
    return {"sent": sent, "times": times}


def gap_stats(times: list[float], after: float = float("-inf")) -> dict:
    """Gaps (ms) between consecutive times, both ends at or after `after`: count, mean, median,
    p90 and max."""
    gaps = [(b - a) * 1e3 for a, b in zip(times, times[1:]) if a >= after]
    if not gaps:
        return {"count": 0, "mean": None, "median": None, "p90": None, "max": None}
    ordered = sorted(gaps)
    return {"count": len(gaps), "mean": statistics.fmean(gaps), "median": statistics.median(gaps),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max": ordered[-1]}


async def steady_state(client, args, prompts) -> list[dict]:
    runs = await asyncio.wait_for(asyncio.gather(*(stream(client, args.model, p, args.max_tokens, args.sampling) for p in prompts)),
                                  TIMEOUT)
    everyone = max(r["times"][0] for r in runs)  # from here on every client decodes
    return [{"client": i, "tokens": len(r["times"]), "ttft_ms": (r["times"][0] - r["sent"]) * 1e3,
             "itl_all": gap_stats(r["times"]), "itl_steady": gap_stats(r["times"], after=everyone)}
            for i, r in enumerate(runs)]


async def arrivals(client, args, prompts) -> dict:
    """clients - 1 long streams decode; one more request arrives, --arrivals times."""
    background_tokens = args.max_seq_len - args.prompt_len - 8
    background = [asyncio.ensure_future(stream(client, args.model, p, background_tokens, args.sampling)) for p in prompts[1:]]
    results = []
    try:
        await asyncio.sleep(0.5)  # (they are prefilled and decoding)
        for _ in range(args.arrivals):
            run = await asyncio.wait_for(stream(client, args.model, prompts[0], 8, args.sampling), TIMEOUT)
            results.append(run)
            await asyncio.sleep(0.2)
        alive = sum(not b.done() for b in background)
    finally:
        for b in background:
            b.cancel()
        await asyncio.gather(*background, return_exceptions=True)
    idle = []
    for _ in range(args.arrivals):
        idle.append(await asyncio.wait_for(stream(client, args.model, prompts[0], 8, args.sampling), TIMEOUT))
    ttft = [(r["times"][0] - r["sent"]) * 1e3 for r in results]
    ttft_idle = [(r["times"][0] - r["sent"]) * 1e3 for r in idle]
    return {"background_streams": len(background), "background_alive_at_the_end": alive,
            "ttft_ms": ttft, "ttft_median_ms": statistics.median(ttft),
            "ttft_idle_ms": ttft_idle, "ttft_idle_median_ms": statistics.median(ttft_idle)}


async def run_clients(url: str, args) -> dict:
    import httpx
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(1, args.vocab) for _ in range(args.prompt_len)] for _ in range(args.clients)]
    limits = httpx.Limits(max_connections=4 * args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
        await asyncio.wait_for(stream(client, args.model, prompts[0], 4, args.sampling), TIMEOUT)  # warm-up
        steady = await steady_state(client, args, prompts)
        arrival = await arrivals(client, args, prompts)
        metrics = (await client.get("/metrics")).text
    return {"steady": steady, "arrival": arrival, "metrics": metrics}


def report(args, step: dict, runs: dict) -> dict:
    mid = str(args.contexts[1])
    step_ms = step["step_ms_by_ctx"][mid]
    clients = runs["steady"]
    for c in clients:
        s = c["itl_steady"]
        c["ratio_mean"] = s["mean"] / step_ms if s["mean"] else None
        c["ratio_median"] = s["median"] / step_ms if s["median"] else None
    worst = max((c["ratio_mean"] for c in clients if c["ratio_mean"] is not None), default=None)
    return {
        "model": args.model, "clients": args.clients, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "sampling": args.sampling,
        "max_seq_len": args.max_seq_len, "commit": _commit(), **step, "reference_ctx": int(mid),
        "reference_step_ms": step_ms, "target_ratio": TARGET_RATIO, "worst_client_ratio_mean": worst,
        "meets_target": worst is not None and worst <= TARGET_RATIO,
        "steady": clients, "arrival": runs["arrival"],
    }


def _commit() -> str | None:
    from flashformer.bench import git_commit

    return git_commit()


def _sampling_text(sampling: dict) -> str:
    if not sampling.get("temperature"):
        return "greedy"
    return f"sampled: temperature={sampling['temperature']}, top_p={sampling.get('top_p', 1.0)}"


def _f(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(r: dict) -> str:
    lines = [
        f"# flashformer serve under load: {r['model']}, {r['clients']} streaming clients",
        "",
        f"GPU {r['gpu'] or 'none (CPU: these figures mean nothing for GPU performance)'}, backend {r['backend']}, "
        f"commit {r['commit']}; prompts of {r['prompt_len']} tokens, {r['max_tokens']} tokens each ("
        f"{_sampling_text(r.get('sampling', {}))}, ignore_eos); KV cache {r['max_seq_len']}.",
        "",
        "Engine decode step at batch " + str(r["batch"]) + ": " + ", ".join(
            f"{_f(v)} ms at ctx {k}" for k, v in r["step_ms_by_ctx"].items())
        + f"; the engine's own generate loop at that batch: {_f(r['engine_generate_ms_per_token'])} ms/token.",
        "",
        f"## Steady state (every client decoding), against the step at ctx {r['reference_ctx']} "
        f"({_f(r['reference_step_ms'])} ms); target mean <= {r['target_ratio']:.2f}x",
        "",
        "| client | tokens | TTFT ms | ITL mean ms | median | p90 | max | mean / step | median / step |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in r["steady"]:
        s = c["itl_steady"]
        lines.append(f"| {c['client']} | {c['tokens']} | {_f(c['ttft_ms'], 1)} | {_f(s['mean'])} | {_f(s['median'])} | "
                     f"{_f(s['p90'])} | {_f(s['max'])} | {_f(c['ratio_mean'], 3)} | {_f(c['ratio_median'], 3)} |")
    verdict = "meets" if r["meets_target"] else "misses"
    lines += ["", f"Worst client: mean ITL {_f(r['worst_client_ratio_mean'], 3)}x the step ({verdict} the target).",
              "", f"## A request arriving while {r['arrival']['background_streams']} others decode", "",
              f"Time to first token (prompt {r['prompt_len']} tokens): median "
              f"{_f(r['arrival']['ttft_median_ms'], 1)} ms ({', '.join(_f(t, 1) for t in r['arrival']['ttft_ms'])}); "
              f"on an idle server {_f(r['arrival']['ttft_idle_median_ms'], 1)} ms."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="serve-load-results", help="output directory")
    p.add_argument("--model", default=None, help="a compiled shape name (default: the bench's largest default shape; --quick: its quick shape)")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients = the engine's batch slots")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; --quick: 16)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per steady-state request (default 256)")
    p.add_argument("--arrivals", type=int, default=None, help="arrivals under load (default 5; --quick: 2)")
    p.add_argument("--temperature", type=float, default=0.0, help="every request's temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="every request's top_p (default 1: off)")
    p.add_argument("--backend", default="auto", help="the engine backend (auto: the megakernel where it can run)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help="tiny shape and few tokens: a smoke run, also on a CPU")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server subprocess
    p.add_argument("--max-seq-len", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=None, help=argparse.SUPPRESS)
    p.add_argument("--step-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        return run_server(args)

    import torch

    from flashformer.bench import DEFAULT_MODELS, QUICK_MODELS, shape_config

    args.model = args.model or (QUICK_MODELS[0] if args.quick else DEFAULT_MODELS[-1])
    args.prompt_len = args.prompt_len or (16 if args.quick else 128)
    args.max_tokens = args.max_tokens or (16 if args.quick else 256)
    args.arrivals = args.arrivals or (2 if args.quick else 5)
    args.sampling = {"temperature": args.temperature, "top_p": args.top_p}
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.vocab = shape_config(args.model)["vocab_size"]
    # room for the arrival phase's long background streams (about 1 s of decoding at 5 ms a step)
    args.max_seq_len = args.max_seq_len or args.prompt_len + max(args.max_tokens, 64 if args.quick else 1024) + 64
    args.contexts = [args.prompt_len, args.prompt_len + args.max_tokens // 2, args.prompt_len + args.max_tokens]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    step_json = out / "step.json"
    server = Server(["--model", args.model, "--clients", str(args.clients), "--max-seq-len", str(args.max_seq_len),
                     "--contexts", ",".join(map(str, args.contexts)), "--step-json", str(step_json), "--backend",
                     args.backend, "--device", args.device], out / "serve.log")
    try:
        runs = asyncio.run(run_clients(server.url, args))
    finally:
        server.stop()
    (out / "metrics.txt").write_text(runs.pop("metrics"))
    result = report(args, json.loads(step_json.read_text()), runs)
    step_json.unlink()
    (out / "serve_load.json").write_text(json.dumps(result, indent=2))
    (out / "serve_load.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
