"""Exactly-once bookkeeping of the queue against a real redis-server: trained groups stay pending until a
checkpoint holds them, a resumed trainer sets the run state back to its checkpoint (no admission deadlock),
dead letters and duplicates leave the stream once, and leases belong to their owner."""

from __future__ import annotations

import pytest
import redis

from asyncgrpo.queue import GroupQueue, PromptRef, RunState

from .helpers import make_group

RUN = "exp/t0"


@pytest.fixture
def client(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def admit(state: RunState, *, ofp: int = 0, bg: int = 2, n: int = 100, owner: str = "w#0", ttl: float = 30.0):
    return state.admit(max_head_offpolicyness=ofp, batch_groups=bg, dataset_size=n, total_epochs=1, lease_ttl_s=ttl,
                       owner=owner)


def fill(state: RunState, q: GroupQueue, k: int, **kw) -> list[str]:
    """Admit and push k groups; returns their group ids."""
    ids = []
    for _ in range(k):
        a = admit(state, **kw)
        assert a.status == "ok", a
        g = make_group(ref=a.ref)
        q.push(g, lease=a.ref)
        ids.append(g.group_id)
    return ids


def test_a_step_moves_groups_from_waiting_to_trained_and_keeps_them_pending(client) -> None:
    s, q = RunState(client, RUN), GroupQueue(client, RUN)
    fill(s, q, 2, bg=2)
    assert s.budget_usage() == (2, 0) and admit(s, bg=2).status == "over_budget"
    batch = q.consume("trainer-0", count=2)
    q.commit_step([m for m, _ in batch], version=1, trained=2, trained_in_stream=2, ack=False)
    # version 1: capacity 4; accepted still 2 (trained now, awaiting the checkpoint): 2 more may start
    assert s.get_version() == 1 and s.trained() == 2 and s.budget_usage() == (2, 0)
    assert q.depth() == 2 and q.pending() == 2
    fill(s, q, 2, bg=2)
    assert admit(s, bg=2).status == "over_budget"
    # the checkpoint holds them: acknowledged, the budget does not move
    assert q.ack_trained([m for m, _ in batch]) == 2
    assert q.depth() == 2 and q.pending() == 0 and s.budget_usage() == (4, 0)
    # a retried commit (lost reply) changes nothing: absolute values
    q.commit_step([m for m, _ in batch], version=1, trained=2, trained_in_stream=0, ack=False)
    assert s.budget_usage() == (4, 0)


def test_resume_from_an_older_checkpoint_cannot_deadlock_admission(client) -> None:
    """Finding 3: the trainer SIGKILLed 4 steps after its checkpoint resumed at the checkpoint's version while
    the budget still counted the groups trained since (acked, gone): accepted + running stayed above capacity
    forever. Now those groups stay pending, the resume sets version and trained back, and the budget counts
    them as waiting: the replay feeds the trainer and admission opens again as it steps."""
    s, q = RunState(client, RUN), GroupQueue(client, RUN)
    bg, lineage, unacked = 2, [], []
    for step in range(1, 7):  # checkpoint at step 2, crash after step 6
        fill(s, q, bg, bg=bg)
        batch = q.consume("trainer-0", count=bg)
        lineage.append([g.group_id for _, g in batch])
        unacked += [m for m, _ in batch]
        q.commit_step([m for m, _ in batch], step, 2 * step, len(unacked), ack=False)
        if step == 2:
            q.ack_trained(unacked)
            unacked = []
            checkpoint = [g for b in lineage for g in b]
    assert s.get_version() == 6 and len(unacked) == 8

    # restart: the model is the version-2 checkpoint
    acked = q.resume(2, set(checkpoint))
    assert acked == 0 and s.get_version() == 2 and s.trained() == 4
    accepted, running = s.budget_usage()
    assert (accepted, running) == (4 + 8, 0), "the 8 groups trained after the checkpoint count as waiting"
    replay = q.pending_of("trainer-0")
    assert [g.group_id for _, g in replay] == [g for b in lineage[2:] for g in b]
    # the trainer retrains them step by step; admission opens once the waiting groups fit the budget again
    for step in range(3, 7):
        batch, replay = replay[:bg], replay[bg:]
        q.commit_step([m for m, _ in batch], step, 2 * step, 0, ack=True)
    assert s.budget_usage() == (12, 0) and admit(s, bg=bg).status == "ok"


def test_resume_acknowledges_what_the_checkpoint_already_holds(client) -> None:
    """A crash between a durable checkpoint and its acknowledgement: the resume finds those groups in the
    lineage and acknowledges them instead of replaying them (trained twice otherwise)."""
    s, q = RunState(client, RUN), GroupQueue(client, RUN)
    ids = fill(s, q, 2, bg=2)
    batch = q.consume("trainer-0", count=2)
    q.commit_step([m for m, _ in batch], 1, 2, 2, ack=False)
    # checkpoint written ... crash before ack_trained
    assert q.resume(1, set(ids)) == 2
    assert q.depth() == 0 and q.pending() == 0 and q.pending_of("trainer-0") == []
    assert s.budget_usage() == (2, 0) and s.get_version() == 1


def test_dead_letter_once_with_reason_and_payload(client) -> None:
    s, q = RunState(client, RUN), GroupQueue(client, RUN)
    fill(s, q, 2, bg=5)
    (m1, g1), (m2, _) = q.consume("trainer-0", count=2)
    items = [(m1, g1.group_id, "vocab", "token 384 outside [0, 384)")]
    assert q.dead_letter(items) == 1
    assert q.dead_letter(items) == 0, "a retried move must not count twice"
    [d] = q.dead_letters()
    assert (d.msg_id, d.group_id, d.kind) == (m1, g1.group_id, "vocab") and "384" in d.reason
    from asyncgrpo.queue import decode_group

    assert decode_group(d.payload) == g1
    counters = s.counters()
    assert counters["dead_letters"] == 1 and counters["dead_letters:vocab"] == 1
    assert q.outcomes() == {g1.group_id: "dead"} and q.depth() == 1
    assert s.budget_usage() == (1, 0), "a dead-lettered group no longer counts as waiting"


def test_undecodable_message_is_dead_lettered_with_its_group_id(client) -> None:
    q = GroupQueue(client, RUN)
    q.push_encoded("e0-p9-a0", b"\x93\x01\x02")
    assert q.consume("trainer-0", count=5) == []
    [d] = q.dead_letters()
    assert d.group_id == "e0-p9-a0" and d.kind == "schema" and d.payload == b"\x93\x01\x02"
    assert q.outcomes() == {"e0-p9-a0": "dead"} and q.depth() == 0


def test_duplicates_are_dropped_once(client) -> None:
    s, q = RunState(client, RUN), GroupQueue(client, RUN)
    fill(s, q, 1, bg=5)
    [(m, _)] = q.consume("trainer-0")
    assert q.drop_duplicates([m]) == 1 and q.drop_duplicates([m]) == 0
    assert s.counters()["duplicates_dropped"] == 1 and q.depth() == 0


def test_lost_consumer_group_is_created_again(client) -> None:
    """After Redis lost its data (no persistence) the consumer group is gone: reading recreates it."""
    s, q = RunState(client, RUN), GroupQueue(client, RUN)
    q.consume("trainer-0", count=1)
    client.flushall()
    fill(s, q, 1, bg=5)
    assert [g.group_id for _, g in q.consume("trainer-0", count=1)] == ["e0-p0-a0"]


def test_leases_belong_to_their_owner(client) -> None:
    s = RunState(client, RUN)
    a = admit(s, bg=5, owner="host#0")
    assert s.lease_owners() == {a.ref: "host#0"}
    assert s.renew_lease(a.ref, 30, "other#0") is False
    assert s.release_lease(a.ref, "groups_filtered", "other#0") is False
    assert s.abandon_lease(a.ref, "other#0") is False
    assert s.running() == 1
    assert s.renew_lease(a.ref, 30, "host#0") is True
    assert s.release_lease(a.ref, "groups_filtered", "host#0") is True
    assert s.running() == 0 and s.lease_owners() == {}


def test_expired_lease_moves_to_its_new_owner(client) -> None:
    s = RunState(client, RUN)
    a = admit(s, bg=1, owner="dead#0", ttl=30)
    client.zadd(s.keys.leases, {a.ref.key(): 0})  # its deadline passed
    b = admit(s, bg=1, owner="alive#3")
    assert b.ref == a.ref and s.lease_owners() == {a.ref: "alive#3"}
    assert s.renew_lease(a.ref, 30, "dead#0") is False, "the zombie learns its copy is moot"


def test_restarted_worker_takes_back_its_leases_at_once(client) -> None:
    """Finding 2: a restarted rollout waited lease_ttl_s (120 s) for its own old leases. With a stable worker
    id it takes them back at once; another worker's leases are left alone."""
    s = RunState(client, RUN)
    mine = [admit(s, bg=5, owner=f"host-a#{i}", ttl=120).ref for i in range(2)]
    theirs = admit(s, bg=5, owner="host-b#0", ttl=120).ref
    assert s.reclaim_leases("host-a") == 2
    again = {admit(s, bg=5, owner=f"host-a#{i}", ttl=120).ref for i in range(2)}
    assert again == set(mine), "re-issued at once, before any new prompt"
    assert s.counters()["leases_reissued"] == 2 and s.running() == 3
    assert s.lease_owners()[theirs] == "host-b#0"
    assert s.reclaim_leases("host-") == 0, "the owner prefix is the whole worker id"
    assert PromptRef(0, 3, 0) == admit(s, bg=5, owner="host-a#0").ref
