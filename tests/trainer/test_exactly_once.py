"""Exactly once into the checkpointed model, and poison messages, with the real megatron trainer loop and a
real redis-server: a trainer that crashes after its checkpoint replays what the checkpoint lacks and ends
with the same weights as a run that never crashed; one that crashes between its checkpoint and the
acknowledgement trains nothing twice; a message it cannot train is dead-lettered once and training goes on."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from asyncgrpo.queue import Completion, Group, GroupQueue, RunState
from asyncgrpo.trainer.service import TrainerService
from asyncgrpo.trainer.train_step import GRPOTrainer
from trainer.workers import make_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("megatron_world1")]

VOCAB = 384  # the tiny preset's vocabulary


class Crash(RuntimeError):
    """Stands for a SIGKILL at a chosen point of the loop."""


def _group(run_id: str, g: int, position: int, seed: int, version: int = 0, **bad: object) -> Group:
    rng = random.Random(seed)
    comps = []
    for i in range(g):
        n = rng.randint(2, 6)
        ids = [rng.randrange(256) for _ in range(n)]
        comps.append(Completion(ids, [-5.9] * n, [(version, 0, n)], "stop", float(i % 2)))
    grp = Group(run_id=run_id, group_id=f"e0-p{position}-a0", prompt_id=str(position), epoch=0, position=position,
                attempt=0, prompt_ids=[rng.randrange(256) for _ in range(4)], completions=comps)
    for k, v in bad.items():
        setattr(grp, k, v)
    return grp


def _config(model_dir: Path, tmp: Path, redis_url: str, trial: str):  # type: ignore[no-untyped-def]
    cfg = make_config(model_dir)
    cfg.trial_name = trial
    cfg.redis.url = redis_url
    cfg.train_dataset.batch_size = 2
    cfg.rollout.max_head_offpolicyness = 100
    cfg.trainer.checkpoint_dir = str(tmp / trial)
    cfg.trainer.checkpoint_interval = 2
    cfg.trainer.poll_timeout_s = 0.1
    return cfg


def _service(cfg, sink=None) -> TrainerService:  # type: ignore[no-untyped-def]
    return TrainerService(cfg, GRPOTrainer(cfg), GroupQueue.from_url(cfg.redis.url, cfg.run_id),
                          RunState.from_url(cfg.redis.url, cfg.run_id), weight_sink=sink)


def _push(cfg, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    q = GroupQueue.from_url(cfg.redis.url, cfg.run_id)
    groups = [_group(cfg.run_id, cfg.actor.group_size, p, seed=p) for p in range(n)]
    for g in groups:
        q.push(g)
    return [g.group_id for g in groups]


def _weights(service: TrainerService) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in service.trainer.export_hf()}


def test_crash_after_checkpoint_replays_and_matches_an_uncrashed_run(tiny_model_dir: Path, tmp_path: Path, redis_server) -> None:
    # the reference: 6 steps over 12 groups, no crash
    ref_cfg = _config(tiny_model_dir, tmp_path, redis_server.url, "reference")
    _push(ref_cfg, 12)
    ref = _service(ref_cfg)
    ref.resume()
    assert ref.run(max_steps=6).steps == 6
    want = _weights(ref)

    cfg = _config(tiny_model_dir, tmp_path, redis_server.url, "crashy")
    ids = _push(cfg, 12)

    def crash_at_5(it, version: int) -> None:  # type: ignore[no-untyped-def]
        if version == 5:
            raise Crash("killed after step 5, one step after the version-4 checkpoint")

    a = _service(cfg, crash_at_5)
    a.resume()
    with pytest.raises(Crash):
        a.run(max_steps=6)
    q, state = a.queue, a.state
    assert state.get_version() == 5 and q.pending() == 2, "step 5's groups stay pending: no checkpoint holds them"

    b = _service(cfg)
    assert b.resume() == 4
    assert state.get_version() == 4 and state.trained() == 8, "the run state follows the checkpoint"
    assert b.run(max_steps=2).steps == 2
    lineage = [g for batch in b.lineage for g in batch]
    assert sorted(lineage) == sorted(ids), "every group trained exactly once into the final model"
    assert q.depth() == 0 and q.pending() == 0 and state.trained() == 12
    got = _weights(b)
    for k, v in want.items():
        # exact by construction: the same batches in the same order from the same restored state
        assert torch.equal(got[k], v), f"{k}: max |diff| {float((got[k] - v).abs().max())}"


def test_crash_between_checkpoint_and_ack_trains_nothing_twice(tiny_model_dir: Path, tmp_path: Path, redis_server,
                                                              monkeypatch) -> None:
    cfg = _config(tiny_model_dir, tmp_path, redis_server.url, "ackless")
    ids = _push(cfg, 10)
    a = _service(cfg)
    a.resume()
    real_ack = a.queue.ack_trained
    calls = []

    def ack_then_crash(msg_ids, trained_in_stream=0):  # type: ignore[no-untyped-def]
        calls.append(list(msg_ids))
        if len(calls) == 2:  # the version-4 checkpoint is durable; the process dies before acknowledging
            raise Crash("killed between checkpoint and ack")
        return real_ack(msg_ids, trained_in_stream)

    monkeypatch.setattr(a.queue, "ack_trained", ack_then_crash)
    with pytest.raises(Crash):
        a.run(max_steps=4)
    assert a.queue.pending() == 4, "steps 3 and 4 are in the durable version-4 checkpoint but unacknowledged"

    b = _service(cfg)
    assert b.resume() == 4
    assert b.queue.pending() == 0, "the checkpoint's groups were acknowledged on resume, not replayed"
    assert b.run(max_steps=1).steps == 1
    lineage = [g for batch in b.lineage for g in batch]
    assert sorted(lineage) == sorted(ids) and len(set(lineage)) == len(lineage)


def test_poison_messages_are_dead_lettered_once_and_training_goes_on(tiny_model_dir: Path, tmp_path: Path, redis_server) -> None:
    """Finding 4: a message that decodes but cannot be trained (wrong group size, a negative weight version, a
    token id >= vocab) crash-looped the trainer on every restart while good groups stayed pending behind it."""
    cfg = _config(tiny_model_dir, tmp_path, redis_server.url, "poison")
    G = cfg.actor.group_size
    q = GroupQueue.from_url(cfg.redis.url, cfg.run_id)
    q.push(_group(cfg.run_id, G - 1, 0, seed=0))  # wrong group size
    q.push(_group(cfg.run_id, G, 1, seed=1, version=-1))  # a negative version (a non-number fails to decode: schema)
    oov = _group(cfg.run_id, G, 2, seed=2)
    oov.completions[1].output_ids[0] = VOCAB
    q.push(oov)
    q.push_encoded("e0-p3-a0", b"not msgpack at all")
    for p in range(4, 8):
        q.push(_group(cfg.run_id, G, p, seed=p))

    s = _service(cfg)
    s.resume()
    stats = s.run(max_steps=2)
    assert (stats.steps, stats.groups_trained, stats.groups_dead_lettered) == (2, 4, 3)
    kinds = {d.group_id: d.kind for d in q.dead_letters()}
    assert kinds == {"e0-p0-a0": "group_size", "e0-p1-a0": "version", "e0-p2-a0": "vocab", "e0-p3-a0": "schema"}
    counters = s.state.counters()
    assert counters["dead_letters"] == 4 and counters["dead_letters:vocab"] == 1
    assert q.depth() == 0 and q.pending() == 0

    # a restarted trainer has nothing left to choke on
    q.push(_group(cfg.run_id, G, 8, seed=8))
    q.push(_group(cfg.run_id, G, 9, seed=9))
    again = _service(cfg)
    assert again.resume() == 2
    assert again.run(max_steps=1).groups_trained == 2
    assert len(q.dead_letters()) == 4


def test_copies_of_uncheckpointed_groups_are_kept_until_a_checkpoint(tiny_model_dir: Path, tmp_path: Path, redis_server) -> None:
    """Redis restarted with AOF everysec may lose its last second: a delivery (the same message comes back) or a
    push (the rollout pushes the group again under a new id). A copy of a group trained since the last
    checkpoint must not be acknowledged before a checkpoint holds the original, or a crash loses the group."""
    cfg = _config(tiny_model_dir, tmp_path, redis_server.url, "copies")
    ids = _push(cfg, 4)

    def crash_after_step(it, version: int) -> None:  # type: ignore[no-untyped-def]
        raise Crash("killed right after step 1, before any checkpoint")

    a = _service(cfg, crash_after_step)
    a.resume()
    with pytest.raises(Crash):
        a.run(max_steps=1)
    q, r = a.queue, a.queue.r
    trained = a.lineage[0]
    assert a.queue.pending() == 2 and len(a._unacked) == 2
    # Redis lost the deliveries, and the push of one trained group: the rollout pushed it again
    r.xgroup_setid(q.keys.stream, q.consumer_group, "0")
    r.hdel(q.keys.group_ids, trained[0])
    q.push(_group(cfg.run_id, cfg.actor.group_size, int(trained[0].split("-p")[1].split("-")[0]),
                  seed=int(trained[0].split("-p")[1].split("-")[0])))
    a._sort(q.consume(a.consumer, count=10))
    assert q.depth() == 5, "nothing acknowledged: the copies wait for a checkpoint"
    assert sorted(g.group_id for _, g in a._pending) == sorted(set(ids) - set(trained))
    assert "duplicates_dropped" not in a.state.counters()

    # the process dies before any checkpoint: the next one replays everything once
    b = _service(cfg)
    assert b.resume() == 0
    assert b.run(max_steps=2).steps == 2
    lineage = [g for batch in b.lineage for g in batch]
    assert sorted(lineage) == sorted(ids), lineage
    assert q.depth() == 0 and q.pending() == 0
