"""The continuous-batching scheduler in-process (no HTTP): staggered arrivals give each sequence
what it gets alone, on the CPU reference path and on a Hopper GPU's megakernel; a failing step
fails its sequences only; the scheduler holds the engine while it runs."""

import queue
import threading
import time

import pytest
import torch

from checkpoints import load_cpu_engine, make_checkpoint, make_shape_checkpoint, random_prompt
from flashformer import Engine, SamplingParams
from flashformer.bench import shape_config
from flashformer.scheduler import QueueFull, Scheduler, Sequence

TIMEOUT = 60


@pytest.fixture(scope="module")
def cpu_engine(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("llama3"), "llama3")[1]
    return load_cpu_engine(path, max_batch_size=4, max_seq_len=96)


class Collector:
    """Sinks for sequences: every item lands on one queue as (key, item), the key numbering the
    sequences in the order they were made."""

    def __init__(self):
        self.items = queue.Queue()
        self.made = 0

    def sequences(self, engine, prompts, params) -> list[Sequence]:
        seqs = [Sequence(r, lambda item, key=self.made + i: self.items.put((key, item)))
                for i, r in enumerate(engine._requests(None, prompts, params))]
        self.made += len(seqs)
        return seqs

    def outputs(self, n: int) -> dict:
        done = {}
        while len(done) < n:
            index, item = self.items.get(timeout=TIMEOUT)
            if isinstance(item, BaseException):
                done[index] = item
            elif item.finish_reason is not None:
                done[index] = item.output
        return done


def staggered_run(engine, prompts, lengths, waves: int, sampling=None) -> list[list[int]]:
    """Submit the prompts in `waves` (each after the one before has produced tokens), so that
    sequences join a running batch and leave it at different steps; the token ids of each.
    `sampling`: SamplingParams fields of every sequence beyond max_tokens (default greedy), or a
    list of them, one per prompt."""
    scheduler = Scheduler(engine, max_queue=len(prompts))
    scheduler.start()
    collector = Collector()
    try:
        per_wave = -(-len(prompts) // waves)
        seqs = []
        for w in range(waves):
            chunk = slice(w * per_wave, (w + 1) * per_wave)
            params = _params(lengths, sampling)[chunk]
            wave = collector.sequences(engine, prompts[chunk], params)
            scheduler.submit(wave)
            seqs += wave
            deadline = time.monotonic() + TIMEOUT
            while not any(s.request.token_ids for s in wave) and time.monotonic() < deadline:
                time.sleep(0.001)
        outputs = collector.outputs(len(seqs))
    finally:
        scheduler.stop()
    return [outputs[key].token_ids for key in range(len(seqs))]


def _params(lengths, sampling=None) -> list[SamplingParams]:
    sampling = sampling or {}
    fields = sampling if isinstance(sampling, list) else [sampling] * len(lengths)
    return [SamplingParams(max_tokens=n, ignore_eos=True, **f) for n, f in zip(lengths, fields)]


def alone(engine, prompts, lengths, sampling=None) -> list[list[int]]:
    return [engine.generate(prompt_token_ids=[p], sampling=params)[0].token_ids
            for p, params in zip(prompts, _params(lengths, sampling))]


def test_staggered_arrivals_get_what_they_get_alone(cpu_engine):
    prompts = [random_prompt(n) for n in (5, 17, 3, 30, 9, 12, 1, 22)]
    lengths = [12, 3, 20, 7, 15, 1, 9, 60]  # the last one runs into the cache's end (96)
    assert staggered_run(cpu_engine, prompts, lengths, waves=3) == alone(cpu_engine, prompts, lengths)


def test_seeded_sampling_and_penalties_get_what_generate_gets(cpu_engine):
    """Sampled and penalized sequences follow the engine's sampler (its filters, penalties and
    seeded noise), whatever joins or leaves the batch around them; greedy ones among them too."""
    prompts = [random_prompt(n) for n in (5, 17, 3, 30, 9, 12, 1, 22)]
    lengths = [12, 3, 20, 7, 15, 1, 9, 40]
    sampled = dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02)
    penalized = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4)
    sampling = [dict(sampled, seed=b, **(penalized if b % 2 else {})) for b in range(6)]
    sampling += [dict(penalized, temperature=0), {}]  # greedy: penalized, plain
    got = staggered_run(cpu_engine, prompts, lengths, waves=3, sampling=sampling)
    assert got == alone(cpu_engine, prompts, lengths, sampling)
    assert got[:6] != alone(cpu_engine, prompts[:6], lengths[:6])  # (they did sample)


def test_a_stop_string_ends_a_sequence_where_it_ends_alone(cpu_engine):
    """Stop strings are found on the host, steps behind the device: a sequence ended by one gets
    the text and tokens it gets alone (none after the stop), and the batch goes on around it."""
    prompts = [random_prompt(n) for n in (5, 9, 3)]
    plain = SamplingParams(max_tokens=30, ignore_eos=True)
    full = cpu_engine.generate(prompt_token_ids=[prompts[1]], sampling=plain)[0]
    stop = next(full.text[i : i + 2] for i in range(4, len(full.text)) if "\ufffd" not in full.text[i : i + 2])
    params = [plain, SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop]), plain]
    scheduler = Scheduler(cpu_engine, max_queue=0)
    scheduler.start()
    try:
        collector = Collector()
        scheduler.submit(collector.sequences(cpu_engine, prompts, params))
        got = collector.outputs(3)
    finally:
        scheduler.stop()
    want = [cpu_engine.generate(prompt_token_ids=[p], sampling=sp)[0] for p, sp in zip(prompts, params)]
    assert [(got[i].text, got[i].token_ids) for i in range(3)] == [(w.text, w.token_ids) for w in want]
    assert got[1].finish_reason == "stop" and len(got[1].token_ids) < 30 and stop not in got[1].text


def test_a_cancelled_sequence_frees_its_slot_for_the_next(cpu_engine):
    """A sequence cancelled while it decodes stops (its sink hears nothing more), and one admitted
    into its slot gets what it gets alone."""
    scheduler = Scheduler(cpu_engine, max_queue=1)
    scheduler.start()
    try:
        collector = Collector()
        long = collector.sequences(cpu_engine, [random_prompt(6)], [SamplingParams(max_tokens=80, ignore_eos=True)])
        scheduler.submit(long)
        first, _ = collector.items.get(timeout=TIMEOUT)
        assert first == 0
        scheduler.cancel(long)
        prompt = random_prompt(4)
        scheduler.submit(collector.sequences(cpu_engine, [prompt], [SamplingParams(max_tokens=12, ignore_eos=True)]))
        done = {}
        while 1 not in done:
            key, item = collector.items.get(timeout=TIMEOUT)
            if key == 1 and item.finish_reason is not None:
                done[1] = item.output
    finally:
        scheduler.stop()
    assert long[0].cancelled and long[0].slot == 0 and len(long[0].request.token_ids) < 80
    assert done[1].token_ids == alone(cpu_engine, [prompt], [12])[0]


def test_logprobs_through_the_scheduler_are_generates(cpu_engine):
    """Sequences asking for logprobs (0, 2, 5 alternatives) beside one that does not: each gets
    what Engine.generate gives it alone, with its own count of alternatives."""
    prompts = [random_prompt(n) for n in (4, 7, 3, 9)]
    counts = [0, 2, 5, None]
    sampling = [dict(logprobs=n, temperature=0.7, seed=i) for i, n in enumerate(counts)]
    lengths = [6, 9, 5, 7]
    scheduler = Scheduler(cpu_engine, max_queue=0)
    scheduler.start()
    try:
        collector = Collector()
        scheduler.submit(collector.sequences(cpu_engine, prompts, _params(lengths, sampling)))
        got = collector.outputs(4)
    finally:
        scheduler.stop()
    want = [cpu_engine.generate(prompt_token_ids=[p], sampling=sp)[0] for p, sp in zip(prompts, _params(lengths, sampling))]
    for i, (n, w) in enumerate(zip(counts, want)):
        g = got[i]
        assert g.token_ids == w.token_ids
        if n is None:
            assert g.logprobs is None
            continue
        assert [lp.token_id for lp in g.logprobs] == g.token_ids
        assert all(len(lp.top_logprobs) == n for lp in g.logprobs)
        for a, b in zip(g.logprobs, w.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [t.token_id for t in a.top_logprobs] == [t.token_id for t in b.top_logprobs]


def test_the_scheduler_holds_the_engine(cpu_engine):
    scheduler = Scheduler(cpu_engine, max_queue=0)
    scheduler.start()
    done = threading.Event()
    prompt = random_prompt(4)

    def generate():
        cpu_engine.generate(prompt_token_ids=[prompt])
        done.set()

    thread = threading.Thread(target=generate)
    try:
        thread.start()
        assert not done.wait(0.3)  # waits for the scheduler to let go of the engine
        long = SamplingParams(max_tokens=80, ignore_eos=True)
        scheduler.submit(Collector().sequences(cpu_engine, [prompt] * 4, [long] * 4))  # every slot
        with pytest.raises(QueueFull, match="at capacity"):
            scheduler.submit(Collector().sequences(cpu_engine, [prompt], [long]))
    finally:
        scheduler.stop()
    assert done.wait(TIMEOUT)
    thread.join(TIMEOUT)


def test_a_failing_step_fails_its_sequences_and_the_scheduler_goes_on(cpu_engine, monkeypatch):
    backend = cpu_engine.backend
    decode = backend.decode
    calls = {"n": 0}

    def flaky(tokens, positions):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected step failure")
        return decode(tokens, positions)

    monkeypatch.setattr(backend, "decode", flaky)
    scheduler = Scheduler(cpu_engine, max_queue=4)
    scheduler.start()
    try:
        collector = Collector()
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        prompts = [random_prompt(5), random_prompt(6)]
        scheduler.submit(collector.sequences(cpu_engine, prompts, [params] * 2))
        outputs = collector.outputs(2)
        assert all(isinstance(o, RuntimeError) and "injected" in str(o) for o in outputs.values())
        again = Collector()
        scheduler.submit(again.sequences(cpu_engine, prompts, [params] * 2))
        outputs = again.outputs(2)
    finally:
        scheduler.stop()
    monkeypatch.undo()
    assert [outputs[i].token_ids for i in range(2)] == alone(cpu_engine, prompts, [8, 8])


# How far apart (in log-probability) the two likeliest tokens of an alone run may be where a row of a
# batch took the other one. The megakernel splits attention into chunks by the batch's longest
# context and size, so a row's sums run in another order than at batch 1 (a last-bit difference in
# attention's bf16 output, a few bf16 ulps of the logits at most); a row mixed with another's, or a
# prefill writing the wrong rows, moves the logits by O(1).
TIE = 0.05


def assert_same_up_to_ties(engine, prompts, lengths, got, want):
    """got[i] == want[i] (the alone run's tokens), or the two agree up to one step where the alone
    run's two likeliest tokens are the two taken and lie within TIE of each other; from there on the
    sequences differ, and nothing after it is compared."""
    for i, (g, w) in enumerate(zip(got, want)):
        if g == w:
            continue
        assert len(g) == len(w) == lengths[i], (i, g, w)
        k = next(j for j, (a, b) in enumerate(zip(g, w)) if a != b)
        out = engine.generate(prompt_token_ids=[prompts[i]],
                              sampling=SamplingParams(max_tokens=k + 1, ignore_eos=True, logprobs=2))[0]
        assert out.token_ids == w[:k + 1], (i, k)
        top = {t.token_id: t.logprob for t in out.logprobs[k].top_logprobs}
        assert g[k] in top and w[k] in top and abs(top[w[k]] - top[g[k]]) <= TIE, (
            f"row {i} left its alone run at token {k}: {g[k]} instead of {w[k]}, not a tie ({top})")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-d128"])
def test_megakernel_staggered_arrivals_get_what_they_get_alone(name, tmp_path):
    """On the megakernel: each row of a decode step is computed apart from the others (so a
    batch of ragged rows, free rows among them, picks what batch 1 picks but where batch 1's two
    likeliest tokens tie to a summation order), and prefill writes only its own rows."""
    config = shape_config(name)
    path = make_shape_checkpoint(tmp_path, config)
    engine = Engine.from_pretrained(path, device="cuda", max_batch_size=8, max_seq_len=512, progress=False)
    assert engine.backend.name == "megakernel"
    prompts = [torch.randint(0, config["vocab_size"], (n,)).tolist() for n in (5, 40, 3, 100, 9, 12, 1, 64, 7, 20)]
    lengths = [30, 4, 50, 12, 25, 1, 40, 90, 8, 16]
    got = staggered_run(engine, prompts, lengths, waves=4)
    assert_same_up_to_ties(engine, prompts, lengths, got, alone(engine, prompts, lengths))
