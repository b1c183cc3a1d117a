"""Continuous batching over an Engine's cache rows ("slots"), for `flashformer serve`.

One thread, the scheduler's, holds the engine (`Engine.exclusive()`) for as long as it runs and
is the only one that touches the backend. Callers (the server's request handlers, on other
threads) hand it `Sequence`s through `submit()` and withdraw them through `cancel()`; both only
touch a queue under a lock. Each sequence's output comes back through its `sink`, called from
the scheduler's thread with every `StreamDelta` and, when the sequence fails, an exception.

A step of the loop, between two decode steps:
  1. free the slots of finished and cancelled sequences; drop cancelled ones from the queue;
     move waiting sequences (oldest first) into free slots, lowest slot first (a decode step
     runs rows 0..B-1, so the batch stays as narrow as the load allows);
  2. pick the tokens of the decode step in flight (this waits for it) and prefill the newly
     admitted sequences into their slots, all in one prefill call;
  3. launch the next decode step for every live sequence (a free row below the highest live
     one decodes a dummy token at position 0 of its own row, which nothing reads);
  4. only then, while that step runs on the GPU, do the host work of the picked tokens: stop
     conditions, detokenization, delivery to the sinks.
A sequence that step 4 finds finished (a stop string, EOS, max_tokens) was already part of the
step launched in 3: that row's result is discarded and its slot freed at the next step 1.
Positions never pass the cache: a sequence finishes when its next position would be the last.

Tokens are picked on the host side of each step, with the engine's sampling semantics: greedy
sequences take the backend's fused arg-max (or the logits' arg-max); as soon as one sequence
samples or is penalized, the step's sequences are picked by `sampling.sample_rows`, the compiled
sampler's PyTorch replica (the same distribution, the same noise keyed by each request's seed and
token index), over per-slot penalty counts. So a seeded sequence draws what it draws alone in
Engine.generate, whatever else is in the batch. logprobs are not produced here yet (submit()
refuses them).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from time import perf_counter
from typing import Callable

import torch

from .engine import Engine, StreamDelta, _Request
from .sampling import row_table, sample_rows, table_columns

Sink = Callable[["StreamDelta | BaseException"], None]


class QueueFull(RuntimeError):
    """submit() found every slot busy and the queue full."""


class SchedulerStopped(RuntimeError):
    """The scheduler is not running (stopped, or failed to start)."""


@dataclass(eq=False)
class Sequence:
    """One generated sequence (a choice of a request): its engine request, where its output goes,
    and its place in the batch."""

    request: _Request
    sink: Sink
    slot: int | None = None
    position: int = 0  # where `token` goes in the cache (its row: `slot`) at the next decode step
    token: int = 0  # the newest token, fed to the next decode step
    cancelled: bool = False
    done: bool = False  # finished or failed: its slot is freed at the next step


class Observer:
    """What the scheduler reports as it runs, from its own thread (the server's metrics implement
    it); every method is optional to override."""

    def admitted(self, seq: Sequence, waited: float) -> None:
        """`seq` left the queue for a slot after `waited` seconds."""

    def token(self, seq: Sequence, delta: StreamDelta) -> None:
        """`seq` produced a token (its request's `times` hold every token's time so far)."""

    def finished(self, seq: Sequence, reason: str) -> None:
        """`seq` ended: its finish_reason ("stop", "length"), "error" or "cancelled"."""

    def step(self, rows: int) -> None:
        """A decode step of `rows` batch rows was launched."""

    def depth(self, waiting: int, running: int) -> None:
        """The queue and the slots now hold these many sequences."""


@dataclass
class _Step:
    """A launched decode step: the sequences it decodes (in slot order) and its logits."""

    seqs: list[Sequence]
    logits: torch.Tensor
    batch: int


class Scheduler:
    """Continuous batching over `engine`'s max_batch_size slots, with at most `max_queue`
    sequences waiting for a slot beyond them (submit() raises QueueFull past that)."""

    def __init__(self, engine: Engine, *, max_queue: int, observer: Observer | None = None):
        if max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {max_queue}")
        self.engine, self.max_queue = engine, max_queue
        self.observer = observer or Observer()
        self.slots: list[Sequence | None] = [None] * engine.max_batch_size
        self.waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None  # why the thread ended, when it failed
        # penalties' state per slot (allocated with the first penalized sequence): how often each
        # token is in the sequence's output, and whether it is in its prompt ([slots, vocab])
        self._counts: torch.Tensor | None = None
        self._in_prompt: torch.Tensor | None = None

    # -- the callers' side (any thread) ----------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the scheduler's thread; returns once it holds the engine."""
        self._thread = threading.Thread(target=self._main, name="flashformer-scheduler", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise SchedulerStopped(f"the scheduler did not get hold of the engine within {timeout} s (is it in use?)")
        if self._error is not None:
            raise SchedulerStopped(f"the scheduler failed to start: {self._error}") from self._error

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread after the step in progress; sequences still queued or running get
        SchedulerStopped through their sinks."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue `seqs` (all or none): QueueFull when the free slots and the room left in the
        queue cannot take them all, SchedulerStopped when the scheduler is not running;
        ValueError for a sequence asking for logprobs (not produced by the scheduler yet)."""
        if any(s.request.params.logprobs is not None for s in seqs):
            raise ValueError("the scheduler does not produce logprobs yet: submit sequences with logprobs=None")
        now = perf_counter()
        with self._cond:
            if not self.alive:
                raise SchedulerStopped("the scheduler is not running" + (f" ({self._error})" if self._error else ""))
            free = sum(s is None for s in self.slots)
            if len(self.waiting) + len(seqs) > self.max_queue + free:
                raise QueueFull(
                    f"the server is at capacity: {len(seqs)} more sequences do not fit beside the "
                    f"{len(self.slots) - free} running (max_batch_size={len(self.slots)}) and the {len(self.waiting)} "
                    f"waiting (max_queue={self.max_queue}); retry later"
                )
            for s in seqs:
                s.request.start = now
                self.waiting.append(s)
            self.observer.depth(len(self.waiting), len(self.slots) - free)
            self._cond.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Withdraw `seqs` (a client went away): they leave the queue, or free their slot, at the
        next step, and their sinks hear nothing more."""
        with self._cond:
            for s in seqs:
                s.cancelled = True
            self._cond.notify()

    def counts(self) -> tuple[int, int]:
        """(waiting, running) sequences."""
        with self._cond:
            return len(self.waiting), sum(s is not None for s in self.slots)

    # -- the scheduler's thread -------------------------------------------------------------------

    def _main(self) -> None:
        try:
            with self.engine.exclusive():
                self._started.set()
                self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported to every sequence, and by submit()
            self._error = exc
            self._started.set()
            raise
        finally:
            with self._cond:
                self._stopping = True
                left = [s for s in self.slots if s is not None] + list(self.waiting)
                self.slots = [None] * len(self.slots)
                self.waiting.clear()
            why = SchedulerStopped("the server is shutting down" if self._error is None else str(self._error))
            for s in left:
                self._fail(s, why)

    def _loop(self) -> None:
        inflight: _Step | None = None
        while True:
            admitted = self._between_steps(idle=inflight is None)
            if admitted is None:
                if inflight is not None:  # leave the backend with no step unchecked
                    getattr(self.engine.backend, "synchronize", lambda: None)()
                return
            picked: list[tuple[Sequence, int]] = []
            if inflight is not None:
                picked += self._collect(inflight)
            if admitted:
                picked += self._prefill(admitted)
            for s, token in picked:
                s.token = token
            live = [s for s, _ in picked if not s.cancelled]
            inflight = self._launch(live) if live else None
            self._deliver(picked)

    def _between_steps(self, idle: bool) -> list[Sequence] | None:
        """Free the slots of done and cancelled sequences and admit waiting ones into free slots;
        the admitted sequences, or None when the scheduler stops. With nothing in flight and
        nothing to run, wait for a submit()."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                for i, s in enumerate(self.slots):
                    if s is not None and (s.done or s.cancelled):
                        self.slots[i] = None
                        if not s.done:
                            self.observer.finished(s, "cancelled")
                if any(s.cancelled for s in self.waiting):
                    for s in self.waiting:
                        if s.cancelled:
                            self.observer.finished(s, "cancelled")
                    self.waiting = deque(s for s in self.waiting if not s.cancelled)
                admitted = []
                now = perf_counter()
                for i in range(len(self.slots)):
                    if self.slots[i] is None and self.waiting:
                        s = self.slots[i] = self.waiting.popleft()
                        s.slot = i
                        admitted.append(s)
                        self.observer.admitted(s, now - s.request.start)
                running = sum(s is not None for s in self.slots)
                self.observer.depth(len(self.waiting), running)
                if admitted or not idle or running:
                    return admitted
                self._cond.wait()

    def _prefill(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
        """Prefill `seqs` into their slots (one call) and pick their first tokens."""
        device = self.engine.device
        prompts = [torch.tensor(s.request.prompt_ids, dtype=torch.long, device=device) for s in seqs]
        try:
            self._reset_penalties(seqs)
            logits = self.engine.backend.prefill(prompts, rows=[s.slot for s in seqs])
            tokens = self._pick(logits, seqs, list(range(len(seqs))), fused=None, check=True)
        except Exception as exc:  # noqa: BLE001 - these sequences fail; the others go on
            for s in seqs:
                self._fail(s, exc)
            return []
        for s in seqs:
            s.position = len(s.request.prompt_ids)
        return [(s, t) for s, t in zip(seqs, tokens) if t is not None]

    def _launch(self, seqs: list[Sequence]) -> _Step | None:
        """Launch a decode step of every row up to the highest slot of `seqs`: each sequence's
        newest token at its position; free rows decode token 0 at position 0 of their own row."""
        batch = max(s.slot for s in seqs) + 1
        tokens, positions = [0] * batch, [0] * batch
        for s in seqs:
            tokens[s.slot], positions[s.slot] = s.token, s.position
        step = torch.tensor([tokens, positions], device=self.engine.device)
        try:
            logits = self.engine.backend.decode(step[0], step[1])
        except Exception as exc:  # noqa: BLE001
            for s in seqs:
                self._fail(s, exc)
            return None
        self.observer.step(batch)
        return _Step(seqs, logits, batch)

    def _collect(self, step: _Step) -> list[tuple[Sequence, int]]:
        """Wait for `step` and pick the next token of each of its sequences still live."""
        backend = self.engine.backend
        live = [s for s in step.seqs if not (s.done or s.cancelled)]
        fused = getattr(backend, "greedy_tokens", None)  # optional (engine.Backend)
        try:
            if fused is not None:
                greedy = fused(step.batch)  # waits for the step, raises if it failed
            else:
                greedy = None
                getattr(backend, "synchronize", lambda: None)()
            if not live:
                return []
            check = not getattr(backend, "checks_logits", False)
            tokens = self._pick(step.logits, live, [s.slot for s in live], fused=greedy, check=check)
        except Exception as exc:  # noqa: BLE001 - the step failed: its sequences fail, the rest go on
            for s in live:
                self._fail(s, exc)
            return []
        picked = []
        for s, t in zip(live, tokens):
            if t is not None:
                s.position += 1
                picked.append((s, t))
        return picked

    def _reset_penalties(self, seqs: list[Sequence]) -> None:
        """Clear the penalty state of the slots of the penalized sequences among `seqs` (newly
        admitted): no output yet, their prompt's tokens marked."""
        penalized = [s for s in seqs if s.request.params.penalized]
        if not penalized:
            return
        if self._counts is None:
            shape, device = (len(self.slots), self.engine.spec.vocab_size), self.engine.device
            self._counts = torch.zeros(shape, dtype=torch.int32, device=device)
            self._in_prompt = torch.zeros(shape, dtype=torch.bool, device=device)
        for s in penalized:
            self._counts[s.slot].zero_()
            self._in_prompt[s.slot].zero_()
            self._in_prompt[s.slot, torch.tensor(s.request.prompt_ids, device=self.engine.device)] = True

    def _pick(self, logits, seqs, rows, fused, check) -> list[int | None]:
        """The next token of seqs[i] from row rows[i] of `logits`. When every sequence is greedy
        and unpenalized: the backend's fused arg-max (`fused`, per batch row) or the logits'
        arg-max; else every sequence through `sample_rows` (the engine's sampler, in PyTorch: its
        penalties, filters and seeded noise at the request's token index; greedy rows take the
        arg-max of their penalized logits). With `check`, a sequence whose row is not finite fails
        (None in its place); the tokens and the finiteness of every row come to the host in one
        transfer. (This is where the compiled sampler can plug in: one launch per step, with each
        row's logprobs for the sinks.)"""
        params = [s.request.params for s in seqs]
        if all(p.greedy and not p.penalized for p in params):
            finite = None
            if check or fused is None:
                argmax, finite = torch.stack([logits.argmax(-1), logits.isfinite().all(-1).long()]).tolist()
                fused = fused if fused is not None else argmax
            picks = [fused[r] for r in rows]
            finite = [True] * len(seqs) if finite is None else [bool(finite[r]) for r in rows]
        else:
            device = logits.device
            table = table_columns(row_table(params, [s.request.seed for s in seqs]))
            step = torch.tensor([len(s.request.token_ids) for s in seqs], device=device)
            counts = in_prompt = None
            slots = torch.tensor([s.slot for s in seqs], device=device)
            if any(p.penalized for p in params):
                counts, in_prompt = self._counts[slots], self._in_prompt[slots]
            chosen, non_finite = sample_rows(logits[torch.tensor(rows, device=device)], table, counts, in_prompt, step)
            if counts is not None:  # the picks count from the next step on (the penalized rows only)
                penalized = torch.tensor([p.penalized for p in params], device=device)
                self._counts.index_put_((slots, chosen), penalized.int(), accumulate=True)
            picks, bad = torch.stack([chosen, non_finite.long()]).tolist()
            finite = [not b for b in bad]
        tokens: list[int | None] = []
        for s, token, ok in zip(seqs, picks, finite):
            if check and not ok:
                self._fail(s, RuntimeError(
                    "the model produced non-finite logits (NaN or inf) for this request: the activations "
                    "overflowed or the backend failed; no token was emitted"))
                tokens.append(None)
            else:
                tokens.append(token)
        return tokens

    def _deliver(self, picked: list[tuple[Sequence, int]]) -> None:
        """Stop conditions, detokenization and delivery of each picked token."""
        limit = self.engine.max_seq_len
        for s, token in picked:
            if s.cancelled or s.done:
                continue
            delta = s.request.add(token, perf_counter(), cache_full=s.position + 1 >= limit)
            self.observer.token(s, delta)
            if delta.finish_reason is not None:
                s.done = True
                self.observer.finished(s, delta.finish_reason)
            self._emit(s, delta)

    def _emit(self, s: Sequence, item) -> None:
        try:
            s.sink(item)
        except Exception:  # noqa: BLE001 - a sink that cannot take it (its client is gone): drop the sequence
            s.cancelled = True

    def _fail(self, s: Sequence, exc: BaseException) -> None:
        if not s.done:
            s.done = True
            self.observer.finished(s, "error")
            if not s.cancelled:
                self._emit(s, exc)
