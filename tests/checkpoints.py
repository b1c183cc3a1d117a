"""Tiny random checkpoints (HF transformers, saved with save_pretrained) and a tiny tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 320
MAX_SEQ_LEN = 96
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
_TEXT = (
    "the quick brown fox jumps over the lazy dog. a tiny model reads a tiny story about kernels, "
    "tokens and caches; every layer streams its weights once. hello world! how are you today? "
) * 4

_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    vocab_size=VOCAB,
    bos_token_id=1,
    eos_token_id=2,
    max_position_embeddings=256,
)

# name -> (transformers config class name, model class name, config kwargs, save kwargs).
# initializer_range 0.2 (not HF's 0.02) gives logits of order 1, so greedy top-2 margins are clear.
ARCHS = {
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            attention_bias=True,
            mlp_bias=True,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        dict(max_shard_size="40KB"),
    ),
    "llama_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_scaling=dict(rope_type="linear", factor=2.0),
        ),
        {},
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            sliding_window=None,
        ),
        {},
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1000000.0,
        ),
        {},
    ),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
        ),
        {},
    ),
}


def hf_model(arch: str):
    """A random HF model of one of ARCHS, in fp32 eval mode, with random norms and biases too
    (HF initialises those to ones and zeros, which would leave them untested)."""
    import transformers

    config_cls, model_cls, kwargs, _ = ARCHS[arch]
    config = getattr(transformers, config_cls)(**_COMMON, **kwargs, initializer_range=0.2)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


def make_checkpoint(path: Path, arch: str):
    """Build a random model of `arch` and save it with a tokenizer to `path`; returns (HF model, path)."""
    model = hf_model(arch)
    model.save_pretrained(path, **ARCHS[arch][3])
    save_tokenizer(path)
    return model, path


def save_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer (any text encodes) of at most VOCAB ids, with a BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TEXT], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def random_prompt(length: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,)).tolist()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """HF's greedy continuation of exactly n tokens (EOS does not stop it)."""
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=0, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def random_shape_model(config: dict, *, initializer_range: float, device=None):
    """A random HF model of `config` (a config.json dict; its model_type picks the class) in fp32
    eval mode, built on `device`; norms random around 1 and biases around 0 (std 0.1): HF's ones
    and zeros would leave them untested."""
    import transformers

    from flashformer.baselines import hf_config

    config = hf_config({k: v for k, v in config.items() if k != "architectures"})
    config.initializer_range = initializer_range
    with torch.device(device or "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


def make_shape_checkpoint(path: Path, config: dict) -> Path:
    """Save a random HF model of `config` (random_shape_model, initializer_range 0.1 so logits
    are of order 1) to `path`, without a tokenizer."""
    random_shape_model(config, initializer_range=0.1).save_pretrained(path)
    return path


def keep_fp32_rope(model, fp32_buffers: dict[str, torch.Tensor]) -> None:
    """Put RoPE's inverse frequencies back into `model` in fp32, as HF computes them
    (`fp32_buffers`: named_buffers() of an fp32 twin): `model.to(torch.bfloat16)` rounds them,
    which shifts every RoPE phase in proportion to the position."""
    for name, buf in fp32_buffers.items():
        if name.endswith("inv_freq"):
            owner, leaf = name.rsplit(".", 1)
            setattr(model.get_submodule(owner), leaf, buf.clone())


def teacher_forced(backend, prompts: list[list[int]], forced: torch.Tensor) -> torch.Tensor:
    """Prefill `prompts`, then decode forced[s] (one token per row) for every step s; the decode
    logits [steps, B, vocab] in fp32."""
    device = backend.kv_cache.device
    backend.prefill([torch.tensor(p, device=device) for p in prompts])
    start = torch.tensor([len(p) for p in prompts], device=device)
    return torch.stack([backend.decode(forced[s].to(device), start + s) for s in range(forced.shape[0])])


def prompt_logits(engine, tokens: list[int], prefill: int = 4) -> torch.Tensor:
    """The logits [len(tokens) - prefill + 1, vocab] fp32 of one prompt through `engine`'s backend:
    its first `prefill` tokens prefilled, then the rest decoded one by one (teacher-forced)."""
    backend = engine.backend
    rows = [backend.prefill([torch.tensor(tokens[:prefill])])[0]]
    for pos in range(prefill, len(tokens)):
        rows.append(backend.decode(torch.tensor([tokens[pos]]), torch.tensor([pos]))[0])
    return torch.stack(rows)


def load_cpu_engine(path, **kwargs):
    """Engine.from_pretrained for the CPU tests: float32, no progress bar; kwargs override."""
    from flashformer import Engine

    return Engine.from_pretrained(path, **{"dtype": "float32", "device": "cpu", "progress": False, **kwargs})


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| in fp32; non-finite `ours` fails."""
    assert torch.isfinite(ours).all(), "non-finite logits"
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def clone_weights(w):
    """A copy of `Weights` on the same device (tied stays tied): backends may reorder theirs in place."""
    import dataclasses

    from flashformer.weights import LayerWeights, Weights

    def c(t):
        return None if t is None else t.clone()

    layers = [LayerWeights(**{f.name: c(getattr(l, f.name)) for f in dataclasses.fields(l)}) for l in w.layers]
    embed = c(w.embed)
    return Weights(embed=embed, final_norm=c(w.final_norm), lm_head=embed if w.tied else c(w.lm_head), layers=layers,
                   fragment_order=w.fragment_order)


def kv_cache(spec, weights, max_batch_size: int, max_seq_len: int):
    """A fresh KVCache for `weights` (dtype and device), as the Engine makes one."""
    from flashformer.reference import KVCache

    return KVCache.allocate(spec, max_batch_size, max_seq_len, dtype=weights.embed.dtype, device=weights.embed.device)
