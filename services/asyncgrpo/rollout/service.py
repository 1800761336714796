"""The rollout service: N asyncio workers, each running one group at a time:

    admit (staleness budget + pause, Redis)  ->  lease a prompt (Redis cursor / re-queue / expired lease)
    -> sample G completions (partial rollouts across weight updates)  ->  score them off the loop
    -> push the group (idempotent; drops the lease)   or   drop it if all rewards are equal (counted)

A worker over budget or paused waits on the run's pub/sub channel (version bumps, resume, re-queues, lease
releases) with a 1 s fallback for leases that expire silently: it never spins. While a group runs, its
lease is renewed every lease_ttl_s / 3; a killed process stops renewing, and another worker re-runs the
prompt once the lease expires.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from asyncgrpo.queue import Admission, Completion, Group, GroupQueue, GroupTooLargeError, PromptRef, RunState
from asyncgrpo.queue.schema import spans_from_versions
from asyncgrpo.rollout.dataset import PromptDataset
from asyncgrpo.rollout.rewards import RewardRunner
from asyncgrpo.rollout.sampling import GenerateClient, sample_completion
from asyncgrpo.utils.metrics import counter, gauge, histogram

log = logging.getLogger(__name__)

WAIT_FALLBACK_S = 1.0  # re-check even without an event: expired leases publish nothing


@dataclass
class RolloutParams:
    run_id: str
    group_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_head_offpolicyness: int = 2
    batch_groups: int = 8
    total_epochs: int = 1
    lease_ttl_s: float = 120.0
    dynamic_filtering: bool = False
    max_resubmits: int = 8
    num_workers: int = 4
    exit_when_exhausted: bool = False
    log_interval_s: float = 10.0
    sampling_extra: dict[str, Any] = field(default_factory=dict)  # more SGLang sampling params (e.g. ignore_eos)

    @classmethod
    def from_config(cls, cfg: Any) -> "RolloutParams":
        r = cfg.rollout
        return cls(run_id=cfg.run_id, group_size=cfg.actor.group_size, max_new_tokens=r.max_new_tokens,
                   temperature=cfg.actor.temperature, top_p=r.top_p, top_k=r.top_k,
                   max_head_offpolicyness=r.max_head_offpolicyness, batch_groups=cfg.train_dataset.batch_size,
                   total_epochs=cfg.total_train_epochs, lease_ttl_s=r.lease_ttl_s,
                   dynamic_filtering=cfg.actor.dynamic_filtering, max_resubmits=r.max_resubmits,
                   num_workers=r.max_concurrent_rollouts, exit_when_exhausted=r.exit_when_exhausted,
                   log_interval_s=r.log_interval_s)

    def sampling_params(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, **self.sampling_extra}


@dataclass
class RolloutStats:
    """What this process did (Redis counters hold the run-wide totals)."""

    groups_pushed: int = 0
    groups_filtered: int = 0
    groups_failed: int = 0
    tokens: int = 0
    reward_sum: float = 0.0
    rewards: int = 0
    reward_errors: int = 0
    resumes: int = 0
    admission_waits: dict[str, int] = field(default_factory=lambda: {"over_budget": 0, "paused": 0, "exhausted": 0})
    admissions: deque[Admission] = field(default_factory=lambda: deque(maxlen=10_000))  # recent, for tests and inspection


class _Metrics:
    def __init__(self) -> None:
        self.groups = counter("rollout_groups_total", "Groups finished by outcome (pushed, filtered, failed).", ["outcome"])
        self.tokens = counter("rollout_tokens_total", "Completion tokens generated (all G per group).")
        self.reward = histogram("rollout_reward", "Reward of each completion.", buckets=(0, 0.25, 0.5, 0.75, 1.0, 2.0))
        self.reward_errors = counter("rollout_reward_errors_total", "Completions scored 0 because a reward function crashed or timed out.")
        self.waits = counter("rollout_admission_waits_total", "Times a worker waited instead of starting a group.", ["reason"])
        self.resumes = counter("rollout_partial_resumes_total", "Completions resubmitted after a weight-update abort.")
        self.group_seconds = histogram("rollout_group_seconds", "Wall time of one group: sampling and scoring.")
        self.depth = gauge("rollout_queue_depth", "Groups in the Redis stream not yet acknowledged by the trainer.")
        self.stale = gauge("rollout_stale_requeued", "Groups the trainer dropped as stale (prompts re-queued), run total.")
        self.groups_per_s = gauge("rollout_groups_per_second", "Groups pushed per second over the last log interval.")
        self.tokens_per_s = gauge("rollout_tokens_per_second", "Tokens generated per second over the last log interval.")


class _Wakeup:
    """An edge-triggered signal: take `current()` before checking, then `wait` on it, so a notification
    that lands in between is not lost."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        ev, self._event = self._event, asyncio.Event()
        ev.set()

    @staticmethod
    async def wait(ev: asyncio.Event, timeout: float) -> None:
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except asyncio.TimeoutError:
            pass


class RolloutService:
    def __init__(self, params: RolloutParams, *, state: RunState, queue: GroupQueue, dataset: PromptDataset,
                 decode: Callable[[list[int]], str], clients: Sequence[GenerateClient], rewards: RewardRunner,
                 redis_url: str) -> None:
        if not clients:
            raise ValueError("rollout needs at least one generation server (rollout.server_urls)")
        self.p = params
        self.state = state
        self.queue = queue
        self.dataset = dataset
        self.decode = decode
        self.clients = list(clients)
        self.rewards = rewards
        self.redis_url = redis_url
        self.stats = RolloutStats()
        self.m = _Metrics()
        self._stop = asyncio.Event()
        self._wake = _Wakeup()
        self._next_server = 0

    # -- lifecycle -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop admitting; running groups finish and are pushed, then run() returns."""
        self._stop.set()
        self._wake.notify()

    async def run(self) -> RolloutStats:
        self.state.init_cursor(len(self.dataset), self.dataset.seed, self.dataset.fingerprint())
        watcher = asyncio.create_task(self._watch_events(), name="rollout-events")
        reporter = asyncio.create_task(self._report(), name="rollout-report")
        try:
            await asyncio.gather(*(self._worker(i) for i in range(self.p.num_workers)))
        finally:
            watcher.cancel()
            reporter.cancel()
            await asyncio.gather(watcher, reporter, return_exceptions=True)
            self._publish_gauges()
        return self.stats

    async def _watch_events(self) -> None:
        """Wake waiting workers on every message of the run's channel; reconnect if Redis drops."""
        while True:
            client = aioredis.Redis.from_url(self.redis_url)
            try:
                async with client.pubsub() as ps:
                    await ps.subscribe(self.state.keys.events)
                    async for msg in ps.listen():
                        if msg.get("type") == "message":
                            self._wake.notify()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis restarts: waiters still wake on the fallback timer meanwhile
                log.warning("event subscription lost (%s); reconnecting", e)
                await asyncio.sleep(WAIT_FALLBACK_S)
            finally:
                await client.aclose()

    # -- one worker ----------------------------------------------------------------------------------
    async def _worker(self, wid: int) -> None:
        while not self._stop.is_set():
            ev = self._wake.current()
            adm = await asyncio.to_thread(
                self.state.admit, max_head_offpolicyness=self.p.max_head_offpolicyness, batch_groups=self.p.batch_groups,
                dataset_size=len(self.dataset), total_epochs=self.p.total_epochs, lease_ttl_s=self.p.lease_ttl_s,
            )
            if adm.status == "ok":
                assert adm.ref is not None
                self.stats.admissions.append(adm)
                await self._run_group(wid, adm)
                continue
            self.stats.admission_waits[adm.status] += 1
            self.m.waits.labels(adm.status).inc()
            if adm.status == "exhausted" and self.p.exit_when_exhausted and await asyncio.to_thread(self._drained):
                log.info("worker %d: every prompt of %d epoch(s) is done", wid, self.p.total_epochs)
                return
            await self._wake.wait(ev, WAIT_FALLBACK_S)

    def _drained(self) -> bool:
        return self.state.running() == 0 and not self.state.requeued()

    async def _run_group(self, wid: int, adm: Admission) -> None:
        ref = adm.ref
        assert ref is not None
        client = self.clients[self._next_server % len(self.clients)]
        self._next_server += 1
        task = asyncio.create_task(self._produce(client, adm))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.p.lease_ttl_s / 3)
                if done:
                    break
                if not await asyncio.to_thread(self.state.renew_lease, ref, self.p.lease_ttl_s):
                    # pushed by a twin that got the expired lease, or released: this copy is moot
                    log.warning("worker %d: lease %s lost; abandoning the group", wid, ref.key())
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    return
            group = task.result()
        except asyncio.CancelledError:
            task.cancel()
            self.state.abandon_lease(ref)  # quick, synchronous: hand the prompt to another worker now
            raise
        except Exception as e:
            self.stats.groups_failed += 1
            self.m.groups.labels("failed").inc()
            log.error("worker %d: group %s failed (%s: %s); prompt handed back", wid, ref.group_id(), type(e).__name__, e)
            await asyncio.to_thread(self.state.abandon_lease, ref)
            await asyncio.to_thread(self.state.incr, "groups_failed")
            await asyncio.sleep(1.0)  # servers down: do not hot-loop over the prompts
            return
        await self._finish(group, ref)

    async def _produce(self, client: GenerateClient, adm: Admission) -> Group:
        ref = adm.ref
        assert ref is not None
        t0 = time.monotonic()
        prompt = self.dataset.get(ref.epoch, ref.position)
        gid = ref.group_id()
        try:
            async with asyncio.TaskGroup() as tg:  # one failure cancels the siblings
                tasks = [tg.create_task(sample_completion(
                    client, prompt.input_ids, self.p.sampling_params(), max_new_tokens=self.p.max_new_tokens,
                    rid=f"{self.p.run_id}:{gid}:{j}", max_resubmits=self.p.max_resubmits)) for j in range(self.p.group_size)]
        except ExceptionGroup as eg:  # report the first real error, not "unhandled errors in a TaskGroup"
            raise eg.exceptions[0] from eg
        samples = [t.result() for t in tasks]
        texts = [self.decode(s.output_ids) for s in samples]
        scores = await self.rewards.score(texts, prompt.answer)
        completions = [
            Completion(output_ids=s.output_ids, logprobs=s.logprobs, version_spans=spans_from_versions(s.token_versions),
                       finish_reason=s.finish_reason, reward=sc.reward, reward_details=sc.details, reward_error=sc.error,
                       resumes=s.resumes, started_at=s.started_at, finished_at=s.finished_at)
            for s, sc in zip(samples, scores, strict=True)
        ]
        self.m.group_seconds.observe(time.monotonic() - t0)
        return Group(run_id=self.p.run_id, group_id=gid, prompt_id=prompt.prompt_id, epoch=ref.epoch,
                     position=ref.position, attempt=ref.attempt, prompt_ids=prompt.input_ids, completions=completions,
                     answer=prompt.answer, admitted_version=adm.version, admission_index=adm.started)

    async def _finish(self, group: Group, ref: PromptRef) -> None:
        rewards = group.rewards
        errors = sum(c.reward_error is not None for c in group.completions)
        resumes = sum(c.resumes for c in group.completions)
        self.stats.reward_errors += errors
        self.stats.resumes += resumes
        self.stats.tokens += group.num_tokens
        self.m.reward_errors.inc(errors)
        self.m.resumes.inc(resumes)
        self.m.tokens.inc(group.num_tokens)
        for r in rewards:
            self.m.reward.observe(r)
        if errors:
            await asyncio.to_thread(self.state.incr, "reward_errors", errors)
        if self.p.dynamic_filtering and len(set(rewards)) == 1:
            # zero advantage for every completion: nothing to learn; the prompt is done for this epoch
            await asyncio.to_thread(self.state.release_lease, ref, "groups_filtered")
            self.stats.groups_filtered += 1
            self.m.groups.labels("filtered").inc()
            return
        try:
            await asyncio.to_thread(self.queue.push, group, ref)
        except GroupTooLargeError as e:
            log.error("%s; group dropped", e)
            await asyncio.to_thread(self.state.release_lease, ref, "groups_too_large")
            self.stats.groups_failed += 1
            self.m.groups.labels("failed").inc()
            return
        self.stats.groups_pushed += 1
        self.stats.reward_sum += sum(rewards)
        self.stats.rewards += len(rewards)
        self.m.groups.labels("pushed").inc()

    # -- reporting -----------------------------------------------------------------------------------
    def _publish_gauges(self) -> dict[str, float]:
        try:
            snap = self.state.snapshot()
        except Exception as e:
            log.warning("cannot read run state: %s", e)
            return {}
        self.m.depth.set(float(snap["queue_depth"]))  # type: ignore[arg-type]
        counters: dict[str, float] = snap["counters"]  # type: ignore[assignment]
        self.m.stale.set(float(counters.get("stale_requeued", 0)))
        return {"depth": float(snap["queue_depth"]), "version": float(snap["version"]),  # type: ignore[arg-type]
                "stale": float(counters.get("stale_requeued", 0))}

    async def _report(self) -> None:
        last_t, last_groups, last_tokens = time.monotonic(), 0, 0
        last_rsum, last_rn = 0.0, 0
        while True:
            await asyncio.sleep(self.p.log_interval_s)
            now, st = time.monotonic(), self.stats
            dt = max(now - last_t, 1e-9)
            gps, tps = (st.groups_pushed - last_groups) / dt, (st.tokens - last_tokens) / dt
            n = st.rewards - last_rn
            rmean = (st.reward_sum - last_rsum) / n if n else float("nan")
            self.m.groups_per_s.set(gps)
            self.m.tokens_per_s.set(tps)
            g = await asyncio.to_thread(self._publish_gauges)
            log.info("groups/s %.2f tokens/s %.0f reward_mean %.3f queue_depth %s version %s stale_drops %s "
                     "admission_waits %s reward_errors %d filtered %d failed %d", gps, tps, rmean, g.get("depth"),
                     g.get("version"), g.get("stale"), st.admission_waits, st.reward_errors, st.groups_filtered,
                     st.groups_failed)
            last_t, last_groups, last_tokens, last_rsum, last_rn = now, st.groups_pushed, st.tokens, st.reward_sum, st.rewards
