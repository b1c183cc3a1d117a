"""Property-style: random wrong types and values fed to SamplingParams, Engine.from_pretrained and
Engine.generate. Each call must fail fast with a ValueError (FileNotFoundError or
NotADirectoryError for the path) whose message names a wrong argument: never another exception,
a hang, or output. The seed of each run is in every failure message (FUZZ_SEED reruns it)."""

import contextlib
import os
import random
import signal
from fractions import Fraction

import numpy as np
import pytest
import torch

from checkpoints import VOCAB, load_cpu_engine, make_checkpoint
from flashformer.sampling import SamplingParams

SEED = int(os.environ.get("FUZZ_SEED", random.randrange(2**32)))
JUNK = [object(), b"bytes", 1 + 2j, {"a": 1}, {1, 2}, [None], float("nan"), -(10**30), np.bool_(True)]

SAMPLING_BAD = {
    "max_tokens": [0, -1, 2.5, "5", True, False, None, [], np.float32(3), 1e3, float("inf")],
    "temperature": [-1, -1e-9, float("inf"), -float("inf"), "1", True, None, [1.0], 10**400],
    "top_k": [0, -2, 2.5, "5", True, None, np.float64(5), -(10**20)],
    "top_p": [0, 0.0, -0.1, 1.5, 1.0000001, float("inf"), "0.5", True, None, [0.5], 10**400],
    "seed": [-1, 2**64, 2**70, 1.0, "7", True, [1], np.float64(1)],
    "stop_token_ids": [5, -1, [-1], [1.5], [True], "5", [None], np.array([1.5]), torch.tensor([[1]]),
                       torch.tensor([True]), [[1]], np.array([-3])],
    "stop": [5, [5], [""], "", [None], [b"x"], {"a"}, ("a", 3)],
    "ignore_eos": ["no", 0, 1, None, "False", np.bool_(True), [True]],
    "min_p": [-0.1, 1.5, float("nan"), "0.1", True, None, [0.1]],
    "presence_penalty": [2.5, -2.01, float("inf"), "1", True, None],
    "frequency_penalty": [3, -3, float("nan"), "0", False, [0.0]],
    "repetition_penalty": [0, 0.0, -1.0, float("inf"), "1.2", True, None],
    "logprobs": [-1, 21, 2.0, "5", True, [5], np.float64(3)],
}
FROM_PRETRAINED_BAD = {
    "dtype": ["int8", "bf16", "float64", torch.int8, torch.float64, 5, None, True, ["float32"]],
    "device": ["tpu", "meta", "cuda:99", "cpu:x", "", 0, 1.5, True, ["cpu"]]
    + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"]),
    "max_batch_size": [0, -1, 1.5, "2", True, None, 10**15, np.float64(2)],
    "max_seq_len": [0, 1, -5, 2.5, "64", True, 10**13, 10**30],
    "backend": ["fast", "", 5, None, True, ["auto"]],
    "progress": ["yes", 1, 0, None, []],
    "allow_unused_tensors": ["yes", 1, None],
    "quantization": ["int8", "FP8", "", 8, True, ["fp8"]],
}
VALID_FROM_PRETRAINED = dict(dtype="float32", device="cpu", max_batch_size=1, max_seq_len=32, backend="reference",
                             progress=False, allow_unused_tensors=False)
PROMPT_TOKEN_IDS_BAD = ["1 2 3", b"123", 5, 1.5, [[]], [], [[1.5]], [[True]], [[-1]], [[VOCAB]], [[1] * 40],
                        [[1], [2], [3]], np.array([1.5]), torch.tensor([[[1]]]), torch.tensor([True]),
                        {"a": 1}, [["a"]], [[1, None]], np.zeros((2, 2, 2), dtype=int), [1, [2]], (x for x in [1])]
PROMPTS_BAD = [5, [5], [None], [b"x"], ["a", "b", "c"], {"x"}, b"x", [["a"]], "a" * 200]
SAMPLING_ARG_BAD = ["greedy", 5, [SamplingParams()] * 3, [None], {}, SamplingParams(stop_token_ids=[10**6]),
                    [SamplingParams(), SamplingParams(stop_token_ids=[VOCAB])], (SamplingParams(),) * 2]


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Fail (instead of hanging) when the block runs longer than `seconds`."""

    def expired(*_):
        raise TimeoutError(f"{what} ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def expect_refusal(call, names, what, capsys, allowed=(ValueError,)):
    """`call()` raises one of `allowed` naming one of `names`, quickly, printing nothing."""
    context = f"{what[:300]} (FUZZ_SEED={SEED})"
    with deadline(10, context):
        try:
            call()
        except allowed as exc:
            message = str(exc)
            assert any(n in message for n in names), f"{context}: the message names none of {names}: {message}"
        except Exception as exc:  # noqa: BLE001 - the point: no other exception type
            pytest.fail(f"{context}: raised {type(exc).__name__}: {exc}")
        else:
            pytest.fail(f"{context}: accepted")
    captured = capsys.readouterr()
    assert captured.out == captured.err == "", f"{context}: printed {captured}"


def pick(rng, pool):
    return pool[rng.randrange(len(pool))]


def test_sampling_params_refuse_every_wrong_value(capsys):
    rng = random.Random(SEED)
    fields = sorted(SAMPLING_BAD)
    for _ in range(1000):
        wrong = {f: pick(rng, SAMPLING_BAD[f] + JUNK) for f in rng.sample(fields, rng.choice((1, 1, 2)))}
        expect_refusal(lambda: SamplingParams(**wrong), list(wrong), f"SamplingParams(**{wrong!r})", capsys)


def test_sampling_params_accept_what_they_document():
    for kwargs in [dict(temperature=Fraction(1, 2)), dict(top_p=np.float32(0.5)), dict(seed=2**64 - 1),
                   dict(stop_token_ids=np.array([1, 2], dtype=np.uint16)), dict(stop=("a", "b")), dict(top_k=10**9),
                   dict(min_p=1), dict(logprobs=0), dict(logprobs=np.int64(20)), dict(repetition_penalty=1e-3),
                   dict(presence_penalty=-2), dict(frequency_penalty=Fraction(3, 2))]:
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fuzz") / "ckpt", "llama_tied")[1]


@pytest.fixture(scope="module")
def engine(ckpt):
    return load_cpu_engine(ckpt, max_batch_size=2, max_seq_len=32)


@pytest.mark.filterwarnings("ignore:max_seq_len=")
def test_from_pretrained_refuses_every_wrong_argument(ckpt, tmp_path, capsys):
    from flashformer import Engine

    rng = random.Random(SEED + 1)
    (tmp_path / "file").write_text("not a directory")
    bad_paths = [5, None, b"/tmp", [str(ckpt)], tmp_path / "nowhere", str(tmp_path / "file"), "meta-llama/Llama-3-8B"]
    for _ in range(200):
        kwargs, path, names = dict(VALID_FROM_PRETRAINED), ckpt, []
        for arg in rng.sample(sorted(FROM_PRETRAINED_BAD) + ["path"], rng.choice((1, 1, 2))):
            if arg == "path":
                path = pick(rng, bad_paths)
                names += ["path", str(path)]
            else:
                kwargs[arg] = pick(rng, FROM_PRETRAINED_BAD[arg] + JUNK[:4])
                names.append(arg)
        expect_refusal(
            lambda: Engine.from_pretrained(path, **kwargs),
            names,
            f"from_pretrained({path!r}, **{kwargs!r})",
            capsys,
            allowed=(ValueError, FileNotFoundError, NotADirectoryError),
        )


def test_generate_refuses_every_wrong_argument(engine, capsys):
    rng = random.Random(SEED + 2)
    for _ in range(300):
        kind = rng.choice(("prompt_token_ids", "prompts", "sampling", "both"))
        if kind == "prompt_token_ids":
            kwargs, names = dict(prompt_token_ids=pick(rng, PROMPT_TOKEN_IDS_BAD + JUNK)), ["prompt_token_ids"]
        elif kind == "prompts":
            kwargs, names = dict(prompts=pick(rng, PROMPTS_BAD + JUNK)), ["prompts"]
            if kwargs["prompts"] == "a" * 200:  # a valid type whose tokens overflow max_seq_len=32
                names = ["prompts[0]"]
        elif kind == "sampling":
            kwargs, names = dict(prompt_token_ids=[1, 2], sampling=pick(rng, SAMPLING_ARG_BAD + JUNK)), ["sampling"]
        else:
            kwargs, names = dict(prompts=["a"], prompt_token_ids=[[1]]), ["prompts", "prompt_token_ids"]
        expect_refusal(lambda: engine.generate(**kwargs), names, f"generate(**{kwargs!r})", capsys)
        expect_refusal(lambda: list(engine.stream(**kwargs)), names, f"stream(**{kwargs!r})", capsys)
