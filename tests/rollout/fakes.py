"""An in-process stand-in for the generation server, for fast worker tests only. The integration tests
(test_integration.py) run the same code against real genserver processes."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeResult:
    output_ids: list[int]
    output_logprobs: list[float]
    token_versions: list[str]
    finish_reason: dict[str, Any]

    @property
    def aborted(self) -> bool:
        return self.finish_reason.get("type") == "abort"


@dataclass
class FakeGenClient:
    """Answers '#### <number in the prompt>' for even completion index j, '#### -1' for odd ones.
    With abort_every_first=True, the first request of every completion returns half its tokens as
    aborted and bumps the version, like a weight update in abort mode."""

    version: int = 0
    abort_every_first: bool = False
    all_correct: bool = False
    calls: list[tuple[str, int, int]] = field(default_factory=list)  # (rid, input len, max_new_tokens)
    n_calls: list[tuple[str, int]] = field(default_factory=list)  # (rid, n) of the parallel-sampling requests
    gate: asyncio.Event | None = None  # when set, requests wait for it (a slow server)

    async def generate(self, input_ids: list[int], sampling_params: dict[str, Any], rid: str | None = None,
                       return_logprob: bool = True) -> FakeResult:
        await asyncio.sleep(0)
        if self.gate is not None:
            await self.gate.wait()
        assert rid is not None
        self.calls.append((rid, len(input_ids), sampling_params["max_new_tokens"]))
        base, resume = rid.rsplit(".", 1)
        j = int(base.rsplit(":", 1)[1])
        prompt = bytes(i for i in input_ids if i < 256).decode(errors="ignore")
        number = re.findall(r"\d+", prompt)[0]
        text = f" #### {number}" if (j % 2 == 0 or self.all_correct) else " #### -1"
        full = list(text.encode()) + [256]
        done = len(input_ids) - (len(prompt[: prompt.rindex("A:") + 2].encode()))  # tokens of this completion so far
        rest = full[done:][: sampling_params["max_new_tokens"]]
        v = str(self.version)
        if self.abort_every_first and resume == "0":
            half = rest[: max(1, len(rest) // 2)]
            self.version += 1
            return FakeResult(half, [-0.1] * len(half), [v] * len(half), {"type": "abort", "message": "paused"})
        reason = {"type": "stop", "matched": 256} if rest and rest[-1] == 256 else {"type": "length", "length": len(rest)}
        return FakeResult(rest, [-0.2] * len(rest), [v] * len(rest), reason)

    async def generate_n(self, input_ids: list[int], sampling_params: dict[str, Any], n: int, rid: str | None = None,
                         return_logprob: bool = True) -> list[FakeResult]:
        """SGLang's parallel sampling: sequence j of request '{group}.0' is '{group}.0_{j}'; answered as the
        completion '{group}:{j}.0' would be."""
        assert rid is not None and rid.endswith(".0")
        group = rid[: -len(".0")]
        self.n_calls.append((rid, n))
        return [await self.generate(input_ids, sampling_params, f"{group}:{j}.0", return_logprob) for j in range(n)]
