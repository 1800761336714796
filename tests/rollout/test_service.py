"""The rollout service's worker logic against real Redis and an in-process generation stand-in: every
prompt once, rewards, partial rollouts across a version change, dynamic filtering, admission budget."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
import redis

from asyncgrpo.queue import GroupQueue, RedisGuard, RunState
from asyncgrpo.rollout.dataset import PromptDataset, load_records
from asyncgrpo.rollout.rewards import RewardRunner
from asyncgrpo.rollout.sampling import PartialRolloutError, sample_completion, sample_group
from asyncgrpo.rollout.service import RolloutParams, RolloutService

from .fakes import FakeGenClient

RUN = "exp/svc"


def byte_encode(s: str) -> list[int]:
    return list(s.encode())


def byte_decode(ids: list[int]) -> str:
    return bytes(i for i in ids if i < 256).decode(errors="ignore")


@pytest.fixture
def dataset(tmp_path) -> PromptDataset:
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Q: {i}+0=?\nA:", "answer": str(i)}) + "\n" for i in range(6)))
    return PromptDataset(load_records(p, "prompt", "answer"), byte_encode, seed=1)


HANG_S = 120  # a hang guard only: these tests take a second or two, more under load


def make_service(url: str, dataset: PromptDataset, client: FakeGenClient, rewards: RewardRunner | None = None,
                 **kw) -> RolloutService:
    params = RolloutParams(run_id=RUN, group_size=4, max_new_tokens=32, num_workers=3, batch_groups=2,
                           max_head_offpolicyness=100, lease_ttl_s=30, exit_when_exhausted=True, log_interval_s=60)
    for k, v in kw.items():
        setattr(params, k, v)
    r = redis.Redis.from_url(url)
    return RolloutService(params, state=RunState(r, RUN), queue=GroupQueue(r, RUN), dataset=dataset, decode=byte_decode,
                          clients=[client], rewards=rewards or RewardRunner(["gsm8k"], timeout_s=10), redis_url=url,
                          guard=RedisGuard(url, deadline_s=30))


def drain(url: str) -> list:
    q = GroupQueue(redis.Redis.from_url(url), RUN)
    return [g for _, g in q.consume("t", count=1000)]


def run_beside(svc: RolloutService, side: Callable[[], Awaitable[None]]) -> None:
    """Run the service to its end with `side` (a fake trainer or control plane) beside it; both must finish."""
    async def main() -> None:
        t = asyncio.create_task(side())
        await svc.run()
        await t

    asyncio.run(asyncio.wait_for(main(), HANG_S))


def metric(name: str, **labels: str) -> float:
    from asyncgrpo.utils.metrics import REGISTRY

    return REGISTRY.get_sample_value(f"asyncgrpo_{name}", labels) or 0.0


def test_every_prompt_once_with_rewards(redis_server, dataset) -> None:
    svc = make_service(redis_server.url, dataset, FakeGenClient())
    pushed0, tokens0 = metric("rollout_groups_total", outcome="pushed"), metric("rollout_tokens_total")
    stats = asyncio.run(asyncio.wait_for(svc.run(), HANG_S))
    groups = drain(redis_server.url)
    assert stats.groups_pushed == 6 and len(groups) == 6
    assert sorted(g.prompt_id for g in groups) == [f"q{i}" for i in range(6)]
    for g in groups:
        assert len(g.completions) == 4 and g.rewards == [1.0, 0.0, 1.0, 0.0]
        assert g.prompt_ids == byte_encode(f"Q: {g.answer}+0=?\nA:")
        c = g.completions[0]
        assert byte_decode(c.output_ids) == f" #### {g.answer}" and c.output_ids[-1] == 256
        assert c.finish_reason == "stop" and c.logprobs == pytest.approx([-0.2] * len(c.output_ids))
        assert c.token_versions == [0] * len(c.output_ids) and g.oldest_version == 0
        assert c.reward_details == {"gsm8k": 1.0} and c.started_at <= c.finished_at
    assert metric("rollout_groups_total", outcome="pushed") - pushed0 == 6
    assert metric("rollout_tokens_total") - tokens0 == stats.tokens == sum(g.num_tokens for g in groups)
    assert metric("rollout_queue_depth") == 6
    state = RunState(redis.Redis.from_url(redis_server.url), RUN)
    assert state.running() == 0 and state.cursor() == (0, 6) and state.counters()["groups_pushed"] == 6


def test_partial_rollout_carries_two_versions() -> None:
    client = FakeGenClient(abort_every_first=True)
    prompt = byte_encode("Q: 7+0=?\nA:")
    s = asyncio.run(sample_completion(client, prompt, {"temperature": 1.0}, max_new_tokens=32, rid="r:g:0", max_resubmits=2))
    assert byte_decode(s.output_ids) == " #### 7" and s.finish_reason == "stop" and s.resumes == 1
    assert set(s.token_versions) == {0, 1} and s.token_versions[0] == 0 and s.token_versions[-1] == 1
    assert len(s.logprobs) == len(s.output_ids)
    # the resubmission sent the prompt plus the partial tokens, with the remaining budget
    (_, in0, max0), (_, in1, max1) = client.calls
    first = len(s.token_versions) - s.token_versions.count(1)
    assert (in0, max0) == (len(prompt), 32) and (in1, max1) == (len(prompt) + first, 32 - first)
    with pytest.raises(PartialRolloutError, match="max_resubmits"):
        asyncio.run(sample_completion(FakeGenClient(abort_every_first=True), prompt, {}, max_new_tokens=32,
                                      rid="r:g:0", max_resubmits=0))


def test_a_group_is_one_parallel_request_and_aborted_completions_resume_alone() -> None:
    """A group is one request with n = G (SGLang's parallel sampling); a weight update that aborts it leaves each
    completion to be resubmitted on its own, from its own tokens, carrying both versions."""
    client = FakeGenClient(abort_every_first=True)
    prompt = byte_encode("Q: 8+0=?\nA:")
    samples = asyncio.run(sample_group(client, prompt, {"temperature": 1.0}, 4, max_new_tokens=32, rid="r:g",
                                       max_resubmits=2))
    assert client.n_calls == [("r:g.0", 4)]
    assert sorted(c[0] for c in client.calls if not c[0].endswith(".0")) == [f"r:g:{j}.1" for j in range(4)]
    assert [byte_decode(s.output_ids) for s in samples] == [" #### 8", " #### -1", " #### 8", " #### -1"]
    for s in samples:
        assert s.resumes == 1 and s.finish_reason == "stop" and len(s.logprobs) == len(s.output_ids)
        assert len(set(s.token_versions)) == 2 and s.token_versions[0] < s.token_versions[-1], s.token_versions
    plain = FakeGenClient()
    samples = asyncio.run(sample_group(plain, prompt, {}, 3, max_new_tokens=32, rid="r:h", max_resubmits=0))
    assert plain.n_calls == [("r:h.0", 3)] and [s.resumes for s in samples] == [0, 0, 0]
    with pytest.raises(PartialRolloutError, match="max_resubmits"):
        asyncio.run(sample_group(FakeGenClient(abort_every_first=True), prompt, {}, 2, max_new_tokens=32, rid="r:i",
                                 max_resubmits=0))


def test_a_reward_plugin_by_import_path_scores_the_queued_groups(redis_server, dataset) -> None:
    """reward.fns = [gsm8k, reward_plugins.sample_rewards:length_bonus] with weights [1, 2]: every completion in the
    queue carries both functions' values and their weighted sum, computed from its own decoded text."""
    plug = "reward_plugins.sample_rewards:length_bonus"
    svc = make_service(redis_server.url, dataset, FakeGenClient(), RewardRunner(["gsm8k", plug], [1.0, 2.0]))
    stats = asyncio.run(asyncio.wait_for(svc.run(), HANG_S))
    groups = drain(redis_server.url)
    assert stats.groups_pushed == len(groups) == 6
    for g in groups:
        for c in g.completions:
            text = byte_decode(c.output_ids)
            assert c.reward_details[plug] == pytest.approx(0.1 * len(text)), (text, c.reward_details)
            assert c.reward == pytest.approx(c.reward_details["gsm8k"] + 2 * 0.1 * len(text))
    assert {c.reward_details["gsm8k"] for g in groups for c in g.completions} == {0.0, 1.0}  # both kinds scored


def test_the_rollout_hands_reward_functions_the_prompt_and_metadata(redis_server, dataset) -> None:
    from reward_plugins import sample_rewards

    sample_rewards.SEEN.clear()
    svc = make_service(redis_server.url, dataset, FakeGenClient(), RewardRunner(["reward_plugins.sample_rewards:seen"]))
    asyncio.run(asyncio.wait_for(svc.run(), HANG_S))
    seen = sample_rewards.SEEN
    assert len(seen) == 6 * 4
    prompts = {dataset.get(0, i).text: dataset.get(0, i) for i in range(len(dataset))}
    for x in seen:
        p = prompts[x.prompt]  # the exact prompt text that was sent
        assert x.answer == p.answer and dict(x.metadata) == p.metadata and "id" in x.metadata, x


def test_dynamic_filtering_drops_all_equal_groups(redis_server, dataset) -> None:
    svc = make_service(redis_server.url, dataset, FakeGenClient(all_correct=True), dynamic_filtering=True)
    stats = asyncio.run(asyncio.wait_for(svc.run(), HANG_S))
    assert stats.groups_filtered == 6 and stats.groups_pushed == 0 and drain(redis_server.url) == []
    # the reported reward is the policy's (every scored completion), not only the trained groups'
    assert stats.rewards == 6 * 4 and stats.reward_sum == 6 * 4 * 1.0, stats
    assert RunState(redis.Redis.from_url(redis_server.url), RUN).counters()["groups_filtered"] == 6


def test_admission_budget_with_a_fake_trainer(redis_server, dataset) -> None:
    """ofp = 0, 2 groups per batch: at version v at most 2 (v + 1) groups may have started. The fake
    trainer bumps the version only once the service is stuck waiting over budget at the current version (an
    answer given at the previous one may land after the bump) with nothing running."""
    url = redis_server.url
    svc = make_service(url, dataset, FakeGenClient(), max_head_offpolicyness=0, batch_groups=2)
    state, q = RunState(redis.Redis.from_url(url), RUN), GroupQueue(redis.Redis.from_url(url), RUN)
    observed: list[tuple[int, int]] = []

    async def trainer() -> None:
        for version in range(3):
            # stuck over budget and nothing running: everything admitted at this version is in the queue
            def stuck() -> bool:
                w = svc.stats.last_wait
                return w is not None and w.status == "over_budget" and w.version == version

            while not (stuck() and await asyncio.to_thread(state.running) == 0):
                await asyncio.sleep(0.01)
            observed.append((version, await asyncio.to_thread(q.depth)))
            await asyncio.to_thread(state.set_version, version + 1)

    run_beside(svc, trainer)
    assert observed == [(0, 2), (1, 4), (2, 6)]
    for a in svc.stats.admissions:
        assert a.started <= (a.version + 0 + 1) * 2 == a.capacity
    assert sorted(g.admission_index for g in drain(url)) == [1, 2, 3, 4, 5, 6]


def test_workers_woken_together_ask_redis_once(redis_server, dataset) -> None:
    """12 workers over budget, woken together by each version: one asks Redis, the others take its answer and wait
    for the next event. Redis refuses at most once per wake-up (version bumps, released leases, the 1 s fallback),
    while every waiting worker still counts its wait; before, each woken worker was refused on its own."""
    url = redis_server.url
    svc = make_service(url, dataset, FakeGenClient(), max_head_offpolicyness=0, batch_groups=2, num_workers=12)
    state = RunState(redis.Redis.from_url(url), RUN)
    counts = {"refusals": 0, "wakeups": 0}
    admit, notify = svc.state.admit, svc._wake.notify

    def counting_admit(**kw):
        a = admit(**kw)
        counts["refusals"] += a.status != "ok"
        return a

    def counting_notify() -> None:
        counts["wakeups"] += 1
        notify()

    svc.state.admit, svc._wake.notify = counting_admit, counting_notify

    async def trainer() -> None:
        for version in range(3):
            while not (svc.stats.admission_waits["over_budget"] >= 10 * (version + 1)
                       and await asyncio.to_thread(state.running) == 0):
                await asyncio.sleep(0.01)
            await asyncio.to_thread(state.set_version, version + 1)

    run_beside(svc, trainer)
    waits = svc.stats.admission_waits["over_budget"]
    assert counts["refusals"] <= counts["wakeups"] + 1, counts
    # ~10 workers wait per refusal; a loaded machine adds fallback wake-ups (one refusal each), not a ratio change
    assert counts["refusals"] * 3 <= waits, (waits, counts)
    assert svc.stats.groups_pushed == 6


def test_pause_stops_admission_and_in_flight_groups_finish(redis_server, dataset) -> None:
    url = redis_server.url
    client = FakeGenClient()
    svc = make_service(url, dataset, client)
    state, q = RunState(redis.Redis.from_url(url), RUN), GroupQueue(redis.Redis.from_url(url), RUN)
    seen: dict[str, int] = {}

    async def control() -> None:
        while await asyncio.to_thread(state.running) < 3:  # three groups in flight, held by the slow server
            await asyncio.sleep(0.01)
        await asyncio.to_thread(state.set_paused, True)
        client.gate.set()
        while not (svc.stats.admission_waits["paused"] >= 3 and await asyncio.to_thread(state.running) == 0):
            await asyncio.sleep(0.01)
        seen["depth_while_paused"] = await asyncio.to_thread(q.depth)
        await asyncio.to_thread(state.set_paused, False)

    client.gate = asyncio.Event()
    run_beside(svc, control)
    # the three in-flight groups finished and were queued; nothing new started while paused
    assert seen["depth_while_paused"] == 3 and q.depth() == 6 and svc.stats.groups_pushed == 6


def test_failed_generation_hands_the_prompt_back(redis_server, dataset) -> None:
    """A server error fails the group, not the worker: the lease goes back to the re-queue list at once
    and the prompt is run again; every prompt still ends up in the queue exactly once."""

    class Flaky(FakeGenClient):
        failures = 1

        async def generate(self, input_ids, sampling_params, rid=None, return_logprob=True):
            if Flaky.failures > 0:
                Flaky.failures -= 1
                raise RuntimeError("server unavailable")
            return await super().generate(input_ids, sampling_params, rid, return_logprob)

    svc = make_service(redis_server.url, dataset, Flaky(), num_workers=1)
    stats = asyncio.run(asyncio.wait_for(svc.run(), HANG_S))
    groups = drain(redis_server.url)
    assert stats.groups_failed == 1 and stats.groups_pushed == 6
    assert sorted(g.prompt_id for g in groups) == [f"q{i}" for i in range(6)]
    counters = RunState(redis.Redis.from_url(redis_server.url), RUN).counters()
    assert counters["leases_abandoned"] == 1 and counters["groups_failed"] == 1
