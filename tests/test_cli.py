"""The `flashformer` command line, run in-process through `flashformer.cli.main`."""

import io
import json
import re
import subprocess
import sys

import pytest

import flashformer

from checkpoints import load_cpu_engine, make_checkpoint
from flashformer import SamplingParams
from flashformer.cli import build_parser, main

CPU = ["--device", "cpu", "--dtype", "float32", "--max-seq-len", "128"]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama_tied")[1]


@pytest.fixture(scope="module")
def engine(path):
    return load_cpu_engine(path, max_batch_size=2, max_seq_len=128)


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "generate" in out and "chat" in out


def test_generate_streams_the_greedy_text(path, engine, capsys):
    assert main(["generate", str(path), "-p", "hello world", "--max-tokens", "12", *CPU]) == 0
    captured = capsys.readouterr()
    expected = engine.generate("hello world", sampling=SamplingParams(max_tokens=12))[0]
    assert captured.out == expected.text + "\n"
    assert f"[{len(expected.token_ids)} tokens, finish_reason={expected.finish_reason}" in captured.err
    assert "ms/token]" in captured.err


def test_generate_a_batch_with_sampling_flags(path, engine, capsys):
    args = ["--max-tokens", "6", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "7"]
    assert main(["generate", str(path), "-p", "hello", "-p", "how are you", *args, *CPU]) == 0
    out = capsys.readouterr().out
    params = SamplingParams(max_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    for i, prompt in enumerate(["hello", "how are you"]):
        expected = engine.generate([prompt], sampling=params)[0]
        assert f"--- prompt {i}: {prompt!r}\n{expected.text}\n" in out


def test_generate_with_penalty_and_min_p_flags(path, engine, capsys):
    args = ["--max-tokens", "6", "--temperature", "0.8", "--min-p", "0.1", "--repetition-penalty", "1.3",
            "--presence-penalty", "0.5", "--frequency-penalty", "0.2", "--seed", "3"]
    assert main(["generate", str(path), "-p", "hello", *args, *CPU]) == 0
    params = SamplingParams(max_tokens=6, temperature=0.8, min_p=0.1, repetition_penalty=1.3, presence_penalty=0.5,
                            frequency_penalty=0.2, seed=3)
    assert capsys.readouterr().out == engine.generate(["hello"], sampling=params)[0].text + "\n"
    assert main(["generate", str(path), "-p", "x", "--repetition-penalty", "0", *CPU]) == 1
    assert "repetition_penalty must be > 0" in capsys.readouterr().err


def test_generate_from_token_ids(path, engine, capsys):
    assert main(["generate", str(path), "--token-ids", "5,6,7", "--max-tokens", "4", *CPU]) == 0
    expected = engine.generate(prompt_token_ids=[[5, 6, 7]], sampling=SamplingParams(max_tokens=4))[0]
    assert capsys.readouterr().out == " ".join(map(str, expected.token_ids)) + "\n"


def test_chat_reads_turns_from_stdin(path, engine, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nhow are you?\n"))
    assert main(["chat", str(path), "--max-tokens", "5", "--system", "be brief", *CPU]) == 0
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    params = SamplingParams(max_tokens=5)
    first = engine.chat(messages, params)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "how are you?"}]
    second = engine.chat(messages, params)
    assert capsys.readouterr().out == f"{first.text}\n{second.text}\n"


def test_chat_exits_on_slash_exit(path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\nnever read\n"))
    assert main(["chat", str(path), *CPU]) == 0
    assert capsys.readouterr().out == ""


def test_errors_are_one_line_and_exit_1(path, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "-p", "x", *CPU]) == 1
    assert capsys.readouterr().err.startswith("flashformer: error: checkpoint directory")
    assert main(["generate", str(path), "-p", "x", "--top-p", "0", *CPU]) == 1
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", str(path), "-p", "x", "--backend", "megakernel", *CPU]) == 1
    assert "megakernel backend cannot run this model: it needs a CUDA device" in capsys.readouterr().err


def test_subcommands_are_registered_on_one_parser():
    parser = build_parser()
    args = parser.parse_args(["generate", "dir", "-p", "a", "-p", "b"])
    assert args.command == "generate" and args.prompt == ["a", "b"] and callable(args.run)
    assert parser.parse_args(["chat", "dir"]).command == "chat"


# --- Issue 20: errors, Ctrl-C, a full chat history, --help, and the new flags ---------------------


def test_usage_errors_are_one_line_with_status_1(path, capsys):
    for argv, message in [
        (["generate"], "the following arguments are required: model_dir"),
        (["generate", str(path), "--token-ids", "1 x"], "argument --token-ids: expected token ids separated"),
        (["generate", str(path), "-p", "a", "--max-tokens", "many"], "argument --max-tokens: invalid int value"),
        (["nonsense"], "argument COMMAND: invalid choice: 'nonsense'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 1
        assert err.startswith(f"flashformer: error: {message}") and err.count("\n") == 1, err


def test_unexpected_errors_are_one_line_too(path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("boom")

    monkeypatch.setattr("flashformer.engine.Engine.from_pretrained", broken)
    assert main(["generate", str(path), "-p", "x", *CPU]) == 1
    err = capsys.readouterr().err
    assert err == "flashformer: error: internal error, TypeError: boom (FLASHFORMER_DEBUG=1 shows the traceback)\n"


def test_bad_engine_arguments_are_one_line(path, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for argv, message in [
        (["generate", str(tmp_path / "file"), "-p", "x"], "checkpoint path"),
        (["generate", str(path), "-p", "x", "--device", "tpu"], "device 'tpu' is not a torch device"),
        (["generate", str(path), "-p", "x", "--temperature", "inf"], "temperature must be finite, got inf"),
        (["generate", str(path), "-p", "a", "-p", "b", "--max-batch-size", "1"], "2 prompts exceed max_batch_size=1"),
        (["generate", str(path), "--token-ids", "1 999", *CPU], "token id 999 (at index 1) is outside the vocabulary"),
    ]:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("flashformer: error: ") and message in err and err.count("\n") == 1, err


def test_render_of_a_malformed_bench_json_names_the_file_and_field(tmp_path, capsys):
    (tmp_path / "bench.json").write_text(json.dumps({"rows": [], "ttft": []}))
    assert main(["bench", "--render", str(tmp_path / "bench.json")]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"flashformer: error: {tmp_path / 'bench.json'} is not a bench.json written by flashformer bench "
        "(missing field 'note')\n"
    )
    (tmp_path / "bench.json").write_text("{not json")
    assert main(["bench", "--render", str(tmp_path / "bench.json")]) == 1
    assert "is not a bench.json written by flashformer bench (JSONDecodeError" in capsys.readouterr().err


def test_help_is_fast_shows_defaults_and_imports_no_torch():
    code = (
        "import sys, time\n"
        "from flashformer.cli import main\n"
        "for argv in (['--help'], ['generate', '--help'], ['chat', '--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "--max-tokens MAX_TOKENS\n                        most tokens to generate per request (default: 128)" in out
    assert "(default: bfloat16)" in out and "--stop TEXT" in out and "--ignore-eos" in out and "--json" in out
    assert "--max-batch-size" in out and out.rstrip().endswith(f"flashformer {flashformer.__version__}")


def test_generate_json_stop_and_ignore_eos(path, engine, capsys):
    assert main(["generate", str(path), "-p", "hello", "-p", "the lazy dog", "--max-tokens", "6", "--ignore-eos",
                 "--json", *CPU]) == 0
    captured = capsys.readouterr()
    lines = captured.out.split("\n")[:-1]  # not splitlines: a generated text may hold U+2028
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    for i, (line, prompt) in enumerate(zip(lines, ["hello", "the lazy dog"], strict=True)):
        record, expected = json.loads(line), engine.generate(prompt, sampling=params)[0]
        assert record["index"] == i and record["prompt"] == prompt and record["text"] == expected.text
        assert record["token_ids"] == expected.token_ids and len(record["token_ids"]) == 6
        assert record["finish_reason"] == "length" and record["metrics"]["time_to_first_token"] > 0
    assert captured.err == ""

    full = engine.generate("the lazy dog", sampling=SamplingParams(max_tokens=12, ignore_eos=True))[0].text
    stop = next((full[i : i + 2] for i in range(1, len(full) - 1) if "\ufffd" not in full[i : i + 2]), None)
    assert stop, "the greedy continuation decodes to too little clean text to pick a stop string from"
    assert main(["generate", str(path), "-p", "the lazy dog", "--max-tokens", "12", "--ignore-eos", "--stop", stop,
                 *CPU]) == 0
    assert capsys.readouterr().out == full[: full.index(stop)] + "\n"


def interrupting_stream(after: int):
    """An Engine.stream that yields `after` deltas of the real stream, then raises KeyboardInterrupt
    (as Ctrl-C does) on its first call, and streams normally on later calls."""
    from flashformer.engine import Engine

    real, calls = Engine.stream, []

    def stream(self, *args, **kwargs):
        calls.append(1)
        deltas = real(self, *args, **kwargs)
        if len(calls) > 1:
            return deltas

        def interrupted():
            for i, delta in enumerate(deltas):
                if i == after:
                    raise KeyboardInterrupt
                yield delta

        return interrupted()

    return stream


def test_ctrl_c_in_generate_is_one_line(path, capsys, monkeypatch):
    monkeypatch.setattr("flashformer.engine.Engine.stream", interrupting_stream(after=3))
    assert main(["generate", str(path), "-p", "hello", "--max-tokens", "10", "--ignore-eos", *CPU]) == 130
    captured = capsys.readouterr()
    assert captured.err == "flashformer: interrupted\n"
    assert captured.out.endswith("\n") and "Traceback" not in captured.out + captured.err


def test_ctrl_c_in_chat_stops_the_reply_and_returns_to_the_prompt(path, engine, capsys, monkeypatch):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    hello = [{"role": "user", "content": "hello"}]
    texts = [d.text for d in engine.chat_stream(hello, params)]
    after = next((k for k in range(1, len(texts)) if "".join(texts[:k])), None)  # some text, not all
    assert after, "the greedy reply streams too little text to interrupt it midway"
    partial = "".join(texts[:after])
    monkeypatch.setattr("flashformer.engine.Engine.stream", interrupting_stream(after=after))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you?\n"))
    assert main(["chat", str(path), "--max-tokens", "12", "--ignore-eos", *CPU]) == 0
    captured = capsys.readouterr()
    assert captured.err == "flashformer: reply interrupted (Ctrl-C at the prompt or end of input exits)\n"
    messages = [*hello, {"role": "assistant", "content": partial}, {"role": "user", "content": "how are you?"}]
    second = engine.chat(messages, params)
    assert captured.out == f"{partial}\n{second.text}\n"  # the partial reply stays in the history


def test_ctrl_c_at_the_chat_prompt_ends_the_session(path, capsys, monkeypatch):
    class Interrupted(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", Interrupted())
    assert main(["chat", str(path), *CPU]) == 0
    assert "Traceback" not in capsys.readouterr().err


def record_chat(monkeypatch) -> tuple[list[str], list[str]]:
    """Record each prompt chat sends (decoded with its special tokens) and each reply's text."""
    from flashformer.engine import Engine

    prompts, replies, real = [], [], Engine.stream

    def recording(self, *args, **kwargs):
        prompts.append(self.tokenizer.decode(kwargs["prompt_token_ids"][0], skip_special_tokens=False))
        replies.append("")
        for delta in real(self, *args, **kwargs):
            replies[-1] += delta.text
            yield delta

    monkeypatch.setattr("flashformer.engine.Engine.stream", recording)
    return prompts, replies


def test_chat_keeps_going_when_the_history_outgrows_max_seq_len(path, capsys, monkeypatch):
    from flashformer.engine import Engine

    prompts, replies = record_chat(monkeypatch)
    turns = [f"turn {i}: the quick brown fox jumps over the lazy dog" for i in range(6)]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(t + "\n" for t in turns)))
    argv = ["chat", str(path), "--system", "be brief", "--max-tokens", "8", "--ignore-eos", *CPU[:-1], "96"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert len(replies) == 6 and captured.out == "".join(r + "\n" for r in replies)  # every turn got its reply
    notes = re.findall(r"flashformer: the conversation outgrew --max-seq-len=96: dropped the (\d+) oldest turns?, "
                       r"kept the system prompt\n", captured.err)
    assert notes and all(int(n) >= 1 for n in notes)  # how many depends on the random replies
    assert captured.err == "".join(
        f"flashformer: the conversation outgrew --max-seq-len=96: dropped the {n} oldest turn{'s' * (n != '1')}, "
        "kept the system prompt\n"
        for n in notes
    )
    assert len(prompts) == 6
    for prompt, turn in zip(prompts, turns):
        assert prompt.startswith("<s><|system|>be brief</s>") and turn in prompt
    assert turns[0] not in prompts[-1]  # dropped, oldest first
    tokenizer = Engine.from_pretrained(path, device="cpu", max_seq_len=96, progress=False).tokenizer
    assert all(len(tokenizer.encode(p, add_special_tokens=False)) + 8 <= 96 for p in prompts)


def test_chat_refuses_a_message_too_long_alone_and_goes_on(path, capsys, monkeypatch):
    prompts, replies = record_chat(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello " * 100 + "\nhello\n"))
    assert main(["chat", str(path), "--max-tokens", "4", *CPU[:-1], "32"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("flashformer: error: this message makes a prompt of ")
    assert "--max-seq-len=32 holds at most 31: not sent" in captured.err
    assert len(replies) == 1 and captured.out == replies[0] + "\n"  # the second message was answered
    assert prompts[0].endswith("<|user|>hello</s><|assistant|>")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"flashformer {flashformer.__version__}\n"


def test_warnings_are_one_line(path, capsys):
    assert main(["generate", str(path), "--token-ids", "5 6", "--max-tokens", "2", *CPU[:-1], "300"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(
        "flashformer: warning: max_seq_len=300 is beyond the model's max_position_embeddings=256 (config.json)"
    )
    assert err.count("\n") == 2  # the warning and the summary
