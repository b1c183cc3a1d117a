"""`Engine`: load a checkpoint directory, then generate, stream and chat.

The engine owns the request loop (validation, stop conditions, detokenization, timing), the decode
state (`KVCache`: the KV cache and the RoPE tables; `BatchSampler`: each row's next token and
position on the device, and the sampler that picks them), and drives the model through a
`Backend` built over that state: `prefill` fills the KV cache from the prompts and `decode` runs
one step for the whole batch. `select_backend` is the one place that picks it.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Iterator, Protocol

import torch

from . import validate
from .config import ModelSpec, load_spec
from .reference import KVCache, ReferenceBackend
from .sampling import BatchSampler, SamplingParams
from .tokenizer import Tokenizer
from .validate import BACKENDS
from .weights import Weights, inspect_checkpoint, load_weights, resolve_dtype

DEFAULT_MAX_SEQ_LEN = 4096  # or the model's max_position_embeddings when smaller
RUN_AHEAD = 2  # decode steps queued on the device before the host reads the oldest


class Backend(Protocol):
    """What the engine needs from a decoder, built as `Backend(spec, weights, cache)` over the
    engine's `KVCache` (cache.kv: [layers, 2, max_batch_size, kv_heads, max_seq_len, head_dim] in
    the model dtype). A backend may reorder the weights in place (the megakernel packs them)."""

    name: str
    kv_cache: torch.Tensor  # cache.kv

    def prefill(self, prompts: list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        """Write prompt b (1-D token ids on the device) into cache row rows[b] (default: row b)
        from position 0, leaving the other rows as they are; return the logits of each prompt's
        last position, [B, vocab] fp32."""

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One step for cache rows 0..B-1: token[b] at positions[b] (int64 [B] on the device);
        append its K/V and return next-token logits [B, vocab] fp32."""

    # Optional: `decode_step(tokens, positions, want_logits) -> (logits | None, next_tokens)`, the
    # same step without a copy of its logits: `logits` (a view valid until the next step; None
    # unless want_logits) and `next_tokens`, int32 [B] on the device, each row's arg-max when the
    # backend computes it itself (the megakernel fuses it). The engine decodes through it when
    # present, and takes next_tokens as the tokens when every row is greedy on the raw logits.
    # Optional: `synchronize()`, for a backend whose decode() returns before its step is known to
    # have completed (the megakernel): waits for it and raises if it failed.
    # Optional: `checks_logits = True`, for a backend whose decode() itself raises when a step's
    # logits are not finite (the engine checks the logits of prefill, and of the decode steps of
    # every other backend, in the transfer that brings the step's picks to the host).


def select_backend(
    name: str,
    spec: ModelSpec,
    device: torch.device,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_batch_size: int = 1,
    quantization: str | None = None,
) -> type:
    """The backend class that will decode `spec` on `device` (with weights in `quantization`'s
    format, "fp8", or dense in `dtype` when None; either KV cache format). "auto" takes the
    megakernel where it can run (a Hopper GPU, bf16, a compiled config) and warns on a GPU where it
    cannot; "megakernel" raises RuntimeError saying why it cannot run."""
    validate.backend_name(name)
    if name == "reference":
        return ReferenceBackend
    from .megakernel import MegakernelBackend, unavailable_reason

    reason = unavailable_reason(spec, torch.device(device), dtype, max_batch_size, quantization=quantization)
    if reason is None:
        return MegakernelBackend
    if name == "megakernel":
        raise RuntimeError(f"the megakernel backend cannot run this model: {reason}")
    if torch.device(device).type == "cuda":
        warnings.warn(f"decoding with the reference backend: the megakernel cannot run this model ({reason})", stacklevel=3)
    return ReferenceBackend


@dataclass
class RequestMetrics:
    """Timings of one request, in seconds."""

    time_to_first_token: float  # from the start of generate (or of the stream) to the first token, prefill included
    per_token_latency: float  # mean time per output token after the first (0.0 with one token)
    total_time: float


@dataclass
class TopLogprob:
    """One alternative at an output position (OpenAI's top_logprobs entry; token_id added)."""

    token: str | None  # the token's text (None without a tokenizer)
    logprob: float
    bytes: list[int] | None  # the token's own bytes (Tokenizer.token_bytes)
    token_id: int


@dataclass
class TokenLogprob:
    """The log-probability of one output token under the model (log_softmax of its logits, before
    penalties and filters), with the top alternatives: OpenAI's logprobs.content entry."""

    token: str | None
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]
    token_id: int
    # what this token added to the output's text (special tokens skipped as there; a character
    # whose bytes span tokens on the one that completes it): the completions' legacy `tokens`, so
    # that they join into the text and text_offset indexes it. None without a tokenizer.
    text: str | None = None


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str  # "" when the checkpoint has no tokenizer
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, a stop token or string) or "length"
    metrics: RequestMetrics | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token, when SamplingParams.logprobs is set


@dataclass
class StreamDelta:
    """What one step added to request `index`; the last delta of a request has its finish_reason."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    output: RequestOutput | None = None  # the whole request, on its last delta
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when SamplingParams.logprobs is set


class _Request:
    """The state of one prompt while it generates: tokens, text, stop conditions, timings.

    The text grows as tokens arrive (an incremental decoder: constant work per token); each
    token's text is searched for the stop strings only where a new match can be."""

    def __init__(self, index, prompt, prompt_ids, params: SamplingParams, tokenizer, eos_ids, device):
        self.index, self.prompt, self.prompt_ids, self.params = index, prompt, prompt_ids, params
        self.tokenizer = tokenizer
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.longest_stop = max((len(s) for s in params.stop), default=0)  # (stop strings' reach, once)
        # the noise's seed: the request's own, else one from torch's global generator
        self.seed = params.seed if params.seed is not None else int(torch.randint(0, 2**63 - 1, ()).item())
        self.stream = tokenizer.decode_stream() if tokenizer is not None else None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.text, self.emitted, self.searched = "", 0, 0
        self.finish_reason: str | None = None
        self.times: list[float] = []
        self.start = 0.0

    def add(self, token: int, now: float, cache_full: bool, logprob: TokenLogprob | None = None) -> StreamDelta:
        self.token_ids.append(token)
        self.times.append(now)
        if logprob is not None:
            self.logprobs.append(logprob)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        if self.finish_reason is None and (len(self.token_ids) == self.params.max_tokens or cache_full):
            self.finish_reason = "length"
        if self.stream is not None:
            piece = self.stream.step(token)
            if self.finish_reason is not None:  # an incomplete character at the end, as decode() gives it
                piece += self.stream.finish()
            self.text += piece
            if logprob is not None:
                logprob.text = piece
            begin = max(0, self.searched - self.longest_stop + 1)
            cuts = [i for i in (self.text.find(s, begin) for s in self.params.stop) if i >= 0]
            self.searched = len(self.text)
            if cuts:
                self.text, self.finish_reason = self.text[: min(cuts)], "stop"
        end = len(self.text)
        if self.finish_reason is None:  # hold back what may be the start of a stop string
            end -= max(self.longest_stop - 1, 0)
        delta = self.text[self.emitted : max(end, self.emitted)]
        self.emitted += len(delta)
        output = self.output() if self.finish_reason else None
        lp = None if logprob is None else [logprob]
        return StreamDelta(self.index, delta, [token], self.finish_reason, output, lp)

    def output(self) -> RequestOutput:
        n = len(self.times)
        metrics = RequestMetrics(
            time_to_first_token=self.times[0] - self.start,
            per_token_latency=(self.times[-1] - self.times[0]) / (n - 1) if n > 1 else 0.0,
            total_time=self.times[-1] - self.start,
        )
        return RequestOutput(self.prompt, self.prompt_ids, self.text, self.token_ids, self.finish_reason, metrics,
                             self.logprobs)


class Engine:
    def __init__(self, spec: ModelSpec, weights: Weights, cache: KVCache, backend: Backend, tokenizer: Tokenizer | None):
        self.spec, self.weights, self.cache, self.backend, self.tokenizer = spec, weights, cache, backend, tokenizer
        self.max_batch_size, self.max_seq_len = cache.max_batch_size, cache.max_seq_len
        self.device = weights.embed.device
        eos = spec.eos_token_ids
        if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = (tokenizer.eos_token_id,)
        self.eos_token_ids = eos
        self._lock = threading.Lock()  # held by whoever runs the decode state (exclusive())
        self._holder: int | None = None  # the thread id holding it
        self._batch_sampler: BatchSampler | None = None
        self._ranks = None  # tensor parallelism: the other ranks' processes (tensor_parallel.RankGroup)

    def close(self) -> None:
        """Release what the engine holds beyond memory: with tensor parallelism, stop the other
        ranks' processes (the engine cannot decode after). A no-op otherwise, and when called again."""
        if self._ranks is not None:
            ranks, self._ranks = self._ranks, None
            ranks.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device | None = None,
        max_batch_size: int = 1,
        max_seq_len: int | None = None,
        backend: str = "auto",
        progress: bool = True,
        allow_unused_tensors: bool = False,
        quantization: str | None = None,
        kv_cache_dtype: str = "auto",
        tensor_parallel_size: int = 1,
    ) -> Engine:
        """Load a HF checkpoint directory (config.json, safetensors, optional tokenizer files).

        `quantization="fp8"` quantizes the layer matrices of a dense checkpoint to FP8 e4m3 at load,
        per output channel, layer by layer; a published FP8 checkpoint (its config.json's
        quantization_config) loads as FP8 whether `quantization` is None or "fp8". `dtype` is the
        model dtype either way: of the activations, the KV cache, the embeddings, the norms and
        the LM head, and what FP8 matrices are dequantized to. The megakernel streams FP8 matrices
        with one scale per output row; block-scaled ones decode on the reference backend.

        `kv_cache_dtype="fp8"` (or "fp8_e4m3") keeps the KV cache in FP8 e4m3 with one fp32 scale
        per token and kv head (half the bytes of bf16, for long contexts and batches); "auto" keeps
        it in `dtype`. The megakernel reads either.

        `tensor_parallel_size=N` > 1 splits the model over N ranks, this process and N - 1 it starts
        (Megatron's splits, flashformer.tensor_parallel; on the CPU, or on GPUs 0..N-1): for now on the
        reference backend, each rank loading the whole checkpoint and keeping its part. close() (or
        a `with` block) stops the other ranks; one such engine a process.

        `max_seq_len` (the KV cache length, prompt + output) defaults to 4096, or to the model's
        max_position_embeddings when that is smaller. Every argument is checked before a file is
        read: a bad one is a ValueError naming it (FileNotFoundError or NotADirectoryError for
        `path`). A checkpoint with tensors the model does not use is refused unless
        `allow_unused_tensors`; one whose weights and KV cache cannot fit in the device's free
        memory is refused before anything is allocated.
        """
        torch_dtype = resolve_dtype(dtype)
        device = validate.resolve_device(device)
        max_batch_size = validate.integer("max_batch_size", max_batch_size, minimum=1, requirement="an integer >= 1")
        if max_seq_len is not None:
            max_seq_len = validate.integer("max_seq_len", max_seq_len, minimum=2, requirement="an integer >= 2")
        validate.backend_name(backend)
        validate.boolean("progress", progress)
        validate.boolean("allow_unused_tensors", allow_unused_tensors)
        validate.quantization(quantization)
        kv_cache_dtype = validate.kv_cache_dtype(kv_cache_dtype)
        tensor_parallel_size = validate.integer("tensor_parallel_size", tensor_parallel_size, minimum=1,
                                                requirement="an integer >= 1")
        if tensor_parallel_size > 1 and backend == "megakernel":
            raise ValueError("backend='megakernel' with tensor_parallel_size > 1: the megakernel does not split a "
                             "model over ranks yet; use backend='auto' or 'reference'")
        model_dir = validate.checkpoint_path(path)

        spec = load_spec(model_dir)
        quantization = "fp8" if spec.quantization is not None else quantization  # what is loaded
        if max_seq_len is None:
            max_seq_len = max(2, min(DEFAULT_MAX_SEQ_LEN, spec.max_position_embeddings))
        spec.check_max_seq_len(max_seq_len)
        if max_seq_len > spec.max_position_embeddings:
            warnings.warn(
                f"max_seq_len={max_seq_len} is beyond the model's max_position_embeddings="
                f"{spec.max_position_embeddings} (config.json): positions past it were never trained, "
                "so the output there may degrade",
                stacklevel=2,
            )
        rank_spec = spec  # what one rank computes (its heads and rows): its KV cache's size
        if tensor_parallel_size > 1:
            from .tensor_parallel import shard_spec, split_problem

            problem = split_problem(spec, tensor_parallel_size)
            if problem:
                raise ValueError(f"tensor_parallel_size={tensor_parallel_size}: {problem}")
            rank_spec = shard_spec(spec, tensor_parallel_size)
            if device.type == "cuda" and (device.index or 0) != 0:
                raise ValueError(f"tensor_parallel_size > 1 runs rank 0 on cuda:0 and rank r on cuda:r; got {device}")
            backend_cls = None
        else:
            backend_cls = select_backend(
                backend, spec, device, dtype=torch_dtype, max_batch_size=max_batch_size, quantization=quantization
            )
        tokenizer = Tokenizer.load(model_dir)
        checkpoint = inspect_checkpoint(model_dir, spec, allow_unused_tensors=allow_unused_tensors)
        weight_bytes = checkpoint.nbytes(torch_dtype, quantize=quantization == "fp8", world=tensor_parallel_size)
        validate.check_model_fits(rank_spec, weight_bytes, device, torch_dtype, max_batch_size, max_seq_len,
                                  kv_cache_dtype)
        if tensor_parallel_size > 1:
            return cls._tensor_parallel(model_dir, tensor_parallel_size, tokenizer, dtype=torch_dtype, device=device,
                                        max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                        kv_cache_dtype=kv_cache_dtype, quantization=quantization,
                                        allow_unused_tensors=allow_unused_tensors, progress=progress)
        weights = load_weights(
            model_dir,
            spec,
            dtype=torch_dtype,
            device=device,
            progress=progress,
            allow_unused_tensors=allow_unused_tensors,
            quantization=quantization,
        )
        cache = KVCache.allocate(spec, max_batch_size, max_seq_len, dtype=torch_dtype, device=device,
                                 kv_cache_dtype=kv_cache_dtype)
        return cls(spec, weights, cache, backend_cls(spec, weights, cache), tokenizer)

    @classmethod
    def _tensor_parallel(cls, model_dir, world: int, tokenizer, *, dtype, device, max_batch_size, max_seq_len,
                         kv_cache_dtype, quantization, allow_unused_tensors, progress) -> Engine:
        """from_pretrained over `world` ranks: start the others, build rank 0's part here."""
        from .tensor_parallel import RankGroup, RankSetup, TensorParallelBackend, build_rank

        setup = RankSetup(str(model_dir), dtype, device.type, max_batch_size, max_seq_len, kv_cache_dtype,
                          quantization, allow_unused_tensors)
        ranks = RankGroup(setup, world)
        try:
            spec, weights, cache = build_rank(setup, 0, world, progress=progress)
            ranks.wait_ready()
            engine = cls(spec, weights, cache, TensorParallelBackend(spec, weights, cache, world, ranks.commands),
                         tokenizer)
        except BaseException:
            ranks.close()
            raise
        engine._ranks = ranks
        return engine

    def generate(self, prompts=None, *, prompt_token_ids=None, sampling=None) -> list[RequestOutput]:
        """Generate for each prompt (strings, or token-id lists); one RequestOutput per prompt."""
        requests = self._requests(prompts, prompt_token_ids, sampling)
        for _ in self._exclusive_run(requests):
            pass
        return [r.output() for r in requests]

    def stream(self, prompts=None, *, prompt_token_ids=None, sampling=None) -> Iterator[StreamDelta]:
        """Like generate, but yield each request's new text and token ids as they are produced."""
        return self._exclusive_run(self._requests(prompts, prompt_token_ids, sampling))

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the engine's decode state (the KV cache rows) for the calling thread. generate, and
        a stream() iterator from its first delta until it is exhausted or closed, hold it while
        they run; so does the server's scheduler. Other threads wait their turn; the thread that
        holds it gets RuntimeError instead of a deadlock (two interleaved stream() iterators would
        otherwise decode over each other's cache rows)."""
        me = threading.get_ident()
        if self._holder == me:
            raise RuntimeError(
                "this Engine is already running a generate/stream in this thread (an unfinished stream() "
                "iterator?): finish or close() it first; concurrent requests on one Engine are served one "
                "call at a time (or batched by `flashformer serve`)"
            )
        with self._lock:
            self._holder = me
            try:
                yield self
            finally:
                self._holder = None

    def _exclusive_run(self, requests: list[_Request]) -> Iterator[StreamDelta]:
        with self.exclusive():
            yield from self._run(requests)

    def chat(self, messages: list[dict], sampling: SamplingParams | None = None) -> RequestOutput:
        """Answer one conversation ([{"role": ..., "content": ...}]) with the checkpoint's chat template."""
        return self.generate(prompt_token_ids=[self._chat_ids(messages)], sampling=sampling)[0]

    def chat_stream(self, messages: list[dict], sampling: SamplingParams | None = None) -> Iterator[StreamDelta]:
        return self.stream(prompt_token_ids=[self._chat_ids(messages)], sampling=sampling)

    def _chat_ids(self, messages) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer, and this checkpoint has no tokenizer.json")
        if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            validate.fail("messages", 'a list of {"role": ..., "content": ...} dicts', messages)
        if not messages:
            raise ValueError("messages is empty")
        for i, m in enumerate(messages):
            for key in ("role", "content"):
                if not isinstance(m[key], str):
                    validate.fail(f"messages[{i}][{key!r}]", "a string", m[key])
        return self.tokenizer.encode_chat(list(messages))

    def _requests(self, prompts, prompt_token_ids, sampling) -> list[_Request]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts (strings) or prompt_token_ids (lists of token ids)")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else prompts
            if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
                raise ValueError(
                    f"prompts must be strings (a string or a list of them; pass token ids as prompt_token_ids), "
                    f"got {validate.show(prompts)}"
                )
            self._check_batch(len(prompts), "prompts")
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass prompt_token_ids instead of prompts")
            ids = [self.tokenizer.encode(p) for p in prompts]
            names = [f"prompts[{i}]" for i in range(len(ids))]
        else:
            names, ids = _prompt_id_lists(prompt_token_ids)
            self._check_batch(len(ids), "prompt_token_ids")
            prompts = [None] * len(ids)
        params = self._sampling(sampling, len(ids))
        ids = [self._check_prompt(name, p) for name, p in zip(names, ids)]
        return [
            _Request(i, prompts[i], p, params[i], self.tokenizer, self.eos_token_ids, self.device)
            for i, p in enumerate(ids)
        ]

    def _check_batch(self, n: int, name: str) -> None:
        if n == 0:
            raise ValueError(f"no prompts given ({name} is empty)")
        if n > self.max_batch_size:
            raise ValueError(
                f"{n} prompts exceed max_batch_size={self.max_batch_size} ({name} holds {n}; "
                "set max_batch_size in Engine.from_pretrained)"
            )

    def _sampling(self, sampling, n: int) -> list[SamplingParams]:
        if sampling is None:
            params = [SamplingParams()] * n
        elif isinstance(sampling, SamplingParams):
            params = [sampling] * n
        elif (
            isinstance(sampling, (list, tuple))
            and len(sampling) == n
            and all(isinstance(s, SamplingParams) for s in sampling)
        ):
            params = list(sampling)
        else:
            raise ValueError(
                f"sampling must be a SamplingParams or a list of {n} SamplingParams, got {validate.show(sampling)}"
            )
        for i, p in enumerate(params):
            bad = [t for t in p.stop_token_ids if t >= self.spec.vocab_size]
            if bad:
                name = "sampling" if isinstance(sampling, SamplingParams) else f"sampling[{i}]"
                raise ValueError(
                    f"{name}.stop_token_ids: token id {bad[0]} is outside the vocabulary "
                    f"(vocab_size={self.spec.vocab_size})"
                )
        return params

    def _check_prompt(self, name: str, ids) -> list[int]:
        """One prompt's token ids as a list of ints, checked: not empty, short enough, in the vocabulary."""
        ids = validate.token_ids(name, ids)
        if not ids:
            raise ValueError(f"{name} is empty")
        if len(ids) >= self.max_seq_len:
            raise ValueError(
                f"{name} has {len(ids)} tokens, too long for max_seq_len={self.max_seq_len} "
                f"(at most {self.max_seq_len - 1}, leaving room for output)"
            )
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < self.spec.vocab_size), None)
        if bad is not None:
            raise ValueError(
                f"{name}: token id {ids[bad]} (at index {bad}) is outside the vocabulary "
                f"(vocab_size={self.spec.vocab_size})"
            )
        return ids

    def _sampler(self) -> BatchSampler:
        if self._batch_sampler is None:
            self._batch_sampler = BatchSampler(self.max_batch_size, self.spec.vocab_size, self.max_seq_len, self.device)
        return self._batch_sampler

    def _logprob(self, rec, b: int, token: int, top: int) -> TokenLogprob:
        """Row b's logprobs in a step's records, OpenAI's shape, with its request's `top`
        alternatives (the step holds the batch's largest count)."""

        def text(t):
            if self.tokenizer is None:
                return None, None
            return self.tokenizer.token_text(t), self.tokenizer.token_bytes(t)

        tops = []
        if rec.top_ids is not None:
            for t, lp in zip(rec.top_ids[b, :top].tolist(), rec.top_logprobs[b, :top].tolist()):
                piece, raw = text(t)
                tops.append(TopLogprob(piece, lp, raw, t))
        piece, raw = text(token)
        return TokenLogprob(piece, float(rec.logprob[b]), raw, tops, token)

    def _run(self, requests: list[_Request]) -> Iterator[StreamDelta]:
        """Prefill, then decode steps back to back until every request has finished.

        The decode state lives on the device (BatchSampler): each step's sampler (or, when every
        row is greedy, the bookkeeping over the backend's fused arg-max) writes the chosen tokens
        and their positions where the next step reads them, and ends a row on a stop token,
        max_tokens or a full cache. So the host never stands between two steps: it keeps up to
        RUN_AHEAD steps queued and reads each step's tokens behind (pinned copies and an event),
        for the text, the stop strings (a row ended by one is ended on the device too; the tokens
        it produced meanwhile are dropped) and the stream."""
        device, start = self.device, perf_counter()
        for r in requests:
            r.start = start
        sampler, B = self._sampler(), len(requests)
        if RUN_AHEAD >= sampler.ring:
            raise ValueError(f"RUN_AHEAD={RUN_AHEAD} needs more than the sampler's {sampler.ring} record buffers")
        sampler.start([r.prompt_ids for r in requests], [r.params for r in requests], [r.seed for r in requests],
                      [r.stop_ids for r in requests])
        logits = self.backend.prefill([torch.tensor(r.prompt_ids, dtype=torch.long, device=device) for r in requests])
        decode_step = getattr(self.backend, "decode_step", None)  # optional (see Backend)
        synchronize = getattr(self.backend, "synchronize", None)  # optional (see Backend)
        checks_logits = getattr(self.backend, "checks_logits", False)  # optional (see Backend)
        # every row greedy on the raw logits: the backend's fused arg-max is the token, no logits needed
        fused = decode_step is not None and all(
            r.params.greedy and not r.params.penalized and r.params.logprobs is None for r in requests
        )
        # decode steps that can still yield a token: the k-th token of a request needs k - 1 of them
        steps = max(min(r.params.max_tokens, self.max_seq_len - len(r.prompt_ids)) for r in requests) - 1
        pending = deque([(0, sampler.step(logits))])  # (step, handle); step 0: the prefill's logits
        launched = 0
        try:
            while pending:
                while launched < steps and len(pending) < RUN_AHEAD and not all(r.finish_reason for r in requests):
                    launched += 1
                    tokens, positions = sampler.tokens[:B], sampler.positions[:B]
                    if decode_step is not None:
                        logits, next_tokens = decode_step(tokens, positions, want_logits=not fused)
                    else:
                        logits, next_tokens = self.backend.decode(tokens, positions), None
                    pending.append((launched, sampler.step(None if fused else logits, next_tokens)))
                step, handle = pending.popleft()
                rec = sampler.read(handle)
                now = perf_counter()
                if step == 0 or not checks_logits:
                    bad = [b for b, r in enumerate(requests)
                           if r.finish_reason is None and rec.flags[b] & sampler.flags["non_finite"]]
                    if bad:
                        where = f"decode step {step}" if step else "the prefill"
                        rows = f"row {bad[0]}" + (f" (and rows {bad[1:]})" if len(bad) > 1 else "")
                        raise RuntimeError(
                            f"{where} produced non-finite logits (NaN or inf) in {rows}: the activations "
                            f"overflowed ({str(self.weights.embed.dtype).removeprefix('torch.')}) or the backend "
                            "failed; no token was emitted for this step"
                        )
                deltas = []
                for b, r in enumerate(requests):
                    if r.finish_reason is not None:
                        continue  # (a row ended by a stop string may still have produced tokens)
                    token = int(rec.token[b])
                    if token < 0:
                        raise RuntimeError(f"the sampler ended row {b} before the engine did (internal error)")
                    position = len(r.prompt_ids) + len(r.token_ids)  # where this token goes
                    logprob = self._logprob(rec, b, token, r.params.logprobs) if r.params.logprobs is not None else None
                    deltas.append(r.add(token, now, cache_full=position + 1 >= self.max_seq_len, logprob=logprob))
                    if r.finish_reason is not None and rec.finish[b] == sampler.finish["none"]:
                        sampler.abort(b)  # a stop string: the device row stops advancing
                yield from deltas
                if all(r.finish_reason is not None for r in requests):
                    break
        except BaseException:  # (GeneratorExit included: the caller stopped iterating)
            if synchronize and launched:  # let the steps in flight finish; the first error is the one to report
                with contextlib.suppress(RuntimeError):
                    synchronize()
            raise
        if synchronize and launched:  # the steps still in flight: a failure among them surfaces here
            synchronize()


def _prompt_id_lists(prompt_token_ids) -> tuple[list[str], list]:
    """The names and token ids of each prompt in prompt_token_ids: one prompt (a list of ints, or a
    1-D integer array or tensor), a list of such prompts, or a 2-D array or tensor (a prompt per
    row). The prompts are checked later, one by one."""
    name = "prompt_token_ids"
    single = None
    if validate.is_array(prompt_token_ids):
        if prompt_token_ids.ndim == 1:
            single = prompt_token_ids
        elif prompt_token_ids.ndim == 2:
            rows = list(prompt_token_ids)
            return [f"{name}[{i}]" for i in range(len(rows))], rows
    elif isinstance(prompt_token_ids, (list, tuple)):
        if not (prompt_token_ids and all(validate.is_int(t) for t in prompt_token_ids)):
            return [f"{name}[{i}]" for i in range(len(prompt_token_ids))], list(prompt_token_ids)
        single = prompt_token_ids
    if single is not None:
        return [name], [single]
    validate.fail(
        "prompt_token_ids",
        "token ids (a list of ints, or a 1-D integer array or tensor) or a list of them",
        prompt_token_ids,
    )
