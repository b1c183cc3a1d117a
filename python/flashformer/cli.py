"""The `flashformer` command: `flashformer generate MODEL_DIR -p ...`, `flashformer chat MODEL_DIR` and
`flashformer bench` (bench.py).

Each subcommand is registered by an `_add_<name>` function that sets its handler with
`set_defaults(run=...)`; a new subcommand is one more such function in `build_parser`.
"""

from __future__ import annotations

import argparse
import sys

from .engine import BACKENDS
from .sampling import SamplingParams
from .weights import DTYPES


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="local checkpoint directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--max-seq-len", type=int, default=4096, help="KV cache length: prompt + output tokens")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=-1, help="-1 disables")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def _sampling(args) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )


def _engine(args, max_batch_size: int = 1):
    from .engine import Engine

    return Engine.from_pretrained(
        args.model_dir,
        dtype=args.dtype,
        device=args.device,
        max_batch_size=max_batch_size,
        max_seq_len=args.max_seq_len,
        backend=args.backend,
        progress=sys.stderr.isatty(),
    )


def _report(output) -> None:
    m = output.metrics
    print(
        f"[{len(output.token_ids)} tokens, finish_reason={output.finish_reason}, "
        f"time to first token {m.time_to_first_token * 1e3:.1f} ms, "
        f"{m.per_token_latency * 1e3:.2f} ms/token]",
        file=sys.stderr,
    )


def _generate(args) -> int:
    sampling = _sampling(args)
    if args.token_ids is not None:
        ids = [int(t) for t in args.token_ids.replace(",", " ").split()]
        output = _engine(args).generate(prompt_token_ids=[ids], sampling=sampling)[0]
        print(" ".join(map(str, output.token_ids)))
        _report(output)
        return 0
    engine = _engine(args, max_batch_size=len(args.prompt))
    if len(args.prompt) == 1:
        _report(_print_stream(engine.stream(args.prompt, sampling=sampling)))
        return 0
    for i, output in enumerate(engine.generate(args.prompt, sampling=sampling)):
        print(f"--- prompt {i}: {output.prompt!r}")
        print(output.text)
        _report(output)
    return 0


def _print_stream(deltas):
    """Print one request's text as it streams; return its RequestOutput."""
    for delta in deltas:
        print(delta.text, end="", flush=True)
    print()
    return delta.output


def _chat(args) -> int:
    engine, sampling = _engine(args), _sampling(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = _print_stream(engine.chat_stream(messages, sampling))
        messages.append({"role": "assistant", "content": reply.text})


def _add_generate(sub) -> None:
    parser = sub.add_parser("generate", help="complete prompts")
    _add_model_args(parser)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("-p", "--prompt", action="append", help="a prompt; repeat for a batch")
    group.add_argument(
        "--token-ids", help="one prompt as token ids ('1 2 3' or '1,2,3'), for checkpoints without a tokenizer"
    )
    _add_sampling_args(parser)
    parser.set_defaults(run=_generate)


def _add_chat(sub) -> None:
    parser = sub.add_parser("chat", help="chat on stdin with the checkpoint's chat template (/exit ends)")
    _add_model_args(parser)
    parser.add_argument("--system", default=None, help="a system message")
    _add_sampling_args(parser)
    parser.set_defaults(run=_chat)


def _add_bench(sub) -> None:
    from .bench import add_arguments, main

    parser = sub.add_parser(
        "bench",
        help="decode latency next to gpt-fast and HF eager, against the floor",
        description="Time the engine's decode step over a sweep of batch sizes and contexts, with the peers "
        "(gpt-fast-style torch.compile, HF transformers eager) in the same process and every figure "
        "against the floor (bytes read per step / measured read bandwidth). Writes bench.md, bench.json "
        "and bench.png under --out.",
    )
    add_arguments(parser)
    parser.set_defaults(run=main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashformer", description="Llama-family LLM decoding on Hopper GPUs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_chat(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"flashformer: error: {exc}", file=sys.stderr)
        return 1
