"""The `flashformer` command line, run in-process through `flashformer.cli.main`."""

import io

import pytest

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
