"""The Engine API on a tiny checkpoint with a tokenizer: generate, stream, chat, stopping, sampling."""

import json
import shutil
import threading

import pytest
import torch

from checkpoints import CHAT_TEMPLATE, MAX_SEQ_LEN, load_cpu_engine, make_checkpoint, random_prompt
from flashformer import Engine, RequestOutput, SamplingParams
from flashformer.sampling import sample
from flashformer.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")[1]


@pytest.fixture(scope="module")
def engine(path):
    return load_cpu_engine(path, max_batch_size=3, max_seq_len=MAX_SEQ_LEN)


def test_generate_from_strings(engine):
    prompts = ["hello world", "the quick brown fox jumps"]
    outputs = engine.generate(prompts, sampling=GREEDY)
    assert [type(o) for o in outputs] == [RequestOutput, RequestOutput]
    for prompt, output in zip(prompts, outputs):
        assert output.prompt == prompt
        assert output.prompt_token_ids == engine.tokenizer.encode(prompt)
        assert output.prompt_token_ids[0] == engine.tokenizer._tok.token_to_id("<s>")
        assert len(output.token_ids) == 24 and output.finish_reason == "length"
        assert output.text == engine.tokenizer.decode(output.token_ids)
        single = engine.generate(prompt_token_ids=[output.prompt_token_ids], sampling=GREEDY)[0]
        assert single.token_ids == output.token_ids and single.prompt is None


def test_single_string_and_flat_token_list(engine):
    by_string = engine.generate("hello world", sampling=GREEDY)
    by_ids = engine.generate(prompt_token_ids=engine.tokenizer.encode("hello world"), sampling=GREEDY)
    assert len(by_string) == len(by_ids) == 1
    assert by_string[0].token_ids == by_ids[0].token_ids


def test_default_sampling_is_16_greedy_tokens(engine):
    prompt = random_prompt(5)
    output = engine.generate(prompt_token_ids=[prompt])[0]
    assert len(output.token_ids) <= 16
    greedy = engine.generate(prompt_token_ids=[prompt], sampling=SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert output.token_ids == greedy.token_ids[: len(output.token_ids)]


def test_metrics(engine):
    output = engine.generate(prompt_token_ids=[random_prompt(7)], sampling=GREEDY)[0]
    m = output.metrics
    assert 0 < m.time_to_first_token <= m.total_time
    assert 0 < m.per_token_latency < m.total_time
    assert m.total_time == pytest.approx(m.time_to_first_token + 23 * m.per_token_latency)


def test_stream_yields_deltas_that_add_up(engine):
    prompts = ["hello world", "how are you today?"]
    expected = engine.generate(prompts, sampling=GREEDY)
    deltas = list(engine.stream(prompts, sampling=GREEDY))
    assert len(deltas) == 48
    for i, output in enumerate(expected):
        mine = [d for d in deltas if d.index == i]
        assert [t for d in mine for t in d.token_ids] == output.token_ids
        assert "".join(d.text for d in mine) == output.text
        assert [d.finish_reason for d in mine] == [None] * 23 + ["length"]
        assert mine[-1].output.token_ids == output.token_ids and mine[-1].output.text == output.text
        assert all(d.output is None for d in mine[:-1])


def test_stream_validates_before_iteration(engine):
    with pytest.raises(ValueError, match="exceed max_batch_size"):
        engine.stream(["a", "b", "c", "d"])


def test_chat_applies_the_template(engine):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    output = engine.chat(messages, SamplingParams(max_tokens=8, ignore_eos=True))
    rendered = "<s><|system|>be brief</s><|user|>hello</s><|assistant|>"
    assert engine.tokenizer.apply_chat_template(messages) == rendered
    assert output.prompt_token_ids == engine.tokenizer.encode(rendered, add_special_tokens=False)
    assert len(output.token_ids) == 8
    streamed = list(engine.chat_stream(messages, SamplingParams(max_tokens=8, ignore_eos=True)))
    assert [d.token_ids[0] for d in streamed] == output.token_ids


def test_chat_template_from_chat_template_jinja(path, tmp_path):
    ckpt = shutil.copytree(path, tmp_path / "ckpt")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.load(ckpt).chat_template is None
    (ckpt / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tokenizer = Tokenizer.load(ckpt)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False) == (
        "<s><|user|>x</s>"
    )


def test_stop_token_ids(engine):
    prompt = random_prompt(6)
    tokens = engine.generate(prompt_token_ids=[prompt], sampling=GREEDY)[0].token_ids
    stop = tokens[4]
    output = engine.generate(
        prompt_token_ids=[prompt], sampling=SamplingParams(max_tokens=24, stop_token_ids=[stop], ignore_eos=True)
    )[0]
    assert output.token_ids == tokens[: tokens.index(stop) + 1]
    assert output.finish_reason == "stop"


def test_eos_from_generation_config_stops_unless_ignored(path, tmp_path):
    ckpt = shutil.copytree(path, tmp_path / "ckpt")
    engine = load_cpu_engine(ckpt, max_seq_len=MAX_SEQ_LEN)
    prompt = random_prompt(6)
    tokens = engine.generate(prompt_token_ids=[prompt], sampling=GREEDY)[0].token_ids
    eos = tokens[3]
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    engine = load_cpu_engine(ckpt, max_seq_len=MAX_SEQ_LEN)
    assert eos in engine.eos_token_ids and 2 in engine.eos_token_ids  # 2: config.json's
    output = engine.generate(prompt_token_ids=[prompt], sampling=SamplingParams(max_tokens=24))[0]
    first = min(tokens.index(t) for t in engine.eos_token_ids if t in tokens)
    assert output.token_ids == tokens[: first + 1] and output.finish_reason == "stop"
    assert engine.generate(prompt_token_ids=[prompt], sampling=GREEDY)[0].token_ids == tokens


def _clean_window(text: str) -> str | None:
    """The first 3 characters of `text` after its first with no undecodable byte among them."""
    return next((text[i : i + 3] for i in range(1, len(text) - 2) if "\ufffd" not in text[i : i + 3]), None)


def test_stop_strings_cut_the_text(engine):
    # (the random model's greedy text may be mostly undecodable bytes: the first of a few prompts
    # whose continuation holds a clean stop string)
    for prompt in ("the lazy dog", "hello world", "a tiny model reads", "how are you today?", "tokens and caches"):
        full = engine.generate(prompt, sampling=GREEDY)[0]
        stop = _clean_window(full.text)
        if stop:
            break
    assert stop, "no prompt's greedy continuation decodes to enough clean text to pick a stop string from"
    output = engine.generate(prompt, sampling=SamplingParams(max_tokens=24, stop=stop, ignore_eos=True))[0]
    assert output.finish_reason == "stop"
    assert output.text == full.text[: full.text.index(stop)]
    assert stop not in output.text
    assert output.token_ids == full.token_ids[: len(output.token_ids)]
    streamed = "".join(
        d.text for d in engine.stream(prompt, sampling=SamplingParams(max_tokens=24, stop=[stop], ignore_eos=True))
    )
    assert streamed == output.text


def test_a_full_kv_cache_ends_with_length(engine):
    prompt = random_prompt(MAX_SEQ_LEN - 3)
    output = engine.generate(prompt_token_ids=[prompt], sampling=SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert len(output.token_ids) == 3 and output.finish_reason == "length"


def test_finished_rows_do_not_disturb_the_batch(engine):
    prompts = [random_prompt(n) for n in (4, 11, 7)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (2, 20, 9)]
    batch = engine.generate(prompt_token_ids=prompts, sampling=params)
    for prompt, p, output in zip(prompts, params, batch):
        assert output.token_ids == engine.generate(prompt_token_ids=[prompt], sampling=p)[0].token_ids
        assert len(output.token_ids) == p.max_tokens


def test_seeded_sampling_is_reproducible(engine):
    prompt = random_prompt(5)
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    first = engine.generate(prompt_token_ids=[prompt], sampling=params)[0].token_ids
    assert engine.generate(prompt_token_ids=[prompt], sampling=params)[0].token_ids == first
    other = SamplingParams(max_tokens=16, temperature=1.0, seed=4321, ignore_eos=True)
    assert engine.generate(prompt_token_ids=[prompt], sampling=other)[0].token_ids != first


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    prompt = random_prompt(5)
    greedy = engine.generate(prompt_token_ids=[prompt], sampling=GREEDY)[0].token_ids
    for params in (
        SamplingParams(max_tokens=24, temperature=1.5, top_k=1, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=1.5, top_p=1e-6, ignore_eos=True),
    ):
        assert engine.generate(prompt_token_ids=[prompt], sampling=params)[0].token_ids == greedy


def test_sampler_filters():
    logits = torch.randn(50)
    top5 = set(logits.topk(5).indices.tolist())
    draws = {sample(logits, SamplingParams(temperature=1.0, top_k=5)) for _ in range(300)}
    assert draws <= top5 and len(draws) > 1
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    mass = probs[order].cumsum(-1)
    nucleus = set(order[: int((mass < 0.5).sum()) + 1].tolist())  # smallest prefix reaching 0.5
    draws = {sample(logits, SamplingParams(temperature=1.0, top_p=0.5)) for _ in range(300)}
    assert draws <= nucleus
    assert sample(logits, SamplingParams()) == int(logits.argmax())


def test_checkpoint_without_tokenizer_works_with_token_ids(path, tmp_path):
    ckpt = shutil.copytree(path, tmp_path / "ckpt")
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer_config.json").unlink()
    engine = load_cpu_engine(ckpt, max_seq_len=MAX_SEQ_LEN)
    assert engine.tokenizer is None
    prompt = random_prompt(5)
    output = engine.generate(prompt_token_ids=[prompt], sampling=GREEDY)[0]
    assert output.text == "" and len(output.token_ids) == 24


def test_bfloat16_on_cpu_and_reference_backend(path):
    engine = Engine.from_pretrained(path, device="cpu", backend="reference", max_seq_len=MAX_SEQ_LEN, progress=False)
    assert engine.weights.embed.dtype == torch.bfloat16 and engine.backend.kv_cache.dtype == torch.bfloat16
    assert engine.backend.name == "reference"
    output = engine.generate(prompt_token_ids=[random_prompt(5)], sampling=GREEDY)[0]
    assert len(output.token_ids) == 24


def test_progress_bar(path, capsys):
    Engine.from_pretrained(path, dtype="float32", device="cpu", max_seq_len=MAX_SEQ_LEN, progress=True)
    assert "loading weights" in capsys.readouterr().err


def test_greedy_rows_take_a_backends_fused_argmax(engine, monkeypatch):
    """A backend with decode_step (the megakernel: its in-kernel arg-max as next_tokens) supplies
    the decode-step tokens of a batch whose rows are all greedy, and writes no logits for it; a
    batch with a sampled row samples every row from the logits, and the token after prefill
    always comes from the logits."""
    calls = []

    def decode_step(tokens, positions, want_logits=True):
        calls.append(want_logits)
        logits = engine.backend.decode(tokens, positions)
        fused = torch.full((tokens.shape[0],), 7, dtype=torch.int32)  # deliberately not the arg-max: 7
        return (logits if want_logits else None), fused

    monkeypatch.setattr(engine.backend, "decode_step", decode_step, raising=False)
    greedy = SamplingParams(max_tokens=4, ignore_eos=True)
    sampled = SamplingParams(max_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
    prompts = [random_prompt(5), random_prompt(6)]
    out = engine.generate(prompt_token_ids=prompts, sampling=[greedy, greedy])
    assert calls == [False] * 3
    mixed = engine.generate(prompt_token_ids=prompts, sampling=[greedy, sampled])
    assert calls[3:] == [True] * 3
    monkeypatch.delattr(engine.backend, "decode_step")
    plain = engine.generate(prompt_token_ids=prompts, sampling=[greedy, sampled])
    # all greedy: the first token from the prefill logits, then the fused picks
    assert out[0].token_ids == plain[0].token_ids[:1] + [7, 7, 7]
    assert out[1].token_ids[1:] == [7, 7, 7]
    assert [o.token_ids for o in mixed] == [o.token_ids for o in plain]  # the logits' picks


def test_generate_from_two_threads_is_serialized(engine):
    """Concurrent calls on one Engine take turns (they would otherwise decode over each other's
    cache rows): each thread gets what it gets alone."""
    prompts = [random_prompt(n) for n in (3, 9, 5, 12)]
    alone = [engine.generate(prompt_token_ids=[p], sampling=GREEDY)[0].token_ids for p in prompts]
    results: dict[int, list] = {}

    def work(i):
        results[i] = [engine.generate(prompt_token_ids=[p], sampling=GREEDY)[0].token_ids for p in prompts[i::2]]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert results == {0: alone[0::2], 1: alone[1::2]}


def test_interleaved_streams_are_refused_not_mixed(engine):
    a, b = random_prompt(4), random_prompt(7)
    expected = engine.generate(prompt_token_ids=[a], sampling=GREEDY)[0].token_ids
    first = engine.stream(prompt_token_ids=[a], sampling=GREEDY)
    tokens = next(first).token_ids
    second = engine.stream(prompt_token_ids=[b], sampling=GREEDY)  # validated, not started
    with pytest.raises(RuntimeError, match="already running a generate/stream in this thread .*close"):
        next(second)
    with pytest.raises(RuntimeError, match="already running"):
        engine.generate(prompt_token_ids=[b], sampling=GREEDY)
    assert tokens + [t for d in first for t in d.token_ids] == expected  # the first stream was not disturbed
    third = engine.stream(prompt_token_ids=[b], sampling=GREEDY)
    next(third)
    third.close()  # a closed stream hands the engine back
    assert engine.generate(prompt_token_ids=[a], sampling=GREEDY)[0].token_ids == expected
