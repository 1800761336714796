"""Sampling parameters (SGLang's names and defaults) and the per-row sampling math, as pure functions.

Log-probs: the returned log-prob of a token is log_softmax(logits / T)[token] where T is the request's
temperature, taken BEFORE top-k / top-p / min-p filtering and before the min_new_tokens stop mask. That is
exactly what the trainer recomputes (log_softmax(logits / T) of a teacher-forced forward), so pi_behave and
pi_prox are comparable. Filters shape the sampling only. Greedy (T < 1e-5) reports log_softmax(logits).
"""

from __future__ import annotations

import math
import random
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
NEUTRAL: dict[str, tuple[Any, ...]] = {
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
    """Validate a request's sampling_params (SGLang names, SGLang defaults, genserver's bounds: the pydantic
    model /generate validates with) into a SamplingSpec; SamplingParamError names the field on bad input."""
    from pydantic import ValidationError

    from asyncgrpo.genserver.requests import SamplingParams
    from asyncgrpo.utils.api_errors import describe_errors

    try:
        params = SamplingParams.model_validate(raw or {})
    except ValidationError as e:
        errors = [{**err, "loc": ("sampling_params", *err["loc"])} for err in e.errors()]
        raise SamplingParamError(describe_errors(errors, SamplingParams)) from None
    return params.to_spec()


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
        out[lp < lp.max() + math.log(min_p)] = float("-inf")
    return out


class SamplingError(RuntimeError):
    """No token can be drawn from a row (every token masked, or log-probs that are not numbers)."""


def sample_row(lp: torch.Tensor, spec: SamplingSpec, generator: torch.Generator, banned: list[int] | None = None) -> int:
    """Draw one token from a row of tempered log-probs under the request's filters, with its own generator
    (so a seeded request gives the same tokens whatever else shares its batch). Banned ids outside the row
    are ignored (the model cannot produce them); SamplingError when nothing can be drawn. The noise is drawn
    on the row's device, so `generator` must live there (torch.Generator(device=lp.device))."""
    masked = lp
    if banned:
        inside = [t for t in banned if 0 <= t < lp.numel()]
        if inside:
            masked = lp.clone()
            masked[inside] = float("-inf")
    if spec.greedy:
        tok = int(torch.argmax(masked))
    else:
        masked = filter_logprobs(masked, spec.top_k, spec.top_p, spec.min_p)
        # exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i
        e = torch.empty(masked.shape, dtype=torch.float32, device=masked.device).exponential_(generator=generator)
        tok = int(torch.argmax(masked - e.log()))
    # argmax picks a NaN, or any -inf when all are: one check of the winner catches both
    if not math.isfinite(float(masked[tok])):
        raise SamplingError(f"no token can be sampled: the best candidate has log-prob {float(masked[tok])} "
                            "(every token masked, or log-probs that are not numbers)")
    return tok


def _unfiltered(spec: SamplingSpec, vocab: int) -> bool:
    return spec.top_k >= vocab and spec.top_p >= 1.0 and spec.min_p <= 0.0


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def device_generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """A torch.Generator on `device` (CUDA draws need a CUDA generator), seeded with `seed` or at random."""
    return torch.Generator(device=device).manual_seed(random.getrandbits(63) if seed is None else int(seed))


def inverse_cdf_draw(lps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of [B, V] log-probs, token i with probability exp(lp_i): the first index whose running
    sum of probabilities exceeds a uniform draw scaled to the row's total. right=True: a token of probability 0
    (its running sum equals its left neighbour's) is never drawn; the min with the first index at the total
    keeps a draw that rounds up to the total on the last token that has probability."""
    cdf = lps.double().exp().cumsum(-1)  # float64: in float32 a 150k-token row's sum rounds each slice to ~6e-8
    u = torch.rand(lps.shape[0], 1, generator=generator, dtype=cdf.dtype, device=lps.device) * cdf[:, -1:]
    return torch.minimum(torch.searchsorted(cdf, u, right=True)[:, 0], cdf.argmax(-1))


def sample_batch(lps: torch.Tensor, specs: list[SamplingSpec], generators: list[torch.Generator | None],
                 banned: list[list[int] | None], shared: torch.Generator | None = None) -> list[int | Exception]:
    """sample_row for every row of [B, V] tempered log-probs. A row with its own generator (a seeded request)
    gets exactly the token sample_row gives it (the same exponential draws from the same generator); rows
    without one (None) draw from `shared`, all in one call. Rows without filters or banned ids (the usual case)
    are decided by one batched argmax instead of ~6 small ops each; the rest go through sample_row. A row that
    cannot be sampled gets its error (SamplingError) in place of a token, so it fails alone."""
    return sample_batch_logprobs(lps, specs, generators, banned, shared)[0]


def sample_batch_logprobs(lps: torch.Tensor, specs: list[SamplingSpec], generators: list[torch.Generator | None],
                          banned: list[list[int] | None], shared: torch.Generator | None = None,
                          ) -> tuple[list[int | Exception], list[float], torch.Tensor]:
    """sample_batch, plus each row's log-prob of its token (lps[i, token]) and the tokens as a [B] long tensor
    on lps.device (0 in a failed row's place), for the engine to feed back without a host->device copy.

    Device-resident: everything is computed on lps.device with generators on that device (`shared` and the
    rows' own), and the tokens and their log-probs come back to the host in ONE copy per call. Rows that are
    filtered (top-k/top-p/min-p) or have banned ids go through sample_row, which reads back per row. Index
    tensors are built only when the batch mixes kinds of rows (fast and filtered, greedy and sampled, seeded and
    unseeded); the usual batch needs none."""
    vocab, dev = lps.shape[-1], lps.device
    shared = shared if shared is not None else device_generator(dev)
    out: list[int | Exception] = [0] * len(specs)
    toks = torch.zeros(len(specs), dtype=torch.long, device=dev)
    fast = [i for i, (spec, ban) in enumerate(zip(specs, banned)) if not ban and (spec.greedy or _unfiltered(spec, vocab))]
    slow = sorted(set(range(len(specs))) - set(fast))
    for i in slow:
        try:
            out[i] = sample_row(lps[i], specs[i], generators[i] or shared, banned[i])
            toks[i] = out[i]
        except Exception as e:  # noqa: BLE001 - this row's failure, reported in its place
            out[i] = e
    if fast:
        every = len(fast) == len(specs)
        rows = lps if every else lps[_index(fast, dev)]
        # Seeded rows race their own exponential draws against the log-probs (argmax of lp - log E), exactly the
        # draws sample_row makes; unseeded ("pooled") rows draw by inverse CDF from the shared generator. Both
        # pick token i with probability exp(lp_i); the pooled way costs one uniform per row instead of one
        # exponential per vocabulary entry (torch's CPU exponential_ costs ~7x torch.rand for the same count).
        seeded = [k for k, i in enumerate(fast) if not specs[i].greedy and generators[i] is not None]
        pooled = [k for k, i in enumerate(fast) if not specs[i].greedy and generators[i] is None]
        if len(pooled) == len(fast):  # the usual batch: no greedy or seeded row
            best = inverse_cdf_draw(rows, shared)
        else:
            scores = rows
            if seeded:
                noise = torch.empty(len(seeded), vocab, dtype=torch.float32, device=dev)
                for j, k in enumerate(seeded):
                    noise[j].exponential_(generator=generators[fast[k]])
                if len(seeded) == len(fast):
                    scores = rows - noise.log()
                else:
                    scores = rows.clone()
                    scores[_index(seeded, dev)] -= noise.log()
            best = torch.argmax(scores, dim=-1)
            if pooled:
                at = _index(pooled, dev)
                best[at] = inverse_cdf_draw(rows[at], shared)
        if every:
            toks = best
        else:
            toks[_index(fast, dev)] = best
    picked = lps.gather(1, toks[:, None])[:, 0]
    # the one device->host copy: tokens and their log-probs together (float64 holds every token id exactly)
    host_toks, host_lps = torch.stack([toks.double(), picked.double()]).tolist() if len(specs) else ([], [])
    for i in fast:
        tok, lp = int(host_toks[i]), host_lps[i]
        out[i] = tok if math.isfinite(lp) else SamplingError(
            f"no token can be sampled: the best candidate has log-prob {lp} (every token masked, or log-probs "
            "that are not numbers)")
    return out, host_lps, toks
