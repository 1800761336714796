"""Pure pieces: sampling-param validation, filters, seeded sampling, version spans, response parsing."""

from __future__ import annotations

import pytest
import torch

from asyncgrpo.genserver.app import _expand, version_spans
from asyncgrpo.genserver.sampling import (
    ALL_TOKENS, SamplingParamError, filter_logprobs, parse_sampling_params, sample_row, tempered_logprobs)
from asyncgrpo.sglang.client import expand_token_versions, parse_generate_response


def test_sglang_defaults_and_unknown_keys() -> None:
    s = parse_sampling_params({})
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.n) == (128, 1.0, 1.0, ALL_TOKENS, 1)
    with pytest.raises(SamplingParamError, match=r"unknown sampling_params key\(s\) \['max_tokens'\]"):
        parse_sampling_params({"max_tokens": 3})
    with pytest.raises(SamplingParamError, match="top_p"):
        parse_sampling_params({"top_p": 1.5})
    with pytest.raises(SamplingParamError, match="max_new_tokens must be an integer"):
        parse_sampling_params({"max_new_tokens": "8"})
    with pytest.raises(SamplingParamError, match="repetition_penalty=1.2 is not supported"):
        parse_sampling_params({"repetition_penalty": 1.2})
    assert parse_sampling_params({"stop": "x", "top_k": -1}).stop == ["x"]


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


def test_expand_batch_and_n() -> None:
    items, is_list = _expand({"input_ids": [[1, 2], [3]], "rid": "r", "sampling_params": {"n": 2, "sampling_seed": 7}})
    assert is_list and [i[0] for i in items] == ["r_0_0", "r_0_1", "r_1_0", "r_1_1"]
    assert [i[2].sampling_seed for i in items] == [7, 8, 7, 8]
    items, is_list = _expand({"input_ids": [1], "rid": "q"})
    assert not is_list and items[0][0] == "q"
    with pytest.raises(ValueError, match="exactly one of text and input_ids"):
        _expand({"sampling_params": {}})
