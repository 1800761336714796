"""Held-out evaluation through a generation server (rollout/evaluation.py) and its schedule in `up`
(launch/periodic_eval.py): the interval arithmetic by hand, the retry of aborted requests against a fake,
and the real thing against a genserver process whose answers the HF model predicts."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncgrpo.launch.periodic_eval import next_point
from asyncgrpo.rollout.evaluation import Z95, evaluate_served, mean_ci95


def test_mean_ci95_by_hand() -> None:
    # per-prompt means 1, 0, 0.5, 0.5: mean 0.5, sample variance (0.25+0.25+0+0)/3 = 1/6
    m, h = mean_ci95([1.0, 0.0, 0.5, 0.5])
    assert m == 0.5
    assert math.isclose(h, Z95 * math.sqrt((1 / 6) / 4), rel_tol=1e-12), h
    assert mean_ci95([0.7]) == (0.7, 0.0)
    assert all(math.isnan(x) for x in mean_ci95([]))


@pytest.mark.parametrize("version,freq,want", [(0, 10, 0), (1, 10, 10), (10, 10, 10), (11, 10, 20), (7, 1, 7)])
def test_next_point(version: int, freq: int, want: int) -> None:
    assert next_point(version, freq) == want


@dataclass
class _Result:
    output_ids: list[int]
    weight_version: str
    finish_reason: dict[str, Any] = field(default_factory=lambda: {"type": "stop"})

    @property
    def aborted(self) -> bool:
        return self.finish_reason.get("type") == "abort"


class _FakeServer:
    """Answers token 1 to even prompts and 2 to odd ones; aborts the first `aborts` requests (a weight update)."""

    def __init__(self, aborts: int = 0) -> None:
        self.aborts, self.calls = aborts, []

    async def generate_n(self, ids: list[int], params: dict[str, Any], n: int, return_logprob: bool = True) -> list[_Result]:
        self.calls.append((list(ids), dict(params), n))
        if self.aborts > 0:
            self.aborts -= 1
            return [_Result([], "3", {"type": "abort"}) for _ in range(n)]
        return [_Result([1 if ids[0] % 2 == 0 else 2], "4") for _ in range(n)]


def test_served_evaluation_scores_per_prompt_and_asks_again_after_an_abort() -> None:
    server = _FakeServer(aborts=2)
    prompts, answers = [[0], [1], [2], [3]], ["1", "1", "1", "1"]  # right on even prompts only
    async def score(prompt_ids: list[int], outputs: list[list[int]], answer: str) -> list[float]:
        return [float(ids == [int(answer)]) for ids in outputs]

    res = asyncio.run(evaluate_served(server, prompts, answers, score, temperature=1.0, samples=3, max_new_tokens=4,
                                      seed=5))
    assert res.reward == 0.5 and res.greedy_reward == 0.5 and res.prompts == 4 and res.samples == 3
    # per-prompt means 1, 0, 1, 0: variance 1/3
    assert math.isclose(res.reward_ci95, Z95 * math.sqrt((1 / 3) / 4), rel_tol=1e-12), res
    assert res.version == 4 and res.versions == (4, 4)  # the aborted answers' version is not the evaluated one
    sampled = [c for c in server.calls if c[1]["temperature"] == 1.0]
    seeds = sorted({c[1]["sampling_seed"] for c in sampled})
    assert seeds == [5 * 1_000_003 + i * 3 for i in range(4)], seeds  # one per prompt, samples never overlap
    assert all(c[2] == 3 for c in sampled) and all(c[1] == {"temperature": 0.0, "max_new_tokens": 4}
                                                      for c in server.calls if c[1]["temperature"] == 0.0)


def test_served_evaluation_gives_up_on_a_server_that_keeps_aborting() -> None:
    async def score(prompt_ids: list[int], outputs: list[list[int]], answer: str) -> list[float]:
        return [1.0] * len(outputs)

    with pytest.raises(RuntimeError, match="aborted 4 times"):
        asyncio.run(evaluate_served(_FakeServer(aborts=100), [[0]], ["1"], score, temperature=1.0, samples=2,
                                    max_new_tokens=2))


def test_a_failed_evaluation_stops_its_other_requests() -> None:
    """One prompt's failure cancels the requests of the others (they would go on generating on the server)."""
    cancelled = []

    class Server:
        async def generate_n(self, ids: list[int], params: dict[str, Any], n: int, return_logprob: bool = True) -> list[Any]:
            if ids == [0]:
                raise RuntimeError("server gone")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(ids[0])
                raise
            return []

    async def score(prompt_ids: list[int], outputs: list[list[int]], answer: str) -> list[float]:
        return [0.0] * len(outputs)

    async def go() -> None:
        with pytest.raises(RuntimeError, match="server gone"):
            await evaluate_served(Server(), [[1], [2], [0]], ["1"] * 3, score, temperature=1.0, samples=2,
                                  max_new_tokens=2)
        assert sorted(cancelled) == [1, 2], cancelled  # already, before evaluate_served returned

    asyncio.run(asyncio.wait_for(go(), 10))


def test_served_evaluation_matches_the_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    """On a real genserver: the greedy answer is the HF model's argmax (greedy accuracy exactly 1 where the
    reference is that argmax), and the sampled accuracy is the model's probability of it, within the interval."""
    from transformers import AutoModelForCausalLM

    from asyncgrpo.sglang.client import SGLangClient

    sys.path.insert(0, str(Path(__file__).parents[1] / "genserver"))
    from procs import GenServer  # type: ignore[import-not-found]

    T = 0.1  # the random model's distribution is nearly flat at 1; at 0.1 its argmax has probability ~0.7
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts, answers, probs = [], [], []
    for i in range(400):  # prompts whose first token has a clear argmax (a near-tie could flip between engines)
        ids = [(7 * i + 3) % 250, (11 * i + 5) % 250, (13 * i) % 250]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        top = torch.topk(logits, 2)
        if float(top.values[0] - top.values[1]) > 1e-3:
            prompts.append(ids)
            answers.append(str(int(top.indices[0])))
            probs.append(float(torch.softmax(logits / T, -1)[top.indices[0]]))
        if len(prompts) == 48:
            break
    assert len(prompts) == 48

    srv = GenServer(tiny_model_dir, tmp_path / "server.log")
    try:
        async def go() -> Any:
            async with SGLangClient(srv.url) as client:
                async def score(prompt_ids: list[int], outputs: list[list[int]], answer: str) -> list[float]:
                    return [float(ids[:1] == [int(answer)]) for ids in outputs]

                return await evaluate_served(client, prompts, answers, score, temperature=T, samples=8,
                                             max_new_tokens=1, seed=0)
        res = asyncio.run(go())
    finally:
        srv.stop()
    assert res.greedy_reward == 1.0, res
    expected = sum(probs) / len(probs)
    # 48 prompts x 8 samples; 3 half-widths keep a false failure below 1 in 300 runs
    assert abs(res.reward - expected) <= 3 * res.reward_ci95 + 1e-9, (res.reward, expected, res.reward_ci95)
    assert res.version == 0 and res.reward_ci95 > 0
    json.dumps(res.row())  # what evals.jsonl and the control plane store
