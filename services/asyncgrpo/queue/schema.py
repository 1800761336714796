"""The scored-group message: what a rollout worker pushes and the trainer consumes.

Encoding: one msgpack map per group with a `schema_version` field. Token ids and log-probs travel as
little-endian int32 / float32 byte strings (4 bytes a token instead of msgpack's 5-9 per number), so a
G = 16, 512-token group is ~70 KB. Per-token policy versions travel as spans [version, start, end)
because a completion holds one or two versions (two when it crossed a weight update).

Versions are the trainer's integers. The generation server reports strings ("3", or SGLang's "default"
before any update); `version_number` parses them once, where rollout receives them (rollout/sampling.py), and
everything after carries ints ("default" and "" are the initial weights, version 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

# 3: completions may carry step rewards and step ends (process supervision); 2: weight versions are the trainer's
# integers; 1: the servers' version strings. Older versions are still read (no steps: outcome rewards only).
SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_I32 = np.dtype("<i4")
_F32 = np.dtype("<f4")
_F64 = np.dtype("<f8")  # step rewards: as exact as the float reward `r` (float32 would turn 1e39 into inf)


class GroupSchemaError(ValueError):
    """A message that cannot be decoded: unknown schema version, missing field or bad shape."""


class GroupTooLargeError(ValueError):
    """An encoded group above the configured size limit."""


def version_number(version: str | int) -> int:
    """The trainer-side integer of a server-reported weight version."""
    if isinstance(version, int):
        return version
    s = str(version).strip()
    if s in ("", "default"):
        return 0
    try:
        return int(s)
    except ValueError:
        raise GroupSchemaError(
            f"weight version {version!r} is not an integer; weight updates must set weight_version to str(policy_version)"
        ) from None


def spans_from_versions(versions: list[int]) -> list[tuple[int, int, int]]:
    """Run-length encode per-token versions into (version, start, end) spans."""
    spans: list[tuple[int, int, int]] = []
    for i, v in enumerate(versions):
        if spans and spans[-1][0] == v:
            spans[-1] = (v, spans[-1][1], i + 1)
        else:
            spans.append((v, i, i + 1))
    return spans


def versions_from_spans(spans: list[tuple[int, int, int]], n: int) -> list[int]:
    out: list[int] = []
    for v, start, end in spans:
        if start != len(out) or end < start:
            raise GroupSchemaError(f"version spans {spans} do not tile [0, {n})")
        out.extend([v] * (end - start))
    if len(out) != n:
        raise GroupSchemaError(f"version spans cover {len(out)} tokens, completion has {n}")
    return out


def check_steps(rewards: list[float] | None, ends: list[int] | None, n: int) -> None:
    """Step rewards and ends come together, one end per finite reward, non-decreasing (a token can complete two
    steps), the first after token 0 and the last at the length `n` (a completion with tokens)."""
    if rewards is None and ends is None:
        return
    if rewards is None or ends is None or len(rewards) != len(ends) or not ends:
        raise GroupSchemaError(f"completion: step_rewards {rewards} and step_ends {ends} must come together, one end "
                               "per step, at least one step")
    if not all(math.isfinite(r) for r in rewards):
        raise GroupSchemaError(f"completion: step_rewards {rewards[:8]} must be finite numbers")
    if n == 0 or ends[-1] != n or ends[0] <= 0 or any(b < a for a, b in zip(ends, ends[1:])):
        raise GroupSchemaError(f"completion: step_ends {ends} must be non-decreasing, from 1 to its {n} tokens")


@dataclass
class Completion:
    """One sampled completion of a prompt, with what the trainer needs for the decoupled loss."""

    output_ids: list[int]
    logprobs: list[float]  # behaviour log-probs, one per output token
    version_spans: list[tuple[int, int, int]]  # policy version (the trainer's integer) of tokens [start, end)
    finish_reason: str  # "stop" | "length" | "abort"
    reward: float
    reward_details: dict[str, float] = field(default_factory=dict)
    reward_error: str | None = None  # set when a reward function crashed or timed out (reward is then 0)
    resumes: int = 0  # how many times the request was resubmitted after an abort (partial rollout)
    started_at: float = 0.0  # unix time of the first request
    finished_at: float = 0.0  # unix time of the last response
    # Process supervision: the reward of each step and the exclusive token index where it ends (the last end is
    # len(output_ids): the steps tile the completion). None: an outcome reward only.
    step_rewards: list[float] | None = None
    step_ends: list[int] | None = None

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.output_ids):
            raise GroupSchemaError(f"completion: {len(self.logprobs)} logprobs for {len(self.output_ids)} output_ids")
        versions_from_spans(self.version_spans, len(self.output_ids))
        check_steps(self.step_rewards, self.step_ends, len(self.output_ids))

    @property
    def token_versions(self) -> list[int]:
        return versions_from_spans(self.version_spans, len(self.output_ids))

    @property
    def versions(self) -> set[int]:
        return {v for v, s, e in self.version_spans if e > s}


@dataclass
class Group:
    """G completions of one prompt, scored. `group_id` is unique per (prompt, epoch, attempt)."""

    run_id: str
    group_id: str
    prompt_id: str
    epoch: int
    position: int  # position of the prompt in the epoch's (shuffled) order
    attempt: int  # 0, then +1 each time the prompt came back after a stale drop
    prompt_ids: list[int]
    completions: list[Completion]
    answer: str = ""
    admitted_version: int = 0  # trainer version read when the group was admitted
    admission_index: int = 0  # groups started (net) counting this one, when admitted
    created_at: float = 0.0  # unix time the group was pushed
    temperature: float | None = None  # sampling temperature (a live knob): the trainer's log-probs must use the same
    schema_version: int = SCHEMA_VERSION

    @property
    def rewards(self) -> list[float]:
        return [c.reward for c in self.completions]

    @property
    def oldest_version(self) -> int:
        """Oldest policy version of any token in the group (staleness = trainer_version - this)."""
        nums = [v for c in self.completions for v in c.versions]
        return min(nums) if nums else self.admitted_version

    @property
    def newest_version(self) -> int:
        nums = [v for c in self.completions for v in c.versions]
        return max(nums) if nums else self.admitted_version

    @property
    def num_tokens(self) -> int:
        return sum(len(c.output_ids) for c in self.completions)

    def prompt_ref(self) -> "PromptRef":
        return PromptRef(self.epoch, self.position, self.attempt)


@dataclass(frozen=True)
class PromptRef:
    """Which prompt of which epoch a lease or group is for; `attempt` separates re-queued retries."""

    epoch: int
    position: int  # position in the epoch's order (the cursor counts these)
    attempt: int = 0

    def key(self) -> str:
        return f"{self.epoch}:{self.position}:{self.attempt}"

    @classmethod
    def parse(cls, key: str | bytes) -> "PromptRef":
        s = key.decode() if isinstance(key, bytes) else key
        try:
            e, i, a = s.split(":")
            return cls(int(e), int(i), int(a))
        except ValueError:
            raise ValueError(f"prompt ref {s!r}: expected 'epoch:position:attempt'") from None

    def group_id(self) -> str:
        return f"e{self.epoch}-p{self.position}-a{self.attempt}"

    def retry(self) -> "PromptRef":
        """The same prompt, next attempt: a new group id, so the re-run is not deduplicated away."""
        return PromptRef(self.epoch, self.position, self.attempt + 1)


def _pack_completion(c: Completion) -> dict[str, Any]:
    return {
        "ids": np.asarray(c.output_ids, dtype=_I32).tobytes(),
        "lp": np.asarray(c.logprobs, dtype=_F32).tobytes(),
        "vs": [[int(v), int(s), int(e)] for v, s, e in c.version_spans],
        "fr": c.finish_reason,
        "r": float(c.reward),
        "rd": {k: float(v) for k, v in c.reward_details.items()},
        "re": c.reward_error,
        "rs": c.resumes,
        "t0": c.started_at,
        "t1": c.finished_at,
        **({} if c.step_ends is None else {"sr": np.asarray(c.step_rewards, dtype=_F64).tobytes(),
                                            "se": np.asarray(c.step_ends, dtype=_I32).tobytes()}),
    }


def _span_version(v: Any, schema: int) -> int:
    if schema == 1:  # schema 1 carried the servers' version strings
        return version_number(str(v))
    if not isinstance(v, int) or isinstance(v, bool):
        raise GroupSchemaError(f"weight version {v!r} is not an integer")
    return v


def _unpack_completion(d: dict[str, Any], schema: int = SCHEMA_VERSION) -> Completion:
    return Completion(
        output_ids=np.frombuffer(d["ids"], dtype=_I32).tolist(),
        logprobs=np.frombuffer(d["lp"], dtype=_F32).tolist(),
        version_spans=[(_span_version(v, schema), int(s), int(e)) for v, s, e in d["vs"]],
        finish_reason=d["fr"],
        reward=float(d["r"]),
        reward_details=dict(d["rd"]),
        reward_error=d["re"],
        resumes=int(d["rs"]),
        started_at=float(d["t0"]),
        finished_at=float(d["t1"]),
        step_rewards=np.frombuffer(d["sr"], dtype=_F64).tolist() if "se" in d else None,
        step_ends=np.frombuffer(d["se"], dtype=_I32).tolist() if "se" in d else None,
    )


def encode_group(group: Group, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """msgpack bytes of a group; raises GroupTooLargeError past `max_bytes`."""
    body = {
        "schema_version": SCHEMA_VERSION,
        "run_id": group.run_id,
        "group_id": group.group_id,
        "prompt_id": group.prompt_id,
        "epoch": group.epoch,
        "position": group.position,
        "attempt": group.attempt,
        "prompt_ids": np.asarray(group.prompt_ids, dtype=_I32).tobytes(),
        "answer": group.answer,
        "admitted_version": group.admitted_version,
        "admission_index": group.admission_index,
        "created_at": group.created_at,
        "completions": [_pack_completion(c) for c in group.completions],
    }
    if group.temperature is not None:
        body["temperature"] = float(group.temperature)
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > max_bytes:
        raise GroupTooLargeError(
            f"group {group.group_id}: encoded size {len(data)} bytes exceeds the limit of {max_bytes} bytes "
            f"({len(group.completions)} completions, {group.num_tokens} output tokens); lower rollout.max_new_tokens "
            "or actor.group_size, or raise rollout.max_message_bytes"
        )
    return data


def decode_group(data: bytes) -> Group:
    """Inverse of encode_group; GroupSchemaError on an unknown schema version or a malformed message."""
    try:
        body = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise GroupSchemaError(f"group message is not valid msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(body, dict):
        raise GroupSchemaError(f"group message must be a map, got {type(body).__name__}")
    ver = body.get("schema_version")
    if ver not in READABLE_SCHEMA_VERSIONS:
        raise GroupSchemaError(
            f"group message has schema_version {ver!r}; this build reads versions {READABLE_SCHEMA_VERSIONS}. "
            "Run the rollout service and trainer from the same asyncgrpo version"
        )
    try:
        return Group(
            run_id=body["run_id"],
            group_id=body["group_id"],
            prompt_id=body["prompt_id"],
            epoch=int(body["epoch"]),
            position=int(body["position"]),
            attempt=int(body["attempt"]),
            prompt_ids=np.frombuffer(body["prompt_ids"], dtype=_I32).tolist(),
            completions=[_unpack_completion(c, ver) for c in body["completions"]],
            answer=body["answer"],
            admitted_version=int(body["admitted_version"]),
            admission_index=int(body["admission_index"]),
            created_at=float(body["created_at"]),
            temperature=None if body.get("temperature") is None else float(body["temperature"]),
        )
    except KeyError as e:
        raise GroupSchemaError(f"group message (schema_version {ver}) lacks field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, GroupSchemaError):
            raise
        raise GroupSchemaError(f"group message has a malformed field: {e}") from None

