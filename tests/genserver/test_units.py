"""Pure pieces: sampling-param validation, filters, seeded sampling, version spans, response parsing."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from asyncgrpo.genserver.app import version_spans
from asyncgrpo.genserver.requests import MAX_SEED, GenerateReqInput, GenerateRequestError, expand_generate
from asyncgrpo.genserver.sampling import (
    ALL_TOKENS, SamplingError, SamplingParamError, filter_logprobs, inverse_cdf_draw, parse_sampling_params, sample_batch,
    sample_row, tempered_logprobs)
from asyncgrpo.sglang.client import expand_token_versions, parse_generate_response


def test_sglang_defaults_and_unknown_keys() -> None:
    s = parse_sampling_params({})
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.n) == (128, 1.0, 1.0, ALL_TOKENS, 1)
    with pytest.raises(SamplingParamError, match=r"sampling_params.max_tokens: unknown field; allowed: max_new_tokens, "):
        parse_sampling_params({"max_tokens": 3})
    with pytest.raises(SamplingParamError, match=r"sampling_params.top_p: Input should be less than or equal to 1 \(got 1.5\)"):
        parse_sampling_params({"top_p": 1.5})
    with pytest.raises(SamplingParamError, match="sampling_params.max_new_tokens: Input should be a valid integer"):
        parse_sampling_params({"max_new_tokens": "8"})
    with pytest.raises(SamplingParamError, match=r"sampling_params.repetition_penalty: not supported by genserver: only null or 1 "):
        parse_sampling_params({"repetition_penalty": 1.2})
    s = parse_sampling_params({"stop": "x", "top_k": -1})
    assert s.stop == ["x"] and s.top_k == ALL_TOKENS


def test_filters() -> None:
    lp = torch.log_softmax(torch.tensor([3.0, 2.0, 1.0, 0.0]), -1)
    assert torch.isinf(filter_logprobs(lp, 2, 1.0, 0.0)).tolist() == [False, False, True, True]
    p = lp.exp()
    # nucleus: keep the smallest prefix whose mass reaches top_p
    kept = ~torch.isinf(filter_logprobs(lp, ALL_TOKENS, float(p[0] + 0.01), 0.0))
    assert kept.tolist() == [True, True, False, False]
    assert (~torch.isinf(filter_logprobs(lp, ALL_TOKENS, 1.0, 0.3))).tolist() == [True, True, False, False]


def test_temperature_logprobs_are_before_filtering() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5]])
    lp = tempered_logprobs(logits, torch.tensor([0.5]))
    assert torch.allclose(lp, torch.log_softmax(logits / 0.5, -1))
    assert torch.allclose(tempered_logprobs(logits, torch.tensor([0.0])), torch.log_softmax(logits, -1))


def test_seeded_sampling_follows_the_distribution_and_repeats() -> None:
    lp = torch.log_softmax(torch.tensor([1.0, 0.0, -1.0, 0.5]), -1)
    spec = parse_sampling_params({"temperature": 1.0})
    draw = lambda seed: [sample_row(lp, spec, g) for g in [torch.Generator().manual_seed(seed)] for _ in range(4000)]
    a = draw(3)
    assert a == draw(3) and a != draw(4)
    freq = torch.bincount(torch.tensor(a), minlength=4).float() / len(a)
    assert torch.allclose(freq, lp.exp(), atol=0.03)
    assert sample_row(lp, parse_sampling_params({"temperature": 0}), torch.Generator()) == 0
    assert sample_row(lp, parse_sampling_params({"temperature": 0}), torch.Generator(), banned=[0]) == 3


def test_sample_row_ignores_impossible_bans_and_refuses_to_draw_from_nothing() -> None:
    lp = torch.log_softmax(torch.tensor([1.0, 0.0, -1.0, 0.5]), -1)
    greedy = parse_sampling_params({"temperature": 0})
    assert sample_row(lp, greedy, torch.Generator(), banned=[0, 4, 384, -1]) == 3  # ids the row cannot hold: no-ops
    for spec in (greedy, parse_sampling_params({})):
        with pytest.raises(SamplingError, match="no token can be sampled"):
            sample_row(lp, spec, torch.Generator(), banned=[0, 1, 2, 3])
        with pytest.raises(SamplingError, match="no token can be sampled"):
            sample_row(torch.full((4,), float("nan")), spec, torch.Generator())


def test_batched_sampling_draws_exactly_what_each_row_alone_draws() -> None:
    """The engine samples a whole batch at once. A seeded row (its own generator) must get the token sample_row
    gives it with the same generator state, whatever shares the batch, filters, bans and failures included;
    unseeded rows (no generator) draw from the shared generator and follow their distribution."""
    torch.manual_seed(0)
    lps = torch.log_softmax(torch.randn(9, 50) * 3, -1)
    lps[5] = float("nan")  # a row that cannot be sampled fails alone
    specs = [parse_sampling_params(p) for p in ({}, {"temperature": 0}, {"top_k": 5}, {"top_p": 0.7}, {"min_p": 0.2},
                                                {}, {"temperature": 1.0}, {}, {"top_k": 3})]
    banned = [None, None, None, None, None, None, [int(lps[6].argmax())], None, None]
    seeded = [0, 1, 2, 3, 4, 5, 6]  # rows 7 and 8 are unseeded
    for step in range(30):
        seeds = [100 * step + i for i in range(9)]
        gens = [torch.Generator().manual_seed(seeds[i]) if i in seeded else None for i in range(9)]
        batch = sample_batch(lps, specs, gens, banned, torch.Generator().manual_seed(step))
        for i in seeded:
            if i == 5:
                assert isinstance(batch[i], SamplingError)
                continue
            alone = sample_row(lps[i], specs[i], torch.Generator().manual_seed(seeds[i]), banned[i])
            assert batch[i] == alone, (step, i, batch[i], alone)
        assert batch[8] in torch.topk(lps[8], 3).indices.tolist()  # the unseeded filtered row keeps its filter
    assert batch[6] != banned[6][0]
    # unseeded rows, many at once, follow the distribution
    lp = torch.log_softmax(torch.tensor([1.0, 0.0, -1.0, 0.5]), -1)
    n = 8000
    toks = sample_batch(lp.expand(n, 4), [parse_sampling_params({})] * n, [None] * n, [None] * n, torch.Generator().manual_seed(1))
    freq = torch.bincount(torch.tensor(toks), minlength=4).float() / n
    assert torch.allclose(freq, lp.exp(), atol=0.02), (freq, lp.exp())


def test_inverse_cdf_draw_follows_the_distribution_and_never_draws_an_impossible_token() -> None:
    """The unseeded rows' sampler. 20,000 draws: each frequency's standard error is at most
    sqrt(0.25 / 20000) = 0.0035, so 0.02 is over five of them; tokens of probability 0 (first, middle, last
    place) must never come out."""
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    lps = p.log().expand(20000, 6)
    toks = inverse_cdf_draw(lps, torch.Generator().manual_seed(3))
    freq = torch.bincount(toks, minlength=6).float() / len(toks)
    assert freq[p == 0].sum() == 0, freq
    assert torch.allclose(freq, p, atol=0.02), (freq, p)
    one = torch.full((4, 6), float("-inf"))
    one[torch.arange(4), torch.tensor([0, 2, 5, 5])] = 0.0  # all mass on one token, wherever it sits
    assert inverse_cdf_draw(one, torch.Generator().manual_seed(0)).tolist() == [0, 2, 5, 5]


def test_version_spans_round_trip_through_the_client() -> None:
    versions = ["1", "1", "2", "2", "2", "3"]
    spans = version_spans(versions)
    assert spans == [{"version": "1", "start": 0, "end": 2}, {"version": "2", "start": 2, "end": 5},
                     {"version": "3", "start": 5, "end": 6}]
    assert expand_token_versions({"weight_version": "3", "weight_versions": spans}, 6) == versions
    assert expand_token_versions({"weight_version": "9"}, 2) == ["9", "9"]


def test_parse_generate_response() -> None:
    r = parse_generate_response({"text": "ab", "output_ids": [5, 6], "meta_info": {
        "id": "x", "finish_reason": {"type": "abort", "message": "m"}, "prompt_tokens": 3, "weight_version": "4",
        "output_token_logprobs": [[-0.5, 5, None], [-1.5, 6, None]]}})
    assert r.aborted and r.output_logprobs == [-0.5, -1.5] and r.token_versions == ["4", "4"] and r.rid == "x"


def expand(body: dict, vocab_size: int = 384, max_context: int = 1024):  # noqa: ANN201
    return expand_generate(GenerateReqInput.model_validate(body), encode=lambda t: [ord(c) for c in t],
                           vocab_size=vocab_size, max_context=max_context)


def test_expand_batch_and_n() -> None:
    items, is_list = expand({"input_ids": [[1, 2], [3]], "rid": "r", "sampling_params": {"n": 2, "sampling_seed": 7}})
    assert is_list and [i.rid for i in items] == ["r_0_0", "r_0_1", "r_1_0", "r_1_1"]
    assert [i.spec.sampling_seed for i in items] == [7, 8, 7, 8]
    items, is_list = expand({"input_ids": [1], "rid": "q"})
    assert not is_list and items[0].rid == "q"
    items, is_list = expand({"text": ["ab", "c"], "sampling_params": [{"max_new_tokens": 1}, {"max_new_tokens": 2}]})
    assert is_list and [i.input_ids for i in items] == [[97, 98], [99]]
    assert [i.spec.max_new_tokens for i in items] == [1, 2]
    with pytest.raises(ValidationError, match="exactly one of text and input_ids"):
        expand({"sampling_params": {}})


def test_derived_seeds_never_overflow() -> None:
    items, _ = expand({"input_ids": [1], "sampling_params": {"n": 3, "sampling_seed": MAX_SEED}})
    assert [i.spec.sampling_seed for i in items] == [MAX_SEED, 0, 1]
    for i in items:  # a torch generator takes every derived seed
        torch.Generator().manual_seed(i.spec.sampling_seed)


@pytest.mark.parametrize("body, message", [
    ({"input_ids": [1, 384]}, r"^input_ids\[1\]: token id 384 is outside the model's vocabulary \[0, 384\)$"),
    ({"input_ids": [[1], [2, 3, 400]]}, r"^input_ids\[1\]\[2\]: token id 400 is outside"),
    ({"text": "a\u0200"}, r"^text: encodes to token id 512 \(position 1\), outside the model's vocabulary"),
    ({"input_ids": [1], "sampling_params": {"stop_token_ids": [5, 384]}},
     r"^sampling_params.stop_token_ids\[1\]: token id 384 is outside"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}, {"stop_token_ids": [999]}]},
     r"^sampling_params\[1\].stop_token_ids\[0\]: token id 999"),
    ({"input_ids": list(range(100)) * 11}, r"^input_ids: the prompt has 1100 tokens; the model's context is 1024"),
    ({"text": ""}, r"^text: the prompt encodes to no tokens"),
])
def test_expand_refuses_what_does_not_fit_the_model(body, message) -> None:
    with pytest.raises(GenerateRequestError, match=message):
        expand(body)


@pytest.mark.parametrize("flag", ["--num-continuous-decode-steps", "--max-batch-size", "--threads"])
def test_counts_below_one_are_refused_by_name(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from asyncgrpo.genserver.command import add_arguments

    p = argparse.ArgumentParser(prog="asyncgrpo genserver")
    add_arguments(p)
    assert getattr(p.parse_args(["--model", "m", flag, "2"]), flag[2:].replace("-", "_")) == 2
    for bad, why in (("0", "0 is below 1"), ("x", "'x' is not an integer")):
        with pytest.raises(SystemExit) as e:
            p.parse_args(["--model", "m", flag, bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: {why}; give a whole number >= 1" in err, err


@pytest.mark.parametrize("command", ["genserver", "reward_server"])
@pytest.mark.parametrize(("env", "want"), [(None, 1), ("", 1), ("0", 1), ("-2", 1), ("x", 1), ("3", 3), ("4,2", 4)])
def test_threads_default_reads_omp_num_threads_as_openmp_does(command: str, env: str | None, want: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import importlib

    add_arguments = importlib.import_module(f"asyncgrpo.{command}.command").add_arguments
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    p = argparse.ArgumentParser(prog=f"asyncgrpo {command}")
    add_arguments(p)
    assert p.parse_args(["--model", "m"]).threads == want
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--threads", "0"])


@pytest.mark.parametrize("kw", [{"max_batch_size": 0}, {"num_continuous_decode_steps": 0}])
def test_the_engine_refuses_counts_below_one(kw: dict[str, int]) -> None:
    from asyncgrpo.genserver.engine import Engine

    with pytest.raises(ValueError, match=r"must both be >= 1"):
        Engine(torch.nn.Linear(2, 2), object(), model_path="m", **kw)
