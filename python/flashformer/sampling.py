"""Sampling parameters (vLLM names) and the sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy (argmax).

    top_k=-1 and top_p=1.0 disable those filters. `seed` makes a request's sampling reproducible.
    `stop_token_ids` and `stop` (a string or strings, cut from the text) end the request with
    finish_reason "stop", as does an EOS token unless `ignore_eos`.
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
        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(f"invalid SamplingParams: {message}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        check(
            is_int(self.max_tokens) and self.max_tokens >= 1, f"max_tokens must be an int >= 1, got {self.max_tokens!r}"
        )
        check(
            isinstance(self.temperature, (int, float)) and self.temperature >= 0,
            f"temperature must be >= 0, got {self.temperature!r}",
        )
        check(
            is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
            f"top_k must be -1 or >= 1, got {self.top_k!r}",
        )
        check(
            isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"
        )
        check(self.seed is None or is_int(self.seed), f"seed must be an int or None, got {self.seed!r}")
        stop_ids = tuple(self.stop_token_ids or ())
        check(
            all(is_int(t) and t >= 0 for t in stop_ids),
            f"stop_token_ids must be ints >= 0, got {self.stop_token_ids!r}",
        )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        check(all(isinstance(s, str) and s for s in stop), f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop_token_ids", stop_ids)
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device) -> torch.Generator | None:
        """A fresh generator seeded with `seed`, or None (the global RNG) without a seed."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick the next token from one row of fp32 logits [vocab]."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
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
