"""Every model family the megakernel runs (Llama, Mistral, Qwen2 with q/k/v biases, Qwen3 with
q/k norm) against HF transformers as ground truth, through the user's path: a checkpoint of the
real shape (2 layers, random bf16-exact weights) saved with `save_pretrained`, loaded with
`Engine.from_pretrained(..., backend="megakernel")`, teacher-forced in a ragged batch.

Yardstick (GPU): HF in fp32, built in fp32 (its RoPE frequencies never rounded). Each decode
step's logits must be within 2x the rel-L2 error that HF bf16 (the same checkpoint loaded in
bf16, its RoPE frequencies fp32 as HF computes them) shows against it, and the kernel must pick
fp32's token wherever fp32's top-2 margin exceeds twice bf16's largest logit error there.
CPU: each family's config matching and the no-match message.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch

import flashformer
from flashformer import Engine
from flashformer.bench import shape_config
from flashformer.config import spec_from_dict
from flashformer.megakernel import compiled_configs, match_config, no_match_reason

from checkpoints import keep_fp32_rope, random_shape_model, rel_l2, teacher_forced

# One config of each family and feature, at the shapes that stress them: head_dim 128 with
# q_rows != hidden (qwen3-0.6b), GQA group 7 (qwen2.5-7b) and 6 (qwen2.5-1.5b), vocabularies of
# 32768-152064, and the tiny configs' vocabularies that are not multiples of 16 (padded LM head).
FAMILY_CASES = ["tiny-qk-norm", "tiny-bias", "qwen3-0.6b", "qwen3-8b", "qwen2.5-1.5b", "qwen2.5-7b", "mistral-7b-v0.3"]
RAGGED = [3, 40, 700, 2900]  # prompt lengths: a few tokens to a few thousand
STEPS = 4


def spec_of(name: str):
    return spec_from_dict(shape_config(name))


def test_each_family_config_is_matched_by_its_spec():
    families = {c["family"] for c in compiled_configs()}
    assert {"llama", "mistral", "qwen2", "qwen3"} <= families
    for c in compiled_configs():
        spec = spec_of(c["name"])
        assert (spec.qkv_bias, spec.qk_norm) == (c["qkv_bias"], c["qk_norm"])
        assert match_config(spec) == c["name"]


def test_a_feature_the_config_lacks_or_has_matches_nothing_and_says_which_field():
    qwen3 = spec_of("qwen3-8b")
    without_norm = dataclasses.replace(qwen3, qk_norm=False)
    assert match_config(without_norm) is None
    assert "qwen3-8b has qk_norm=True" in no_match_reason(without_norm)
    with_bias = dataclasses.replace(spec_of("qwen2.5-7b"), vocab_size=1000)
    assert match_config(with_bias) is None
    assert "qwen2.5-7b has vocab_size=152064" in no_match_reason(with_bias)
    for part in ("o_bias", "mlp_bias"):  # parts no kernel implements
        spec = dataclasses.replace(spec_of("llama-3.1-8b"), **{part: True})
        assert match_config(spec) is None
        assert "no compiled kernel implements" in no_match_reason(spec)


def test_the_tiny_configs_cover_padded_vocabularies():
    vocab = {c["name"]: (c["vocab_size"], c["padded_vocab_size"]) for c in compiled_configs()}
    assert vocab["tiny-qk-norm"] == (1000, 1008) and vocab["tiny-bias"] == (1003, 1008)
    assert all(p % 16 == 0 and 0 <= p - v < 16 for v, p in vocab.values())


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("vocab", [1003, 1008])
def test_lm_head_padding_round_trip_keeps_the_weights_and_their_tying(vocab, tied):
    from flashformer.megakernel import pad_lm_head, unpad_lm_head
    from flashformer.weights import random_weights

    spec = dataclasses.replace(spec_of("tiny-bias"), vocab_size=vocab)
    weights = random_weights(spec, tied=tied, device="cpu", dtype=torch.bfloat16, std=0.1)
    head, embed = weights.lm_head.clone(), weights.embed.clone()
    pad_lm_head(weights, 1008)
    assert weights.lm_head.shape == (1008, spec.hidden_size) and weights.tied == tied
    assert torch.equal(weights.lm_head[:vocab], head) and not weights.lm_head[vocab:].any()
    unpad_lm_head(weights, vocab)
    assert weights.tied == tied and torch.equal(weights.lm_head, head) and torch.equal(weights.embed, embed)


gpu = pytest.mark.skipif(not torch.cuda.is_available() or not flashformer.cuda_available(), reason="needs a Hopper GPU")


def hf_models(name: str, path):
    """HF's fp32 model of shape `name` at 2 layers, random and bf16-exact, built on the GPU in fp32
    (checkpoints.random_shape_model), saved to `path` in bf16; and HF's bf16 model loaded from that
    checkpoint, its RoPE frequencies fp32 as HF computes them."""
    import transformers

    fp32 = random_shape_model(dict(shape_config(name), num_hidden_layers=2), initializer_range=0.02, device="cuda")
    with torch.no_grad():
        for p in fp32.parameters():
            p.copy_(p.bfloat16().float())
    copy.deepcopy(fp32).to(torch.bfloat16).save_pretrained(path)  # (only the weights are saved)
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    keep_fp32_rope(bf16, dict(fp32.named_buffers()))
    return fp32, bf16


def hf_logits(model, prompt: list[int], forced: list[int]) -> torch.Tensor:
    """Logits [len(forced), vocab] after each forced token (the decode steps), fp32."""
    with torch.no_grad():
        ids = torch.tensor([prompt + forced], device="cuda")
        return model(ids).logits[0, len(prompt) :].float()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", FAMILY_CASES)
def test_family_teacher_forced_logits_match_hf(name, tmp_path):
    fp32, bf16 = hf_models(name, tmp_path)
    vocab = fp32.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in RAGGED]
    forced = [torch.randint(0, vocab, (STEPS,)).tolist() for _ in RAGGED]
    ref32 = torch.stack([hf_logits(fp32, p, f) for p, f in zip(prompts, forced)], dim=1)  # [steps, B, vocab]
    ref16 = torch.stack([hf_logits(bf16, p, f) for p, f in zip(prompts, forced)], dim=1)
    del fp32, bf16
    engine = Engine.from_pretrained(tmp_path, backend="megakernel", max_batch_size=len(RAGGED),
                                    max_seq_len=max(RAGGED) + STEPS + 1, progress=False)
    assert engine.backend.name == "megakernel"
    engine.backend.logits.fill_(float("nan"))  # poisoned: an unwritten logit fails
    ours = teacher_forced(engine.backend, prompts, torch.tensor(forced).T)
    assert ours.shape == ref32.shape
    for s in range(STEPS):  # each decode step
        err, ref_err = rel_l2(ours[s], ref32[s]), rel_l2(ref16[s], ref32[s])
        assert err <= 2 * ref_err, f"{name} step {s}: megakernel rel-L2 {err:.2e} vs HF bf16 {ref_err:.2e}"
        top2 = ref32[s].topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * (ref16[s] - ref32[s]).abs().amax(-1)
        picked, truth = ours[s].argmax(-1), ref32[s].argmax(-1)
        assert torch.equal(picked[clear], truth[clear]), f"{name} step {s}: a clear fp32 pick was missed"
    # the fused arg-max picks what the written logits say (ties: the lower index, like torch)
    assert torch.equal(engine.backend.next_tokens[: len(RAGGED)].long(), ours[-1].argmax(-1))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["tiny-qk-norm", "tiny-bias"])
def test_the_lm_heads_padding_rows_never_win_the_arg_max(name):
    """Every LM-head row the same vector: every logit equal, and negative for one sign of it. The
    padding rows past the vocabulary would give 0 and win; the kernel must pick row 0 (the lowest
    index among equal maxima) and write exactly vocab logits per row."""
    from flashformer.megakernel import MegakernelBackend
    from flashformer.weights import random_weights

    from checkpoints import kv_cache

    spec = spec_of(name)
    tied = shape_config(name)["tie_word_embeddings"]
    # Seeded weights, and several seeds: fresh weights for each sign (and, tied, the table flipped
    # with the head) can give positive logits for both signs, so a single pair made the test a coin toss.
    for seed, sign in itertools.product(range(8), (1.0, -1.0)):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        weights = random_weights(spec, tied=tied, dtype=torch.bfloat16, device="cuda", std=0.1, generator=gen)
        weights.lm_head.fill_(0.05 * sign)  # (tied: the embedding table too, every token alike)
        mk = MegakernelBackend(spec, weights, kv_cache(spec, weights, 2, 16))
        # (the same token in both rows: the same hidden state, so the same sign of every logit)
        logits = mk.decode(torch.tensor([3, 3], device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda"))
        assert logits.shape == (2, spec.vocab_size)
        assert torch.isfinite(logits).all() and (logits == logits[:, :1]).all()
        if (logits < 0).all():
            assert mk.greedy_tokens(2) == [0, 0]
            return
    pytest.fail("no seed and sign of the LM head gave negative logits")
