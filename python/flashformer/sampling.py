"""Sampling parameters (vLLM names) and the sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import validate


# Temperatures below this are greedy, as in vLLM: dividing logits by less overflows fp32.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 (or below 1e-5) means greedy (argmax).

    top_k=-1 and top_p=1.0 disable those filters. `seed` (0 <= seed < 2**64) makes a request's
    sampling reproducible. `stop_token_ids` (a list of ids, or a 1-D integer array or tensor) and
    `stop` (a string or strings, cut from the text) end the request with finish_reason "stop", as
    does an EOS token unless `ignore_eos`. Every field is checked here (types strictly: a bool is
    not an int, nor an int a bool); a bad one is a ValueError naming it.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    stop: tuple[str, ...] | list[str] | str | None = None
    ignore_eos: bool = False

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
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def generator(self, device) -> torch.Generator | None:
        """A fresh generator seeded with `seed`, or None (the global RNG) without a seed."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick the next token from one row of fp32 logits [vocab]."""
    if params.greedy:
        return int(logits.argmax())
    logits = (logits.float() - logits.max()) / params.temperature  # <= 0: no overflow to inf
    if params.top_k != -1 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
