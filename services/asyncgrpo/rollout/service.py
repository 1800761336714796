"""The rollout service: N asyncio workers, each running one group at a time:

    admit (staleness budget + pause, Redis)  ->  lease a prompt (Redis cursor / re-queue / expired lease)
    -> sample G completions (partial rollouts across weight updates)  ->  score them off the loop
    -> push the group (idempotent; drops the lease)   or   drop it if all rewards are equal (counted)

Live knobs (sampling temperature, top_p, the staleness bound) come with each admission, read in the same
script, so a change applies from the next admitted group; each group records the temperature it was sampled
at. When the control plane drains or stops the run, admission answers so and each worker returns after its
current group: the process exits once every admitted group is pushed.

A worker over budget or paused waits on the run's pub/sub channel (version bumps, resume, re-queues, lease
releases) with a 1 s fallback for leases that expire silently: it never spins. While a group runs, its
lease is renewed every lease_ttl_s / 3; a killed process stops renewing, and another worker re-runs the
prompt once the lease expires. Leases carry their owner ('worker_id#n'): a process restarted with the same
worker_id takes its own back at once instead of waiting for them to expire.

Faults are weather: every Redis call goes through one RedisGuard (backoff through an outage, one warning,
RedisUnavailable only past redis.outage_deadline_s); a group whose generation server failed hands its
prompt back and is logged once per server outage, not once per group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from asyncgrpo.queue import Admission, Completion, Group, GroupTooLargeError, PromptRef, RedisGuard
from asyncgrpo.queue.connection import make_async_redis
from asyncgrpo.queue.protocols import GroupSink, RolloutState
from asyncgrpo.queue.run_control import RunControl
from asyncgrpo.queue.schema import spans_from_versions
from asyncgrpo.rollout.dataset import PromptDataset
from asyncgrpo.rewards.steps import token_ends
from asyncgrpo.rollout.rewards import RewardRunner, Score
from asyncgrpo.rollout.sampling import GenerateClient, sample_group
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
    worker_id: str = "rollout"  # stable identity of this process; leases are owned by 'worker_id#n'
    sampling_extra: dict[str, Any] = field(default_factory=dict)  # more SGLang sampling params (e.g. ignore_eos)

    @classmethod
    def from_config(cls, cfg: Any) -> "RolloutParams":
        r = cfg.rollout
        return cls(run_id=cfg.run_id, group_size=cfg.actor.group_size, max_new_tokens=r.max_new_tokens,
                   temperature=cfg.actor.temperature, top_p=r.top_p, top_k=r.top_k,
                   max_head_offpolicyness=r.max_head_offpolicyness, batch_groups=cfg.train_dataset.batch_size,
                   total_epochs=cfg.total_train_epochs, lease_ttl_s=r.lease_ttl_s,
                   dynamic_filtering=cfg.rollout.dynamic_filtering, max_resubmits=r.max_resubmits,
                   num_workers=r.max_concurrent_rollouts, exit_when_exhausted=r.exit_when_exhausted,
                   log_interval_s=r.log_interval_s, worker_id=r.worker_id or socket.gethostname())

    def sampling_params(self, knobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """SGLang sampling params; `knobs` are the live values an admission carried (they win)."""
        k = knobs or {}
        return {"temperature": k.get("actor.temperature", self.temperature), "top_p": k.get("rollout.top_p", self.top_p),
                "top_k": self.top_k, **self.sampling_extra}


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
    ended_by: str = ""  # 'draining' or 'stopping' when the control plane ended the run
    last_wait: Admission | None = None  # the latest admission answer that made a worker wait
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

    async def wait(self, ev: asyncio.Event, timeout: float) -> None:
        """Wait for `ev` to be set, at most `timeout`; a timeout spends it as if notified, so every holder re-checks
        once (the fallback for changes nobody announces)."""
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except asyncio.TimeoutError:
            if ev is self._event:
                self.notify()


class RolloutService:
    def __init__(self, params: RolloutParams, *, state: RolloutState, queue: GroupSink, dataset: PromptDataset,
                 decode: Callable[[list[int]], str], clients: Sequence[GenerateClient], rewards: RewardRunner,
                 redis_url: str, guard: RedisGuard, claim: Any = None, control: RunControl | None = None) -> None:
        if not clients:
            raise ValueError("rollout needs at least one generation server (rollout.server_urls)")
        self.p = params
        self.state = state
        self.control = control  # the run's control-plane records: recent completions, this process's reports
        self.queue = queue
        self.dataset = dataset
        self.decode = decode
        self.clients = list(clients)
        self.rewards = rewards
        self.redis_url = redis_url
        self.guard = guard
        self.claim = claim  # this process's worker_id in the run (queue/claims.py), renewed by a heartbeat
        self.fenced = False  # another process took the worker_id over: this one stopped
        self.stats = RolloutStats()
        self.m = _Metrics()
        self._stop = asyncio.Event()
        self._wake = _Wakeup()
        self._next_server = 0
        self._server_down: set[str] = set()  # servers whose failure was reported and not yet followed by a success
        self._in_flight: dict[int, PromptRef] = {}  # worker -> the lease it works on
        self._episodes_seen = 0
        self._reclaiming = asyncio.Lock()
        self._admitting = asyncio.Lock()
        self._refused: tuple[asyncio.Event, Admission] | None = None  # admission's last no, and the wake-up it was given in

    # -- lifecycle -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop admitting; running groups finish and are pushed, then run() returns."""
        self._stop.set()
        self._wake.notify()

    def owner(self, wid: int) -> str:
        return f"{self.p.worker_id}#{wid}"

    async def run(self) -> RolloutStats:
        await self.guard.acall(self.state.init_cursor, len(self.dataset), self.dataset.seed, self.dataset.fingerprint())
        taken = await self.guard.acall(self.state.reclaim_leases, self.p.worker_id)
        if taken:
            log.info("took back %d leases of worker %s (a restart of this process); re-running them now", taken,
                     self.p.worker_id)
        watcher = asyncio.create_task(self._watch_events(), name="rollout-events")
        reporter = asyncio.create_task(self._report(), name="rollout-report")
        background = [watcher, reporter]
        if self.claim is not None:
            background.append(asyncio.create_task(self._heartbeat(), name="rollout-claim"))
        try:
            await asyncio.gather(*(self._worker(i) for i in range(self.p.num_workers)))
        finally:
            for t in background:
                t.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            self._publish_gauges()
        return self.stats

    async def _heartbeat(self) -> None:
        """Renew this process's worker_id claim; if another process holds it now, stop (it runs our leases)."""
        while True:
            await asyncio.sleep(self.claim.interval_s)
            if not await asyncio.to_thread(self.claim.renew):
                log.error("another rollout process (%s) took worker_id %s over; stopping", self.claim.holder(),
                          self.p.worker_id)
                self.fenced = True
                self.stop()
                return

    async def _watch_events(self) -> None:
        """Wake waiting workers on every message of the run's channel; resubscribe if Redis drops (waiters
        still wake on the fallback timer meanwhile, and the guard reports the outage once)."""
        while True:
            client = make_async_redis(self.redis_url, max_block_s=WAIT_FALLBACK_S)
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as ps:
                    await ps.subscribe(self.state.keys.events)
                    while True:
                        msg = await ps.get_message(timeout=WAIT_FALLBACK_S)
                        if msg is not None:
                            self._wake.notify()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis restarting; the worker calls report it through the guard
                log.debug("event subscription lost (%s: %s); resubscribing", type(e).__name__, e)
                await asyncio.sleep(WAIT_FALLBACK_S)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()

    # -- one worker ----------------------------------------------------------------------------------
    async def _after_outage(self) -> None:
        """After a Redis outage: writes of the last moments before a crash may be lost (AOF everysec), e.g. a
        push whose lease survived. Leases of this process that no worker holds now are taken back at once."""
        async with self._reclaiming:
            if self.guard.episodes == self._episodes_seen:
                return
            self._episodes_seen = self.guard.episodes
            n = await self.guard.acall(self.state.reclaim_leases, self.p.worker_id, list(self._in_flight.values()))
            if n:
                log.info("took back %d leases this process no longer works on (lost in the Redis outage)", n)

    async def _worker(self, wid: int) -> None:
        while not self._stop.is_set():
            if self.guard.episodes != self._episodes_seen:
                await self._after_outage()
            answer = await self._admit(wid)
            if answer is None:
                return
            adm, ev = answer
            if adm.status == "ok":
                assert adm.ref is not None
                self.stats.admissions.append(adm)
                self._in_flight[wid] = adm.ref
                try:
                    await self._run_group(wid, adm)
                finally:
                    self._in_flight.pop(wid, None)
                continue
            if adm.status in ("draining", "stopping"):
                if not self.stats.ended_by:
                    self.stats.ended_by = adm.status
                    log.info("the run is %s (control plane): admitting nothing new; running groups finish and are "
                             "pushed, then this process exits", adm.status)
                return
            self.stats.admission_waits[adm.status] += 1
            self.stats.last_wait = adm
            self.m.waits.labels(adm.status).inc()
            if adm.status == "exhausted" and self.p.exit_when_exhausted and await self.guard.acall(self._drained):
                log.info("worker %d: every prompt of %d epoch(s) is done", wid, self.p.total_epochs)
                return
            await self._wake.wait(ev, WAIT_FALLBACK_S)

    async def _admit(self, wid: int) -> tuple[Admission, asyncio.Event] | None:
        """Ask Redis to start a group, one worker at a time; and the wake-up to wait on if the answer is no. None
        once the service is stopping.

        Every event of the run's channel (a version, a released lease, a re-queue) wakes every waiting worker. If
        each asked Redis, one freed slot would cost a refusal per worker (32 round trips, ~13,000 refusals in a
        run). Instead, once admission said no, workers that wake on the same event take that answer and wait for
        the next one: nothing can have changed that was not announced, and the 1 s fallback, which covers the
        leases that expire silently, is itself a new event."""
        async with self._admitting:
            ev = self._wake.current()
            if self._stop.is_set():  # stopped while this worker queued for the lock: start nothing more
                return None
            if self._refused is not None and self._refused[0] is ev:
                return self._refused[1], ev
            adm = await self.guard.acall(
                self.state.admit, max_head_offpolicyness=self.p.max_head_offpolicyness, batch_groups=self.p.batch_groups,
                dataset_size=len(self.dataset), total_epochs=self.p.total_epochs, lease_ttl_s=self.p.lease_ttl_s,
                owner=self.owner(wid),
            )
            self._refused = (ev, adm) if adm.status != "ok" else None
            return adm, ev

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
                if not await self.guard.acall(self.state.renew_lease, ref, self.p.lease_ttl_s, self.owner(wid)):
                    # pushed by a twin that got the expired lease, or released: this copy is moot
                    log.warning("worker %d: lease %s lost; abandoning the group", wid, ref.key())
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    return
            group = task.result()
        except asyncio.CancelledError:
            task.cancel()
            try:  # quick, synchronous: hand the prompt to another worker now
                self.state.abandon_lease(ref, self.owner(wid))
            except Exception as e:  # noqa: BLE001 - Redis down: a restart with this worker_id takes it back
                log.info("lease %s not handed back (%s); it is taken back on restart or expires", ref.key(), e)
            raise
        except Exception as e:
            self.stats.groups_failed += 1
            self.m.groups.labels("failed").inc()
            self._report_failure(wid, ref, client, e)
            await self.guard.acall(self.state.abandon_lease, ref, self.owner(wid))
            await self.guard.acall(self.state.incr, "groups_failed")
            await asyncio.sleep(1.0)  # servers down: do not hot-loop over the prompts
            return
        self._server_up(client)
        await self._finish(group, ref, wid)

    def _report_failure(self, wid: int, ref: PromptRef, client: GenerateClient, e: Exception) -> None:
        """A generation server failing is weather: one WARNING per server outage. Anything else is a bug."""
        from asyncgrpo.rollout.sampling import PartialRolloutError
        from asyncgrpo.sglang.client import SGLangError

        url = str(getattr(client, "base_url", client))
        if isinstance(e, (SGLangError, PartialRolloutError)):
            if url not in self._server_down:
                self._server_down.add(url)
                log.warning("generation on %s failing (%s); prompts are handed back and retried, quiet until it "
                            "answers again", url, e)
            else:
                log.debug("worker %d: group %s failed on %s: %s", wid, ref.group_id(), url, e)
        else:
            log.error("worker %d: group %s failed; prompt handed back", wid, ref.group_id(), exc_info=e)

    def _server_up(self, client: GenerateClient) -> None:
        url = str(getattr(client, "base_url", client))
        if url in self._server_down:
            self._server_down.discard(url)
            log.info("generation on %s works again", url)

    async def _produce(self, client: GenerateClient, adm: Admission) -> Group:
        ref = adm.ref
        assert ref is not None
        t0 = time.monotonic()
        prompt = self.dataset.get(ref.epoch, ref.position)
        gid = ref.group_id()
        params = self.p.sampling_params(adm.knobs)
        try:
            samples = await sample_group(client, prompt.input_ids, params, self.p.group_size,
                                         max_new_tokens=self.p.max_new_tokens, rid=f"{self.p.run_id}:{gid}",
                                         max_resubmits=self.p.max_resubmits)
        except ExceptionGroup as eg:  # report the first real error, not "unhandled errors in a TaskGroup"
            raise eg.exceptions[0] from eg
        texts = [self.decode(s.output_ids) for s in samples]
        scores = await self.rewards.score(prompt.text, texts, prompt.answer, prompt.metadata)
        completions = [
            Completion(output_ids=s.output_ids, logprobs=s.logprobs, version_spans=spans_from_versions(s.token_versions),
                       finish_reason=s.finish_reason, reward=sc.reward, reward_details=sc.details, reward_error=sc.error,
                       resumes=s.resumes, started_at=s.started_at, finished_at=s.finished_at, **steps)
            for s, sc, steps in zip(samples, scores, await self._steps_off_loop(samples, scores), strict=True)
        ]
        self.m.group_seconds.observe(time.monotonic() - t0)
        return Group(run_id=self.p.run_id, group_id=gid, prompt_id=prompt.prompt_id, epoch=ref.epoch,
                     position=ref.position, attempt=ref.attempt, prompt_ids=prompt.input_ids, completions=completions,
                     answer=prompt.answer, admitted_version=adm.version, admission_index=adm.started,
                     temperature=float(params["temperature"]))

    async def _steps_off_loop(self, samples: Sequence[Any], scores: Sequence[Score]) -> list[dict[str, list[Any]]]:
        if all(sc.step_rewards is None for sc in scores):
            return [{} for _ in scores]  # outcome rewards: nothing to map, no thread
        return await asyncio.to_thread(self._group_steps, samples, scores)

    def _group_steps(self, samples: Sequence[Any], scores: Sequence[Score]) -> list[dict[str, list[Any]]]:
        """Process rewards' steps as token ranges: each step's character end becomes the token that completes it.
        Decoding prefixes takes a while on long completions: this runs on a thread, off the event loop."""
        out: list[dict[str, list[Any]]] = []
        for s, sc in zip(samples, scores, strict=True):
            if sc.step_rewards is None or sc.step_char_ends is None or not s.output_ids:
                out.append({})
            else:
                out.append({"step_rewards": sc.step_rewards,
                            "step_ends": token_ends(self.decode, s.output_ids, sc.step_char_ends)})
        return out

    async def _finish(self, group: Group, ref: PromptRef, wid: int) -> None:
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
        # every scored completion, filtered groups included: the policy's reward, not the trained batches'
        self.stats.reward_sum += sum(rewards)
        self.stats.rewards += len(rewards)
        if errors:
            await self.guard.acall(self.state.incr, "reward_errors", errors)
        if self.p.dynamic_filtering and len(set(rewards)) == 1 and len(
                {r for c in group.completions for r in (c.step_rewards or [c.reward])}) == 1:
            # zero advantage for every completion (and every token, with step rewards): nothing to learn; the prompt
            # is done for this epoch
            await self.guard.acall(self.state.release_lease, ref, "groups_filtered", self.owner(wid))
            self.stats.groups_filtered += 1
            self.m.groups.labels("filtered").inc()
            return
        try:
            await self.guard.acall(self.queue.push, group, ref)  # idempotent on group_id: safe to retry
        except GroupTooLargeError as e:
            log.error("%s; group dropped", e)
            await self.guard.acall(self.state.release_lease, ref, "groups_too_large", self.owner(wid))
            self.stats.groups_failed += 1
            self.m.groups.labels("failed").inc()
            return
        if self.control is not None:
            await self.guard.acall(self.control.record_completion, {
                "group_id": group.group_id, "version": group.newest_version, "rewards": rewards,
                "reward_mean": sum(rewards) / len(rewards) if rewards else 0.0, "temperature": group.temperature,
                "text": self.decode(group.completions[0].output_ids)[:1000] if group.completions else "",
                "at": time.time()})
        self.stats.groups_pushed += 1
        self.m.groups.labels("pushed").inc()

    # -- reporting -----------------------------------------------------------------------------------
    def _publish_gauges(self) -> dict[str, float]:
        try:
            snap = self.state.snapshot()
        except Exception as e:  # noqa: BLE001 - reporting only; an outage is reported by the guard
            (log.debug if self.guard.down else log.warning)("cannot read run state: %s", e)
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
            with contextlib.suppress(Exception):  # reporting only; an outage is reported by the guard
                if self.control is not None:
                    await asyncio.to_thread(self.control.record_rollout_stats, self.p.worker_id, {
                        "groups_per_s": gps, "tokens_per_s": tps, "reward_mean": rmean if n else None,
                        "groups_pushed": st.groups_pushed, "groups_filtered": st.groups_filtered,
                        "groups_failed": st.groups_failed, "admission_waits": st.admission_waits})
            log.info("groups/s %.2f tokens/s %.0f reward_mean %.3f queue_depth %s version %s stale_drops %s "
                     "admission_waits %s reward_errors %d filtered %d failed %d", gps, tps, rmean, g.get("depth"),
                     g.get("version"), g.get("stale"), st.admission_waits, st.reward_errors, st.groups_filtered,
                     st.groups_failed)
            last_t, last_groups, last_tokens, last_rsum, last_rn = now, st.groups_pushed, st.tokens, st.reward_sum, st.rewards
