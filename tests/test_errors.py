"""Bad input gets an error that names the problem (and the file or field), never a deep traceback."""

import json
import shutil

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
        match=rf"prompt_token_ids\[1\]: token id {VOCAB} \(at index 1\) is outside the vocabulary \(vocab_size={VOCAB}\)",
    ):
        engine.generate(prompt_token_ids=[[1, 2], [3, VOCAB]])
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\]: token id -1 \(at index 0\) is outside the vocabulary"):
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
