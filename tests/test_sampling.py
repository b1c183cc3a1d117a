"""The sampler: its draws follow the exact filtered distribution (chi-square), seeds reproduce
whatever the batch, logprobs are the model's, the loop's device-side stops. CPU tests run the
PyTorch sampler (the compiled one's replica); the GPU tests run the compiled kernel."""

import math

import pytest
import torch

from checkpoints import MAX_SEQ_LEN, load_cpu_engine, make_checkpoint, random_prompt
from flashformer import SamplingParams, _core
from flashformer.sampling import (
    BatchSampler,
    filtered_logprobs,
    race_noise,
    row_table,
    sample_rows,
    split_seed,
    table_columns,
)

FILTERS = [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=20),
    dict(temperature=1.3, top_p=0.6),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, repetition_penalty=1.6, presence_penalty=0.5, frequency_penalty=0.4),
    dict(temperature=0.9, top_p=0.8, repetition_penalty=0.7, frequency_penalty=-0.5),
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("llama"), "llama3")[1]
    return load_cpu_engine(path, max_batch_size=3, max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def model_logits(engine):
    """A tiny model's next-token logits (fp32 [vocab]), rescaled to a spread (std 1.5) at which
    every filter keeps several tokens and drops many."""
    logits = engine.backend.prefill([torch.tensor(random_prompt(7))])[0].float()
    return (logits - logits.mean()) / logits.std() * 1.5


def prompt_and_output(logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """A history among the likeliest tokens, so that the penalties move much of the mass."""
    top = logits.topk(8).indices.tolist()
    return [top[0], top[2], top[2], top[6]], [top[1], top[2], top[3], top[3], top[3], top[5]]


def chi_square_passes(draws: torch.Tensor, logprobs: torch.Tensor, z: float = 4.5) -> tuple[bool, str]:
    """Whether `draws` (token ids) fit the distribution exp(logprobs): no draw outside it, and
    Pearson's statistic (bins expecting < 5 pooled) below the chi-square quantile at about
    p = 3e-6 (Wilson-Hilferty). The draws are deterministic (seeded), so a pass is reproducible."""
    probs = logprobs.exp()
    counts = torch.bincount(draws, minlength=probs.numel()).double()
    outside = int(counts[probs == 0].sum())
    if outside:
        return False, f"{outside} draws outside the support"
    expected = probs * draws.numel()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expect = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expect > 0
    stat = float(((observed - expect) ** 2 / expect)[keep].sum())
    dof = int(keep.sum()) - 1
    if dof == 0:
        return bool(observed[keep].sum() == draws.numel()), "one token"
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat < crit, f"chi-square {stat:.1f} vs {crit:.1f} at {dof} degrees of freedom"


def history(prompt_ids, output_ids, vocab: int, rows: int, device="cpu"):
    """counts, in_prompt [rows, vocab] of that prompt and output."""
    counts = torch.zeros(rows, vocab, dtype=torch.int32, device=device)
    for t in output_ids:
        counts[:, t] += 1
    in_prompt = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
    in_prompt[:, prompt_ids] = True
    return counts, in_prompt


def exact(logits, params):
    """filtered_logprobs with the test's history when params are penalized."""
    prompt_ids, output_ids = prompt_and_output(logits) if params.penalized else ((), ())
    return filtered_logprobs(logits, params, prompt_ids, output_ids)


@pytest.mark.parametrize("kwargs", FILTERS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_draws_follow_the_filtered_distribution(model_logits, kwargs):
    params = SamplingParams(seed=11, **kwargs)
    n, vocab = 20000, model_logits.numel()
    table = table_columns(row_table([params] * n, [params.seed] * n))
    counts, in_prompt = history(*prompt_and_output(model_logits), vocab, n) if params.penalized else (None, None)
    tokens, non_finite = sample_rows(model_logits.expand(n, vocab), table, counts, in_prompt, torch.arange(n))
    assert not non_finite.any()
    ok, why = chi_square_passes(tokens, exact(model_logits, params))
    assert ok, why


def test_the_filters_keep_what_vllm_keeps(model_logits):
    """top-k keeps the k largest, top-p the smallest prefix of the sorted distribution reaching p
    (on distinct logits), min-p what is at least min_p x the top probability."""
    z = model_logits / 1.0
    probs = z.softmax(-1)
    kept = lambda p: set(torch.nonzero(filtered_logprobs(model_logits, p).isfinite()).flatten().tolist())  # noqa: E731
    assert kept(SamplingParams(temperature=1.0, top_k=7)) == set(z.topk(7).indices.tolist())
    order = probs.argsort(descending=True)
    mass = probs[order].cumsum(-1)
    assert kept(SamplingParams(temperature=1.0, top_p=0.5)) == set(order[: int((mass < 0.5).sum()) + 1].tolist())
    assert kept(SamplingParams(temperature=1.0, min_p=0.3)) == set(
        torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())


def test_the_noise_is_the_compiled_samplers():
    C = _core.load()
    seeds = [0, 1, 2**32 - 1, 2**32, 2**64 - 1, 123456789012345]
    for seed in seeds:
        lo, hi = split_seed(seed)
        for step, rnd in ((0, 0), (7, 0), (100000, 3)):
            e = race_noise(torch.tensor([lo]), torch.tensor([hi]), torch.tensor([step]), rnd, 50)[0]
            bits = torch.tensor([C.sampler_noise_bits(seed, step, rnd, t) for t in range(50)], dtype=torch.float64)
            u = (bits + 0.5) / 2 ** _core.load().SAMPLER["noise_bits"]
            torch.testing.assert_close(e.double(), -torch.log(u), rtol=1e-6, atol=1e-6)


def test_same_seed_same_tokens_whatever_the_batch(engine):
    prompt = random_prompt(6)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    alone = engine.generate(prompt_token_ids=[prompt], sampling=params)[0].token_ids
    assert engine.generate(prompt_token_ids=[prompt], sampling=params)[0].token_ids == alone
    others = [SamplingParams(max_tokens=5, temperature=0.5, seed=1, ignore_eos=True), SamplingParams(max_tokens=20)]
    for row in (1, 2):
        prompts, sampling = [random_prompt(4), random_prompt(9)], list(others)
        prompts.insert(row, prompt)
        sampling.insert(row, params)
        assert engine.generate(prompt_token_ids=prompts, sampling=sampling)[row].token_ids == alone


def test_unseeded_requests_follow_torch_manual_seed(engine):
    prompt = random_prompt(5)
    params = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    torch.manual_seed(5)
    first = engine.generate(prompt_token_ids=[prompt], sampling=params)[0].token_ids
    torch.manual_seed(5)
    assert engine.generate(prompt_token_ids=[prompt], sampling=params)[0].token_ids == first


def test_penalties_change_greedy_decoding_as_vllm_does(engine):
    """Greedy with a repetition penalty: each token is the arg-max of the penalized logits."""
    prompt = random_prompt(6)
    params = SamplingParams(max_tokens=6, repetition_penalty=3.0, presence_penalty=1.0, ignore_eos=True)
    out = engine.generate(prompt_token_ids=[prompt], sampling=params)[0].token_ids
    for i, token in enumerate(out):
        logits = engine.backend.prefill([torch.tensor(prompt + out[:i])])[0]
        expected = filtered_logprobs(logits, SamplingParams(temperature=1.0, repetition_penalty=3.0,
                                                            presence_penalty=1.0), prompt, out[:i])
        assert token == int(expected.argmax())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_are_log_softmax_of_the_reference_logits(engine, temperature):
    prompt = random_prompt(5)
    params = SamplingParams(max_tokens=5, temperature=temperature, seed=3, logprobs=4, ignore_eos=True)
    out = engine.generate(prompt_token_ids=[prompt], sampling=params)[0]
    deltas = list(engine.stream(prompt_token_ids=[prompt], sampling=params))
    assert [d.logprobs[0].token_id for d in deltas] == out.token_ids
    assert len(out.logprobs) == len(out.token_ids) == 5
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        expected = engine.backend.prefill([torch.tensor(prompt + out.token_ids[:i])])[0].log_softmax(-1)
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        top = expected.topk(4)
        assert [t.token_id for t in lp.top_logprobs] == top.indices.tolist()
        assert [t.logprob for t in lp.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert lp.token == engine.tokenizer.token_text(token) and lp.bytes == engine.tokenizer.token_bytes(token)
        assert [t.bytes for t in lp.top_logprobs] == [engine.tokenizer.token_bytes(t.token_id) for t in lp.top_logprobs]
        if "\ufffd" not in lp.token:  # (a part of a character: the bytes it stands for, tests/test_stream_text.py)
            assert lp.bytes == list(lp.token.encode())
    assert engine.generate(prompt_token_ids=[prompt], sampling=SamplingParams(max_tokens=2))[0].logprobs is None


def test_logprobs_zero_gives_the_chosen_token_only(engine):
    out = engine.generate(prompt_token_ids=[random_prompt(5)], sampling=SamplingParams(max_tokens=3, logprobs=0))[0]
    assert all(lp.top_logprobs == [] for lp in out.logprobs)


def test_each_request_gets_the_top_logprobs_it_asked_for(engine):
    """In one batch, logprobs=1 and 3 and none: each token's alternatives are that request's count,
    the likeliest first (the step computes the batch's largest count), and the request without
    logprobs gets none."""
    counts = [1, 3, None]
    sampling = [SamplingParams(max_tokens=3, logprobs=n, ignore_eos=True) for n in counts]
    outs = engine.generate(prompt_token_ids=[random_prompt(4 + i) for i in range(3)], sampling=sampling)
    for n, out in zip(counts, outs):
        if n is None:
            assert out.logprobs is None
            continue
        assert all(len(lp.top_logprobs) == n for lp in out.logprobs), n
        for lp in out.logprobs:
            assert [t.logprob for t in lp.top_logprobs] == sorted((t.logprob for t in lp.top_logprobs), reverse=True)


def test_huge_top_k_and_max_tokens_mean_no_limit(engine):
    prompt = random_prompt(MAX_SEQ_LEN - 6)
    params = SamplingParams(max_tokens=10**12, top_k=10**12, temperature=1.0, seed=0)
    out = engine.generate(prompt_token_ids=[prompt], sampling=SamplingParams(**{**vars(params), "ignore_eos": True}))[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"  # the cache ends it


class CountingBackend:
    """Wraps a backend, counting its decode steps."""

    def __init__(self, backend):
        self.inner, self.decodes = backend, 0
        self.name, self.kv_cache = backend.name, backend.kv_cache

    def prefill(self, prompts):
        return self.inner.prefill(prompts)

    def decode(self, tokens, positions):
        self.decodes += 1
        return self.inner.decode(tokens, positions)


def test_the_loop_launches_no_step_it_does_not_need(engine, monkeypatch):
    counting = CountingBackend(engine.backend)
    monkeypatch.setattr(engine, "backend", counting)
    prompt = random_prompt(5)
    out = engine.generate(prompt_token_ids=[prompt], sampling=SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert len(out.token_ids) == 6 and counting.decodes == 5  # the k-th token needs k - 1 steps


def test_a_stop_string_ends_the_row_on_the_device_and_drops_later_tokens(engine, monkeypatch):
    from flashformer import engine as engine_module

    prompt = "the lazy dog"
    full = engine.generate(prompt, sampling=SamplingParams(max_tokens=24, ignore_eos=True))[0]
    stop = next(full.text[i : i + 2] for i in range(2, len(full.text)) if "\ufffd" not in full.text[i : i + 2])
    monkeypatch.setattr(engine_module, "RUN_AHEAD", 3)  # tokens past the stop are produced, never returned
    deltas = list(engine.stream(prompt, sampling=SamplingParams(max_tokens=24, stop=stop, ignore_eos=True)))
    text = "".join(d.text for d in deltas)
    assert text == full.text[: full.text.index(stop)] == deltas[-1].output.text
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == deltas[-1].output.token_ids == full.token_ids[: len(tokens)]
    assert int(engine._batch_sampler.status[0]) != 0  # aborted, or ended by itself since


def test_the_batch_sampler_on_the_cpu_feeds_tokens_and_ends_rows():
    sampler = BatchSampler(2, 10, 16, "cpu")
    params = [SamplingParams(max_tokens=3), SamplingParams(max_tokens=5, stop_token_ids=[4])]
    sampler.start([[1, 2], [3]], params, [0, 0], [set(), {4}])
    logits = torch.full((2, 10), -5.0)
    logits[0, 7], logits[1, 4] = 1.0, 1.0
    rec = sampler.read(sampler.step(logits))
    assert rec.token.tolist() == [7, 4] and rec.finish.tolist() == [0, 1]
    assert sampler.tokens.tolist() == [7, 3] and sampler.positions.tolist() == [2, 0]  # row 1 ended: not fed
    rec = sampler.read(sampler.step(logits))
    assert rec.token.tolist() == [7, -1] and rec.flags[1] & sampler.flags["idle"]
    rec = sampler.read(sampler.step(logits))
    assert rec.finish.tolist() == [2, 1]  # max_tokens


def _admit_rows_and_step_a_run(device: str):
    """Rows admitted one by one while another goes on: a step over a run of rows (first 1) draws
    for those rows alone and leaves row 0's state as it was."""
    sampler = BatchSampler(4, 10, 16, device)
    sampler.end_all()
    sampler.admit([0], [[1, 2]], [SamplingParams(max_tokens=8)], [0], [set()])
    logits = torch.full((4, 10), -5.0, device=device)
    logits[:, 7] = 1.0
    rec = sampler.read(sampler.step(logits[:1], rows=(0, 1)))
    assert rec.first == 0 and rec.token.tolist() == [7]
    before = (sampler.tokens[0].item(), sampler.positions[0].item(), sampler.generated[0].item())
    sampler.admit([2, 3], [[3], [4, 5, 6]], [SamplingParams(max_tokens=1), SamplingParams(max_tokens=4, stop_token_ids=[9])],
                  [1, 2], [set(), {9}])
    assert sampler.stop_ids.shape[1] == 1 and sampler.positions[2:].tolist() == [0, 2]
    run = torch.full((2, 10), -5.0, device=device)
    run[0, 3], run[1, 9] = 1.0, 1.0
    rec = sampler.read(sampler.step(run, rows=(2, 2)))
    assert rec.first == 2 and rec.token.tolist() == [3, 9] and rec.finish.tolist() == [2, 1]  # max_tokens; a stop
    assert (sampler.tokens[0].item(), sampler.positions[0].item(), sampler.generated[0].item()) == before
    rec = sampler.read(sampler.step(logits, rows=(0, 4)))  # rows 1 (never admitted), 2 and 3 (ended) idle
    assert rec.token.tolist() == [7, -1, -1, -1] and (rec.flags[1:] & sampler.flags["idle"]).all()
    assert sampler.positions[0].item() == 3 and sampler.generated[0].item() == 2
    with pytest.raises(ValueError, match="rows 3..4"):
        sampler.step(logits[:2], rows=(3, 2))


def test_the_batch_sampler_admits_rows_and_steps_runs_of_them():
    _admit_rows_and_step_a_run("cpu")


@pytest.mark.gpu
def test_the_compiled_sampler_admits_rows_and_steps_runs_of_them():
    if not _core.cuda_available():
        pytest.skip("needs a Hopper GPU")
    _admit_rows_and_step_a_run("cuda")


# --- GPU: the compiled sampler ------------------------------------------------------------------


def _kernel_draws(logits_row: torch.Tensor, params: SamplingParams, draws: int, batch: int = 8):
    """`draws` tokens from the compiled sampler: `batch` rows of the same logits (seeds 0..batch-1),
    stepped draws // batch times (each step advances every row's token index)."""
    vocab = logits_row.numel()
    sampler = BatchSampler(batch, vocab, 1 << 30, "cuda")
    assert sampler.kernel
    many = SamplingParams(**{**vars(params), "max_tokens": 1 << 30})
    sampler.start([[1]] * batch, [many] * batch, list(range(batch)), [set()] * batch)
    if params.penalized:
        counts, in_prompt = history(*prompt_and_output(logits_row), vocab, batch, "cuda")
        sampler.counts[:batch], sampler.in_prompt[:batch] = counts, in_prompt.to(torch.uint8)
    logits = logits_row.cuda().expand(batch, vocab).contiguous()
    counts_before = None if sampler.counts is None else sampler.counts.clone()
    out = []
    for _ in range(draws // batch):
        if counts_before is not None:  # keep the history fixed: the distribution stays the same
            sampler.counts.copy_(counts_before)
        out.append(torch.from_numpy(sampler.read(sampler.step(logits)).token.copy()))
    return torch.cat(out).long(), sampler


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", FILTERS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_kernel_draws_follow_the_filtered_distribution(model_logits, kwargs):
    if not _core.cuda_available():
        pytest.skip("needs a Hopper GPU")
    params = SamplingParams(**kwargs)
    tokens, _ = _kernel_draws(model_logits, params, 12000)
    ok, why = chi_square_passes(tokens, exact(model_logits, params))
    assert ok, why


def _agreement_with_sample_rows(device: str, vocab: int, kwargs: dict, steps: int = 20, batch: int = 8):
    """(agree, total): a BatchSampler on `device` (the compiled sampler on a GPU, the PyTorch one on
    the CPU) stepped `steps` times over `batch` rows (seeds 0..batch-1, row 3 peaked), each token
    compared with sample_rows given the same state. Every step must draw a token in every row:
    max_tokens is set past the steps (its default, 16, would end the rows and leave idle records,
    token -1, in the last steps)."""
    gen = torch.Generator().manual_seed(vocab)
    params = [SamplingParams(seed=s, **{"max_tokens": 1 << 20, **kwargs}) for s in range(batch)]
    logits = (torch.randn(batch, vocab, generator=gen) * 2).to(device)
    logits[3] *= 4  # a peaked row
    sampler = BatchSampler(batch, vocab, 1 << 20, device)
    assert sampler.kernel == (device == "cuda")
    sampler.start([[1, 2, 3]] * batch, params, [p.seed for p in params], [set()] * batch)
    agree, total = 0, 0
    for step in range(steps):
        state = (sampler.generated.clone(), None if sampler.counts is None else sampler.counts[:batch].clone())
        rec = sampler.read(sampler.step(logits))
        assert (rec.flags == 0).all() and (rec.finish == 0).all(), (
            f"step {step}: a row ended or idled (flags {rec.flags.tolist()}, finish {rec.finish.tolist()})")
        got = torch.from_numpy(rec.token.copy())
        in_prompt = None if sampler.in_prompt is None else sampler.in_prompt[:batch].bool()
        want, _ = sample_rows(logits, {k: v for k, v in sampler.table.items()}, state[1], in_prompt,
                              state[0][:batch])
        agree += int((got == want.cpu()).sum())
        total += batch
    return agree, total


@pytest.mark.parametrize("vocab,kwargs", [(5003, k) for k in FILTERS] + [(128256, FILTERS[0])],
                         ids=lambda x: str(x) if isinstance(x, int) else ",".join(f"{a}={b}" for a, b in x.items()))
def test_the_batch_sampler_steps_as_sample_rows_draws(vocab, kwargs):
    """The harness of the kernel's comparison below, on the CPU (where BatchSampler runs
    sample_rows itself): every row draws at every step, and the state sample_rows is given is the
    state the step read, so the two agree on every token. (A real vocabulary for one filter alone:
    the CPU's time.)"""
    agree, total = _agreement_with_sample_rows("cpu", vocab, kwargs)
    assert agree == total, f"{agree} of {total} tokens agree"


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [128256, 151936])
@pytest.mark.parametrize("kwargs", FILTERS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_kernel_matches_the_torch_sampler_at_real_vocabularies(vocab, kwargs):
    """The same noise and the same draws: the same tokens, but where fp32 sums of a different order
    move a token across the top-p boundary, or the kernel's fast exp and log (its first draw of a row
    that keeps every token compares l / T - log E instead of exp(z) / E) reorder two near-equal
    scores (both rare)."""
    if not _core.cuda_available():
        pytest.skip("needs a Hopper GPU")
    agree, total = _agreement_with_sample_rows("cuda", vocab, kwargs)
    assert agree >= 0.98 * total, f"{agree} of {total} tokens agree"


@pytest.mark.gpu
def test_kernel_reports_non_finite_rows_and_feeds_nothing():
    if not _core.cuda_available():
        pytest.skip("needs a Hopper GPU")
    sampler = BatchSampler(2, 1000, 64, "cuda")
    sampler.start([[1], [2]], [SamplingParams(temperature=1.0, seed=1)] * 2, [1, 1], [set(), set()])
    logits = torch.randn(2, 1000, device="cuda")
    logits[1, 17] = float("nan")
    rec = sampler.read(sampler.step(logits))
    assert not rec.flags[0] & sampler.flags["non_finite"] and rec.flags[1] & sampler.flags["non_finite"]
    assert sampler.tokens[1].item() == 2 and sampler.positions[1].item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=0.8, top_p=0.95)])
def test_kernel_sampler_is_fast(kwargs):
    """The sampler of a batch of 8 at a 128K vocabulary costs little beside a decode step."""
    if not _core.cuda_available():
        pytest.skip("needs a Hopper GPU")
    vocab, batch = 128256, 8
    sampler = BatchSampler(batch, vocab, 1 << 20, "cuda")
    params = SamplingParams(seed=0, **kwargs)
    sampler.start([[1]] * batch, [SamplingParams(**{**vars(params), "max_tokens": 1 << 20})] * batch,
                  list(range(batch)), [set()] * batch)
    logits = torch.randn(batch, vocab, device="cuda")
    for _ in range(5):
        sampler.step(logits)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(100_000_000)  # the GPU waits while the host queues every step: GPU time alone is timed
    start.record()
    for _ in range(50):
        sampler.step(logits)
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / 50
    print(f"sampler step {kwargs}: {ms * 1e3:.1f} us")
    assert ms < 0.05


# --- GPU: the engine's loop over the megakernel --------------------------------------------------


@pytest.fixture(scope="module")
def mk_engine(tmp_path_factory):
    if not torch.cuda.is_available() or not _core.cuda_available():
        pytest.skip("needs a Hopper GPU")
    from checkpoints import make_shape_checkpoint
    from flashformer import Engine
    from flashformer.bench import shape_config

    path = make_shape_checkpoint(tmp_path_factory.mktemp("tiny-gqa"), shape_config("tiny-gqa"))
    engine = Engine.from_pretrained(path, dtype="bfloat16", device="cuda", max_batch_size=4, max_seq_len=160,
                                    progress=False)
    assert engine.backend.name == "megakernel"
    return engine


def _prompts(n, length=9, vocab=None):
    return [torch.randint(0, vocab, (length + i,)).tolist() for i in range(n)]


@pytest.mark.gpu
def test_megakernel_greedy_is_the_step_by_step_arg_max(mk_engine):
    """The loop that runs ahead picks what the old loop picked: the fused arg-max of each step,
    fed back one step at a time (here by hand, through decode() and greedy_tokens())."""
    vocab = mk_engine.spec.vocab_size
    prompts = _prompts(3, vocab=vocab)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    fast = [o.token_ids for o in mk_engine.generate(prompt_token_ids=prompts, sampling=params)]
    backend = mk_engine.backend
    logits = backend.prefill([torch.tensor(p, device="cuda") for p in prompts])
    tokens = logits.argmax(-1).tolist()
    slow = [[t] for t in tokens]
    positions = [len(p) for p in prompts]
    for _ in range(39):
        backend.decode(torch.tensor(tokens, device="cuda"), torch.tensor(positions, device="cuda"))
        tokens = backend.greedy_tokens(3)
        positions = [p + 1 for p in positions]
        for row, t in zip(slow, tokens):
            row.append(t)
    assert fast == slow
    mixed = mk_engine.generate(prompt_token_ids=prompts, sampling=[params, SamplingParams(temperature=1.0, seed=1,
                                                                                         max_tokens=40), params])
    assert [mixed[0].token_ids, mixed[2].token_ids] == [fast[0], fast[2]]  # the sampler's arg-max: the same


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [dict(temperature=1.0), dict(temperature=0.8, top_p=0.95),
                                    dict(temperature=1.0, top_k=20, min_p=0.05, repetition_penalty=1.3)])
def test_megakernel_seeded_sampling_ignores_the_batch(mk_engine, kwargs):
    vocab = mk_engine.spec.vocab_size
    prompt = _prompts(1, vocab=vocab)[0]
    params = SamplingParams(max_tokens=48, seed=99, ignore_eos=True, **kwargs)
    alone = mk_engine.generate(prompt_token_ids=[prompt], sampling=params)[0].token_ids
    assert mk_engine.generate(prompt_token_ids=[prompt], sampling=params)[0].token_ids == alone
    others = _prompts(3, vocab=vocab)
    batch = mk_engine.generate(prompt_token_ids=[others[0], others[1], prompt, others[2]],
                               sampling=[SamplingParams(max_tokens=5), SamplingParams(temperature=0.5, seed=1),
                                         params, SamplingParams(max_tokens=60, temperature=2.0)])
    # The kernel's logits of a row do not depend on the others (one code path for batch 1-8), so
    # neither do its tokens.
    assert batch[2].token_ids == alone


@pytest.mark.gpu
def test_megakernel_logprobs_are_log_softmax_of_the_step_logits(mk_engine):
    vocab = mk_engine.spec.vocab_size
    prompt = _prompts(1, vocab=vocab)[0]
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=5, logprobs=5, ignore_eos=True)
    out = mk_engine.generate(prompt_token_ids=[prompt], sampling=params)[0]
    backend = mk_engine.backend
    logits = [backend.prefill([torch.tensor(prompt, device="cuda")])[0]]
    for i, token in enumerate(out.token_ids[:-1]):
        logits.append(backend.decode(torch.tensor([token], device="cuda"),
                                     torch.tensor([len(prompt) + i], device="cuda"))[0])
    backend.synchronize()
    for lp, step_logits, token in zip(out.logprobs, logits, out.token_ids):
        expected = step_logits.float().log_softmax(-1).cpu()
        assert lp.token_id == token and lp.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        assert_top_logprobs(lp.top_logprobs, expected, 5, tol=1e-4)


def assert_top_logprobs(entries, expected, n: int, tol: float):
    """`entries` (a step's top_logprobs) are the n likeliest tokens of `expected` (the replayed
    step's log-probabilities), with their values, in descending order, to within `tol`: the
    replay's logits are not bit-identical to the run's (its attention sums run in another order),
    so two tokens within `tol` of each other may come in either order (the fifth and sixth of one
    step swapped in one run of six on the H200), but a token further than `tol` below the n-th
    may not take a place."""
    ids = [t.token_id for t in entries]
    values = [t.logprob for t in entries]
    assert len(ids) == len(set(ids)) == n
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(expected[ids].tolist(), abs=tol)
    nth = float(expected.topk(n).values[-1])
    assert min(expected[ids].tolist()) >= nth - tol  # none of them below the n-th likeliest
    rest = expected.clone()
    rest[ids] = float("-inf")
    assert float(rest.max()) <= min(expected[ids].tolist()) + tol  # and none left out above them


@pytest.mark.gpu
def test_megakernel_stops_end_rows_at_the_same_token(mk_engine):
    vocab = mk_engine.spec.vocab_size
    prompts = _prompts(2, vocab=vocab)
    free = mk_engine.generate(prompt_token_ids=prompts, sampling=SamplingParams(max_tokens=30, ignore_eos=True))
    stop = free[1].token_ids[6]
    params = SamplingParams(max_tokens=30, stop_token_ids=[stop], ignore_eos=True)
    out = mk_engine.generate(prompt_token_ids=prompts, sampling=params)
    for o, f in zip(out, free):
        expected = f.token_ids[: f.token_ids.index(stop) + 1] if stop in f.token_ids else f.token_ids
        assert o.token_ids == expected
    deltas = list(mk_engine.stream(prompt_token_ids=prompts, sampling=params))
    assert [t for d in deltas if d.index == 1 for t in d.token_ids] == out[1].token_ids


@pytest.mark.gpu
def test_the_reference_backend_on_the_gpu_samples_through_the_kernel(mk_engine, tmp_path):
    from checkpoints import make_shape_checkpoint
    from flashformer import Engine
    from flashformer.bench import shape_config

    path = make_shape_checkpoint(tmp_path, shape_config("tiny-gqa"))
    ref = Engine.from_pretrained(path, dtype="float32", device="cuda", backend="reference", max_batch_size=2,
                                 max_seq_len=96, progress=False)
    prompt = _prompts(1, vocab=ref.spec.vocab_size)[0]
    params = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    first = ref.generate(prompt_token_ids=[prompt], sampling=params)[0].token_ids
    assert ref._batch_sampler.kernel
    assert ref.generate(prompt_token_ids=[prompt, prompt[:5]], sampling=params)[0].token_ids == first


@pytest.mark.gpu
def test_sampler_sanitizer_smoke():
    """Every path of the compiled sampler on a small batch: scripts/gpu_check.sh runs this under
    compute-sanitizer's memcheck, racecheck and synccheck."""
    if not _core.cuda_available():
        pytest.skip("needs a Hopper GPU")
    vocab = 5003  # not a multiple of the cluster: a short last slice
    params = [SamplingParams(temperature=0.9, top_k=40, top_p=0.8, min_p=0.01, seed=1, repetition_penalty=1.2,
                             presence_penalty=0.3, frequency_penalty=0.1),
              SamplingParams(temperature=1.0, top_p=0.3, seed=2), SamplingParams(), SamplingParams(temperature=0.5)]
    sampler = BatchSampler(4, vocab, 64, "cuda")
    sampler.start([[1, 2, 3]] * 4, params, [1, 2, 3, 4], [{7}, set(), set(), set()])
    logits = torch.randn(4, vocab, device="cuda") * 3
    for _ in range(3):
        rec = sampler.read(sampler.step(logits))
        assert (rec.token >= 0).all() and (rec.token < vocab).all()
    assert sampler.read(sampler.step(None, logits.argmax(-1).int())).token.tolist() == logits.argmax(-1).tolist()
