"""config.json -> ModelSpec: every architecture as transformers writes it, and older field layouts."""

import json

import pytest

from checkpoints import ARCHS, hf_model
from flashformer.config import ModelSpec, RopeSpec, load_spec, spec_from_dict

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 320,
    "rms_norm_eps": 1e-5,
}


@pytest.fixture(scope="module")
def saved_configs(tmp_path_factory):
    """The config.json (+ generation_config.json) that save_pretrained writes for each of ARCHS."""
    specs = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(arch)
        hf_model(arch).save_pretrained(path)
        specs[arch] = load_spec(path)
    return specs


def test_llama3_rope_scaling_explicit_head_dim_and_biases(saved_configs):
    spec = saved_configs["llama3"]
    assert isinstance(spec, ModelSpec)
    assert (spec.architecture, spec.num_heads, spec.num_kv_heads, spec.head_dim) == ("LlamaForCausalLM", 4, 2, 32)
    assert spec.rope == RopeSpec(
        theta=500000.0,
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    assert spec.qkv_bias and spec.o_bias and spec.mlp_bias and not spec.qk_norm
    assert (spec.bos_token_id, spec.eos_token_ids) == (1, (2,))


def test_linear_rope_and_default_head_dim(saved_configs):
    spec = saved_configs["llama_tied"]
    assert spec.rope == RopeSpec(theta=10000.0, rope_type="linear", factor=2.0)
    assert spec.head_dim == spec.hidden_size // spec.num_heads
    assert not (spec.qkv_bias or spec.o_bias or spec.mlp_bias)


def test_mistral_qwen2_qwen3(saved_configs):
    mistral, qwen2, qwen3 = saved_configs["mistral"], saved_configs["qwen2"], saved_configs["qwen3"]
    assert (mistral.architecture, mistral.num_heads, mistral.num_kv_heads, mistral.sliding_window) == (
        "MistralForCausalLM",
        8,
        2,
        None,
    )
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm and qwen2.sliding_window is None
    assert qwen2.rope.theta == 1000000.0
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 32 and qwen3.q_size == 128


def test_transformers_4_layout_rope_scaling_and_rope_theta():
    spec = spec_from_dict(
        {
            **LLAMA,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "type": "llama3",
                "factor": 32,
                "low_freq_factor": 1,
                "high_freq_factor": 4,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    assert spec.rope == RopeSpec(500000.0, "llama3", 32.0, 1.0, 4.0, 8192)
    assert spec_from_dict({**LLAMA, "rope_scaling": {"type": "linear", "factor": 4.0}}).rope.factor == 4.0
    assert spec_from_dict({**LLAMA, "rope_scaling": None}).rope == RopeSpec(10000.0)
    assert spec_from_dict({**LLAMA, "head_dim": None}).head_dim == 16
    assert spec_from_dict({k: v for k, v in LLAMA.items() if k != "num_key_value_heads"}).num_kv_heads == 4


def test_architecture_from_model_type_when_architectures_is_absent():
    config = {k: v for k, v in LLAMA.items() if k != "architectures"}
    assert spec_from_dict({**config, "model_type": "qwen3"}).architecture == "Qwen3ForCausalLM"


def test_eos_ids_are_the_union_of_config_and_generation_config(tmp_path):
    config = {**LLAMA, "vocab_size": 128256, "eos_token_id": [128001, 128008]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128009, 128001], "bos_token_id": 7}))
    spec = load_spec(tmp_path)
    assert spec.eos_token_ids == (128001, 128008, 128009)
    assert spec.bos_token_id == 7


def test_sliding_window_is_accepted_when_it_covers_max_seq_len():
    mistral = spec_from_dict({**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 4096})
    mistral.check_max_seq_len(4096)
    qwen2 = spec_from_dict(
        {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 64, "use_sliding_window": False}
    )
    assert qwen2.sliding_window is None
    qwen2.check_max_seq_len(4096)
