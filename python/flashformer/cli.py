"""The `flashformer` command: `flashformer generate MODEL_DIR -p ...`, `flashformer chat MODEL_DIR`,
`flashformer serve MODEL_DIR` (serve.py) and `flashformer bench` (bench.py).

Each subcommand is registered by an `_add_<name>` function that sets its handler with
`set_defaults(run=...)`; a new subcommand is one more such function in `build_parser`. Building
the parser imports neither torch nor the engine, so `--help` is fast: the handlers import them.
Every error is one line, `flashformer: error: ...`, with exit status 1; Ctrl-C ends `generate`
with one line and status 130, and stops the current reply of `chat`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import asdict

from . import __version__
from .validate import BACKENDS, DEFAULT_MAX_QUEUE, DTYPE_NAMES, KV_CACHE_DTYPES, QUANTIZATIONS

PROG = "flashformer"
INTERRUPTED = 130  # the exit status of a command ended by SIGINT, as shells report it


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's formatter that appends each option's default, except where there is none to show
    (None, an unset flag) or the help text already states it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, `flashformer: error: ...`, with exit status 1. `lazy_arguments`
    (a function of the parser) adds arguments only when the parser parses, so that a subcommand's
    imports happen only when it is the one run."""

    lazy_arguments = None

    def error(self, message):
        self.exit(1, f"{PROG}: error: {message} (see '{self.prog} --help')\n")

    def parse_known_args(self, args=None, namespace=None):
        if self.lazy_arguments is not None:
            add, self.lazy_arguments = self.lazy_arguments, None
            add(self)
        return super().parse_known_args(args, namespace)


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        ids = []
    if not ids:
        raise argparse.ArgumentTypeError(f"expected token ids separated by spaces or commas, got {text!r}")
    return ids


def _model_command(sub, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand that loads a checkpoint: its parser, with the model options (_add_model_args)."""
    parser = sub.add_parser(name, help=help, description=description, formatter_class=_HelpFormatter)
    _add_model_args(parser)
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="local checkpoint directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="weight and activation dtype")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="KV cache length: prompt + output tokens (default: 4096, or the model's max_position_embeddings "
        "when smaller)",
    )
    parser.add_argument(
        "--backend", default="auto", choices=BACKENDS, help="auto: the megakernel where it can run, else reference"
    )
    parser.add_argument(
        "--allow-unused-tensors",
        action="store_true",
        help="load a checkpoint that holds tensors the model does not use (refused otherwise)",
    )
    parser.add_argument(
        "--quantization", default=None, choices=QUANTIZATIONS,
        help="fp8: quantize a dense checkpoint's layer matrices to FP8 e4m3 at load (an FP8 checkpoint loads as FP8 anyway)",
    )
    parser.add_argument(
        "--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
        help="auto: the KV cache in --dtype; fp8 (fp8_e4m3): e4m3 with a scale per token and kv head",
    )
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1,
        help="split the model over this many ranks (processes; GPUs 0..N-1 on cuda), reference backend for now",
    )


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate per request")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=-1, help="sample among the k likeliest tokens; -1 disables")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample among the likeliest tokens of this mass")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this fraction of the top one's probability")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 discourages tokens of the prompt and the output (vLLM's); 1 disables")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted once from each output token")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted per occurrence in the output")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: unseeded)")
    parser.add_argument(
        "--stop", action="append", default=None, metavar="TEXT", help="stop at TEXT (cut from the output); repeatable"
    )
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS tokens")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per request (text, token ids, finish reason, metrics) instead of the text",
    )


def _sampling(args):
    from .sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
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
        allow_unused_tensors=args.allow_unused_tensors,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        tensor_parallel_size=args.tensor_parallel_size,
    )


def _report(output) -> None:
    m = output.metrics
    print(
        f"[{len(output.token_ids)} tokens, finish_reason={output.finish_reason}, "
        f"time to first token {m.time_to_first_token * 1e3:.1f} ms, "
        f"{m.per_token_latency * 1e3:.2f} ms/token]",
        file=sys.stderr,
    )


def _print_json(index: int, output) -> None:
    print(json.dumps({"index": index, **asdict(output)}, ensure_ascii=False), flush=True)


def _generate(args) -> int:
    sampling = _sampling(args)
    if args.token_ids is not None:
        engine = _engine(args, args.max_batch_size or 1)
        output = engine.generate(prompt_token_ids=[args.token_ids], sampling=sampling)[0]
        if args.json:
            _print_json(0, output)
        else:
            print(" ".join(map(str, output.token_ids)))
            _report(output)
        return 0
    engine = _engine(args, max_batch_size=args.max_batch_size or len(args.prompt))
    if args.json:
        for i, output in enumerate(engine.generate(args.prompt, sampling=sampling)):
            _print_json(i, output)
    elif len(args.prompt) == 1:
        _report(_print_stream(engine.stream(args.prompt, sampling=sampling), []))
    else:
        for i, output in enumerate(engine.generate(args.prompt, sampling=sampling)):
            print(f"--- prompt {i}: {output.prompt!r}")
            print(output.text)
            _report(output)
    return 0


def _print_stream(deltas, parts: list[str]):
    """Print one request's text as it streams (also appended to `parts`); return its RequestOutput.
    Ctrl-C propagates, after the line is ended."""
    try:
        output = None
        for delta in deltas:
            print(delta.text, end="", flush=True)
            parts.append(delta.text)
            output = delta.output
        return output
    finally:
        deltas.close()
        print(flush=True)


def _read_turn(interactive: bool) -> str | None:
    """The next user message, or None at the end of input or /exit."""
    if interactive:
        try:
            line = input("> ")
        except EOFError:
            print()
            return None
    else:
        line = sys.stdin.readline()
        if not line:
            return None
    line = line.rstrip("\n")
    return None if line.strip() in ("/exit", "/quit") else line


def _chat_prompt(engine, system: list[dict], history: list[dict], max_tokens: int) -> list[int]:
    """Token ids of the conversation, once its oldest turns (a user message and the reply) are
    dropped from `history` until the prompt leaves room for a reply in the KV cache (max_tokens,
    or half the cache when that is less); the system prompt and the newest message are always kept.
    Says on stderr what it dropped; ValueError when the newest message alone does not fit."""
    limit = engine.max_seq_len
    room = min(max_tokens, limit // 2)
    start = 0
    while True:
        ids = engine.tokenizer.encode_chat(system + history[start:])
        if len(ids) + room <= limit or start + 1 >= len(history):
            break
        start += 2
    if len(ids) >= limit:
        raise ValueError(
            f"this message makes a prompt of {len(ids)} tokens{' with the system prompt' if system else ''}, "
            f"and --max-seq-len={limit} holds at most {limit - 1}: not sent"
        )
    if start:
        del history[:start]
        kept = ", kept the system prompt" if system else ""
        print(
            f"{PROG}: the conversation outgrew --max-seq-len={limit}: dropped the {start // 2} oldest "
            f"turn{'s' if start > 2 else ''}{kept}",
            file=sys.stderr,
        )
    return ids


def _chat(args) -> int:
    sampling = _sampling(args)
    engine = _engine(args)
    if engine.tokenizer is None:
        raise ValueError("chat needs a tokenizer, and this checkpoint has no tokenizer.json")
    if engine.tokenizer.chat_template is None:
        raise ValueError("this checkpoint has no chat template (no chat_template in tokenizer_config.json)")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []  # user and assistant messages, oldest first
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        try:
            line = _read_turn(interactive)
        except KeyboardInterrupt:  # at the prompt: the session ends
            print(file=sys.stderr)
            return 0
        if line is None:
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            ids = _chat_prompt(engine, system, history, sampling.max_tokens)
        except ValueError as exc:
            history.pop()
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            continue
        parts: list[str] = []
        try:
            deltas = engine.stream(prompt_token_ids=[ids], sampling=sampling)
            if args.json:
                output = None
                for delta in deltas:
                    parts.append(delta.text)
                    output = delta.output
                _print_json(turn, output)
            else:
                _print_stream(deltas, parts)
        except KeyboardInterrupt:  # during a reply: stop it, keep what it said, back to the prompt
            print(f"{PROG}: reply interrupted (Ctrl-C at the prompt or end of input exits)", file=sys.stderr)
        history.append({"role": "assistant", "content": "".join(parts)})
        turn += 1


def _add_generate(sub) -> None:
    parser = _model_command(
        sub,
        "generate",
        help="complete prompts",
        description="Complete prompts with a checkpoint: one prompt streams to stdout, several run as a batch.",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("-p", "--prompt", action="append", help="a prompt; repeat for a batch")
    group.add_argument(
        "--token-ids",
        type=_token_ids,
        help="one prompt as token ids ('1 2 3' or '1,2,3'), for checkpoints without a tokenizer",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=None, help="KV cache rows (default: the number of prompts)"
    )
    _add_sampling_args(parser)
    parser.set_defaults(run=_generate)


def _add_chat(sub) -> None:
    parser = _model_command(
        sub,
        "chat",
        help="chat on stdin with the checkpoint's chat template (/exit ends)",
        description="Chat with the checkpoint's chat template: one user turn per line of stdin, each reply "
        "streamed. When the conversation outgrows --max-seq-len the oldest turns are dropped (the system "
        "prompt is kept). Ctrl-C stops a reply; Ctrl-C at the prompt, /exit or end of input ends the chat.",
    )
    parser.add_argument("--system", default=None, help="a system message")
    _add_sampling_args(parser)
    parser.set_defaults(run=_chat)


def _serve(args) -> int:
    try:
        from . import serve
    except ImportError as exc:
        raise ImportError(
            f"flashformer serve needs starlette, uvicorn and prometheus-client ({exc.name or exc} is missing): "
            "pip install 'flashformer[serve]'"
        ) from exc
    from pathlib import Path

    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    name = args.served_model_name or Path(args.model_dir).resolve().name
    sock = serve.bind(args.host, args.port)  # a taken port fails before the model loads
    with sock:
        engine = _engine(args, max_batch_size=args.max_batch_size)
        try:
            serve.serve(engine, sock, model_name=name, max_queue=args.max_queue, log_level=args.log_level)
        except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the SIGINT: a normal stop
            pass
    print(f"{PROG}: server stopped", file=sys.stderr)
    return 0


def _add_serve(sub) -> None:
    parser = _model_command(
        sub,
        "serve",
        help="an OpenAI-compatible HTTP server with continuous batching",
        description="Serve a checkpoint over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models; "
        "/health, /metrics): requests are batched continuously over --max-batch-size slots, those beyond "
        "wait in a queue of --max-queue, and past it get HTTP 429. SIGINT or SIGTERM stops the server.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one, printed at start)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="batch slots: sequences decoded together")
    parser.add_argument(
        "--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="sequences that may wait for a slot (beyond: HTTP 429)"
    )
    parser.add_argument(
        "--served-model-name", default=None, help="the model id clients name (default: the directory's name)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level (each request is logged at debug)",
    )
    parser.set_defaults(run=_serve)


def _bench(args) -> int:
    from . import bench

    if args.render is None:
        return bench.main(args)
    try:
        return bench.main(args)
    except (KeyError, TypeError, AttributeError, IndexError, json.JSONDecodeError) as exc:
        why = f"missing field {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"{args.render} is not a bench.json written by flashformer bench ({why})") from exc


def _add_bench(sub) -> None:
    parser = sub.add_parser(
        "bench",
        help="decode latency next to gpt-fast and HF eager, against the floor",
        description="Time the engine's decode step over a sweep of batch sizes and contexts, with the peers "
        "(gpt-fast-style torch.compile, HF transformers eager) in the same process and every figure "
        "against the floor (bytes read per step / measured read bandwidth). Writes bench.md, bench.json "
        "and bench.png under --out.",
        formatter_class=_HelpFormatter,
    )

    def add_arguments(parser):
        from .bench import add_arguments

        add_arguments(parser)

    parser.lazy_arguments = add_arguments  # bench.py imports torch: only when bench runs
    parser.set_defaults(run=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="Llama-family LLM decoding on Hopper GPUs", formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_generate(sub)
    _add_chat(sub)
    _add_serve(sub)
    _add_bench(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (a usage error exits with 1, --help with 0)."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`| head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError, RuntimeError, MemoryError, ImportError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        if os.environ.get("FLASHFORMER_DEBUG"):
            raise
        print(
            f"{PROG}: error: internal error, {type(exc).__name__}: {_one_line(exc)} "
            "(FLASHFORMER_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
