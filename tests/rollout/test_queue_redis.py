"""GroupQueue and RunState against a real redis-server: idempotent push, consume/ack, reclaim from a
dead consumer, admission budget, leases, cursor and stale re-queue."""

from __future__ import annotations

import time

import pytest
import redis

from asyncgrpo.queue import CursorMismatchError, GroupQueue, PromptRef, RunState

from .helpers import make_group

RUN = "exp/t0"


@pytest.fixture
def client(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def admit(state: RunState, *, ofp: int = 0, bg: int = 2, n: int = 3, epochs: int = 1, ttl: float = 30.0):
    return state.admit(max_head_offpolicyness=ofp, batch_groups=bg, dataset_size=n, total_epochs=epochs, lease_ttl_s=ttl)


def test_push_is_idempotent_and_consume_returns_the_group(client) -> None:
    q = GroupQueue(client, RUN)
    g = make_group()
    first = q.push(g)
    assert q.push(g) == first  # re-push of the same group id: same message id, nothing added
    assert q.depth() == 1 and q.pushed_ids() == 1
    assert RunState(client, RUN).accepted() == 1
    [(msg_id, got)] = q.consume("c1", count=10, block_ms=100)
    assert msg_id == first and got == g
    assert q.pending() == 1
    assert q.consume("c1", count=10) == []
    assert q.ack([msg_id]) == 1
    assert q.pending() == 0 and q.depth() == 0


def test_push_rejects_other_run(client) -> None:
    with pytest.raises(ValueError, match="belongs to run"):
        GroupQueue(client, RUN).push(make_group(run_id="other/run"))


def test_dead_consumer_groups_are_reclaimed(client) -> None:
    q = GroupQueue(client, RUN)
    for i in range(3):
        q.push(make_group(ref=PromptRef(0, i, 0)))
    read = q.consume("dies", count=2)
    assert len(read) == 2
    # the consumer dies without acking; another consumer takes over what it held
    assert q.reclaim("survivor", min_idle_ms=60_000) == []  # not idle long enough yet
    time.sleep(0.05)
    taken = q.reclaim("survivor", min_idle_ms=10)
    assert sorted(g.group_id for _, g in taken) == sorted(g.group_id for _, g in read)
    rest = q.consume("survivor", count=10)
    assert len(rest) == 1
    q.ack([m for m, _ in taken + rest])
    assert q.pending() == 0 and q.depth() == 0


def test_undecodable_message_goes_to_dead_letter(client) -> None:
    q = GroupQueue(client, RUN)
    q.push_encoded("bad", b"\x93\x01\x02")
    q.push(make_group())
    got = q.consume("c", count=10)
    assert [g.group_id for _, g in got] == [make_group().group_id]
    assert client.llen(q.keys.dead_letter) == 1
    assert RunState(client, RUN).counters()["dead_letters"] == 1


def test_size_limit_on_push(client) -> None:
    from asyncgrpo.queue import GroupTooLargeError

    q = GroupQueue(client, RUN, max_message_bytes=1000)
    with pytest.raises(GroupTooLargeError):
        q.push(make_group(g=16, n=64))
    assert q.depth() == 0


def test_admission_budget_and_version(client) -> None:
    s = RunState(client, RUN)
    s.init_cursor(10, seed=1)
    # capacity = (v + ofp + 1) * bg = 2 at version 0
    a1, a2, a3 = admit(s, n=10), admit(s, n=10), admit(s, n=10)
    assert (a1.status, a2.status, a3.status) == ("ok", "ok", "over_budget")
    assert (a1.started, a2.started, a1.capacity) == (1, 2, 2)
    assert [a1.ref, a2.ref] == [PromptRef(0, 0, 0), PromptRef(0, 1, 0)]
    # pushing a group moves it from running to accepted: still counted
    GroupQueue(client, RUN).push(make_group(ref=a1.ref), lease=a1.ref)
    assert s.running() == 1 and s.accepted() == 1
    assert admit(s, n=10).status == "over_budget"
    s.set_version(1)
    a4 = admit(s, n=10)
    assert a4.status == "ok" and a4.version == 1 and a4.capacity == 4 and a4.started == 3
    assert s.counters()["groups_started"] == 3


def test_pause_stops_admission(client) -> None:
    s = RunState(client, RUN)
    s.set_paused(True)
    assert s.is_paused() and admit(s).status == "paused"
    s.set_paused(False)
    assert admit(s).status == "ok"


def test_cursor_walks_epochs_then_exhausts(client) -> None:
    s = RunState(client, RUN)
    refs = []
    while (a := admit(s, bg=100, n=2, epochs=2)).status == "ok":
        refs.append(a.ref)
        s.release_lease(a.ref, "groups_filtered")
    assert a.status == "exhausted"
    assert refs == [PromptRef(0, 0), PromptRef(0, 1), PromptRef(1, 0), PromptRef(1, 1)]
    assert s.counters()["groups_filtered"] == 4 and s.running() == 0


def test_prompts_exhausted_only_when_no_group_can_come(client) -> None:
    """The trainer's 'wait forever' detector: past the last epoch, nothing re-queued, no lease held."""
    s = RunState(client, RUN)
    assert s.prompts_exhausted(1) is False  # no cursor yet: the rollout has not started
    s.init_cursor(2, seed=0)
    a = admit(s, bg=100, n=2)
    assert s.prompts_exhausted(1) is False  # one prompt still to admit
    b = admit(s, bg=100, n=2)
    assert admit(s, bg=100, n=2).status == "exhausted"
    assert s.prompts_exhausted(1) is False  # two leases held: their groups may still come
    s.release_lease(a.ref, "groups_filtered")
    assert s.abandon_lease(b.ref)
    assert s.prompts_exhausted(1) is False  # b is re-queued: it will run again
    b2 = admit(s, bg=100, n=2)
    assert b2.ref == b.ref and s.prompts_exhausted(1) is False
    s.release_lease(b2.ref, "groups_pushed")
    assert s.prompts_exhausted(1) is True
    assert s.prompts_exhausted(2) is False  # a resume with more epochs has prompts left


def test_cursor_mismatch_is_an_error(client) -> None:
    s = RunState(client, RUN)
    s.init_cursor(10, seed=1, fingerprint="abc")
    s.init_cursor(10, seed=1, fingerprint="abc")
    with pytest.raises(CursorMismatchError, match="trial_name"):
        s.init_cursor(11, seed=1, fingerprint="abc")


def test_expired_lease_is_reissued_without_new_budget(client) -> None:
    s = RunState(client, RUN)
    a = admit(s, bg=1, ttl=30)  # capacity 1; this worker then dies
    assert a.status == "ok" and admit(s, bg=1).status == "over_budget"
    client.zadd(s.keys.leases, {a.ref.key(): 0})  # its lease expires (a deadline in the past), without sleeping
    b = admit(s, bg=1)
    assert b.status == "ok" and b.ref == a.ref and s.running() == 1
    assert s.counters()["leases_reissued"] == 1
    assert s.renew_lease(b.ref, 30) is True
    GroupQueue(client, RUN).push(make_group(ref=b.ref), lease=b.ref)
    assert s.renew_lease(b.ref, 30) is False  # pushed: the lease is gone
    # the zombie's late push of the same group is a no-op
    GroupQueue(client, RUN).push(make_group(ref=a.ref), lease=a.ref)
    assert GroupQueue(client, RUN).depth() == 1 and s.accepted() == 1


def test_stale_requeue_brings_the_prompt_back_as_a_new_attempt(client) -> None:
    s, q = RunState(client, RUN), GroupQueue(client, RUN)
    a = admit(s, bg=1)
    q.push(make_group(ref=a.ref), lease=a.ref)
    [(mid, g)] = q.consume("trainer-0")
    assert admit(s, bg=1).status == "over_budget"
    assert q.drop_stale([(mid, g)]) == 1  # the trainer drops it as stale: acked, prompt back as attempt 1
    assert s.accepted() == 0 and s.requeued() == [PromptRef(0, 0, 1)]
    assert q.outcomes() == {g.group_id: "stale"}
    b = admit(s, bg=1)
    assert b.status == "ok" and b.ref == PromptRef(0, 0, 1)
    assert q.push(make_group(ref=b.ref), lease=b.ref)
    assert q.depth() == 1 and s.counters()["stale_requeued"] == 1


def test_version_and_snapshot(client) -> None:
    s = RunState(client, RUN)
    assert s.get_version() == 0
    s.set_version(5)
    assert s.get_version() == 5
    with pytest.raises(ValueError):
        s.set_version(-1)
    snap = s.snapshot()
    assert snap["version"] == 5 and snap["queue_depth"] == 0 and snap["paused"] is False


def test_abandoned_lease_is_requeued_first(client) -> None:
    s = RunState(client, RUN)
    a = admit(s, bg=5)
    assert s.abandon_lease(a.ref) is True and s.abandon_lease(a.ref) is False
    assert s.running() == 0 and s.requeued() == [a.ref]
    assert admit(s, bg=5).ref == a.ref


def test_drop_stale_acks_and_requeues_once(client) -> None:
    s, q = RunState(client, RUN), GroupQueue(client, RUN)
    for i in range(2):
        a = admit(s, bg=5)
        q.push(make_group(ref=a.ref), lease=a.ref)
    got = q.consume("trainer-0", count=10)
    assert q.drop_stale(got[:1]) == 1
    assert q.drop_stale(got[:1]) == 0  # a retry after a crash does not re-queue twice
    assert s.requeued() == [got[0][1].prompt_ref().retry()] and s.accepted() == 1
    assert q.pending() == 1 and q.depth() == 1 and s.counters()["stale_requeued"] == 1


def test_restarted_consumer_reads_its_own_pending_first(client) -> None:
    q = GroupQueue(client, RUN)
    q.push(make_group())
    [(mid, _)] = q.consume("trainer-0")
    assert q.consume("trainer-0") == []
    [(again, g)] = GroupQueue(client, RUN).consume_own_pending("trainer-0")
    assert again == mid and g.group_id == make_group().group_id
    assert q.consume_own_pending("trainer-1") == []
