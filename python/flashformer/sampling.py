"""Sampling parameters (vLLM's names), the filtered distribution they define, and the batched
sampler that picks every row's next token on the device.

The distribution of a row, in vLLM's order: penalties on the logits (repetition over the
prompt's and the output's tokens, presence and frequency over the output's) -> temperature,
z = (l - max l) / T -> min-p (keep z >= log min_p) -> top-k (keep z >= the k-th largest z, ties
kept) -> top-p (keep a token when the kept mass strictly above it is below top_p x the kept mass:
the smallest set of the most likely tokens reaching top_p, ties kept) -> softmax over what is
kept. `filtered_logprobs` states it exactly (sorting; the test oracle).

A draw is a Gumbel-max draw taken as an exponential race: the arg-max of exp(z) / E over the kept
tokens, where E = -log u (the token of the arg-max of z - log(-log u), one log fewer) and u hashes
(the request's seed, how many tokens the request has produced, the draw round, the token id). So a seeded request draws the same tokens whatever row it sits in and whatever else is in the
batch; an unseeded request takes a seed from torch's global generator. Top-p draws by rejection
(no sort): a draw above the pivot that is in the nucleus is kept; else the pivot rises past it and
another round draws with fresh noise. On a Hopper GPU the compiled sampler
(cpp/include/flashformer/sampling.cuh) does all of this for every row in one launch;
elsewhere `sample_rows` does the same in PyTorch, with the same noise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from . import _core, validate


@lru_cache(maxsize=None)
def constants() -> dict:
    """The compiled sampler's constants and layouts (flashformer._C.SAMPLER)."""
    return dict(_core.load().SAMPLER)


def greedy_below() -> float:
    """Temperatures below this are greedy (arg-max), as in vLLM: dividing by less overflows fp32."""
    return constants()["greedy_below"]


def max_logprobs() -> int:
    return constants()["max_logprobs"]


def record_column(field: str) -> int:
    """The column of a Sampler::Record field ("token", "finish", "flags") in a [batch, fields] int32 view."""
    return constants()["record_fields"].index(field)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 (or below 1e-5) means greedy (argmax).

    top_k=-1, top_p=1.0 and min_p=0.0 disable those filters; repetition_penalty=1.0 and
    presence_penalty=frequency_penalty=0.0 disable the penalties (vLLM's meanings: the repetition
    penalty divides positive logits and multiplies negative ones of every token in the prompt or
    the output; presence subtracts once from each token in the output, frequency once per
    occurrence). `seed` (0 <= seed < 2**64) makes a request's sampling reproducible, whatever else is
    in the batch. `logprobs` (0..20): also return each chosen token's log-probability and that many
    top alternatives (of the model's distribution, before penalties and filters). `stop_token_ids`
    (a list of ids, or a 1-D integer array or tensor) and `stop` (a string or strings, cut from the
    text) end the request with finish_reason "stop", as does an EOS token unless `ignore_eos`.
    Every field is checked here (types strictly: a bool is not an int, nor an int a bool); a bad one
    is a ValueError naming it.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    stop: tuple[str, ...] | list[str] | str | None = None
    ignore_eos: bool = False
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    def __post_init__(self):
        try:
            fields = self._checked()
        except ValueError as exc:
            raise ValueError(f"invalid SamplingParams: {exc}") from None
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def _checked(self) -> dict:
        """Every field, validated and normalized (Python ints and floats, tuples)."""
        max_tokens = validate.integer("max_tokens", self.max_tokens, minimum=1)
        temperature = validate.number("temperature", self.temperature)
        if temperature < 0:
            validate.fail("temperature", ">= 0", self.temperature)
        top_k = validate.integer("top_k", self.top_k)
        if top_k != -1 and top_k < 1:
            validate.fail("top_k", "-1 or >= 1", self.top_k)
        top_p = validate.number("top_p", self.top_p)
        if not 0 < top_p <= 1:
            validate.fail("top_p", "in (0, 1]", self.top_p)
        min_p = validate.number("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            validate.fail("min_p", "in [0, 1]", self.min_p)
        penalties = {}
        for name in ("presence_penalty", "frequency_penalty"):
            penalties[name] = validate.number(name, getattr(self, name))
            if not -2 <= penalties[name] <= 2:
                validate.fail(name, "in [-2, 2]", getattr(self, name))
        repetition_penalty = validate.number("repetition_penalty", self.repetition_penalty)
        if not repetition_penalty > 0:
            validate.fail("repetition_penalty", "> 0", self.repetition_penalty)
        logprobs = self.logprobs
        if logprobs is not None:
            logprobs = validate.integer(
                "logprobs", logprobs, minimum=0, requirement=f"an int in 0..{max_logprobs()} or None"
            )
            if logprobs > max_logprobs():
                validate.fail("logprobs", f"an int in 0..{max_logprobs()} or None", self.logprobs)
        seed = self.seed
        if seed is not None and not (validate.is_int(seed) and 0 <= seed < 2**64):
            validate.fail("seed", "an int or None (0 <= seed < 2**64)", seed)
        stop_ids = () if self.stop_token_ids is None else self.stop_token_ids
        requirement = "ints >= 0 (a list, tuple, or 1-D integer array or tensor; or None)"
        stop_ids = tuple(validate.token_ids("stop_token_ids", stop_ids, requirement))
        if any(t < 0 for t in stop_ids):
            validate.fail("stop_token_ids", requirement, self.stop_token_ids)
        stop = self.stop
        stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            validate.fail("stop", "non-empty strings (a string or a list of them; or None)", self.stop)
        ignore_eos = validate.boolean("ignore_eos", self.ignore_eos)
        return dict(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=None if seed is None else int(seed),
            stop_token_ids=stop_ids,
            stop=tuple(stop),
            ignore_eos=ignore_eos,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            logprobs=logprobs,
            **penalties,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < greedy_below()

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


# --- The distribution, in PyTorch ----------------------------------------------------------------


def penalize(logits: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor, repetition, presence, frequency):
    """vLLM's penalties on fp32 logits [B, V]: `counts` [B, V] (how often each token is in the
    output), `in_prompt` [B, V] bool; the penalties [B, 1] fp32. The same fp32 operations, in the
    same order, as the compiled sampler."""
    seen = in_prompt | (counts > 0)
    scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, scaled, logits)
    logits = logits - frequency * counts.float()
    return logits - torch.where(counts > 0, presence, torch.zeros_like(presence))


def _scaled(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """z = (l - max l) / T per row (fp32 [B, V]; temperature [B, 1])."""
    return (logits - logits.max(-1, keepdim=True).values) / temperature


def _kept(z: torch.Tensor, top_k: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The tokens min-p and top-k keep, [B, V] bool (top_k [B] int, <= 0: off; min_p [B, 1])."""
    vocab = z.shape[-1]
    keep = torch.where(min_p > 0, z >= torch.log(min_p), torch.ones_like(z, dtype=torch.bool))
    k = top_k.long()
    on = (k > 0) & (k < vocab)
    if bool(on.any()):
        kth = z.sort(-1, descending=True).values.gather(1, (k.clamp(1, vocab) - 1)[:, None])
        keep &= torch.where(on[:, None], z >= kth, torch.ones_like(keep))
    return keep


def filtered_logprobs(logits: torch.Tensor, params: SamplingParams, prompt_ids=(), output_ids=()) -> torch.Tensor:
    """The exact log-probabilities [V] (float64; -inf outside what is kept) from which a sampled
    row with `params` draws its next token, given one row of fp32 logits, the prompt and the
    output so far. The oracle of the samplers' tests."""
    vocab = logits.shape[-1]
    v = logits.float().reshape(1, vocab)
    counts = torch.zeros(1, vocab, dtype=torch.int32)
    for t in output_ids:
        counts[0, t] += 1
    in_prompt = torch.zeros(1, vocab, dtype=torch.bool)
    in_prompt[0, list(prompt_ids)] = True
    col = lambda x: torch.tensor([[x]], dtype=torch.float32)  # noqa: E731
    v = penalize(v, counts, in_prompt, col(params.repetition_penalty), col(params.presence_penalty),
                 col(params.frequency_penalty))
    z = _scaled(v, col(params.temperature))
    keep = _kept(z, torch.tensor([params.top_k]), col(params.min_p))[0]
    z = z[0].double()
    if params.top_p < 1:
        mass = torch.where(keep, z.float().exp().double(), torch.zeros_like(z))
        order = z.argsort(descending=True)
        sorted_z, cum = z[order], mass[order].cumsum(0)
        # kept mass strictly above each token: the cumulative mass before its value's first occurrence
        first = torch.searchsorted(-sorted_z, -sorted_z, side="left")
        above = torch.where(first > 0, cum[(first - 1).clamp(min=0)], torch.zeros_like(cum))
        inside = torch.empty_like(keep)
        inside[order] = above < params.top_p * float(mass.sum())
        keep &= inside
    return torch.where(keep, z, torch.full_like(z, -torch.inf)).log_softmax(-1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """sampling.cuh's Sampler::mix on int64 tensors holding uint32 values (the products stay below 2^63)."""
    m0, m1 = constants()["hash_multipliers"]
    x = x ^ (x >> 16)
    x = (x * m0) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * m1) & 0xFFFFFFFF
    return x ^ (x >> 16)


def race_noise(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor, round: int, vocab: int) -> torch.Tensor:
    """The compiled sampler's race exponentials E = -log u [B, V] fp32 for rows with these seeds
    ([B] int64 holding uint32) at token index `step` [B] of their requests and draw `round` (the
    kernel's own are within 1e-5 of these: a series near u = 1, the hardware's log2 elsewhere)."""
    key = _mix(torch.tensor(round, dtype=torch.int64, device=seed_lo.device))
    key = _mix(key ^ step.long())
    key = _mix(key ^ seed_lo.long())
    key = _mix(key ^ seed_hi.long())[:, None]  # [B, 1]: the draw's key (Sampler::noise_key)
    token = torch.arange(vocab, dtype=torch.int64, device=seed_lo.device)[None]
    bits = constants()["noise_bits"]
    x = _mix(token ^ key) >> (32 - bits)
    u = (x.float() + 0.5) * (1.0 / (1 << bits))
    return -torch.log(u)


def split_seed(seed: int) -> tuple[int, int]:
    return seed & 0xFFFFFFFF, seed >> 32


def sample_rows(logits: torch.Tensor, table: dict, counts, in_prompt, step: torch.Tensor):
    """The compiled sampler's choice for every row, in PyTorch (and on any device): `table` holds
    the rows' settings as columns ([B] tensors named as sampling.cuh's Sampler::Row fields),
    `counts`/`in_prompt` [B, V] (or None: no row is penalized), `step` [B] the tokens each request
    has produced. Returns (tokens [B] int64, non-finite [B] bool)."""
    B, vocab = logits.shape
    col = lambda name: table[name].to(logits.device, torch.float32)[:, None]  # noqa: E731
    finite = logits.isfinite()
    non_finite = ~finite.all(-1)
    v = torch.where(finite, logits.float(), torch.full_like(logits, -torch.inf))
    if counts is not None:
        penalized = table["penalized"].to(logits.device).bool()[:, None]
        v = torch.where(penalized, penalize(v, counts, in_prompt, col("repetition_penalty"),
                                            col("presence_penalty"), col("frequency_penalty")), v)
    top = v.argmax(-1)
    greedy = table["temperature"].to(logits.device) < greedy_below()
    if bool(greedy.all()):
        return top, non_finite
    temperature = torch.where(greedy[:, None], torch.ones_like(col("temperature")), col("temperature"))
    z = _scaled(v, temperature)
    keep = _kept(z, table["top_k"].to(logits.device), col("min_p"))
    top_p = col("top_p")
    nucleus = top_p[:, 0] < 1
    mass = torch.where(keep, z.exp(), torch.zeros_like(z))
    kept_mass = mass.sum(-1)
    tokens = top.clone()
    pending = ~greedy  # rows still drawing
    above_pivot = keep.clone()
    for round in range(constants()["max_rounds"]):
        e = race_noise(table["seed_lo"].to(logits.device), table["seed_hi"].to(logits.device), step, round, vocab)
        drawn = torch.where(above_pivot, z.exp() / e, torch.full_like(z, -torch.inf)).argmax(-1)
        tokens = torch.where(pending, drawn, tokens)
        zj = z.gather(1, drawn[:, None])
        above = torch.where(z > zj, mass, torch.zeros_like(mass)).sum(-1)
        accepted = ~nucleus | (above < top_p[:, 0] * kept_mass)
        pending = pending & ~accepted
        if not bool(pending.any()):
            return tokens, non_finite
        above_pivot &= z > zj
    return torch.where(pending, top, tokens), non_finite


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One draw from one row of fp32 logits [vocab] under `params` (no penalties: there is no
    history), by torch.multinomial over filtered_logprobs; greedy params take the arg-max."""
    if params.greedy:
        return int(logits.argmax())
    probs = filtered_logprobs(logits.detach().cpu(), params).exp()
    return int(torch.multinomial(probs, 1, generator=generator))


# --- The batched sampler of an engine --------------------------------------------------------------


def row_dtype() -> np.dtype:
    """The numpy dtype of sampling.cuh's Sampler::Row (its layout read from the compiled core)."""
    c = constants()
    names, offsets, formats = zip(*c["row_fields"])
    return np.dtype({"names": list(names), "formats": ["<" + f for f in formats], "offsets": list(offsets),
                     "itemsize": c["row_bytes"]})


INT32_MAX = 2**31 - 1


def row_table(params: list[SamplingParams], seeds: list[int], num_stop: list[int] | None = None) -> np.ndarray:
    """The rows' settings as the compiled sampler reads them (one Sampler::Row per row)."""
    table = np.zeros(len(params), dtype=row_dtype())
    for b, (p, seed) in enumerate(zip(params, seeds)):
        seed_lo, seed_hi = split_seed(seed)
        values = dict(temperature=p.temperature, top_p=p.top_p, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
                      presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                      top_k=min(p.top_k, INT32_MAX), max_tokens=min(p.max_tokens, INT32_MAX),  # (beyond: the same)
                      seed_lo=seed_lo, seed_hi=seed_hi, penalized=int(p.penalized),
                      num_stop=0 if num_stop is None else num_stop[b])
        for name in table.dtype.names:  # every field set: a new one in sampling.cuh fails here, not silently
            table[name][b] = values[name]
    return table


def table_columns(table: np.ndarray) -> dict[str, torch.Tensor]:
    """A row table as columns ([B] tensors: int64 for the integer fields, fp32 for the others), what
    sample_rows reads."""
    return {name: torch.from_numpy(table[name].astype(np.int64 if table[name].dtype.kind in "iu" else np.float32))
            for name in table.dtype.names}


@dataclass
class StepRecord:
    """What the host reads of one step, per row of the rows it stepped (`first` on, the arrays'
    index 0 being row `first`): the token (-1: none), its FinishReason and flags, and (when asked
    for) its logprob and the top ones."""

    token: np.ndarray
    finish: np.ndarray
    flags: np.ndarray
    logprob: np.ndarray | None = None  # [B]
    top_logprobs: np.ndarray | None = None  # [B, n]
    top_ids: np.ndarray | None = None  # [B, n]
    first: int = 0


def most_logprobs(params: Iterable[SamplingParams]) -> int | None:
    """The alternatives a step computes for its rows' requests: the most any asks for (each row's
    record keeps its own count); None when none asks for logprobs."""
    return max((p.logprobs for p in params if p.logprobs is not None), default=None)


class BatchSampler:
    """The decode state of one batch on the device and the sampler that advances it: the token and
    position each row's next decode step reads (`tokens`, `positions`: int64 [max_batch]), how many
    tokens each request has produced, whether it has ended, the penalties' token counts. `step()`
    samples every row from a step's logits (or takes the backend's fused arg-max), feeds the chosen
    tokens back into `tokens`/`positions` and queues the step's records to the host without waiting;
    `read()` waits for one. Steps run back to back; the host reads them behind.

    `start()` sets up a batch in rows 0..B-1 (Engine.generate); `admit()` sets up single rows while
    the others go on (the server's scheduler), and `step(rows=...)` steps any run of rows."""

    RING = 4  # pinned record buffers beyond max_batch: steps between step() and read() (`ring`)

    def __init__(self, max_batch: int, vocab: int, max_seq: int, device: torch.device):
        self.max_batch, self.vocab, self.max_seq, self.device = max_batch, vocab, max_seq, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.device_index = -1
        if self.cuda:
            self.device_index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.kernel = self.cuda and _core.cuda_available() and vocab <= self._max_vocab()
        zeros = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, device=self.device)  # noqa: E731
        self.tokens, self.positions = zeros(max_batch, dtype=torch.int64), zeros(max_batch, dtype=torch.int64)
        self.generated, self.status = zeros(max_batch, dtype=torch.int32), zeros(max_batch, dtype=torch.int32)
        self.record_width = len(constants()["record_fields"])  # (int32 fields of a Sampler::Record)
        self.records = zeros(max_batch, self.record_width, dtype=torch.int32)
        self._table = np.zeros(max_batch, dtype=row_dtype())  # every row's settings (Sampler::Row)
        self._columns = table_columns(self._table)  # the same as columns, for the PyTorch sampler
        self.rows = zeros(max_batch * row_dtype().itemsize, dtype=torch.uint8)  # the table on the device
        self.counts = self.in_prompt = None
        self.stop_ids = torch.full((max_batch, 1), -1, dtype=torch.int32, device=self.device)
        self.batch = 0
        self.penalized = False  # some row has penalties: the counts and prompt masks exist
        self.num_logprobs: int | None = None
        self.finish, self.flags = dict(constants()["finish"]), dict(constants()["flags"])
        # at most this many steps between step() and read(): a decode loop's few, and a
        # scheduler's step per run of admitted rows beside them
        self.ring = self.RING + max_batch
        self._slots: list[dict] = []
        self._next_slot = 0

    def _max_vocab(self) -> int:
        with torch.cuda.device(self.device_index):
            return _core.load().sampler_max_vocab()

    def start(self, prompts: list[list[int]], params: list[SamplingParams], seeds: list[int], stop_ids: list[set]):
        """Reset the state for a batch: row b's next decode step reads its prompt's last token at
        that token's position (a row that ends at once re-decodes it there, rewriting its own entry)."""
        B = len(prompts)
        self.batch = B
        self.admit(list(range(B)), prompts, params, seeds, stop_ids)
        self.num_logprobs = most_logprobs(params)

    @property
    def table(self) -> dict[str, torch.Tensor]:
        """The settings of rows 0..batch-1 as columns (what sample_rows reads)."""
        return {name: col[: self.batch] for name, col in self._columns.items()}

    def admit(self, rows: list[int], prompts: list[list[int]], params: list[SamplingParams], seeds: list[int],
              stop_ids: list[set]) -> None:
        """Set up rows `rows` for new requests, as start() does for a batch, leaving the other rows
        as they are: the settings, stop tokens, the token and position each row's next decode step
        reads, its token count and status, its penalties' state. (In stream order, after every step
        queued before.)"""
        if not rows:
            return
        table = row_table(params, seeds, [len(s) for s in stop_ids])
        self._table[rows] = table
        self._columns = table_columns(self._table)
        self.rows.copy_(torch.from_numpy(self._table.view(np.uint8)))
        width = max(self.stop_ids.shape[1], max(len(s) for s in stop_ids))
        if width > self.stop_ids.shape[1]:  # (wider for every row: the kernel reads one stride)
            wider = torch.full((self.max_batch, width), -1, dtype=torch.int32, device=self.device)
            wider[:, : self.stop_ids.shape[1]] = self.stop_ids
            self.stop_ids = wider
        stops = torch.full((len(rows), width), -1, dtype=torch.int32)
        for i, ids in enumerate(stop_ids):
            stops[i, : len(ids)] = torch.tensor(sorted(ids), dtype=torch.int32)
        index = torch.tensor(rows, device=self.device)
        self.stop_ids[index] = stops.to(self.device)
        self.tokens[index] = torch.tensor([p[-1] for p in prompts], device=self.device)
        self.positions[index] = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        self.generated[index] = 0
        self.status[index] = self.finish["none"]
        penalized = [(r, p) for r, p, sp in zip(rows, prompts, params) if sp.penalized]
        if penalized and self.counts is None:
            self.counts = torch.zeros(self.max_batch, self.vocab, dtype=torch.int32, device=self.device)
            self.in_prompt = torch.zeros(self.max_batch, self.vocab, dtype=torch.uint8, device=self.device)
        self.penalized = self.counts is not None  # (rows without penalties never read theirs)
        for r, p in penalized:
            self.counts[r].zero_()
            self.in_prompt[r].zero_()
            self.in_prompt[r, torch.tensor(p, device=self.device)] = 1

    def step(self, logits: torch.Tensor | None, next_tokens: torch.Tensor | None = None,
             rows: tuple[int, int] | None = None) -> int:
        """Sample rows first..first+B-1 (`rows` = (first, B); default: 0..batch-1) from `logits`
        [B, vocab] fp32 (or take `next_tokens`, int32 [B], when logits is None), feed the tokens to
        the next decode step and queue the records to the host (no wait); returns the handle for
        read()."""
        first, B = rows if rows is not None else (0, self.batch)
        if not (0 <= first and 1 <= B and first + B <= self.max_batch):
            raise ValueError(f"step: rows {first}..{first + B - 1} are not rows of a sampler of {self.max_batch}")
        handle, slot = self._take_slot()
        # Without logprobs the kernel writes the records straight into the pinned slot (mapped host
        # memory): no copy between this step and the next.
        direct = self.kernel and self.num_logprobs is None and slot["records_device_ptr"] != 0
        if self.kernel:
            C = _core.load()
            if logits is not None:
                if logits.dtype != torch.float32 or logits.stride(-1) != 1 or logits.device != self.device:
                    logits = logits.float().contiguous().to(self.device)
            stream = torch.cuda.current_stream(self.device).cuda_stream
            # row `first` of a per-row state tensor (its address: no view per tensor a step)
            row = lambda t: t.data_ptr() + first * t.stride(0) * t.element_size()  # noqa: E731
            C.sample_tokens(
                0 if logits is None else logits.data_ptr(), 0 if logits is None else logits.stride(0),
                0 if next_tokens is None else next_tokens.data_ptr(), self.vocab, B, self.max_seq,
                self.rows.data_ptr() + first * self._table.itemsize, row(self.stop_ids), self.stop_ids.shape[1],
                row(self.counts) if self.penalized else 0, row(self.in_prompt) if self.penalized else 0,
                row(self.tokens), row(self.positions), row(self.generated), row(self.status),
                slot["records_device_ptr"] if direct else self.records.data_ptr(), self.device_index, stream,
            )
        else:
            self._step_torch(logits, next_tokens, first, B)
        if not direct:
            slot["records"][:B].copy_(self.records[:B], non_blocking=True)
        slot["has_lp"] = self.num_logprobs is not None and logits is not None
        if slot["has_lp"]:
            lsm = logits[:B].float().log_softmax(-1)
            token = record_column("token")
            chosen = lsm.gather(1, self.records[:B, token : token + 1].long().clamp(min=0))
            parts = [chosen]
            if self.num_logprobs:
                top = lsm.topk(self.num_logprobs, -1)
                parts += [top.values, top.indices.float()]  # ids < 2^24: exact in fp32
            packed = torch.cat(parts, dim=1)
            slot["lp"][:B, : packed.shape[1]].copy_(packed, non_blocking=True)
        if slot["event"] is not None:
            slot["event"].record(torch.cuda.current_stream(self.device))
        slot["first"], slot["count"], slot["num_logprobs"] = first, B, self.num_logprobs
        return handle

    def _step_torch(self, logits, next_tokens, first: int, B: int):
        """The compiled sampler's step over rows first..first+B-1, in PyTorch (its records in rows
        0..B-1 of self.records)."""
        at = slice(first, first + B)
        table = {name: col[at] for name, col in self._columns.items()}
        status, generated, positions = self.status[at], self.generated[at], self.positions[at]
        active = status == self.finish["none"]
        if logits is None:
            tokens, non_finite = next_tokens[:B].long(), torch.zeros(B, dtype=torch.bool, device=self.device)
        else:
            in_prompt = None if not self.penalized else self.in_prompt[at].bool()
            tokens, non_finite = sample_rows(logits[:B], table, None if not self.penalized else self.counts[at],
                                             in_prompt, generated)
        feed = active & ~non_finite
        produced = generated + 1
        position = positions + 1
        stop_ids = self.stop_ids[at]
        widths = torch.arange(stop_ids.shape[1], device=self.device)[None]
        num_stop = table["num_stop"].to(self.device)[:, None]
        stop = ((stop_ids == tokens[:, None].int()) & (widths < num_stop)).any(-1)
        length = (produced >= table["max_tokens"].to(self.device)) | (position + 1 >= self.max_seq)
        finish = torch.where(stop, self.finish["stop"], torch.where(length, self.finish["length"], self.finish["none"]))
        finish = torch.where(feed, finish, torch.zeros_like(finish))
        if self.penalized:
            rows = torch.arange(first, first + B, device=self.device)
            penalized = table["penalized"].to(self.device).bool() & feed
            self.counts[rows, tokens.clamp(0, self.vocab - 1)] += penalized.int()
        self.generated[at] = torch.where(feed, produced, generated).int()
        cont = feed & (finish == self.finish["none"])
        self.tokens[at] = torch.where(cont, tokens, self.tokens[at])
        self.positions[at] = torch.where(cont, position, positions)
        idle = ~active
        self.records[:B, record_column("token")] = torch.where(idle, -1, tokens).int()
        self.records[:B, record_column("finish")] = torch.where(idle, status, finish.int())
        self.records[:B, record_column("flags")] = (idle.int() * self.flags["idle"]) | (
            (non_finite & active).int() * self.flags["non_finite"])
        self.status[at] = torch.where(feed, finish.int(), status)

    def _take_slot(self) -> tuple[int, dict]:
        """The next pinned record buffer (the ring's) and its handle."""
        while len(self._slots) < self.ring:
            records = torch.zeros(self.max_batch, self.record_width, dtype=torch.int32, pin_memory=self.cuda)
            self._slots.append(dict(
                records=records,
                records_device_ptr=_core.load().host_device_pointer(records.data_ptr()) if self.kernel else 0,
                lp=torch.zeros(self.max_batch, 1 + 2 * max_logprobs(), dtype=torch.float32, pin_memory=self.cuda),
                event=torch.cuda.Event() if self.cuda else None, has_lp=False))
        handle = self._next_slot
        self._next_slot += 1
        slot = self._slots[handle % self.ring]
        slot["handle"] = handle
        return handle, slot

    def read(self, handle: int) -> StepRecord:
        """Wait for step `handle`'s records (at most `ring` steps after it was queued)."""
        slot = self._slots[handle % self.ring]
        if slot.get("handle") != handle:
            raise RuntimeError(f"sampler records of step {handle} were overwritten (read them within {self.ring} steps)")
        if slot["event"] is not None:
            slot["event"].synchronize()
        B, n = slot["count"], slot["num_logprobs"] or 0
        rec = slot["records"][:B].numpy()
        out = StepRecord(*(rec[:, record_column(f)].copy() for f in ("token", "finish", "flags")), first=slot["first"])
        if slot["has_lp"]:
            lp = slot["lp"][:B].numpy()
            out.logprob = lp[:, 0].copy()
            out.top_logprobs, out.top_ids = lp[:, 1 : 1 + n].copy(), lp[:, 1 + n : 1 + 2 * n].astype(np.int64)
        return out

    def abort(self, row: int) -> None:
        """End `row` on the device (the host found a stop string): it stops advancing."""
        self.status[row] = self.finish["aborted"]

    def end_all(self) -> None:
        """End every row on the device: each idles until admit() sets it up."""
        self.status.fill_(self.finish["aborted"])
