"""Sampling parameters (SGLang's names and defaults) and the per-row sampling math, as pure functions.

Log-probs: the returned log-prob of a token is log_softmax(logits / T)[token] where T is the request's
temperature, taken BEFORE top-k / top-p / min-p filtering and before the min_new_tokens stop mask. That is
exactly what the trainer recomputes (log_softmax(logits / T) of a teacher-forced forward), so pi_behave and
pi_prox are comparable. Filters shape the sampling only. Greedy (T < 1e-5) reports log_softmax(logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

GREEDY_EPS = 1e-5
ALL_TOKENS = 1 << 30  # SGLang's "no top-k" default

# Every key of sglang.api.v1.SamplingParams (0.5.23). Unknown keys are a 400, as in SGLang.
KNOWN_KEYS = frozenset({
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
})
# Known to SGLang but not implemented here: accepted only at their neutral value.
_NEUTRAL: dict[str, Any] = {
    "stop_regex": (None, [], ""), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "json_schema": (None,), "regex": (None,), "ebnf": (None,),
    "structural_tag": (None,), "logit_bias": (None, {}), "custom_params": (None,), "beam_width": (None, 0, 1),
    "watermark": (None,), "choice": (None, []),
}


class SamplingParamError(ValueError):
    """A sampling_params value SGLang (or genserver) rejects; becomes HTTP 400."""


@dataclass
class SamplingSpec:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = ALL_TOKENS
    min_p: float = 0.0
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    sampling_seed: int | None = None
    stream_interval: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def parse_sampling_params(raw: dict[str, Any] | None) -> SamplingSpec:
    """Validate a request's sampling_params (SGLang names, SGLang defaults); SamplingParamError on bad input."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise SamplingParamError(f"unknown sampling_params key(s) {unknown}; SGLang accepts {sorted(KNOWN_KEYS)}")
    for k, ok in _NEUTRAL.items():
        if k in raw and raw[k] not in ok:
            raise SamplingParamError(f"sampling_params.{k}={raw[k]!r} is not supported by genserver (only {ok[0]!r})")
    s = SamplingSpec()

    def num(key: str, typ: type, lo: float | None = None, hi: float | None = None) -> Any:
        v = raw.get(key)
        if v is None:
            return getattr(s, key)
        if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise SamplingParamError(f"sampling_params.{key} must be an integer, got {v!r}")
        if typ is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise SamplingParamError(f"sampling_params.{key} must be a number, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise SamplingParamError(f"sampling_params.{key}={v} is outside [{lo}, {hi}]")
        return typ(v)

    s.max_new_tokens = num("max_new_tokens", int, 0)
    s.temperature = num("temperature", float, 0.0)
    s.top_p = num("top_p", float, 1e-9, 1.0)
    top_k = num("top_k", int)
    s.top_k = ALL_TOKENS if top_k in (-1, 0) or top_k >= ALL_TOKENS else top_k
    if s.top_k < 1:
        raise SamplingParamError(f"sampling_params.top_k={top_k} must be >= 1 or -1 (all tokens)")
    s.min_p = num("min_p", float, 0.0, 1.0)
    s.min_new_tokens = num("min_new_tokens", int, 0)
    s.n = num("n", int, 1, 1024)
    s.stream_interval = num("stream_interval", int, 1)
    seed = raw.get("sampling_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SamplingParamError(f"sampling_params.sampling_seed must be an integer, got {seed!r}")
    s.sampling_seed = seed
    stop = raw.get("stop")
    s.stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(x, str) and x for x in s.stop):
        raise SamplingParamError(f"sampling_params.stop must be a non-empty string or list of them, got {stop!r}")
    ids = raw.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
        raise SamplingParamError(f"sampling_params.stop_token_ids must be a list of integers, got {ids!r}")
    s.stop_token_ids = list(ids)
    for key in ("ignore_eos", "skip_special_tokens", "no_stop_trim"):
        if raw.get(key) is not None:
            if not isinstance(raw[key], bool):
                raise SamplingParamError(f"sampling_params.{key} must be true or false, got {raw[key]!r}")
            setattr(s, key, raw[key])
    return s


def tempered_logprobs(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """[B, V] logits, [B] temperatures -> log_softmax(logits / T) in fp32 (T < 1e-5 counts as 1: greedy)."""
    t = torch.where(temperatures < GREEDY_EPS, torch.ones_like(temperatures), temperatures)
    return torch.log_softmax(logits.float() / t[:, None], dim=-1)


def filter_logprobs(lp: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """One row of log-probs with tokens outside top-k / top-p (nucleus) / min-p set to -inf."""
    out = lp.clone()
    if top_k < lp.numel():
        kth = torch.topk(lp, top_k).values[-1]
        out[lp < kth] = float("-inf")
    if top_p < 1.0:
        sorted_lp, idx = torch.sort(out, descending=True)
        probs = sorted_lp.exp()
        # keep a token while the mass strictly before it is < top_p (the top token is always kept)
        drop = (probs.cumsum(0) - probs) >= top_p
        out[idx[drop]] = float("-inf")
    if min_p > 0.0:
        out[lp < lp.max() + torch.log(torch.tensor(min_p))] = float("-inf")
    return out


def sample_row(lp: torch.Tensor, spec: SamplingSpec, generator: torch.Generator, banned: list[int] | None = None) -> int:
    """Draw one token from a row of tempered log-probs under the request's filters, with its own generator
    (so a seeded request gives the same tokens whatever else shares its batch)."""
    masked = lp
    if banned:
        masked = lp.clone()
        masked[banned] = float("-inf")
    if spec.greedy:
        return int(torch.argmax(masked))
    masked = filter_logprobs(masked, spec.top_k, spec.top_p, spec.min_p)
    # exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i
    e = torch.empty(masked.shape, dtype=torch.float32).exponential_(generator=generator)
    return int(torch.argmax(masked - e.log()))
