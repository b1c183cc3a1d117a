"""`flashformer serve` as a real server process on 127.0.0.1, driven by the official `openai`
client and by httpx: completions, chat, streaming, continuous batching under 32 concurrent
clients, disconnects, the queue's 429, and bad requests. Every call has a timeout; the server is
stopped at the end."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from checkpoints import make_checkpoint

# Where the serve and test extras are not installed (the GPU machine's image), skip, not fail.
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("flashformer.serve")

MAX_BATCH, MAX_QUEUE, MAX_SEQ = 8, 32, 4096  # (long enough that no machine ends a long request early)
TIMEOUT = 60  # seconds: no call waits longer
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


class ServerProcess:
    """`flashformer serve` in a subprocess: its URL (from the line it prints once ready) and its
    stderr, read all along by a thread so that the pipe never fills."""

    def __init__(self, args: list[str]):
        code = "import sys; from flashformer.cli import main; sys.exit(main(sys.argv[1:]))"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", code, "serve", *args], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        self._url = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(TIMEOUT) or self._url is None:
            self.stop()
            pytest.fail("the server did not start:\n" + "".join(self.lines))
        self.url = self._url

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            match = re.search(r"serving \S+ at (http://\S+)", line)
            if match:
                self._url = match.group(1)
                self._ready.set()
        self._ready.set()  # the process ended

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        return self.proc.returncode


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "llama_tied")[1]


@pytest.fixture(scope="module")
def server(path):
    s = ServerProcess([str(path), "--device", "cpu", "--dtype", "float32", "--max-seq-len", str(MAX_SEQ), "--port",
                       "0", "--max-batch-size", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
                       "--served-model-name", "tiny", "--log-level", "warning"])
    yield s
    assert s.stop() == 0, "".join(s.lines)
    assert "Traceback" not in "".join(s.lines), "".join(s.lines)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def metric(http, name: str) -> float:
    """The sum of a metric's samples named exactly `name` (any labels) in /metrics."""
    text = http.get("/metrics").text
    return sum(float(v) for k, v in re.findall(r"^(\S+?)(?:\{.*\})? (\S+)$", text, re.M) if k == name)


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert http.get("/health").json()["status"] == "ok"


def test_completion_and_its_stream_agree(client):
    full = client.completions.create(model="tiny", prompt="hello world", max_tokens=12, **GREEDY)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and full.usage.completion_tokens == 12
    assert full.usage.prompt_tokens > 0 and full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(client.completions.create(model="tiny", prompt="hello world", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []


def test_chat_and_its_stream_agree(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you today?"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, **GREEDY)
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 10
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    # content as a list of text parts, and max_completion_tokens, as newer clients send them
    text_parts = [{"type": "text", "text": "how are "}, {"type": "text", "text": "you today?"}]
    parts = [{"role": "user", "content": text_parts}]
    again = client.chat.completions.create(model="tiny", messages=messages[:1] + parts, max_completion_tokens=10,
                                           **GREEDY)
    assert again.choices[0].message.content == full.choices[0].message.content


def test_logprobs_in_completions_and_chats_and_their_streams(client, path):
    """OpenAI's logprobs: a completion's legacy shape (tokens, token_logprobs, top_logprobs as
    token -> logprob, text_offset) and a chat's content entries, equal to Engine.generate's for
    the same request, and the same again in their streams."""
    from checkpoints import load_cpu_engine
    from flashformer import SamplingParams

    engine = load_cpu_engine(path)
    prompt = "the lazy dog"
    want = engine.generate(prompt, sampling=SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2))[0]
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, logprobs=2, **GREEDY)
    lp = full.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-4)
    assert lp.tokens == [t.text for t in want.logprobs] and "".join(lp.tokens) == full.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)  # (two ids of one text make one key)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=6, logprobs=2, stream=True,
                                            **GREEDY))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((s.token_logprobs for s in streamed), []) == lp.token_logprobs
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset

    messages = [{"role": "user", "content": "how are you today?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, logprobs=True, top_logprobs=3,
                                          **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 5 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)  # greedy: the top one is taken
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, logprobs=True,
                                            top_logprobs=3, stream=True, **GREEDY)
    streamed = sum((c.choices[0].logprobs.content for c in stream if c.choices and c.choices[0].logprobs), [])
    assert [c.logprob for c in streamed] == [c.logprob for c in content]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_completion_logprob_tokens_join_into_the_text(path):
    """The legacy logprobs' tokens are what each token added to the text: a special token (not in
    the text) adds "", a character whose bytes span two tokens lands on the second; so they join
    into the text and text_offset indexes it (the random model once drew <|assistant|>)."""
    from flashformer import SamplingParams
    from flashformer.engine import TokenLogprob, _Request
    from flashformer.serve import _completion_logprobs
    from flashformer.tokenizer import Tokenizer

    tok = Tokenizer.load(path)
    special, e_acute = tok.encode("<|assistant|>", add_special_tokens=False), tok.encode("é", add_special_tokens=False)
    assert len(special) == 1 and len(e_acute) == 2  # (the test's premise: one special id, two byte ids)
    ids = tok.encode("ab ", add_special_tokens=False) + special + e_acute + tok.encode(" cd", add_special_tokens=False)
    r = _Request(0, None, [1], SamplingParams(max_tokens=len(ids), logprobs=0), tok, (), "cpu")
    for t in ids:
        r.add(t, 0.0, cache_full=False, logprob=TokenLogprob(tok.token_text(t), -1.0, None, [], t))
    assert r.text == "ab é cd"
    lp = _completion_logprobs(r.logprobs, 0)
    assert "".join(lp["tokens"]) == r.text and lp["tokens"][ids.index(special[0])] == ""
    assert [r.text[o : o + len(t)] for o, t in zip(lp["text_offset"], lp["tokens"])] == lp["tokens"]
    assert r.logprobs[ids.index(special[0])].token == "<|assistant|>"  # (the chat entries keep the token's own)


def test_sampling_parameters(client):
    first = client.completions.create(model="tiny", prompt="the quick", max_tokens=16, temperature=0.9, top_p=0.9,
                                      seed=3, n=3, extra_body={"top_k": 40, "ignore_eos": True})
    assert [c.index for c in first.choices] == [0, 1, 2] and first.usage.completion_tokens == 48
    again = client.completions.create(model="tiny", prompt="the quick", max_tokens=16, temperature=0.9, top_p=0.9,
                                      seed=3, n=3, extra_body={"top_k": 40, "ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in first.choices]  # seeded: reproducible
    assert len({c.text for c in first.choices}) > 1  # choice j samples with seed + j
    penalties = dict(presence_penalty=0.5, frequency_penalty=0.5,
                     extra_body={"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.2, "ignore_eos": True})
    first = client.completions.create(model="tiny", prompt="the quick", max_tokens=16, temperature=0.9, seed=5,
                                      **penalties)
    again = client.completions.create(model="tiny", prompt="the quick", max_tokens=16, temperature=0.9, seed=5,
                                      **penalties)
    assert first.usage.completion_tokens == 16 and again.choices[0].text == first.choices[0].text
    greedy = client.completions.create(model="tiny", prompt="the quick", max_tokens=16, **GREEDY).choices[0].text
    stop = greedy[3:6]
    cut = client.completions.create(model="tiny", prompt="the quick", max_tokens=16, stop=[stop], **GREEDY)
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == greedy[: greedy.index(stop)]
    batch = client.completions.create(model="tiny", prompt=["the quick", [1, 50, 60]], max_tokens=4, **GREEDY)
    assert batch.choices[0].text == client.completions.create(
        model="tiny", prompt="the quick", max_tokens=4, **GREEDY).choices[0].text
    assert len(batch.choices) == 2


def _request(i: int) -> dict:
    """Request i of the concurrency test: a completion or a chat, streamed or not, of its own
    prompt and length (so that sequences join and leave the batch at different steps)."""
    words = "the quick brown fox jumps over the lazy dog hello world how are you today".split()
    text = " ".join(words[(i * 3 + k) % len(words)] for k in range(1 + i % 7))
    return dict(chat=i % 2 == 1, stream=i % 4 < 2, text=text, max_tokens=4 + (i * 5) % 29)


async def _run(client: openai.AsyncOpenAI, r: dict) -> str:
    kwargs = dict(model="tiny", max_tokens=r["max_tokens"], stream=r["stream"], **GREEDY)
    if r["chat"]:
        out = await client.chat.completions.create(messages=[{"role": "user", "content": r["text"]}], **kwargs)
        if r["stream"]:
            return "".join([c.choices[0].delta.content or "" async for c in out])
        return out.choices[0].message.content
    out = await client.completions.create(prompt=r["text"], **kwargs)
    if r["stream"]:
        return "".join([c.choices[0].text async for c in out])
    return out.choices[0].text


def test_32_concurrent_clients_get_what_each_gets_alone(server, http):
    requests = [_request(i) for i in range(32)]

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", timeout=TIMEOUT,
                                      max_retries=0) as client:
            together = await asyncio.wait_for(asyncio.gather(*(_run(client, r) for r in requests)), TIMEOUT)
            alone = [await asyncio.wait_for(_run(client, r), TIMEOUT) for r in requests]
        return together, alone

    full_batches = metric(http, "flashformer_decode_batch_rows_bucket")  # (cumulative buckets: just a change)
    together, alone = asyncio.run(main())
    assert together == alone
    assert metric(http, "flashformer_decode_batch_rows_bucket") > full_batches
    text = http.get("/metrics").text
    steps = float(re.search(r"^flashformer_decode_batch_rows_count (\S+)", text, re.M).group(1))
    wide = float(re.search(r'^flashformer_decode_batch_rows_bucket\{le="7.0"\} (\S+)', text, re.M).group(1))
    assert steps > wide, "no decode step ran all 8 slots: the 32 clients were not batched"


def _open_stream(http, n: int, max_tokens: int):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": max_tokens, "n": n, "stream": True, "temperature": 0,
            "ignore_eos": True}
    response = http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)
    assert response.status_code == 200
    return response


def _wait_for(condition, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_queue_429_and_disconnects_free_the_slots(http):
    tokens_before = metric(http, "flashformer_generation_tokens_total")
    long = MAX_SEQ - 16
    # 8 running + 32 waiting = 5 requests of n=8: the server's whole capacity
    streams = [_open_stream(http, MAX_BATCH, long) for _ in range((MAX_BATCH + MAX_QUEUE) // MAX_BATCH)]
    over = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert over.status_code == 429, over.text
    assert over.json()["error"]["code"] == "rate_limit_exceeded"
    lines = streams[0].iter_lines()
    assert all(next(line for line in lines if line.startswith("data:")) for _ in range(3))  # mid-stream
    for s in streams:
        s.close()
    _wait_for(lambda: http.get("/health").json() | {"status": 0} == {"status": 0, "running": 0, "waiting": 0},
              "the disconnected clients' sequences to leave the slots and the queue")
    generated = metric(http, "flashformer_generation_tokens_total") - tokens_before
    assert generated < MAX_BATCH * long / 2, "the disconnected sequences went on decoding"
    assert metric(http, "flashformer_sequences_finished_total") > 0
    ok = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_a_non_streaming_client_that_gives_up_frees_its_slots(server, http):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": MAX_SEQ - 16, "n": MAX_BATCH, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=0.5) as impatient:  # a non-streaming request, given up
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/completions", json=body)
    _wait_for(lambda: http.get("/health").json()["running"] == 0, "the abandoned request's slots to be freed")


BAD_REQUESTS = [
    # (path, body (a dict is sent as JSON, bytes as they are), status, error.param)
    ("/v1/completions", b'{"prompt": "x", ', 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": 0}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": MAX_BATCH + 1}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, 400, "min_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 2}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": 7}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hello " * MAX_SEQ}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["x", [1] * MAX_SEQ]}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * MAX_SEQ}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}, 400,
     "max_completion_tokens"),
    ("/v1/completion", {"prompt": "x"}, 404, None),
]


def test_bad_requests_get_their_4xx_and_the_server_keeps_serving(http):
    for path, body, status, param in BAD_REQUESTS:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        response = http.post(path, **kwargs)
        assert response.status_code == status, (path, body, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["message"] and error["type"], (body, error)
    assert http.get("/v1/completions").status_code == 405
    assert http.get("/health").json()["status"] == "ok"
    ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature=-2)


def test_serve_refuses_a_busy_port_before_loading_the_model(tmp_path, server, capsys):
    from flashformer.cli import main

    port = server.url.rsplit(":", 1)[1]
    assert main(["serve", str(tmp_path / "never-read"), "--port", port]) == 1
    assert f"flashformer: error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
