"""The group message encoding: round trip, compactness, versioning and the size limit."""

from __future__ import annotations

import msgpack
import pytest

from asyncgrpo.queue import GroupSchemaError, GroupTooLargeError, PromptRef, decode_group, encode_group, version_number
from asyncgrpo.queue.schema import Completion, spans_from_versions, versions_from_spans

from .helpers import make_group


def test_round_trip_keeps_every_field() -> None:
    g = make_group(split=2)
    g.completions[0].reward_error = "TimeoutError"
    g.completions[1].resumes = 1
    back = decode_group(encode_group(g))
    assert back == g
    assert back.completions[0].token_versions == [0, 0, 1, 1]
    assert back.oldest_version == 0 and back.newest_version == 1


def test_logprobs_travel_as_float32() -> None:
    g = make_group()
    g.completions[0].logprobs = [-0.123456789] * 4
    back = decode_group(encode_group(g))
    assert back.completions[0].logprobs[0] == pytest.approx(-0.123456789, abs=1e-7)
    assert back.completions[0].logprobs[0] != -0.123456789


def test_g16_512_tokens_is_compact() -> None:
    g = make_group(g=16, n=512)
    size = len(encode_group(g))
    # 16 * 512 tokens * (4 B id + 4 B logprob) = 64 KiB of payload plus small per-completion overhead
    assert 16 * 512 * 8 < size < 16 * 512 * 8 + 4096


def test_unknown_schema_version_is_a_clear_error() -> None:
    body = msgpack.unpackb(encode_group(make_group()))
    body["schema_version"] = 99
    with pytest.raises(GroupSchemaError, match="schema_version 99"):
        decode_group(msgpack.packb(body))


def test_missing_field_and_garbage_are_schema_errors() -> None:
    body = msgpack.unpackb(encode_group(make_group()))
    del body["prompt_ids"]
    with pytest.raises(GroupSchemaError, match="prompt_ids"):
        decode_group(msgpack.packb(body))
    with pytest.raises(GroupSchemaError, match="msgpack"):
        decode_group(b"\xc1\xc1")


def test_size_limit_names_the_knob() -> None:
    with pytest.raises(GroupTooLargeError, match="max_message_bytes"):
        encode_group(make_group(g=16, n=512), max_bytes=10_000)


def test_version_spans() -> None:
    assert spans_from_versions([3, 3, 4]) == [(3, 0, 2), (4, 2, 3)]
    assert spans_from_versions([]) == []
    assert versions_from_spans([(3, 0, 2), (4, 2, 3)], 3) == [3, 3, 4]
    with pytest.raises(GroupSchemaError):
        versions_from_spans([(3, 0, 2)], 3)
    with pytest.raises(GroupSchemaError):
        Completion([1, 2], [0.0], [(1, 0, 2)], "stop", 0.0)


def test_version_number() -> None:
    assert version_number("default") == 0 and version_number("7") == 7 and version_number(3) == 3
    with pytest.raises(GroupSchemaError, match="weight_version"):
        version_number("v7-abc")


def test_prompt_ref() -> None:
    ref = PromptRef(2, 17, 1)
    assert PromptRef.parse(ref.key()) == ref and PromptRef.parse(ref.key().encode()) == ref
    assert ref.retry() == PromptRef(2, 17, 2) and ref.retry().group_id() != ref.group_id()
    with pytest.raises(ValueError, match="epoch:position:attempt"):
        PromptRef.parse("1:2")


def test_schema_1_messages_with_version_strings_are_still_read() -> None:
    """Groups queued by the previous build (schema 1: the servers' version strings) decode to integers; a
    version string that is not a number is a schema error (dead-lettered), and so is a non-integer in schema 2."""
    body = msgpack.unpackb(encode_group(make_group(split=2)), raw=False)
    body["schema_version"] = 1
    for c in body["completions"]:
        c["vs"] = [[("default" if v == 0 else str(v)), s, e] for v, s, e in c["vs"]]
    g = decode_group(msgpack.packb(body, use_bin_type=True))
    assert g.completions[0].token_versions == [0, 0, 1, 1] and g.oldest_version == 0
    body["completions"][0]["vs"][0][0] = "v7-abc"
    with pytest.raises(GroupSchemaError, match="v7-abc"):
        decode_group(msgpack.packb(body, use_bin_type=True))
    body["schema_version"] = 2
    body["completions"][0]["vs"][0][0] = "7"
    with pytest.raises(GroupSchemaError, match="not an integer"):
        decode_group(msgpack.packb(body, use_bin_type=True))


# A group exactly as the schema-2 build (before step rewards) encoded it, kept as bytes: queues and dead letters
# written then must still decode.
SCHEMA_2_MESSAGE = (
    "jq5zY2hlbWFfdmVyc2lvbgKmcnVuX2lkoXKoZ3JvdXBfaWSoZTAtcDMtYTCpcHJvbXB0X2lkonAzpWVwb2NoAKhwb3NpdGlvbgOnYXR0ZW1wdACq"
    "cHJvbXB0X2lkc8QMBQAAAAYAAAAHAAAApmFuc3dlcqI0MrBhZG1pdHRlZF92ZXJzaW9uAa9hZG1pc3Npb25faW5kZXgEqmNyZWF0ZWRfYXTLP/gA"
    "AAAAAACrY29tcGxldGlvbnOSiqNpZHPECAoAAAALAAAAomxwxAgAAAC/AACAvqJ2c5KTAQABkwIBAqJmcqRzdG9woXLLP/AAAAAAAACicmSBpWdz"
    "bThryz/wAAAAAAAAonJlwKJycwCidDDLAAAAAAAAAACidDHLAAAAAAAAAACKo2lkc8QEDAAAAKJscMQEAACAv6J2c5GTAgABomZypmxlbmd0aKFy"
    "ywAAAAAAAAAAonJkgKJyZcCicnMAonQwywAAAAAAAAAAonQxywAAAAAAAAAAq3RlbXBlcmF0dXJlyz/wAAAAAAAA"
)


def test_schema_2_bytes_still_decode_as_outcome_rewards() -> None:
    import base64

    g = decode_group(base64.b64decode(SCHEMA_2_MESSAGE))
    assert (g.group_id, g.prompt_ids, g.answer, g.admitted_version) == ("e0-p3-a0", [5, 6, 7], "42", 1)
    c0, c1 = g.completions
    assert c0.output_ids == [10, 11] and c0.token_versions == [1, 2] and c0.reward == 1.0 and c0.reward_details == {"gsm8k": 1.0}
    assert c1.finish_reason == "length" and c1.logprobs == [-1.0]
    assert c0.step_rewards is None and c0.step_ends is None  # no steps: an outcome reward


def test_step_rewards_round_trip_as_schema_3() -> None:
    g = make_group(n=4)
    g.completions[0].step_rewards = [0.25, 1.0]
    g.completions[0].step_ends = [3, 4]
    data = encode_group(g)
    assert msgpack.unpackb(data)["schema_version"] == 3
    back = decode_group(data)
    assert back == g
    assert back.completions[1].step_ends is None


@pytest.mark.parametrize("rewards,ends", [([1.0], None), ([1.0, 2.0], [4]), ([1.0], [3]), ([1.0, 1.0], [3, 3]),
                                          ([1.0, 1.0], [0, 4]), ([1.0, 1.0], [4, 3]), ([float("nan")], [4]), ([], [])])
def test_bad_steps_are_schema_errors(rewards: list[float] | None, ends: list[int] | None) -> None:
    with pytest.raises(GroupSchemaError, match="step"):
        Completion([1, 2, 3, 4], [0.0] * 4, [(0, 0, 4)], "stop", 0.0, step_rewards=rewards, step_ends=ends)


def test_steps_sharing_a_token_and_large_rewards_survive_the_queue() -> None:
    g = make_group(n=4)
    g.completions[0].step_rewards = [1e39, -0.5, 2.0]  # float64 on the wire: float32 would make 1e39 infinite
    g.completions[0].step_ends = [2, 2, 4]  # one token completed two steps
    back = decode_group(encode_group(g))
    assert back.completions[0].step_rewards == [1e39, -0.5, 2.0] and back.completions[0].step_ends == [2, 2, 4]
    body = msgpack.unpackb(encode_group(g))
    import numpy as np

    body["completions"][0]["sr"] = np.asarray([float("nan"), 0.0, 0.0], dtype="<f8").tobytes()
    with pytest.raises(GroupSchemaError, match="finite"):
        decode_group(msgpack.packb(body))
