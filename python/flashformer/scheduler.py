"""Continuous batching over an Engine's cache rows ("slots"), for `flashformer serve`.

One thread, the scheduler's, holds the engine (`Engine.exclusive()`) for as long as it runs and
is the only one that touches the backend. Callers (the server's request handlers, on other
threads) hand it `Sequence`s through `submit()` and withdraw them through `cancel()`; both only
touch a queue under a lock. Each sequence's output comes back through its `sink`, called from
the scheduler's thread with every `StreamDelta` and, when the sequence fails, an exception.

The decode state lives on the device, in the engine's sampler (`sampling.BatchSampler`, as in
Engine.generate): each step's sampler (or, when every row is greedy, the bookkeeping over the
backend's fused arg-max) writes the chosen tokens where the next decode step reads them and ends
a row on a stop token, max_tokens or a full cache. So steps run back to back, and the host reads
each one's tokens behind, RUN_AHEAD steps at most. A round of the loop:
  1. free the slots of finished and cancelled sequences (a cancelled row is ended on the device);
     drop cancelled ones from the queue; move waiting sequences (oldest first) into free slots,
     lowest slot first (a decode step runs rows 0..B-1, so the batch stays as narrow as the load
     allows);
  2. prefill the newly admitted sequences into their slots, all in one call, and queue the
     sampling of their first tokens from its logits (their rows set up by `BatchSampler.admit`);
  3. launch the next decode step of rows 0..B-1 up to the highest slot with tokens still to come
     (free and ended rows among them idle: the sampler leaves them as they are);
  4. read the oldest queued step (the GPU runs the newer ones meanwhile) and do its host work:
     stop conditions, stop strings (which end the row on the device too), detokenization,
     delivery to the sinks. Tokens a row produced after its sequence ended are dropped.
Sampled and penalized sequences draw with the engine's sampler (its filters, penalties and noise
keyed by each request's seed and token index), so a seeded sequence draws what it draws alone in
Engine.generate, whatever else is in the batch; so do its logprobs (a step computes them when one
of its sequences asks, each sequence keeping the count it asked for).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from time import perf_counter
from typing import Callable

import torch

from .engine import RUN_AHEAD, Engine, StreamDelta, _Request
from .sampling import BatchSampler, most_logprobs

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
    queued: int = 0  # its tokens the steps queued so far will produce (the prefill's first one included)
    cancelled: bool = False
    done: bool = False  # finished or failed: its slot is freed at the next step

    def to_come(self, max_seq_len: int) -> bool:
        """Whether a decode step may still give it a token: neither ended nor past the tokens it
        can have (max_tokens, and the cache's: one position a token after the prompt's)."""
        r = self.request
        return not (self.done or self.cancelled) and self.queued < min(r.params.max_tokens,
                                                                        max_seq_len - len(r.prompt_ids))


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
    """A sampler step queued on the device: its handle (BatchSampler.read), the sequence of each
    row it stepped (from its StepRecord's `first` row on; None: a free row), and whether it drew
    first tokens from a prefill's logits."""

    handle: int
    seqs: list[Sequence | None]
    prefill: bool = False


def _num_logprobs(seqs: list[Sequence | None]) -> int | None:
    """The alternatives a step of these rows computes (BatchSampler.num_logprobs)."""
    return most_logprobs(s.request.params for s in seqs if s is not None)


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
        self.sampler: BatchSampler | None = None  # the engine's, while the thread holds it

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
        queue cannot take them all, SchedulerStopped when the scheduler is not running."""
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
        sampler = self.sampler = self.engine._sampler()
        sampler.end_all()  # every row idle until a sequence is admitted into it
        pending: deque[_Step] = deque()
        while True:
            admitted, freed = self._between_steps(idle=not pending)
            if admitted is None:
                if pending:  # leave the backend with no step unchecked
                    getattr(self.engine.backend, "synchronize", lambda: None)()
                return
            for row in freed:
                sampler.abort(row)
            if admitted:
                pending.extend(self._prefill(admitted))
            launchable = [s for s in self.slots if s is not None and s.to_come(self.engine.max_seq_len)]
            if launchable and sum(not p.prefill for p in pending) < RUN_AHEAD:
                try:
                    pending.append(self._launch(launchable))
                except Exception as exc:  # noqa: BLE001 - the step failed: its sequences fail, the rest go on
                    self._fail_steps(pending, exc, launchable)
                    continue
                if len(pending) < RUN_AHEAD:
                    continue  # another step can be queued before the host reads one
            if pending:
                self._read(pending.popleft(), last=not pending)
            else:  # (never: a sequence whose tokens were all read has finished) no step can end them
                for s in self.slots:
                    if s is not None and not (s.done or s.cancelled):
                        self._fail(s, RuntimeError("the scheduler has no step left for this sequence (internal error)"))

    def _between_steps(self, idle: bool) -> tuple[list[Sequence] | None, list[int]]:
        """Free the slots of done and cancelled sequences and admit waiting ones into free slots;
        the admitted sequences (None when the scheduler stops) and the freed rows of cancelled
        sequences (still running on the device). With nothing in flight and nothing to run, wait
        for a submit()."""
        freed = []
        with self._cond:
            while True:
                if self._stopping:
                    return None, freed
                for i, s in enumerate(self.slots):
                    if s is not None and (s.done or s.cancelled):
                        self.slots[i] = None
                        if not s.done:
                            self.observer.finished(s, "cancelled")
                            freed.append(i)
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
                    return admitted, freed
                self._cond.wait()

    def _prefill(self, seqs: list[Sequence]) -> list[_Step]:
        """Prefill `seqs` into their slots (one call), set their rows up in the sampler and queue
        the draws of their first tokens (a step per run of consecutive slots)."""
        device, sampler = self.engine.device, self.sampler
        seqs = sorted(seqs, key=lambda s: s.slot)
        requests = [s.request for s in seqs]
        steps = []
        try:
            prompts = [torch.tensor(r.prompt_ids, dtype=torch.long, device=device) for r in requests]
            logits = self.engine.backend.prefill(prompts, rows=[s.slot for s in seqs])
            sampler.admit([s.slot for s in seqs], [r.prompt_ids for r in requests], [r.params for r in requests],
                          [r.seed for r in requests], [r.stop_ids for r in requests])
            sampler.num_logprobs = _num_logprobs(seqs)
            i = 0
            while i < len(seqs):
                j = i + 1
                while j < len(seqs) and seqs[j].slot == seqs[j - 1].slot + 1:
                    j += 1
                handle = sampler.step(logits[i:j], rows=(seqs[i].slot, j - i))
                steps.append(_Step(handle, seqs[i:j], prefill=True))
                i = j
        except Exception as exc:  # noqa: BLE001 - these sequences fail; the others go on
            for s in seqs:
                sampler.abort(s.slot)
                self._fail(s, exc)
            return []
        for s in seqs:
            s.queued = 1
        return steps

    def _launch(self, seqs: list[Sequence]) -> _Step:
        """Queue a decode step of rows 0..B-1 (B: past the highest slot of `seqs`) and its sampler
        step; free and ended rows among them idle."""
        backend, sampler = self.engine.backend, self.sampler
        batch = max(s.slot for s in seqs) + 1
        rows: list[Sequence | None] = [None] * batch
        for s in self.slots[:batch]:
            if s is not None and not (s.done or s.cancelled):
                rows[s.slot] = s
        sampler.num_logprobs = _num_logprobs(rows)
        fused = sampler.num_logprobs is None and all(
            s is None or (s.request.params.greedy and not s.request.params.penalized) for s in rows)
        decode_step = getattr(backend, "decode_step", None)  # optional (engine.Backend)
        tokens, positions = sampler.tokens[:batch], sampler.positions[:batch]
        if decode_step is not None:
            logits, next_tokens = decode_step(tokens, positions, want_logits=not fused)
        else:
            fused = False
            logits, next_tokens = backend.decode(tokens, positions), None
        handle = sampler.step(None if fused else logits, next_tokens, rows=(0, batch))
        for s in seqs:
            s.queued += 1
        self.observer.step(batch)
        return _Step(handle, rows)

    def _fail_steps(self, pending: deque[_Step], exc: BaseException, seqs: list[Sequence]) -> None:
        """A decode step failed (or the one before it, which the backend reports at the next launch):
        the sequences of every queued step and `seqs` fail, and their rows end on the device."""
        failed = {id(s): s for step in pending for s in step.seqs if s is not None}
        failed.update((id(s), s) for s in seqs)
        pending.clear()
        for s in failed.values():
            self.sampler.abort(s.slot)
            self._fail(s, exc)

    def _read(self, step: _Step, last: bool) -> None:
        """Wait for `step`'s tokens and do their host work: stop conditions, detokenization and
        delivery. The newest queued step (`last`) is checked by the backend first (a step's failure
        surfaces at the next launch, or at synchronize())."""
        backend, sampler = self.engine.backend, self.sampler
        try:
            if last and not step.prefill:
                getattr(backend, "synchronize", lambda: None)()
            rec = sampler.read(step.handle)
        except Exception as exc:  # noqa: BLE001 - the step failed: its sequences fail, the rest go on
            self._fail_steps(deque([step]), exc, [])
            return
        check = step.prefill or not getattr(backend, "checks_logits", False)
        limit = self.engine.max_seq_len
        now = perf_counter()
        for i, s in enumerate(step.seqs):
            if s is None or s.done or s.cancelled:
                continue  # (a free row, or a sequence that ended: what its row produced since is dropped)
            if check and rec.flags[i] & sampler.flags["non_finite"]:
                sampler.abort(s.slot)
                self._fail(s, RuntimeError(
                    "the model produced non-finite logits (NaN or inf) for this request: the activations "
                    "overflowed or the backend failed; no token was emitted"))
                continue
            token = int(rec.token[i])
            if token < 0:  # the device ended the row at a token the host has not finished on
                sampler.abort(s.slot)
                self._fail(s, RuntimeError(f"the sampler ended row {s.slot} before the scheduler did (internal error)"))
                continue
            position = len(s.request.prompt_ids) + len(s.request.token_ids)  # where this token goes
            top = s.request.params.logprobs
            logprob = None if top is None else self.engine._logprob(rec, i, token, top)
            delta = s.request.add(token, now, cache_full=position + 1 >= limit, logprob=logprob)
            self.observer.token(s, delta)
            if delta.finish_reason is not None:
                s.done = True
                if rec.finish[i] == sampler.finish["none"]:
                    sampler.abort(s.slot)  # a stop string: the device row stops advancing
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
