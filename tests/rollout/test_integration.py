"""End to end with real processes: redis-server, genserver(s) on the tiny model, `asyncgrpo rollout`
subprocesses, and the test acting as a fake trainer (consume, ack, bump the version)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis

from asyncgrpo.queue import GroupQueue, RedisGuard, RunState, version_number

from .procs import Proc, free_port, start_genserver, start_router, start_rollout, wait_for, write_config, write_dataset

pytestmark = pytest.mark.slow
pytest.importorskip("asyncgrpo.sglang.client", reason="the SGLang client/genserver has not landed yet")


@pytest.fixture(scope="module")
def servers(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("genserver")
    procs: list[Proc] = []
    urls: list[str] = []
    try:
        for i in range(2):
            port = free_port()
            procs.append(start_genserver(tiny_model_dir, port, logs / f"gen{i}.log"))
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for p in procs:
            p.stop()


def started_now(r: redis.Redis, state: RunState) -> tuple[int, int]:
    """(accepted, running) read atomically."""
    return state.budget_usage()


def test_groups_flow_under_the_admission_budget(servers, tiny_model_dir, redis_server, tmp_path) -> None:
    """Two servers, G = 2, 6 prompts, max_head_offpolicyness 0, 2 groups per batch: the fake trainer
    consumes a batch, acks it and bumps the version; at version v no more than 2 (v + 1) groups ever start."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = write_dataset(tmp_path / "train.jsonl", 6)
    cfg = write_config(tmp_path / "run.yaml", model_dir=tiny_model_dir, dataset=data, redis_url=redis_server.url,
                       servers=servers, trial="flow", exit_when_exhausted=True)
    r = redis.Redis.from_url(redis_server.url)
    state, q = RunState(r, "it/flow"), GroupQueue(r, "it/flow")
    proc = start_rollout(cfg, tmp_path / "rollout.log")
    groups = []
    try:
        for version in range(3):
            cap = (version + 0 + 1) * 2
            peak = 0

            def filled() -> bool:
                nonlocal peak
                acc, run = started_now(r, state)
                peak = max(peak, acc + run)
                return acc == cap and run == 0

            wait_for(filled, 120, f"the budget of version {version} to fill", proc)
            assert peak <= cap
            batch = q.consume("trainer-0", count=10)
            assert len(batch) == 2
            for _, g in batch:
                assert g.admission_index <= (g.admitted_version + 1) * 2 and g.admitted_version == version
                # the fake trainer only bumps Redis; the servers keep their initial weights ("default" = 0)
                assert g.oldest_version == 0
                assert {v for c in g.completions for v in c.token_versions} == {0}
            # trained: version and trained count in one step, the batch acknowledged (no checkpoint to wait for)
            q.commit_step([m for m, _ in batch], version + 1, 2 * (version + 1), 0, ack=True)
            groups += [g for _, g in batch]
        assert proc.wait(60) == 0, proc.tail()
    finally:
        proc.stop()
    assert sorted(g.prompt_id for g in groups) == [f"q{i}" for i in range(6)]
    for g in groups:
        assert g.run_id == "it/flow" and g.group_id == f"e0-p{g.position}-a0" and len(g.completions) == 2
        assert g.prompt_ids == tok.encode(f"Q: {int(g.answer) - 1}+1=?\nA:", add_special_tokens=False)
        for c in g.completions:
            assert 1 <= len(c.output_ids) <= 8 and len(c.logprobs) == len(c.output_ids)
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length") and c.reward in (0.0, 1.0)
            assert c.reward_details.keys() == {"gsm8k"} and c.reward_error is None
            assert len(c.token_versions) == len(c.output_ids) and c.started_at <= c.finished_at
    assert state.counters()["groups_pushed"] == 6 and q.depth() == 0 and q.pending() == 0


def _pause(url: str, mode: str = "abort") -> None:
    httpx.post(f"{url}/pause_generation", json={"mode": mode}, timeout=10).raise_for_status()


def _resume(url: str) -> None:
    httpx.post(f"{url}/continue_generation", json={}, timeout=10).raise_for_status()


def test_restart_resumes_the_cursor_and_a_killed_process_loses_nothing(servers, tiny_model_dir, redis_server, tmp_path) -> None:
    url = servers[0]
    data = write_dataset(tmp_path / "train.jsonl", 6)
    cfg = write_config(tmp_path / "run.yaml", model_dir=tiny_model_dir, dataset=data, redis_url=redis_server.url,
                       servers=[url], trial="restart", lease_ttl_s=2.0, exit_when_exhausted=True)
    r = redis.Redis.from_url(redis_server.url)
    state, q = RunState(r, "it/restart"), GroupQueue(r, "it/restart")

    # 1. fills the budget of version 0 (2 groups), then is stopped gracefully
    p1 = start_rollout(cfg, tmp_path / "r1.log")
    try:
        wait_for(lambda: started_now(r, state) == (2, 0), 120, "two groups", p1)
        p1.stop(signal.SIGTERM)
        assert p1.p.returncode == 0, p1.tail()
    finally:
        p1.stop()
    assert state.cursor() == (0, 2)

    # 2. the server is paused (a weight update that never ends): two groups start, and the process is killed
    _pause(url)
    try:
        state.set_version(1)
        p2 = start_rollout(cfg, tmp_path / "r2.log")
        try:
            wait_for(lambda: state.running() == 2, 120, "two leased groups", p2)
            time.sleep(0.5)  # let the requests reach the server
            p2.p.kill()
            p2.p.wait(10)
        finally:
            p2.stop()
    finally:
        _resume(url)
    assert state.running() == 2 and state.cursor() == (0, 4)

    # 3. a new process re-runs the dead one's prompts once their leases expire, then finishes the epoch
    state.set_version(10)
    p3 = start_rollout(cfg, tmp_path / "r3.log")
    try:
        assert p3.wait(120) == 0, p3.tail()
    finally:
        p3.stop()
    got = q.consume("trainer-0", count=100)
    ids = [g.prompt_id for _, g in got]
    assert sorted(ids) == [f"q{i}" for i in range(6)], ids  # no prompt repeated, none skipped
    counters = state.counters()
    assert counters["leases_reissued"] == 2 and counters["groups_pushed"] == 6 and state.running() == 0


def test_partial_rollout_across_a_weight_update_carries_two_versions(servers, tiny_model_dir) -> None:
    """A weight update in abort mode lands mid-completion: the completion is resubmitted with its tokens
    so far and ends with tokens of both versions, one log-prob each."""
    from asyncgrpo.rollout.sampling import sample_completion
    from asyncgrpo.sglang.client import SGLangClient

    url = servers[1]
    prompt = [81, 58, 32, 49, 43, 49, 61, 63, 10, 65, 58]

    async def attempt(client: SGLangClient, k: int):
        before = (await client.model_info())["weight_version"]
        task = asyncio.create_task(sample_completion(
            client, prompt, {"temperature": 1.0, "ignore_eos": True}, max_new_tokens=1000, rid=f"it:partial{k}:0",
            max_resubmits=4))
        while (await client.loads())["loads"][0]["num_running_reqs"] == 0 and not task.done():
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)  # some tokens exist before the update
        await client.pause("abort")
        await client.update_weights_from_disk(str(tiny_model_dir), weight_version=str(k + 7))
        await client.resume()
        return version_number(before), k + 7, await task

    async def main():
        async with SGLangClient(url) as client:
            for k in range(3):  # the tiny model is fast: retry in the rare case it finished before the pause
                before, after, s = await attempt(client, k)
                if s.resumes:
                    return before, after, s
        raise AssertionError("the completion finished before every pause; the update never landed mid-request")

    before, after, s = asyncio.run(main())
    assert s.resumes == 1 and len(s.output_ids) == 1000 and s.finish_reason == "length"
    assert len(s.logprobs) == 1000 and len(s.token_versions) == 1000 and all(lp <= 0 for lp in s.logprobs)
    first = s.token_versions.index(after)
    assert first > 0 and set(s.token_versions[:first]) == {before} and set(s.token_versions[first:]) == {after}


def test_group_across_a_weight_update_carries_two_versions(servers, tiny_model_dir, redis_server, tmp_path) -> None:
    """The rollout service itself (in process, real server): a weight update lands while a group runs; the
    pushed group holds tokens of both versions and reports the oldest for the trainer's staleness check."""
    from asyncgrpo.rollout.dataset import PromptDataset, load_records, tokenizer_encoder
    from asyncgrpo.rollout.rewards import RewardRunner
    from asyncgrpo.rollout.service import RolloutParams, RolloutService
    from asyncgrpo.sglang.client import SGLangClient

    url = servers[1]
    encode, decode = tokenizer_encoder(str(tiny_model_dir))
    ds = PromptDataset(load_records(write_dataset(tmp_path / "train.jsonl", 1), "prompt", "answer"), encode)
    params = RolloutParams(run_id="it/partial", group_size=2, max_new_tokens=1000, num_workers=1, batch_groups=1,
                           exit_when_exhausted=True, log_interval_s=60, sampling_extra={"ignore_eos": True})
    r = redis.Redis.from_url(redis_server.url)
    q = GroupQueue(r, "it/partial")

    async def main() -> int:
        async with SGLangClient(url) as client:
            before = (await client.model_info())["weight_version"]
            svc = RolloutService(params, state=RunState(r, "it/partial"), queue=q, dataset=ds, decode=decode,
                                 clients=[client], rewards=RewardRunner(["gsm8k"]), redis_url=redis_server.url,
                                 guard=RedisGuard(redis_server.url, deadline_s=30))
            task = asyncio.create_task(svc.run())
            while (await client.loads())["loads"][0]["num_running_reqs"] < 2:
                assert not task.done(), "the service ended before its requests reached the server"
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)
            await client.pause("abort")
            await client.update_weights_from_disk(str(tiny_model_dir), weight_version="50")
            await client.resume()
            stats = await task
            assert stats.groups_pushed == 1 and stats.resumes >= 1
            return version_number(before)

    before = asyncio.run(asyncio.wait_for(main(), 120))
    [(_, g)] = q.consume("trainer-0", count=10)
    assert all(len(c.output_ids) == 1000 and c.finish_reason == "length" for c in g.completions)
    crossed = [c for c in g.completions if c.resumes == 1]
    assert crossed and all([v for v, _, _ in c.version_spans] == [before, 50] for c in crossed)
    assert g.newest_version == 50 and g.oldest_version == before


def test_rollout_through_the_sglang_router(servers, tiny_model_dir, redis_server, tmp_path) -> None:
    router = start_router(servers, free_port(), tmp_path / "router.log")
    try:
        url = f"http://127.0.0.1:{router.p.args[router.p.args.index('--port') + 1]}"
        data = write_dataset(tmp_path / "train.jsonl", 4)
        cfg = write_config(tmp_path / "run.yaml", model_dir=tiny_model_dir, dataset=data, redis_url=redis_server.url,
                           servers=[url], trial="router", max_head_offpolicyness=10, exit_when_exhausted=True)
        proc = start_rollout(cfg, tmp_path / "rollout.log")
        try:
            assert proc.wait(120) == 0, proc.tail()
        finally:
            proc.stop()
    finally:
        router.stop()
    got = GroupQueue(redis.Redis.from_url(redis_server.url), "it/router").consume("t", count=10)
    assert sorted(g.prompt_id for _, g in got) == ["q0", "q1", "q2", "q3"]
    assert all(len(c.output_ids) == len(c.logprobs) > 0 for _, g in got for c in g.completions)
