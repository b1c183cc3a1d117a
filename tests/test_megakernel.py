"""The megakernel backend: config matching and selection (CPU), and on a Hopper GPU the
teacher-forced logits of every decode step against the reference path (DESIGN.md §4).

Yardstick: the reference in fp32 on the same GPU. The kernel's rel-L2 logit error against it,
over all decode steps of a run, must be at most 2x the bf16 reference's own error against it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flashformer
from flashformer import Engine, _core
from flashformer.bench import shape_config
from flashformer.config import spec_from_dict
from flashformer.engine import select_backend
from flashformer.megakernel import MegakernelBackend, compiled_configs, match_config
from flashformer.reference import KVCache, ReferenceBackend, dequantize_kv
from flashformer.quantization import QuantizedMatrix
from flashformer.weights import Weights, random_weights

from checkpoints import clone_weights, kv_cache, make_shape_checkpoint, rel_l2, teacher_forced

# The compiled test configs: tiny-gqa untied, tiny-d128 tied, tiny-qk-norm (Qwen3's q/k norm,
# q_rows != hidden, a padded vocabulary) untied, tiny-bias (Qwen2's q/k/v biases, GQA group 3, a
# padded vocabulary) tied.
TINY = ("tiny-gqa", "tiny-d128", "tiny-qk-norm", "tiny-bias")


def megakernel(spec, weights, batch: int, max_seq: int) -> MegakernelBackend:
    return MegakernelBackend(spec, weights, kv_cache(spec, weights, batch, max_seq))


def reference(spec, weights, batch: int, max_seq: int) -> ReferenceBackend:
    return ReferenceBackend(spec, weights, kv_cache(spec, weights, batch, max_seq))


def tied(name: str) -> bool:
    return shape_config(name)["tie_word_embeddings"]


def test_every_compiled_shape_is_matched_by_its_spec():
    names = [c["name"] for c in compiled_configs()]
    assert set(TINY) <= set(names) and len(names) >= 12
    for name in names:
        assert match_config(spec_from_dict(shape_config(name))) == name


def test_features_or_other_shapes_match_no_config():
    """A config is its shape and its features (q/k/v biases, q/k norm), whatever the architecture
    is called: Llama's shape with a feature it lacks matches nothing, nor do biases no kernel has."""
    spec = spec_from_dict(shape_config("tiny-gqa"))
    for change in (dict(qkv_bias=True), dict(qk_norm=True), dict(o_bias=True), dict(mlp_bias=True),
                   dict(hidden_size=320)):
        assert match_config(dataclasses.replace(spec, **change)) is None, change
    assert match_config(dataclasses.replace(spec, architecture="MistralForCausalLM")) == "tiny-gqa"


def test_auto_uses_the_reference_backend_on_cpu_without_warning(recwarn):
    spec = spec_from_dict(shape_config("tiny-gqa"))
    assert select_backend("auto", spec, torch.device("cpu")) is ReferenceBackend
    assert not [w for w in recwarn if "megakernel" in str(w.message)]


gpu = pytest.mark.skipif(not torch.cuda.is_available() or not flashformer.cuda_available(), reason="needs a Hopper GPU")


def to_fp32(w: Weights) -> Weights:
    layers = [dataclasses.replace(l, **{f.name: getattr(l, f.name).float() for f in dataclasses.fields(l)
                                        if getattr(l, f.name) is not None}) for l in w.layers]
    embed = w.embed.float()
    return Weights(embed=embed, final_norm=w.final_norm.float(),
                   lm_head=embed if w.tied else w.lm_head.float(), layers=layers)


def run_three(spec, weights, prompt_lens: list[int], steps: int, max_seq: int, tune: dict | None = None):
    """Teacher-forced logits of the megakernel, the bf16 reference and the fp32 reference on the
    same fresh random prompts and forced tokens. The megakernel packs `weights` in place and hands
    them back row-major (release_weights) before the references run on them. `tune`: engine
    tuning attributes set first."""
    batch = len(prompt_lens)
    prompts = [torch.randint(0, spec.vocab_size, (n,)).tolist() for n in prompt_lens]
    forced = torch.randint(0, spec.vocab_size, (steps, batch))
    mk = megakernel(spec, weights, batch, max_seq)
    for attr, value in (tune or {}).items():
        setattr(mk.engine, attr, value)
    mk.logits.fill_(float("nan"))  # poisoned: an unwritten logit fails
    out = {"mk": teacher_forced(mk, prompts, forced)}
    out["mk_next"] = mk.next_tokens[:batch].cpu()
    mk.release_weights()
    del mk
    out["bf16"] = teacher_forced(reference(spec, weights, batch, max_seq), prompts, forced)
    out["fp32"] = teacher_forced(reference(spec, to_fp32(weights), batch, max_seq), prompts, forced)
    return out


def check_errors(out) -> tuple[float, float]:
    mk_err, ref_err = rel_l2(out["mk"], out["fp32"]), rel_l2(out["bf16"], out["fp32"])
    assert mk_err <= 2 * ref_err, f"megakernel rel-L2 {mk_err:.2e} vs bf16 reference {ref_err:.2e}"
    # the fused arg-max picks what the written logits say (ties: the lower index, like torch)
    assert torch.equal(out["mk_next"], out["mk"][-1].argmax(-1).cpu())
    return mk_err, ref_err


# Ragged prompt lengths per batch size: contexts from 1 to past one attention chunk and beyond.
RAGGED = {1: [1], 2: [5, 300], 4: [1, 64, 200, 1100], 8: [3, 17, 64, 129, 500, 1000, 2049, 4000]}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("batch", [1, 2, 4, 8])
def test_tiny_teacher_forced_logits_match_reference(name, batch):
    spec = spec_from_dict(shape_config(name))
    weights = random_weights(spec, tied=tied(name), dtype=torch.bfloat16, device="cuda", std=0.1)
    out = run_three(spec, weights, RAGGED[batch], steps=16, max_seq=4200)
    check_errors(out)


def dequantized_fp32(q: Weights) -> Weights:
    """The fp32 model whose layer matrices are `q`'s dequantized ones (data * scale in fp32)."""
    def f32(v):
        return v.dequantize(torch.float32) if isinstance(v, QuantizedMatrix) else v.float()
    layers = [dataclasses.replace(l, **{f.name: f32(getattr(l, f.name)) for f in dataclasses.fields(l)
                                        if getattr(l, f.name) is not None}) for l in q.layers]
    embed = q.embed.float()
    return Weights(embed=embed, final_norm=q.final_norm.float(), lm_head=embed if q.tied else q.lm_head.float(),
                   layers=layers)


def run_three_fp8(spec, weights, prompt_lens: list[int], steps: int, max_seq: int):
    """run_three for e4m3 weights (random_weights(quantization="fp8"): per channel); the
    megakernel streams them in e4m3 (bf16 activations); the bf16 reference dequantizes them to
    bf16 layer by layer; the fp32 reference runs the same dequantized values in fp32 (the ground
    truth of the FP8 model)."""
    batch = len(prompt_lens)
    prompts = [torch.randint(0, spec.vocab_size, (n,)).tolist() for n in prompt_lens]
    forced = torch.randint(0, spec.vocab_size, (steps, batch))
    q = weights
    out = {"bf16": teacher_forced(reference(spec, q, batch, max_seq), prompts, forced),
           "fp32": teacher_forced(reference(spec, dequantized_fp32(q), batch, max_seq), prompts, forced)}
    mk = megakernel(spec, q, batch, max_seq)  # packs q in place
    assert mk.weight_format == "fp8" and mk.engine.weight_formats == (1, 0)
    mk.logits.fill_(float("nan"))  # poisoned: an unwritten logit fails
    out["mk"] = teacher_forced(mk, prompts, forced)
    out["mk_next"] = mk.next_tokens[:batch].cpu()
    return out


# (shape, weight std, prompt lengths, steps, cache length): the tiny configs at batch 1 and 8, then
# the real 1B and 8B shapes at batch 2.
FP8_CASES = [*[(n, 0.1, RAGGED[b], 8, 4200) for n in TINY for b in (1, 8)],
             *[(n, 0.02, [1, 300], 4, 400) for n in ("llama-3.2-1b", "llama-3.1-8b")]]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name,std,prompt_lens,steps,max_seq", FP8_CASES,
                         ids=[f"{c[0]}-b{len(c[2])}" for c in FP8_CASES])
def test_fp8_teacher_forced_logits_match_the_dequantized_model(name, std, prompt_lens, steps, max_seq):
    """e4m3 weights, per-channel scales: within 2x the bf16 reference's error on the same
    dequantized weights, against those weights in fp32."""
    spec = spec_from_dict(shape_config(name))
    weights = random_weights(spec, tied=tied(name), dtype=torch.bfloat16, device="cuda", std=std, quantization="fp8")
    mk_err, ref_err = check_errors(run_three_fp8(spec, weights, prompt_lens, steps=steps, max_seq=max_seq))
    print(f"{name} b{len(prompt_lens)} fp8: megakernel rel-L2 {mk_err:.2e}, bf16 reference {ref_err:.2e}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", TINY)
def test_tiny_context_8192(name):
    spec = spec_from_dict(shape_config(name))
    weights = random_weights(spec, tied=tied(name), dtype=torch.bfloat16, device="cuda", std=0.1)
    check_errors(run_three(spec, weights, [8191, 2], steps=4, max_seq=8200))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b"])
def test_real_shapes_teacher_forced_logits_match_reference(name):
    spec = spec_from_dict(shape_config(name))
    weights = random_weights(spec, tied=tied(name), dtype=torch.bfloat16, device="cuda", std=0.02)
    original = clone_weights(weights)
    check_errors(run_three(spec, weights, [1], steps=4, max_seq=64))
    # packed in place and handed back: bit for bit the same weights (tied stays tied)
    assert weights.tied == original.tied and torch.equal(weights.lm_head, original.lm_head)
    assert all(torch.equal(a, b) for la, lb in zip(weights.layers, original.layers)
               for a, b in ((la.wqkv, lb.wqkv), (la.wo, lb.wo), (la.w_gate_up, lb.w_gate_up), (la.w_down, lb.w_down)))
    del original
    check_errors(run_three(spec, weights, [8191, 1, 700, 2, 4096, 33, 129, 5000], steps=3, max_seq=8200))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", TINY)
def test_greedy_256_steps_follow_the_reference(name, tmp_path):
    """Through the user path (a checkpoint directory, backend="auto" picks the megakernel).
    Teacher-forced on the fp32 reference's 256 greedy tokens, the kernel picks the same token at
    every step whose fp32 top-2 margin exceeds that step's `tie`: 2x the largest logit error the
    bf16 reference itself shows there (below it, rounding alone may flip a pick). Free-running,
    the kernel follows the bf16 reference up to the first near-tie."""
    path = make_shape_checkpoint(tmp_path, shape_config(name))
    kw = dict(device="cuda", max_seq_len=300, progress=False)
    mk = Engine.from_pretrained(path, dtype="bfloat16", **kw)
    assert mk.backend.name == "megakernel"
    ref16 = Engine.from_pretrained(path, dtype="bfloat16", backend="reference", **kw)
    ref32 = Engine.from_pretrained(path, dtype="float32", backend="reference", **kw)
    prompt = torch.randint(0, shape_config(name)["vocab_size"], (8,)).tolist()
    sampling = flashformer.SamplingParams(max_tokens=256, ignore_eos=True)
    greedy32 = ref32.generate(prompt_token_ids=[prompt], sampling=sampling)[0].token_ids
    forced = torch.tensor(greedy32[:-1])[:, None]
    logits = {k: teacher_forced(e.backend, [prompt], forced)[:, 0] for k, e in (("mk", mk), ("bf16", ref16), ("fp32", ref32))}
    tie = 2 * (logits["bf16"] - logits["fp32"]).abs().amax(-1)
    top2 = logits["fp32"].topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) >= tie
    assert clear.sum() >= 64, f"only {int(clear.sum())} of 255 steps are clear enough to compare"
    picks = logits["mk"].argmax(-1)
    assert torch.equal(picks[clear], torch.tensor(greedy32[1:], device=picks.device)[clear])
    ours = mk.generate(prompt_token_ids=[prompt], sampling=sampling)[0].token_ids
    theirs = ref16.generate(prompt_token_ids=[prompt], sampling=sampling)[0].token_ids
    first_tie = int(clear.long().cumprod(0).sum()) + 1  # tokens decided before the first near-tie
    assert ours[:first_tie] == theirs[:first_tie]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", TINY)
def test_the_loop_picks_the_arg_max_of_its_own_logits(name, tmp_path):
    """Free-running greedy through generate (the fused arg-max, the steps launched back to back with
    the bookkeeping kernel between them) against the same kernel teacher-forced on that output with
    its logits written: each token is the arg-max of the logits of the step that chose it (the
    lowest index among equal maxima, as torch.argmax). No tolerance: one kernel, the same inputs."""
    path = make_shape_checkpoint(tmp_path, shape_config(name))
    mk = Engine.from_pretrained(path, dtype="bfloat16", device="cuda", max_seq_len=300, max_batch_size=4,
                                progress=False)
    assert mk.backend.name == "megakernel"
    gen = torch.Generator().manual_seed(7)
    vocab = shape_config(name)["vocab_size"]
    prompts = [torch.randint(0, vocab, (8 + 3 * i,), generator=gen).tolist() for i in range(3)]
    sampling = flashformer.SamplingParams(max_tokens=200, ignore_eos=True)
    outs = [o.token_ids for o in mk.generate(prompt_token_ids=prompts, sampling=sampling)]
    forced = torch.tensor([o[:-1] for o in outs]).T  # [steps, rows]: what each decode step read
    picks = teacher_forced(mk.backend, prompts, forced).argmax(-1).cpu()
    chosen = torch.tensor([o[1:] for o in outs]).T
    wrong = (picks != chosen).nonzero().tolist()
    assert not wrong, (f"{len(wrong)} of {chosen.numel()} tokens are not their step's arg-max; "
                       f"the first (step, row): {wrong[:5]}")


instrumented = pytest.mark.skipif(
    not _core.load().INSTRUMENTED, reason="needs the instrumented kernels (FLASHFORMER_INSTRUMENTED=ON, as gpu_check.sh builds)"
)


@pytest.mark.gpu
@gpu
@instrumented
def test_a_lost_dependency_raises_instead_of_hanging():
    spec = spec_from_dict(shape_config("tiny-gqa"))
    weights = random_weights(spec, tied=False, dtype=torch.bfloat16, device="cuda", std=0.1)
    ref = reference(spec, clone_weights(weights), 2, 64)
    mk = megakernel(spec, weights, 2, 64)
    prompts = [torch.randint(0, spec.vocab_size, (n,), device="cuda") for n in (3, 7)]
    mk.prefill(prompts), ref.prefill(prompts)
    tokens, positions = torch.randint(0, spec.vocab_size, (2,), device="cuda"), torch.tensor([3, 7], device="cuda")
    lost = flashformer._core.load().OPS.index("gate_up")
    mk.engine.debug_skip_signal = lost
    mk.engine.timeout_ms = 100.0
    # Which SM times out first depends on where each one waits; all wait on work downstream of it.
    aborted = r"megakernel step aborted: SM \d+ waited more than 100 ms for \w+ of layer \d"
    mk.decode(tokens, positions)  # does not wait for its step: the next check reports it
    with pytest.raises(RuntimeError, match=aborted):
        mk.synchronize()
    mk.decode(tokens, positions)
    with pytest.raises(RuntimeError, match=aborted + r".*\(the decode step before this call"):
        mk.decode(tokens, positions)  # the next decode() reports the previous step
    mk.engine.debug_skip_signal = -1  # the engine reset itself: the same step now runs clean
    logits = mk.decode(tokens, positions)
    mk.synchronize()
    assert rel_l2(logits, ref.decode(tokens, positions)) < 0.05
    with pytest.raises(RuntimeError, match=aborted):  # greedy_tokens() checks too
        mk.engine.debug_skip_signal = lost
        mk.decode(tokens, positions)
        mk.greedy_tokens(2)
    mk.engine.debug_skip_signal = -1
    mk.synchronize()  # nothing pending after a raise


@pytest.mark.gpu
@gpu
@instrumented
def test_step_trace_is_ordered_and_changes_nothing():
    """The step trace (trace.hpp): every task ran on some SM, each SM's timestamps are ordered
    (start <= dependency met <= computed <= synced <= signalled, tasks in sequence), and a traced step
    computes the same logits and tokens as an untraced one."""
    C = flashformer._core.load()
    spec = spec_from_dict(shape_config("tiny-gqa"))
    weights = random_weights(spec, tied=False, dtype=torch.bfloat16, device="cuda", std=0.1)
    mk = megakernel(spec, weights, 2, 64)
    tokens, positions = torch.randint(0, spec.vocab_size, (2,), device="cuda"), torch.tensor([5, 9], device="cuda")
    mk.kv_cache.uniform_(-1, 1)
    plain = mk.decode(tokens, positions)
    plain_next = mk.next_tokens[:2].clone()
    trace = torch.zeros(mk.engine.trace_words, dtype=torch.int64, device="cuda")
    mk.engine.trace = trace.data_ptr()
    traced = mk.decode(tokens, positions)
    mk.engine.trace = 0
    assert torch.equal(plain, traced) and torch.equal(plain_next, mk.next_tokens[:2])
    layout = C.TRACE_LAYOUT
    nh, nf = len(layout["header"]), len(layout["fields"])
    raw = trace.view(mk.engine.num_sms, -1).cpu()
    tasks = len(C.step_tasks(spec.num_layers))
    assert raw.shape[1] == nh + tasks * nf
    head = dict(zip(layout["header"], raw[:, :nh].T))
    assert (head["start_ns"] > 0).all() and (head["end_ns"] >= head["start_ns"]).all()
    assert (head["end_cycles"] > head["start_cycles"]).all()
    f = {name: raw[:, nh:].reshape(-1, tasks, nf)[:, :, i] for i, name in enumerate(layout["fields"])}
    ran = f["task_start_ns"] > 0
    assert ran.any(0).all(), "every task ran on at least one SM"
    order = ["task_start_ns", "ready_ns", "computed_ns", "synced_ns", "signalled_ns"]
    for a, b in zip(order, order[1:]):
        assert (f[a][ran] <= f[b][ran]).all(), f"{a} after {b}"
    for sm in range(raw.shape[0]):
        starts, ends = f["task_start_ns"][sm][ran[sm]], f["signalled_ns"][sm][ran[sm]]
        assert (starts[1:] >= ends[:-1]).all(), f"SM {sm}: tasks overlap"
        assert (ends <= head["end_ns"][sm]).all()


@pytest.mark.gpu
@gpu
def test_weight_stream_settings_change_no_result_and_bad_values_are_refused():
    """The weight stream's tuning (in-flight stage limit, L2 policy, ring depth) changes timing
    only: every setting computes bit-identical logits and tokens (the kernel's reductions have a
    fixed order). Out-of-range values are refused with a message naming the setting."""
    spec = spec_from_dict(shape_config("tiny-d128"))
    weights = random_weights(spec, tied=True, dtype=torch.bfloat16, device="cuda", std=0.1)
    mk = megakernel(spec, weights, 2, 64)
    mk.kv_cache.uniform_(-1, 1)
    tokens, positions = torch.randint(0, spec.vocab_size, (2,), device="cuda"), torch.tensor([7, 40], device="cuda")
    default = mk.decode(tokens, positions)
    smallest = _core.load().MIN_RING_STAGES  # the shallowest ring the kernel allows
    for inflight, policy, ring in [(0, 0, 0), (1, 1, smallest), (2, 0, 0), (0, 1, smallest), (3, 1, smallest + 1)]:
        e = mk.engine
        e.inflight_stages_limit, e.weight_l2_policy, e.ring_stages_limit = inflight, policy, ring
        assert torch.equal(mk.decode(tokens, positions), default), (inflight, policy, ring)
        assert mk.greedy_tokens(2) == default.argmax(-1).tolist()
    for attr, bad in [("inflight_stages_limit", -1), ("weight_l2_policy", 2), ("ring_stages_limit", smallest - 1)]:
        setattr(mk.engine, attr, bad)
        with pytest.raises(ValueError, match=attr):
            mk.decode(tokens, positions)
        setattr(mk.engine, attr, 0)
    e.inflight_stages_limit, e.weight_l2_policy = 3, 1  # the defaults again
    # a refused step launched nothing: the next one runs clean (its epoch counts only steps that ran)
    assert torch.equal(mk.decode(tokens, positions), default)
    mk.synchronize()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("min_work", [1, 64, 4096])
def test_attention_split_setting_keeps_the_logits_and_bad_values_are_refused(min_work):
    """attn_min_work (the row-positions an attention unit takes before a context is split over
    more SMs; a tuning knob, 256 by default): from 16 positions a chunk to one chunk a kv head,
    the teacher-forced logits stay within the kernel's bound against fp32 (the chunks' merge only
    orders fp32 sums otherwise). 0 is refused, naming it, and refuses nothing after."""
    spec = spec_from_dict(shape_config("tiny-gqa"))
    weights = random_weights(spec, tied=tied("tiny-gqa"), dtype=torch.bfloat16, device="cuda", std=0.1)
    check_errors(run_three(spec, weights, RAGGED[4], steps=3, max_seq=1200, tune={"attn_min_work": min_work}))
    mk = megakernel(spec, weights, 2, 64)
    assert mk.engine.attn_min_work == _core.load().DEFAULT_ATTN_MIN_WORK
    tokens, positions = torch.randint(0, spec.vocab_size, (2,), device="cuda"), torch.tensor([7, 40], device="cuda")
    default = mk.decode(tokens, positions)
    mk.engine.attn_min_work = 0
    with pytest.raises(ValueError, match="attn_min_work"):
        mk.decode(tokens, positions)
    mk.engine.attn_min_work = _core.load().DEFAULT_ATTN_MIN_WORK
    assert torch.equal(mk.decode(tokens, positions), default)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name,fp8,kv,start,min_work", [
    ("tiny-gqa", False, "auto", 0, None), ("tiny-qk-norm", False, "auto", 0, None), ("tiny-bias", False, "auto", 0, None),
    ("tiny-gqa", True, "auto", 0, None), ("tiny-bias", True, "auto", 0, None), ("tiny-gqa", False, "fp8", 0, None),
    ("tiny-qk-norm", True, "fp8", 0, None), ("tiny-d128", False, "fp8", 90, None), ("tiny-gqa", False, "fp8", 90, None),
    ("tiny-gqa", False, "auto", 90, 32), ("tiny-d128", True, "fp8", 90, 32)])
def test_sanitizer_smoke(name, fp8, kv, start, min_work):
    """Decode-only steps of a tiny config from position `start` of an empty cache (no prefill:
    only the kernel and a few elementwise torch ops run): scripts/gpu_check.sh runs this under
    compute-sanitizer's memcheck, racecheck and synccheck (with FLASHFORMER_WATCHDOG_MS raised).
    Llama's layer, then q/k norm and q/k/v biases (both with padded vocabularies); then e4m3
    layers; then an FP8 KV cache, last past one stage's positions (head_dim 128: 56 a stage; 64:
    64); last with attn_min_work 32 (chunks of 16 positions), so that each kv head's context is
    split over several units, which merge its chunks together."""
    spec = spec_from_dict(shape_config(name))
    weights = random_weights(spec, tied=tied(name), dtype=torch.bfloat16, device="cuda", std=0.1,
                             quantization="fp8" if fp8 else None)
    max_seq = start + 16
    mk = (fp8_kv_backend(MegakernelBackend, spec, weights, 2, max_seq) if kv == "fp8"
          else megakernel(spec, weights, 2, max_seq))
    if min_work is not None:
        mk.engine.attn_min_work = min_work
    for step in range(start, start + 3):
        tokens = torch.randint(0, spec.vocab_size, (2,), device="cuda")
        logits = mk.decode(tokens, torch.full((2,), step, device="cuda"))
        assert torch.isfinite(logits).all()
        assert torch.equal(mk.next_tokens[:2], logits.argmax(-1).int())
        assert mk.greedy_tokens(2) == logits.argmax(-1).tolist()  # copied back by the step's record


def fp8_kv_backend(cls, spec, weights, batch: int, max_seq: int):
    """`cls` (a backend class) over a fresh FP8 KV cache (kv_cache_dtype="fp8")."""
    cache = KVCache.allocate(spec, batch, max_seq, dtype=weights.embed.dtype, device=weights.embed.device,
                             kv_cache_dtype="fp8")
    return cls(spec, weights, cache)


# (shape, weight std, prompt lengths, steps, cache length, FP8 weights): the tiny configs at batch 1
# and 8 (ragged contexts past one attention chunk), with bf16 and e4m3 layers; the 1B shape at batch 2.
FP8_KV_CASES = [*[(n, 0.1, RAGGED[b], 8, 4200, w) for n in TINY for b in (1, 8) for w in (False, True)],
                ("llama-3.2-1b", 0.02, [1, 300], 4, 400, True)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name,std,prompt_lens,steps,max_seq,fp8_weights", FP8_KV_CASES,
                         ids=[f"{c[0]}-b{len(c[2])}-{'fp8' if c[5] else 'bf16'}" for c in FP8_KV_CASES])
def test_fp8_kv_cache_teacher_forced_logits_match_the_reference(name, std, prompt_lens, steps, max_seq, fp8_weights):
    """The megakernel over an FP8 KV cache (prefill's vectors quantized by the reference path,
    each decode step's by the kernel) against the fp32 reference over one: within 2x the bf16
    reference path's error with an FP8 cache. The kernel's appended vectors dequantize to the bf16
    reference's within e4m3's rounding."""
    spec = spec_from_dict(shape_config(name))
    weights = random_weights(spec, tied=tied(name), dtype=torch.bfloat16, device="cuda", std=std,
                             quantization="fp8" if fp8_weights else None)
    batch = len(prompt_lens)
    prompts = [torch.randint(0, spec.vocab_size, (n,)).tolist() for n in prompt_lens]
    forced = torch.randint(0, spec.vocab_size, (steps, batch))
    fp32 = dequantized_fp32(weights) if fp8_weights else to_fp32(weights)
    ref16_backend = fp8_kv_backend(ReferenceBackend, spec, weights, batch, max_seq)
    out = {"bf16": teacher_forced(ref16_backend, prompts, forced),
           "fp32": teacher_forced(fp8_kv_backend(ReferenceBackend, spec, fp32, batch, max_seq), prompts, forced)}
    mk = fp8_kv_backend(MegakernelBackend, spec, weights, batch, max_seq)  # (packs them: the references ran)
    mk.logits.fill_(float("nan"))  # poisoned: an unwritten logit fails
    out["mk"] = teacher_forced(mk, prompts, forced)
    out["mk_next"] = mk.next_tokens[:batch].cpu()
    mk_err, ref_err = check_errors(out)
    print(f"{name} b{batch} {'fp8' if fp8_weights else 'bf16'} weights, fp8 KV: megakernel rel-L2 {mk_err:.2e}, "
          f"bf16 reference {ref_err:.2e}")
    # layer 0's decode positions: written by the kernel, against the bf16 reference's (same inputs)
    ends = [len(p) for p in prompts]
    for b, end in enumerate(ends):
        sl = (0, slice(None), b, slice(None), slice(end, end + steps))
        ours = dequantize_kv(mk.cache.kv[sl], mk.cache.scale[sl], torch.float32)
        theirs = dequantize_kv(ref16_backend.model.cache.kv[sl], ref16_backend.model.cache.scale[sl], torch.float32)
        assert torch.isfinite(mk.cache.scale[sl]).all() and (mk.cache.scale[sl] > 0).all()
        assert rel_l2(ours, theirs) < 0.03, (b, rel_l2(ours, theirs))


@pytest.mark.gpu
@gpu
def test_a_step_with_non_finite_logits_raises_naming_the_row():
    """NaN in one token's embedding row makes the row that feeds it non-finite: the kernel's check
    beside its arg-max fails the step (no token is emitted from it), naming that batch row."""
    spec = spec_from_dict(shape_config("tiny-gqa"))  # untied: the embedding table is its own
    weights = random_weights(spec, tied=False, dtype=torch.bfloat16, device="cuda", std=0.1)
    weights.embed[7] = float("nan")
    mk = megakernel(spec, weights, 2, 16)
    for bad_row in (1, 0):
        tokens = torch.tensor([3, 7] if bad_row else [7, 3], device="cuda")
        mk.decode(tokens, torch.tensor([0, 0], device="cuda"))
        with pytest.raises(RuntimeError, match=f"non-finite logits \\(NaN or inf\\) in batch row {bad_row}"):
            mk.synchronize()
    # finite tokens at position 0 again (which rewrites the cache slots the NaN rows left): a clean step
    logits = mk.decode(torch.tensor([3, 4], device="cuda"), torch.tensor([0, 0], device="cuda"))
    mk.synchronize()
    assert torch.isfinite(logits).all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b"])
def test_the_packed_weights_are_the_only_copy_on_the_device(name):
    """Building the backend adds only its scratch, the prefill's layer buffer, the kernel's
    half RoPE tables and its I/O buffers: the matrices (and a tied table) are reordered in place."""
    cfg = dict(shape_config(name), num_hidden_layers=2)
    spec = spec_from_dict(cfg)
    weights = random_weights(spec, tied=cfg["tie_word_embeddings"], dtype=torch.bfloat16, device="cuda", std=0.02)
    cache = kv_cache(spec, weights, 8, 256)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    mk = MegakernelBackend(spec, weights, cache)
    torch.cuda.synchronize()
    added = torch.cuda.memory_allocated() - before
    own = (mk.scratch.nbytes + mk.prefill_model.buffer.nbytes + mk.rope_cos.nbytes
           + mk.rope_sin.nbytes + mk.logits.nbytes + mk.tokens.nbytes + mk.positions.nbytes + mk.next_tokens.nbytes)
    assert added <= own + (1 << 20), f"{added - own} bytes beyond the backend's own buffers"
    assert weights.fragment_order and weights.tied == cfg["tie_word_embeddings"]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", TINY)
def test_prefill_over_the_packed_weights_is_the_reference_prefill(name):
    """Ragged prompts, layer by layer over the unpacked buffer: logits and KV cache as close to
    the fp32 reference's as the bf16 reference over row-major weights gets. (Not bit for bit:
    prefill's fused RMSNorm and silu(gate) * up sum in another order, so a value may differ by
    one bf16 ulp, test_prefills_fused_kernels_round_as_the_reference_does; those ulps move a
    2-layer model's logits by a few 1e-3.)"""
    spec = spec_from_dict(shape_config(name))
    weights = random_weights(spec, tied=tied(name), dtype=torch.bfloat16, device="cuda", std=0.1)
    ref = reference(spec, clone_weights(weights), 3, 600)
    fp32 = reference(spec, to_fp32(weights), 3, 600)
    mk = megakernel(spec, weights, 3, 600)
    prompts = [torch.randint(0, spec.vocab_size, (n,), device="cuda") for n in (1, 37, 513)]
    for _ in range(2):  # twice: the second prefill reuses the buffer the first one left
        ours, theirs, truth = mk.prefill(prompts), ref.prefill(prompts), fp32.prefill(prompts)
        assert torch.isfinite(ours).all()
        assert rel_l2(ours, truth) <= 1.5 * rel_l2(theirs, truth)
        cache_truth = fp32.kv_cache.float()
        assert rel_l2(mk.kv_cache.float(), cache_truth) <= 1.5 * rel_l2(ref.kv_cache.float(), cache_truth)


@pytest.mark.gpu
@gpu
@pytest.mark.skipif(_core.load().INSTRUMENTED, reason="checks a build without the instrumented kernels")
def test_measurement_settings_need_the_instrumented_build():
    spec = spec_from_dict(shape_config("tiny-gqa"))
    weights = random_weights(spec, tied=False, dtype=torch.bfloat16, device="cuda", std=0.1)
    mk = megakernel(spec, weights, 1, 16)
    mk.engine.timing_variant = _core.load().TIMING_VARIANTS["skip_norm"]
    with pytest.raises(ValueError, match="FLASHFORMER_INSTRUMENTED=ON"):
        mk.decode(torch.tensor([1], device="cuda"), torch.tensor([0], device="cuda"))
    mk.engine.timing_variant = 0  # the refused step launched nothing: the next one runs clean
    assert torch.isfinite(mk.decode(torch.tensor([1], device="cuda"), torch.tensor([0], device="cuda"))).all()
    mk.synchronize()


@pytest.mark.gpu
@gpu
def test_prefills_fused_kernels_round_as_the_reference_does():
    """The megakernel backend's prefill fuses the reference's RMSNorm and silu(gate) * up: the
    same values, to one bf16 ulp (the fp32 sums may add in another order)."""
    from flashformer.reference import rms_norm

    spec = spec_from_dict(shape_config("tiny-gqa"))
    weights = random_weights(spec, tied=False, dtype=torch.bfloat16, device="cuda", std=0.1)
    model = megakernel(spec, weights, 1, 16).prefill_model
    x = torch.randn(3, 37, spec.hidden_size, device="cuda").bfloat16()
    w = (1 + 0.1 * torch.randn(spec.hidden_size, device="cuda")).bfloat16()
    fused, ref = model.norm(x, w), rms_norm(x, w, spec.rms_norm_eps)
    ulp = ref.float().abs().clamp(min=1e-30) * 2**-7
    assert fused.shape == ref.shape and ((fused.float() - ref.float()).abs() <= ulp).all()
    assert (fused == ref).float().mean() > 0.99
    gate_up = (3 * torch.randn(5, 2 * spec.intermediate_size, device="cuda")).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    fused, ref = model.activation(gate_up), torch.nn.functional.silu(gate) * up
    ulp = ref.float().abs().clamp(min=1e-30) * 2**-7
    assert fused.shape == ref.shape and ((fused.float() - ref.float()).abs() <= ulp).all()
    assert (fused == ref).float().mean() > 0.99


# Tensor parallelism on one GPU (issue 21): two ranks of a shard, each a megakernel on half the SMs
# and its own stream, exchanging the O and down projections' partial sums between the kernels.

def decode_from_zero(backend, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits [steps, B, vocab] fp32 of tokens [steps, B], decoded from position 0."""
    device = backend.kv_cache.device
    return torch.stack([backend.decode(tokens[s].to(device), torch.full((tokens.shape[1],), s, device=device))
                        for s in range(tokens.shape[0])])


def shard_ranks(spec, weights, world: int, batch: int, max_seq: int):
    from flashformer.tensor_parallel import shard_spec, shard_weights

    part = shard_spec(spec, world)
    sms = torch.cuda.get_device_properties(0).multi_processor_count // world
    ranks = []
    for r in range(world):
        w = clone_weights(shard_weights(spec, weights, r, world))  # (each rank packs its own in place)
        ranks.append(MegakernelBackend(part, w, kv_cache(part, w, batch, max_seq), shard=f"tiny-gqa-tp{world}",
                                       sm_count=sms))
    for r, b in enumerate(ranks):
        b.connect(r, [x.exchange for x in ranks])
        b.logits.fill_(float("nan"))  # poisoned: an unwritten logit fails
    return ranks


@pytest.mark.gpu
@gpu
def test_two_ranks_of_a_shard_on_one_gpu_decode_as_the_whole_model():
    spec = spec_from_dict(shape_config("tiny-gqa"))
    weights = random_weights(spec, tied=False, dtype=torch.bfloat16, device="cuda", std=0.1)
    batch, steps, max_seq = 2, 24, 64
    tokens = torch.randint(0, spec.vocab_size, (steps, batch))
    ranks = shard_ranks(spec, weights, 2, batch, max_seq)
    streams = [torch.cuda.Stream() for _ in ranks]
    got, inputs = [[] for _ in ranks], []  # (inputs: alive until the side streams are done with them)
    for s in range(steps):
        pos = torch.full((batch,), s, dtype=torch.int64, device="cuda")
        step_tokens = tokens[s].cuda()
        inputs += [pos, step_tokens]
        for r, b in enumerate(ranks):  # both launched before either step is waited for
            streams[r].wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(streams[r]):
                logits, _ = b.decode_step(step_tokens, pos)
                got[r].append(logits.clone())
    for b in ranks:
        b.synchronize()
    torch.cuda.synchronize()
    tp = [torch.stack(g) for g in got]
    assert torch.equal(tp[0], tp[1]), "the ranks' residual streams differ"
    fp32 = decode_from_zero(reference(spec, to_fp32(weights), batch, max_seq), tokens)
    bf16 = decode_from_zero(reference(spec, weights, batch, max_seq), tokens)
    tp_err, ref_err = rel_l2(tp[0], fp32), rel_l2(bf16, fp32)
    assert tp_err <= 2 * ref_err, f"2-rank megakernel rel-L2 {tp_err:.2e} vs bf16 reference {ref_err:.2e}"


@pytest.mark.gpu
@gpu
def test_a_shard_refuses_an_fp8_kv_cache_it_has_no_kernel_for():
    from flashformer.tensor_parallel import shard_spec, shard_weights

    spec = spec_from_dict(shape_config("tiny-gqa"))
    weights = random_weights(spec, tied=False, dtype=torch.bfloat16, device="cuda", std=0.1)
    part = shard_spec(spec, 2)
    with pytest.raises(ValueError, match="tiny-gqa-tp2 has no kernel for an FP8 KV cache"):
        fp8_kv_backend(lambda s, w, c: MegakernelBackend(s, w, c, shard="tiny-gqa-tp2"), part,
                       shard_weights(spec, weights, 0, 2), 1, 16)


@pytest.mark.gpu
@gpu
def test_a_rank_whose_peer_never_steps_raises_instead_of_hanging():
    spec = spec_from_dict(shape_config("tiny-gqa"))
    weights = random_weights(spec, tied=False, dtype=torch.bfloat16, device="cuda", std=0.1)
    ranks = shard_ranks(spec, weights, 2, 1, 16)
    ranks[0].engine.timeout_ms = 200.0
    ranks[0].decode_step(torch.tensor([3], device="cuda"), torch.tensor([0], device="cuda"))  # rank 1 never steps
    with pytest.raises(RuntimeError, match="waited more than 100 ms for rank 1's partial sums of o_proj of layer 0"):
        ranks[0].synchronize()
    ranks[0].decode_step(torch.tensor([3], device="cuda"), torch.tensor([0], device="cuda"))  # reset: fails alike
    with pytest.raises(RuntimeError, match="for rank 1's partial sums"):
        ranks[0].synchronize()
