"""Bad input gets an error that names the problem (and the file or field), never a deep traceback."""

import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import VOCAB, make_checkpoint
from checkpoints import load_cpu_engine as load
from flashformer.sampling import SamplingParams


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One single-file and one sharded checkpoint, copied per test before being damaged."""
    root = tmp_path_factory.mktemp("pristine")
    make_checkpoint(root / "single", "llama_tied")
    make_checkpoint(root / "sharded", "llama3")
    return root


@pytest.fixture
def ckpt(pristine, tmp_path):
    return shutil.copytree(pristine / "single", tmp_path / "single")


@pytest.fixture
def sharded(pristine, tmp_path):
    return shutil.copytree(pristine / "sharded", tmp_path / "sharded")


@pytest.fixture(scope="module")
def engine(pristine):
    return load(pristine / "single", max_batch_size=2, max_seq_len=32)


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory .*nowhere does not exist"):
        load(tmp_path / "nowhere")


def test_no_config_json(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load(ckpt)


def test_malformed_config_json(ckpt):
    (ckpt / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        load(ckpt)


def test_config_json_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json must hold a JSON object"):
        load(ckpt)


def test_missing_required_field(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    del config["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json is missing the required field 'hidden_size'"):
        load(ckpt)


def test_field_of_wrong_type(ckpt):
    edit_config(ckpt, num_hidden_layers="two")
    with pytest.raises(ValueError, match="config.json field 'num_hidden_layers' must be int, got 'two'"):
        load(ckpt)


def test_unsupported_architecture(ckpt):
    edit_config(ckpt, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel .*supported: LlamaForCausalLM"):
        load(ckpt)


def test_sliding_window_shorter_than_max_seq_len(ckpt):
    edit_config(ckpt, architectures=["MistralForCausalLM"], sliding_window=32)
    with pytest.raises(ValueError, match="sliding_window=32 is shorter than max_seq_len=64"):
        load(ckpt, max_seq_len=64)


def test_unknown_rope_type(ckpt):
    edit_config(ckpt, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="config.json field 'rope_parameters': unsupported rope_type 'yarn'"):
        load(ckpt)


def test_llama3_rope_missing_a_field(ckpt):
    edit_config(
        ckpt,
        rope_parameters=None,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    )
    with pytest.raises(
        ValueError, match="rope_scaling is missing the required field 'original_max_position_embeddings'"
    ):
        load(ckpt)


def test_quantization_config(ckpt):
    edit_config(ckpt, quantization_config={"quant_method": "awq", "bits": 4})
    with pytest.raises(ValueError, match="quantization_config .*'awq'.* not supported"):
        load(ckpt)


def test_unsupported_activation(ckpt):
    edit_config(ckpt, hidden_act="gelu")
    with pytest.raises(ValueError, match="'hidden_act': unsupported activation 'gelu'"):
        load(ckpt)


def test_heads_not_a_multiple_of_kv_heads(ckpt):
    edit_config(ckpt, num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        load(ckpt)


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    torch.save({}, ckpt / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors .*found pytorch_model.bin"):
        load(ckpt)


def test_missing_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(
        FileNotFoundError, match=f"shard {shard.name} listed in model.safetensors.index.json is missing"
    ):
        load(sharded)


def test_malformed_index(sharded):
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="model.safetensors.index.json is not a valid safetensors index"):
        load(sharded)


def test_missing_tensor(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        load(ckpt)


def test_tensor_listed_in_index_but_not_in_its_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.k_proj.weight"
    index["weight_map"][name] = index["weight_map"]["model.embed_tokens.weight"]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"tensor {name} is not in model-.*safetensors"):
        load(sharded)


def test_truncated_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is truncated or"):
        load(ckpt)


def test_corrupt_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors is truncated or not a valid safetensors file"):
        load(ckpt)


def test_shape_mismatch(ckpt):
    edit_config(ckpt, intermediate_size=96)
    with pytest.raises(
        ValueError, match=r"mlp.down_proj.weight in model.safetensors has shape \(64, 128\), expected \(64, 96\)"
    ):
        load(ckpt)


def test_bad_engine_arguments(ckpt):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load(ckpt, dtype="int8")
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1, got 0"):
        load(ckpt, max_batch_size=0)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        load(ckpt, backend="fast")


def test_megakernel_backend_says_why_it_cannot_run(ckpt):
    # ckpt's shape is no compiled config, and the tests load on the CPU: the first reason wins.
    with pytest.raises(RuntimeError, match="megakernel backend cannot run this model: it needs a CUDA device, not cpu"):
        load(ckpt, backend="megakernel")


def test_prompt_longer_than_max_seq_len(engine):
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\] has 40 tokens, too long for max_seq_len=32"):
        engine.generate(prompt_token_ids=[[5] * 40])
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\] has 32 tokens, too long for max_seq_len=32"):
        engine.generate(prompt_token_ids=[[5] * 32])


def test_token_id_outside_the_vocabulary(engine):
    with pytest.raises(
        ValueError,
        match=rf"prompt_token_ids\[1\]: token id {VOCAB} \(at index 1\) is outside the vocabulary "
        rf"\(vocab_size={VOCAB}\)",
    ):
        engine.generate(prompt_token_ids=[[1, 2], [3, VOCAB]])
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\]: token id -1 \(at index 0\) is outside the vocab"):
        engine.generate(prompt_token_ids=[[-1]])


def test_malformed_prompts(engine):
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\] is empty"):
        engine.generate(prompt_token_ids=[[]])
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\] must be a list of int token ids, got \[1.5, 2\]"):
        engine.generate(prompt_token_ids=[[1.5, 2]])
    with pytest.raises(ValueError, match="pass exactly one of prompts"):
        engine.generate()
    with pytest.raises(ValueError, match="prompts must be strings"):
        engine.generate([[1, 2]])


def test_more_prompts_than_max_batch_size(engine):
    with pytest.raises(ValueError, match="3 prompts exceed max_batch_size=2"):
        engine.generate(["a", "b", "c"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens must be an int >= 1, got 0"),
        (dict(max_tokens=2.5), "max_tokens must be an int >= 1, got 2.5"),
        (dict(temperature=-0.1), "temperature must be >= 0, got -0.1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=0), "top_k must be -1 or >= 1, got 0"),
        (dict(seed="x"), "seed must be an int or None"),
        (dict(stop_token_ids=[-3]), "stop_token_ids must be ints >= 0"),
        (dict(stop=[""]), "stop must be non-empty strings"),
    ],
)
def test_invalid_sampling_values(kwargs, message):
    with pytest.raises(ValueError, match="invalid SamplingParams: " + message):
        SamplingParams(**kwargs)


def test_sampling_list_of_the_wrong_length(engine):
    with pytest.raises(ValueError, match="sampling must be a SamplingParams or a list of 1 SamplingParams"):
        engine.generate(prompt_token_ids=[[1, 2]], sampling=[SamplingParams(), SamplingParams()])


def test_strings_without_a_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    engine = load(ckpt)
    with pytest.raises(ValueError, match="no tokenizer.json: pass prompt_token_ids"):
        engine.generate(["hello"])
    with pytest.raises(ValueError, match="chat needs a tokenizer"):
        engine.chat([{"role": "user", "content": "hi"}])


def test_corrupt_tokenizer_json(ckpt):
    (ckpt / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json could not be loaded"):
        load(ckpt)


def test_chat_template_raise_exception(engine):
    with pytest.raises(ValueError, match="chat template failed: unknown role robot"):
        engine.chat([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="messages must be a list of"):
        engine.chat(["hello"])


# --- Weights and configs that would make the output silently wrong (issue 20) -----------------


def edit_tensors(path, edit):
    """Rewrite model.safetensors with `edit(tensors)` applied to its dict of tensors."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_naming_the_tensor(ckpt, value):
    name = "model.layers.1.self_attn.v_proj.weight"
    edit_tensors(ckpt, lambda t: t[name].view(-1).__setitem__(17, value))
    with pytest.raises(ValueError, match=rf"tensor {name} in model.safetensors has 1 non-finite values \(NaN or inf\)"):
        load(ckpt)


def test_weight_beyond_the_model_dtype_is_refused_naming_the_tensor(ckpt):
    name = "model.layers.0.mlp.down_proj.weight"
    edit_tensors(ckpt, lambda t: t[name].view(-1).__setitem__(3, 1e5))  # finite in fp32, inf in fp16
    with pytest.raises(ValueError, match=rf"tensor {name} in model.safetensors has values beyond the range of float16"):
        load(ckpt, dtype="float16")
    assert load(ckpt, dtype="float32").weights.layers[0].w_down.view(-1)[3] == 1e5


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(rms_norm_eps=0), "config.json field 'rms_norm_eps' must be > 0, got 0.0"),
        (dict(rms_norm_eps=-1e-6), "config.json field 'rms_norm_eps' must be > 0, got -1e-06"),
        (dict(rms_norm_eps=float("nan")), "config.json field 'rms_norm_eps' must be finite, got nan"),
        (dict(rope_parameters=None, rope_scaling=None, rope_theta=0), "config.json field 'rope_theta' must be > 0"),
        (
            dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 0.0}),
            "config.json rope_parameters field 'rope_theta' must be > 0, got 0.0",
        ),
        (
            dict(rope_parameters={"rope_type": "linear", "factor": 0.0, "rope_theta": 1e4}),
            "config.json rope_parameters field 'factor' must be > 0, got 0.0",
        ),
        (
            dict(
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 5e5,
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            ),
            "rope_parameters field 'high_freq_factor' must be > low_freq_factor=4.0, got 4.0",
        ),
        (
            dict(rope_parameters={"rope_type": "linear", "factor": float("inf"), "rope_theta": 1e4}),
            "rope_parameters field 'factor' must be finite, got inf",
        ),
    ],
)
def test_config_values_that_break_the_math_are_refused_by_name(ckpt, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        load(ckpt)


@pytest.mark.parametrize("source", ["config.json", "generation_config.json"])
def test_eos_id_outside_the_vocabulary_is_refused(ckpt, source):
    if source == "config.json":
        edit_config(ckpt, eos_token_id=[2, VOCAB])
    else:
        (ckpt / source).write_text(json.dumps({"eos_token_id": VOCAB + 7}))
    with pytest.raises(
        ValueError,
        match=re.escape(f"{source} field 'eos_token_id': token id {VOCAB + (source != 'config.json') * 7} is outside"),
    ):
        load(ckpt)


def test_config_with_fewer_layers_than_the_checkpoint_is_refused(ckpt):
    edit_config(ckpt, num_hidden_layers=1)
    with pytest.raises(
        ValueError,
        match=r"has 9 tensors of layers up to model.layers.1, but config.json has num_hidden_layers=1: "
        r"model.layers.1.input_layernorm.weight, .* \(and 6 more\); pass allow_unused_tensors=True",
    ):
        load(ckpt)
    assert len(load(ckpt, allow_unused_tensors=True).weights.layers) == 1


def test_extra_tensors_are_refused_unless_allowed(ckpt):
    edit_tensors(ckpt, lambda t: t.update({"model.vision_tower.proj.weight": torch.ones(2, 2)}))
    with pytest.raises(
        ValueError, match="has 1 tensors the model does not use: model.vision_tower.proj.weight; pass allow_unused"
    ):
        load(ckpt)
    engine = load(ckpt, allow_unused_tensors=True)
    assert engine.generate(prompt_token_ids=[[1, 2, 3]], sampling=SamplingParams(max_tokens=2))[0].token_ids


def test_rotary_inv_freq_buffers_of_old_exports_are_ignored(ckpt):
    edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    assert len(load(ckpt).weights.layers) == 2


@pytest.mark.parametrize("dtype, shown", [(torch.int32, "I32"), (torch.bool, "BOOL"), (torch.int8, "I8")])
def test_non_floating_weights_are_refused(ckpt, dtype, shown):
    name = "model.layers.0.post_attention_layernorm.weight"
    edit_tensors(ckpt, lambda t: t.update({name: t[name].to(dtype)}))
    message = rf"tensor {name} in model.safetensors has dtype {shown}; weights must be floating point"
    with pytest.raises(ValueError, match=message):
        load(ckpt)


def test_untied_config_without_lm_head_is_refused(ckpt):
    edit_config(ckpt, tie_word_embeddings=False)
    with pytest.raises(
        ValueError, match=r"missing tensor lm_head.weight \(config.json has tie_word_embeddings=false\)"
    ):
        load(ckpt)


# --- Non-finite logits -------------------------------------------------------------------------


def poison(engine, monkeypatch, method, at_call, row):
    """Make the backend's `method` return NaN in `row` at its `at_call`-th call (1-based)."""
    original, calls = getattr(engine.backend, method), []

    def poisoned(*args):
        logits = original(*args).clone()  # the reference backend's are inference tensors
        calls.append(1)
        if len(calls) == at_call:
            logits[row, 5] = float("nan")
        return logits

    monkeypatch.setattr(engine.backend, method, poisoned)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_decode_step_with_non_finite_logits_raises_instead_of_emitting(engine, monkeypatch, temperature):
    poison(engine, monkeypatch, "decode", at_call=2, row=1)
    params = SamplingParams(max_tokens=8, temperature=temperature, seed=0, ignore_eos=True)
    deltas = []
    with pytest.raises(RuntimeError, match=r"decode step 2 produced non-finite logits \(NaN or inf\) in row 1: "):
        for delta in engine.stream(prompt_token_ids=[[1, 2, 3], [4, 5]], sampling=params):
            deltas.append(delta)
    assert len(deltas) == 2 * 2  # the prefill's tokens and step 1's, nothing of step 2


def test_non_finite_prefill_logits_raise(engine, monkeypatch):
    poison(engine, monkeypatch, "prefill", at_call=1, row=0)
    with pytest.raises(RuntimeError, match=r"the prefill produced non-finite logits \(NaN or inf\) in row 0"):
        engine.generate(prompt_token_ids=[[1, 2, 3]])


def test_a_backend_that_checks_its_logits_is_trusted(engine, monkeypatch):
    """checks_logits = True: the backend raises itself (the megakernel, on the device), so the
    engine adds no check of its own to decode steps."""
    poison(engine, monkeypatch, "decode", at_call=1, row=0)
    monkeypatch.setattr(engine.backend, "checks_logits", True, raising=False)
    out = engine.generate(prompt_token_ids=[[1, 2, 3]], sampling=SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3


# --- Arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ignore_eos="no"), "ignore_eos must be a bool (True or False), got 'no'"),
        (dict(ignore_eos=1), "ignore_eos must be a bool (True or False), got 1"),
        (dict(stop=5), "stop must be non-empty strings (a string or a list of them; or None), got 5"),
        (
            dict(stop_token_ids=5),
            "stop_token_ids must be ints >= 0 (a list, tuple, or 1-D integer array or tensor; or None), got 5",
        ),
        (dict(stop_token_ids=[True]), "stop_token_ids must be ints >= 0"),
        (dict(seed=2**70), f"seed must be an int or None (0 <= seed < 2**64), got {2**70}"),
        (dict(seed=-1), "seed must be an int or None (0 <= seed < 2**64), got -1"),
        (dict(seed=True), "seed must be an int or None"),
        (dict(temperature=float("inf")), "temperature must be finite, got inf"),
        (dict(temperature=float("nan")), "temperature must be finite, got nan"),
        (dict(temperature="hot"), "temperature must be a number, got 'hot'"),
        (dict(top_p=float("nan")), "top_p must be finite, got nan"),
        (dict(max_tokens=True), "max_tokens must be an int >= 1, got True"),
        (dict(top_k=2.0), "top_k must be an int, got 2.0"),
    ],
)
def test_sampling_params_types_are_strict(kwargs, message):
    with pytest.raises(ValueError, match=re.escape("invalid SamplingParams: " + message)):
        SamplingParams(**kwargs)


def test_sampling_params_accept_numpy_and_tensor_integers():
    params = SamplingParams(max_tokens=np.int64(3), seed=np.uint64(7), stop_token_ids=np.array([4, 5]))
    assert params == SamplingParams(max_tokens=3, seed=7, stop_token_ids=[4, 5])
    assert type(params.max_tokens) is int and type(params.seed) is int
    assert SamplingParams(stop_token_ids=torch.tensor([9])).stop_token_ids == (9,)
    assert SamplingParams(temperature=1e-7).greedy  # dividing by less would overflow


def test_stop_token_ids_outside_the_vocabulary(engine):
    with pytest.raises(ValueError, match=r"sampling.stop_token_ids: token id 1000000 is outside the vocabulary"):
        engine.generate(prompt_token_ids=[[1]], sampling=SamplingParams(stop_token_ids=[10**6]))
    with pytest.raises(ValueError, match=r"sampling\[1\].stop_token_ids: token id 320 is outside"):
        engine.generate(
            prompt_token_ids=[[1], [2]], sampling=[SamplingParams(), SamplingParams(stop_token_ids=[VOCAB])]
        )


def test_token_ids_may_be_numpy_arrays_or_tensors(engine):
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    expected = engine.generate(prompt_token_ids=[[5, 6, 7], [8, 9, 10]], sampling=params)
    for ids in (np.array([[5, 6, 7], [8, 9, 10]]), torch.tensor([[5, 6, 7], [8, 9, 10]]),
                [np.array([5, 6, 7], dtype=np.int32), torch.tensor([8, 9, 10])]):
        assert [o.token_ids for o in engine.generate(prompt_token_ids=ids, sampling=params)] == [
            o.token_ids for o in expected
        ]
    assert engine.generate(prompt_token_ids=torch.tensor([5, 6, 7]), sampling=params)[0].token_ids == (
        expected[0].token_ids
    )


@pytest.mark.parametrize(
    "ids, message",
    [
        (
            "1 2 3",
            "prompt_token_ids must be token ids (a list of ints, or a 1-D integer array or tensor) or a list of "
            "them, got '1 2 3'",
        ),
        (5, "prompt_token_ids must be token ids"),
        (
            np.array([1.0, 2.0]),
            "prompt_token_ids must be a list of int token ids (an array or tensor must be 1-D of integers)",
        ),
        (torch.tensor([True, False]), "prompt_token_ids must be a list of int token ids (an array"),
        (torch.zeros(1, 1, 2, dtype=torch.long), "prompt_token_ids must be token ids"),
        ([[1, 2], "3 4"], "prompt_token_ids[1] must be a list of int token ids, got '3 4'"),
        ([], "no prompts given (prompt_token_ids is empty)"),
        ([[1], [2], [3]], "3 prompts exceed max_batch_size=2 (prompt_token_ids holds 3;"),
    ],
)
def test_prompt_token_ids_of_the_wrong_type(engine, ids, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.generate(prompt_token_ids=ids)


def test_prompts_of_the_wrong_type(engine):
    with pytest.raises(ValueError, match=re.escape("prompts must be strings (a string or a list of them; pass token")):
        engine.generate(5)
    with pytest.raises(ValueError, match=re.escape("got ['a', None]")):
        engine.generate(["a", None])
    with pytest.raises(ValueError, match=r"3 prompts exceed max_batch_size=2 \(prompts holds 3"):
        engine.generate(("a", "b", "c"))


def test_chat_messages_of_the_wrong_type(engine):
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\] must be a string, got 5"):
        engine.chat([{"role": "user", "content": 5}])
    with pytest.raises(ValueError, match="messages is empty"):
        engine.chat([])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(device="tpu"), "device 'tpu' is not a torch device"),
        (dict(device="meta"), "device 'meta' is not supported: flashformer runs on cpu or cuda"),
        (dict(device=0), "device must be a string such as 'cpu' or 'cuda:0', a torch.device, or None, got 0"),
        (dict(max_batch_size=True), "max_batch_size must be an integer >= 1, got True"),
        (dict(max_batch_size=2.0), "max_batch_size must be an integer >= 1, got 2.0"),
        (dict(max_seq_len=1), "max_seq_len must be an integer >= 2, got 1"),
        (dict(max_seq_len="64"), "max_seq_len must be an integer >= 2, got '64'"),
        (dict(progress="yes"), "progress must be a bool (True or False), got 'yes'"),
        (dict(allow_unused_tensors=1), "allow_unused_tensors must be a bool (True or False), got 1"),
        (dict(backend=None), "unknown backend None"),
        (dict(dtype=["bfloat16"]), "unsupported dtype ['bfloat16']"),
    ],
)
def test_from_pretrained_arguments_are_checked_before_any_file_is_read(tmp_path, kwargs, message):
    # The directory does not exist: an argument error must come first.
    with pytest.raises(ValueError, match=re.escape(message)):
        load(tmp_path / "nowhere", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_cuda_without_a_gpu_is_one_clear_error(ckpt):
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(ValueError, match=r"device .*cuda.* is not available: torch sees no CUDA device"):
            load(ckpt, device=device)


def test_a_file_as_the_checkpoint_directory(ckpt):
    with pytest.raises(NotADirectoryError, match=r"checkpoint path .*config.json is a file; pass the directory"):
        load(ckpt / "config.json")
    with pytest.raises(ValueError, match="path must be a checkpoint directory"):
        load(None)


@pytest.mark.filterwarnings("ignore:max_seq_len=1000000000 is beyond")
def test_a_kv_cache_that_cannot_fit_says_how_many_bytes(ckpt):
    # KV: 2 layers x 2 x 1 row x 4 kv heads x 10**9 positions x 16 dims x 4 bytes = 1.024e12 bytes;
    # RoPE: cos and sin, 10**9 x 16 fp32 = 1.28e11 bytes
    with pytest.raises(
        ValueError,
        match=r"the weights \(.* bytes .*\) and a KV cache of max_batch_size=1 x max_seq_len=1000000000 "
        r"\(1,152,000,000,000 bytes .* with the RoPE tables\) need [\d,]+ bytes .*, but cpu has [\d,]+ bytes .* free",
    ):
        load(ckpt, max_seq_len=10**9)


def test_weights_that_cannot_fit_are_refused_before_loading(ckpt, monkeypatch):
    monkeypatch.setattr("flashformer.validate.free_bytes", lambda device: 1000)
    loaded = []
    monkeypatch.setattr("flashformer.engine.load_weights", lambda *a, **k: loaded.append(1))
    with pytest.raises(ValueError, match=r"the weights \([\d,]+ bytes.*need [\d,]+ bytes .*, but cpu has 1,000 bytes"):
        load(ckpt, max_seq_len=32)
    assert not loaded


def test_max_seq_len_beyond_max_position_embeddings_warns_once(ckpt):
    with pytest.warns(UserWarning) as record:
        engine = load(ckpt, max_seq_len=300)
    assert [str(w.message) for w in record] == [
        "max_seq_len=300 is beyond the model's max_position_embeddings=256 (config.json): positions past it "
        "were never trained, so the output there may degrade"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.generate(prompt_token_ids=[[1] * 280], sampling=SamplingParams(max_tokens=4))
        assert load(ckpt).max_seq_len == 256  # the default: 4096, or max_position_embeddings when smaller


def test_malformed_tokenizer_config_and_chat_template_name_the_file(ckpt):
    (ckpt / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"tokenizer_config.json must hold a JSON object, got list"):
        load(ckpt)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: 'chat_template' must be a string, got int"):
        load(ckpt)
    (ckpt / "tokenizer_config.json").write_text("{}")
    (ckpt / "chat_template.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"chat_template.json is not valid JSON"):
        load(ckpt)
