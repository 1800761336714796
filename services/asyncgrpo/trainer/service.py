"""`asyncgrpo trainer`: the loop around `GRPOTrainer.train_step`, fed by the Redis stream of scored groups.

Global rank 0 alone talks to Redis. It collects `train_dataset.batch_size` groups and sorts out, before
anything is trained: deliveries of groups the model already holds (dropped as duplicates), groups the
trainer cannot train (dead-lettered with their reason, once: group_checks.py) and groups whose oldest
token is more than `rollout.max_head_offpolicyness` versions behind the version about to be trained
(acknowledged, prompt re-queued). It broadcasts the batch to every rank, steps, and records the step in
Redis (new version and trained count, atomically) and hands the new weights to weight sync.

Exactly once into the checkpointed model: trained groups stay pending (unacknowledged) until a checkpoint
that holds their update is durable; the checkpoint records the model's lineage (the group ids trained at
each version), and only then are they acknowledged. A crash replays the groups trained since the last
checkpoint from the pending list; a crash between checkpoint and acknowledgement finds them in the lineage
and acknowledges them without training. On start the version and trained count in Redis are set back to
the checkpoint's, so the admission budget (derived from them) follows the model and no restart can
deadlock the run. With trainer.checkpoint_interval = 0 there is nothing to resume from: groups are
acknowledged right after their step.

The control plane steers the loop through the run's keys (queue/run_control.py), read at each step boundary:
live knobs are applied on every rank; while the run is paused no batch is collected or trained (rank 0 wakes
the other ranks every poll_timeout_s so no collective times out); 'stop' ends the loop after the step, and
'drain' trains full batches until no group is running and no full batch is left. Each step's metrics go to
a capped Redis stream (the control plane's time series) and to metrics.jsonl in the run directory.

Redis outages are ridden out through one RedisGuard (backoff, one warning per outage); after an outage
the groups delivered to this consumer are read again, in case a reply carrying them was lost.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from asyncgrpo.config.schema import RunConfig
from asyncgrpo.queue.protocols import GroupSource, RunStateView
from asyncgrpo.trainer.train_step import Batch, GRPOTrainer, Sample

log = logging.getLogger(__name__)

WeightSink = Callable[[Iterable[tuple[str, torch.Tensor]], int], Any]
T = TypeVar("T")


def group_to_samples(group: Any) -> list[Sample]:
    """A queue Group -> one Sample per completion (token versions as trainer integers)."""
    return [
        Sample(list(group.prompt_ids), list(c.output_ids), list(c.logprobs), c.token_versions, float(c.reward),
               group.group_id, c.step_rewards, c.step_ends)
        for c in group.completions
    ]


def is_stale(group: Any, trained_version: int, max_offpolicyness: int) -> bool:
    """AReaL's bound (queue/staleness.py): a group whose oldest token came from version v may train at
    versions <= v + bound."""
    from asyncgrpo.queue.staleness import is_stale as stale

    return stale(trained_version, group.oldest_version, max_offpolicyness)


def checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(cfg.trainer.checkpoint_dir or Path(cfg.fileroot) / cfg.experiment_name / cfg.trial_name / "checkpoints")


WAIT = "wait"  # _collect's answer when the run was paused while it collected


def sampled_at_other_temperature(group: Any, temperature: float) -> bool:
    """Log-probs are recomputed at the trainer's temperature: a group sampled at another one (the live knob
    changed) would carry behaviour log-probs of a different distribution."""
    return group.temperature is not None and abs(group.temperature - temperature) > 1e-12 * max(1.0, temperature)


@dataclass
class LoopStats:
    steps: int = 0
    groups_trained: int = 0
    groups_dropped_stale: int = 0
    groups_dead_lettered: int = 0
    duplicates_dropped: int = 0
    longest_wait_s: float = 0.0  # longest time spent collecting one batch
    last: dict[str, float] = field(default_factory=dict)


class _Metrics:
    """Prometheus side of the per-step metrics (declared lazily so importing this module registers nothing)."""

    def __init__(self) -> None:
        from asyncgrpo.utils.metrics import counter, gauge, histogram

        self.step = gauge("trainer_step_metric", "Last training step's metrics by name (loss, reward_mean, clip_frac, ...)", ["name"])
        self.version = gauge("trainer_policy_version", "Policy version (optimizer steps taken)")
        self.trained = counter("trainer_groups_trained_total", "Groups trained")
        self.dropped = counter("trainer_groups_dropped_stale_total", "Groups dropped as too stale (prompt re-queued)")
        self.dead = counter("trainer_groups_dead_lettered_total", "Groups the trainer cannot train, moved to the dead-letter list", ["kind"])
        self.duplicates = counter("trainer_duplicates_dropped_total", "Deliveries of groups the model already holds, acknowledged untrained")
        self.replayed = counter("trainer_groups_replayed_total", "Groups trained after the last checkpoint and replayed on resume")
        self.unacked = gauge("trainer_groups_awaiting_checkpoint", "Trained groups kept pending until a checkpoint holds them")
        self.tokens = counter("trainer_tokens_total", "Tokens (prompt + completion) trained")
        self.staleness = histogram("trainer_sample_staleness", "Staleness of trained samples (version - oldest token version)",
                                   buckets=(0, 1, 2, 3, 4, 8, 16))
        self.step_time = histogram("trainer_step_seconds", "Seconds per training step", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.wait_time = histogram("trainer_batch_wait_seconds", "Seconds spent collecting one batch", buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300))

    def record(self, stats: dict[str, float], batch: Batch, version: int) -> None:
        from asyncgrpo.queue.staleness import staleness

        for k, v in stats.items():
            self.step.labels(name=k).set(v)
        self.version.set(version)
        self.trained.inc(batch.n_groups)
        self.tokens.inc(sum(len(s.prompt_ids) + len(s.completion_ids) for s in batch.samples))
        for s in batch.samples:
            if s.token_versions:
                self.staleness.observe(staleness(version - 1, min(s.token_versions)))
        self.step_time.observe(stats["step_time_s"])


class TrainerService:
    """Runs on every rank; `queue` / `state` / `weight_sink` / `guard` are used on global rank 0 only."""

    def __init__(self, cfg: RunConfig, trainer: GRPOTrainer, queue: GroupSource | None = None,
                 state: RunStateView | None = None,
                 weight_sink: WeightSink | None = None, consumer: str = "trainer-0", guard: Any = None,
                 claim: Any = None, control: Any = None) -> None:
        from asyncgrpo.queue.connection import RedisGuard

        self.cfg = cfg
        self.trainer = trainer
        self.queue = queue
        self.state = state
        self.weight_sink = weight_sink
        self.consumer = consumer
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if self.rank == 0 and (queue is None or state is None):
            raise ValueError("rank 0 needs the group queue and the run state")
        self.guard = guard or RedisGuard(cfg.redis.url, cfg.redis.outage_deadline_s)
        self.stop_requested = False
        self.claim = claim  # the run's trainer role (queue/claims.py), renewed by a heartbeat thread
        self.control = control  # the run's control-plane records (queue/run_control.py), rank 0 only
        self._knobs: dict[str, Any] = {}  # live knob values read last (rank 0), broadcast with each batch
        self._stop_logged = False
        self._trainer_state = ""
        self._metrics_file: Any = None
        self.fenced = False  # another trainer took the role over: this one stops before its next step commits
        self._beat_stop = threading.Event()
        self.stats = LoopStats()
        self.metrics = _Metrics()
        self._pending: list[tuple[str, Any]] = []  # consumed, not yet trained or dropped
        self._unacked: list[str] = []  # trained, kept pending until a checkpoint holds them
        self.lineage: list[list[str]] = []  # group ids trained at versions 1..version of the model held now
        self._trained: set[str] = set()  # every group id in the lineage
        self._checkpointed: set[str] = set()  # those the latest durable checkpoint holds
        self._reread = True  # read the groups delivered to this consumer (start, and after a Redis outage)
        self._episodes_seen = 0
        self._saved_version = -1
        self._hf_version = -1

    def _redis(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return self.guard.call(fn, *args, **kw)

    # -- lifecycle -----------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the latest checkpoint if any and set the run state in Redis back to it; returns the version
        to continue from."""
        from asyncgrpo.trainer.checkpoint import latest_checkpoint, load_checkpoint

        step_dir = latest_checkpoint(checkpoint_dir(self.cfg))
        if step_dir is not None:
            data = load_checkpoint(self.trainer, step_dir)
            self.lineage = [list(g) for g in data.get("lineage", [])]
            if len(self.lineage) != self.trainer.version:
                from asyncgrpo.config import ConfigError

                raise ConfigError(f"checkpoint {step_dir} records {len(self.lineage)} trained batches for version "
                                  f"{self.trainer.version} (written by an asyncgrpo without the lineage): resume it "
                                  "with the asyncgrpo that wrote it, or start a new trial_name")
            self._trained = {g for batch in self.lineage for g in batch}
            self._checkpointed = set(self._trained)
            log.info("resumed from %s at version %d (%d groups trained into it)", step_dir, self.trainer.version,
                     len(self._trained))
        if self.rank == 0:
            done = self._redis(self.queue.resume, self.trainer.version, self._trained)
            if done:
                log.info("%d groups already in the checkpoint acknowledged (the previous run stopped before doing it)", done)
        if self.trainer.version > 0:
            # The generation servers may hold other weights (restarted with the base model, or ahead of this
            # checkpoint): hand the resumed model to weight sync now, not after the next step. Without it a
            # whole restarted run samples at version 0 and every group is too stale to train: no step ever comes.
            self._publish()
        return self.trainer.version

    def start_heartbeat(self) -> None:
        """Renew the trainer role from a thread (a step or a checkpoint may take longer than its TTL)."""
        if self.claim is None:
            return

        def beat() -> None:
            from asyncgrpo.queue.connection import RedisUnavailable

            while not self._beat_stop.wait(self.claim.interval_s):
                try:
                    held = self.claim.renew()
                except RedisUnavailable:
                    return  # the main loop meets the same outage and stops with its own line
                if not held:
                    log.error("another trainer (%s) took this run over; stopping before the next step commits",
                              self.claim.holder())
                    self.fenced = self.stop_requested = True
                    return

        threading.Thread(target=beat, name="trainer-claim", daemon=True).start()

    def stop_heartbeat(self) -> None:
        """Before releasing the claim: a renewal after the release would take it again."""
        self._beat_stop.set()

    def install_signal_handlers(self) -> None:
        def _stop(signum: int, _frame: Any) -> None:
            log.info("signal %d: stopping after the current step", signum)
            self.stop_requested = True
            self.guard.stopping()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)

    # -- rank 0: collecting a batch ------------------------------------------------------------------
    def _sort(self, entries: list[tuple[str, Any]]) -> None:
        """Sort deliveries out: copies of groups already held, what cannot be trained (dead letters), the
        stale; keep the rest pending."""
        from asyncgrpo.trainer.group_checks import group_problem

        bound = self.cfg.rollout.max_head_offpolicyness
        arch = self.trainer.arch
        held_msgs = {m for m, _ in self._pending} | set(self._unacked)
        held = {g.group_id for _, g in self._pending}
        dups: list[str] = []
        dead: list[tuple[str, str, str, str]] = []
        stale: list[tuple[str, Any]] = []
        for msg_id, g in entries:
            if msg_id in held_msgs:  # delivered again (Redis lost the delivery with its last second): held already
                continue
            if g.group_id in self._checkpointed:  # the durable model holds it: acknowledge this copy now
                dups.append(msg_id)
                continue
            if g.group_id in self._trained or g.group_id in held:
                # another copy of a group trained since the checkpoint, or waiting in this batch: acknowledged
                # with the next checkpoint (or step), so a crash before it still finds a copy to replay
                self._unacked.append(msg_id)
                held_msgs.add(msg_id)
                self.stats.duplicates_dropped += 1
                self.metrics.duplicates.inc()
                continue
            problem = group_problem(g, run_id=self.cfg.run_id, group_size=self.cfg.actor.group_size,
                                    vocab_size=arch.vocab_size, max_seq_len=arch.max_position_embeddings)
            if problem is not None:
                dead.append((msg_id, g.group_id, *problem))
            elif is_stale(g, self.trainer.version, bound) or sampled_at_other_temperature(g, self.cfg.actor.temperature):
                stale.append((msg_id, g))
            else:
                self._pending.append((msg_id, g))
                held.add(g.group_id)
        if dups:
            n = self._redis(self.queue.drop_duplicates, dups)
            self.stats.duplicates_dropped += n
            self.metrics.duplicates.inc(n)
            log.info("dropped %d deliveries of groups the model already holds", n)
        if dead:
            n = self._redis(self.queue.dead_letter, dead)
            self.stats.groups_dead_lettered += n
            for _, _, kind, _ in dead:
                self.metrics.dead.labels(kind).inc()
        if stale:
            n = self._redis(self.queue.drop_stale, stale)
            self.stats.groups_dropped_stale += n
            self.metrics.dropped.inc(n)
            log.info("dropped %d stale groups (trainer version %d, bound %d, temperature %g)", n, self.trainer.version,
                     bound, self.cfg.actor.temperature)

    def _reread_delivered(self) -> None:
        """The groups delivered to this consumer and not acknowledged that this process does not hold:
        all of them on start (the replay after a crash), lost replies after a Redis outage."""
        self._reread = False
        self._episodes_seen = self.guard.episodes
        held = {m for m, _ in self._pending} | set(self._unacked)
        entries = [e for e in self._redis(self.queue.pending_of, self.consumer) if e[0] not in held]
        if entries and self.stats.steps == 0:
            self.metrics.replayed.inc(len(entries))
            log.info("replaying %d groups delivered before the restart and not in the checkpoint", len(entries))
        self._sort(entries)

    def _collect(self, deadline: float | None, drain: bool = False) -> list[tuple[str, Any]] | str | None:
        """Block until a full batch is pending. None when stopping (a signal, the control plane's stop, the idle
        deadline) or when draining and no full batch can come (no live lease, nothing more in the stream);
        WAIT when the run was paused meanwhile (the groups collected so far stay pending). The control plane
        is read on every poll, so a stop, a drain, a pause or a knob lands while the trainer waits too."""
        bs = self.cfg.train_dataset.batch_size
        # Groups may have gone stale while waiting for the rest of the batch.
        if self._pending:
            keep = self._pending
            self._pending = []
            self._sort(keep)
        while True:
            if self._reread or self.guard.episodes != self._episodes_seen:
                self._reread_delivered()
            if len(self._pending) >= bs:
                break
            if self.stop_requested or (deadline is not None and time.monotonic() > deadline):
                return None
            action = self._control()
            if action == "stop":
                return None
            if action == "pause":
                return WAIT
            if action == "drain" and not drain:
                drain = True
                self._set_trainer_state("draining")
            block = int(self.cfg.trainer.poll_timeout_s * 1000)
            running = self._redis(self.state.live_leases) if drain else None
            got = self._redis(self.queue.consume, self.consumer, count=bs - len(self._pending), block_ms=200 if drain else block)
            self._sort(got)
            if drain and not got and running == 0 and len(self._pending) < bs:
                log.info("run ended early: drained through the control plane at version %d (nothing running, %d groups "
                         "short of a batch)", self.trainer.version, bs - len(self._pending))
                return None
            if not drain and not got and self._out_of_prompts():
                return None
        batch, self._pending = self._pending[:bs], self._pending[bs:]
        return batch

    def _out_of_prompts(self) -> bool:
        """True (said once, as a WARNING) when every prompt of the run's epochs is done, nothing runs or waits to
        be re-run, and the stream holds less than a batch: waiting on would wait forever. Dynamic filtering and
        stale drops use up prompts without training on them, so this can come before max_steps."""
        epochs = self.cfg.total_train_epochs
        if not self._redis(self.state.prompts_exhausted, epochs):
            return False
        self._sort(self._redis(self.queue.consume, self.consumer, count=self.cfg.train_dataset.batch_size, block_ms=None))
        short = self.cfg.train_dataset.batch_size - len(self._pending)
        if short <= 0:  # the last groups landed between the read and the check
            return False
        counters = self._redis(self.state.counters)
        log.warning("run ended early: the prompts ran out at version %d. Every prompt of total_train_epochs=%d was "
                    "used (%d groups filtered as all-equal by dynamic filtering, %d dropped as stale) and the last "
                    "batch is %d groups short. Raise total_train_epochs to train longer.", self.trainer.version, epochs,
                    int(counters.get("groups_filtered", 0)), self.stats.groups_dropped_stale, short)
        return True

    # -- the control plane ---------------------------------------------------------------------------
    def _set_trainer_state(self, state: str) -> None:
        """training / paused / draining / stopped, written when it changes (the control plane shows it)."""
        if self.control is not None and state != self._trainer_state:
            self._trainer_state = state
            self._redis(self.control.set_trainer_state, state)

    def _control(self) -> str:
        """Rank 0: read the control plane's state once and apply the live knobs (re-sorting what is pending:
        a new bound or temperature may make it stale). Returns 'stop', 'drain', 'pause' or 'train'."""
        from asyncgrpo.config.knobs import apply_knobs

        if self.control is None:
            return "stop" if self.stop_requested else "train"
        mode, paused, knobs = self._redis(self._read_control)
        self._knobs = knobs
        changed = apply_knobs(self.cfg, knobs)
        for k, (old, new) in changed.items():
            log.info("live knob %s: %s -> %s (from step %d)", k, old, new, self.trainer.version + 1)
        if changed and self._pending:
            keep, self._pending = self._pending, []
            self._sort(keep)
        if mode == "stop" or self.stop_requested:
            if mode == "stop" and not self._stop_logged:
                self._stop_logged = True
                log.info("run ended early: stop requested through the control plane at version %d", self.trainer.version)
            return "stop"
        if mode == "drain":
            return "drain"
        return "pause" if paused else "train"

    def _gate(self) -> str:
        """Rank 0 at a step boundary: 'train', 'drain', 'stop', or 'wait' while paused (returned after at most
        poll_timeout_s, so the other ranks hear from rank 0 and no collective times out)."""
        deadline = time.monotonic() + self.cfg.trainer.poll_timeout_s
        while True:
            action = self._control()
            if action != "pause":
                if action != "stop":
                    self._set_trainer_state("draining" if action == "drain" else "training")
                return action
            if self._trainer_state != "paused":
                log.info("run paused: stopped at the step boundary after version %d", self.trainer.version)
                self._set_trainer_state("paused")
            if time.monotonic() > deadline:
                return "wait"
            time.sleep(0.2)

    def _read_control(self) -> tuple[str, bool, dict[str, Any]]:
        return self.control.mode(), self.state.is_paused(), self.control.knobs()

    def _report_step(self, stats: dict[str, float], batch: Batch, version: int, waited_s: float) -> None:
        """One step's metrics to the control plane's stream and to metrics.jsonl."""
        import json
        import math

        row: dict[str, Any] = {"version": version, "time": time.time(), "groups": batch.n_groups,
                               "wait_s": round(waited_s, 4), "temperature": self.cfg.actor.temperature,
                               "max_head_offpolicyness": self.cfg.rollout.max_head_offpolicyness,
                               "groups_trained_total": self.stats.groups_trained + batch.n_groups,
                               "groups_dropped_stale_total": self.stats.groups_dropped_stale}
        row.update({k: (v if math.isfinite(v) else None) for k, v in stats.items()})
        row["version"] = version  # an int (the stats hold it as a float)
        if self.control is not None:
            self._redis(self.control.record_step, row)
        try:
            if self._metrics_file is None:
                path = checkpoint_dir(self.cfg).parent / "metrics.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                self._metrics_file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
            self._metrics_file.write(json.dumps(row) + "\n")
            self._metrics_file.flush()
        except OSError as e:
            log.warning("cannot write metrics.jsonl (%s); the control plane still has the step", e)

    # -- the loop ------------------------------------------------------------------------------------
    def _broadcast(self, obj: Any) -> Any:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _publish(self) -> None:
        it = self.trainer.export_hf()
        if self.rank == 0 and self.weight_sink is not None:
            self.weight_sink(it, self.trainer.version)
        for _ in it:  # the export is collective over TP: every rank runs it to the end
            pass

    def _save_hf(self) -> None:
        from asyncgrpo.trainer.model import save_hf_checkpoint

        save_hf_checkpoint(self.trainer.model, self.trainer.arch, self.cfg.actor.path, self._hf_dir(self.trainer.version))
        self._hf_version = self.trainer.version

    def _hf_dir(self, version: int) -> Path:
        return checkpoint_dir(self.cfg).parent / "hf" / f"version_{version}"

    def _hf_missing(self) -> bool:
        """A resumed run whose checkpoint is already its last step, killed before it wrote that step's HF model:
        the model is written now, from the checkpoint, instead of the run ending with no final model."""
        v = self.trainer.version
        return v > 0 and self._hf_version != v and not (self._hf_dir(v) / "config.json").exists()

    def _checkpoint(self) -> None:
        """Save (collective), then acknowledge the groups the checkpoint now holds."""
        from asyncgrpo.trainer.checkpoint import save_checkpoint

        t = self.cfg.trainer
        save_checkpoint(self.trainer, checkpoint_dir(self.cfg), {"version": self.trainer.version, "lineage": self.lineage},
                        keep=t.keep_checkpoints)
        self._saved_version = self.trainer.version
        self._checkpointed = set(self._trained)
        if self.rank == 0 and self._unacked:
            self._redis(self.queue.ack_trained, self._unacked, 0)
            self._unacked = []
            self.metrics.unacked.set(0)

    def run(self, max_steps: int | None = None, idle_timeout_s: float | None = None) -> LoopStats:
        """Train until stopped, `max_steps` steps were taken in this call (None: no limit), or (if given) no
        full batch arrived for idle_timeout_s seconds."""
        t = self.cfg.trainer
        ack_now = not t.checkpoint_interval
        taken = 0
        from asyncgrpo.config.knobs import apply_knobs

        waited = 0.0
        while max_steps is None or taken < max_steps:
            entries = None
            msg: tuple[str, Any, dict[str, Any]] | None = None
            if self.rank == 0:
                action = self._gate()
                if action == "wait":
                    msg = ("wait", None, self._knobs)
                elif action != "stop":
                    t0 = time.monotonic()
                    deadline = t0 + idle_timeout_s if idle_timeout_s is not None else None
                    got = self._collect(deadline, drain=action == "drain")
                    waited = time.monotonic() - t0
                    self.stats.longest_wait_s = max(self.stats.longest_wait_s, waited)
                    self.metrics.wait_time.observe(waited)
                    if got == WAIT:
                        msg = ("wait", None, self._knobs)
                    elif got is not None:
                        entries = got
                        msg = ("batch", [group_to_samples(g) for _, g in entries], self._knobs)
            msg = self._broadcast(msg if self.rank == 0 else None)
            if msg is None:
                break
            kind, payload, knobs = msg
            apply_knobs(self.cfg, knobs)  # every rank trains under the same values
            if kind == "wait":
                continue
            batch = Batch([s for group in payload for s in group])
            stats = self.trainer.train_step(batch)
            version = self.trainer.version
            self.lineage.append(list(batch.group_ids))
            self._trained.update(batch.group_ids)
            if self._broadcast(self.fenced if self.rank == 0 else None):
                break  # the run belongs to another trainer now: record, publish and checkpoint nothing (every rank)
            if self.rank == 0:
                msg_ids = [m for m, _ in entries]
                if ack_now:  # no checkpoint to wait for: the batch and any copies held back go now
                    msg_ids, self._unacked = msg_ids + self._unacked, []
                else:
                    self._unacked.extend(msg_ids)
                self._redis(self.queue.commit_step, msg_ids, version, len(self._trained), len(self._unacked), ack_now)
                self.metrics.unacked.set(len(self._unacked))
                self.metrics.record(stats, batch, version)
                self._report_step(stats, batch, version, waited)
                log.info("step %d: loss %.4f reward %.3f clip %.3f grad_norm %.3f %.0f tok/s", version, stats["loss"],
                         stats["reward_mean"], stats.get("clip_frac", 0.0), stats["grad_norm"], stats["tokens_per_s"])
            self._publish()
            self.stats.steps += 1
            taken += 1
            self.stats.groups_trained += batch.n_groups
            self.stats.last = stats
            if t.checkpoint_interval and version % t.checkpoint_interval == 0:
                self._checkpoint()
            if t.hf_save_interval and version % t.hf_save_interval == 0:
                self._save_hf()
            stop = self._broadcast(self.stop_requested if self.rank == 0 else None)
            if stop:
                break
        # A clean stop checkpoints too, so a restart continues exactly where this run ended, and leaves the HF
        # model of the version it reached (a run stopped or drained early still has its final model).
        fenced = self._broadcast(self.fenced if self.rank == 0 else None)
        if t.checkpoint_interval and self.stats.steps and self._saved_version != self.trainer.version and not fenced:
            self._checkpoint()
        if t.hf_save_interval and not fenced and (
                (self.stats.steps and self._hf_version != self.trainer.version) or self._broadcast(self._hf_missing() if self.rank == 0 else None)):
            self._save_hf()
        if self.rank == 0 and self._pending:
            log.info("%d consumed groups left pending; a restart replays them", len(self._pending))
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        return self.stats

    def mark_stopped(self) -> None:
        """Rank 0, after a clean end of the loop: the control plane shows the run stopped."""
        if self.control is not None and not self.fenced:
            self._redis(self.control.set_status, "stopped")
            self._set_trainer_state("stopped")
