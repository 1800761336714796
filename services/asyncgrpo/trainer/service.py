"""`asyncgrpo trainer`: the loop around `GRPOTrainer.train_step`, fed by the Redis stream of scored groups.

Global rank 0 alone talks to Redis. It collects `train_dataset.batch_size` groups, dropping (ack +
prompt re-queue, counted) any group whose oldest token is more than `rollout.max_head_offpolicyness`
versions behind the version about to be trained, broadcasts the batch to every rank, and after the step
acks the batch, bumps the policy version in Redis and hands the new weights to weight sync. Every
`trainer.checkpoint_interval` steps it checkpoints; on start it resumes from the latest checkpoint and
first re-reads the groups it had consumed but not acknowledged.

Delivery is at-least-once up to the checkpoint: groups trained after the last checkpoint were acked, so
a crash replays the model from the checkpoint without them (they are not trained twice).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from asyncgrpo.config.schema import RunConfig
from asyncgrpo.trainer.train_step import Batch, GRPOTrainer, Sample

log = logging.getLogger(__name__)

WeightSink = Callable[[Iterable[tuple[str, torch.Tensor]], int], Any]


def group_to_samples(group: Any) -> list[Sample]:
    """A queue Group -> one Sample per completion (token versions as trainer integers)."""
    from asyncgrpo.queue import version_number

    return [
        Sample(list(group.prompt_ids), list(c.output_ids), list(c.logprobs),
               [version_number(v) for v in c.token_versions], float(c.reward), group.group_id)
        for c in group.completions
    ]


def is_stale(group: Any, trained_version: int, max_offpolicyness: int) -> bool:
    """AReaL's bound: a group whose oldest token came from version v may train at versions <= v + bound."""
    return trained_version - group.oldest_version > max_offpolicyness


def checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(cfg.trainer.checkpoint_dir or Path(cfg.fileroot) / cfg.experiment_name / cfg.trial_name / "checkpoints")


@dataclass
class LoopStats:
    steps: int = 0
    groups_trained: int = 0
    groups_dropped_stale: int = 0
    last: dict[str, float] = field(default_factory=dict)


class _Metrics:
    """Prometheus side of the per-step metrics (declared lazily so importing this module registers nothing)."""

    def __init__(self) -> None:
        from asyncgrpo.utils.metrics import counter, gauge, histogram

        self.step = gauge("trainer_step_metric", "Last training step's metrics by name (loss, reward_mean, clip_frac, ...)", ["name"])
        self.version = gauge("trainer_policy_version", "Policy version (optimizer steps taken)")
        self.trained = counter("trainer_groups_trained_total", "Groups trained")
        self.dropped = counter("trainer_groups_dropped_stale_total", "Groups dropped as too stale (prompt re-queued)")
        self.tokens = counter("trainer_tokens_total", "Tokens (prompt + completion) trained")
        self.staleness = histogram("trainer_sample_staleness", "Staleness of trained samples (version - oldest token version)",
                                   buckets=(0, 1, 2, 3, 4, 8, 16))
        self.step_time = histogram("trainer_step_seconds", "Seconds per training step", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))

    def record(self, stats: dict[str, float], batch: Batch, version: int) -> None:
        for k, v in stats.items():
            self.step.labels(name=k).set(v)
        self.version.set(version)
        self.trained.inc(batch.n_groups)
        self.tokens.inc(sum(len(s.prompt_ids) + len(s.completion_ids) for s in batch.samples))
        for s in batch.samples:
            if s.token_versions:
                self.staleness.observe(version - 1 - min(s.token_versions))
        self.step_time.observe(stats["step_time_s"])


class TrainerService:
    """Runs on every rank; `queue` / `state` / `weight_sink` are used on global rank 0 only."""

    def __init__(self, cfg: RunConfig, trainer: GRPOTrainer, queue: Any = None, state: Any = None,
                 weight_sink: WeightSink | None = None, consumer: str = "trainer-0") -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.queue = queue
        self.state = state
        self.weight_sink = weight_sink
        self.consumer = consumer
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if self.rank == 0 and (queue is None or state is None):
            raise ValueError("rank 0 needs the group queue and the run state")
        self.stop_requested = False
        self.stats = LoopStats()
        self.metrics = _Metrics()
        self._pending: list[tuple[str, Any]] = []  # consumed, not yet trained or dropped
        self._replayed = False
        self._saved_version = -1

    # -- lifecycle -----------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the latest checkpoint if any; returns the version to continue from."""
        from asyncgrpo.trainer.checkpoint import latest_checkpoint, load_checkpoint

        step_dir = latest_checkpoint(checkpoint_dir(self.cfg))
        if step_dir is not None:
            load_checkpoint(self.trainer, step_dir)
            log.info("resumed from %s at version %d", step_dir, self.trainer.version)
        if self.rank == 0:
            self.state.set_version(self.trainer.version)
        return self.trainer.version

    def install_signal_handlers(self) -> None:
        def _stop(signum: int, _frame: Any) -> None:
            log.info("signal %d: stopping after the current step", signum)
            self.stop_requested = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)

    # -- rank 0: collecting a batch ------------------------------------------------------------------
    def _admit(self, entries: list[tuple[str, Any]]) -> None:
        bound = self.cfg.rollout.max_head_offpolicyness
        stale = [e for e in entries if is_stale(e[1], self.trainer.version, bound)]
        fresh = [e for e in entries if not is_stale(e[1], self.trainer.version, bound)]
        if stale:
            n = self.queue.drop_stale(stale)
            self.stats.groups_dropped_stale += n
            self.metrics.dropped.inc(n)
            log.info("dropped %d stale groups (trainer version %d, bound %d)", n, self.trainer.version, bound)
        G = self.cfg.actor.group_size
        for e in fresh:
            if len(e[1].completions) != G:
                raise ValueError(f"group {e[1].group_id} has {len(e[1].completions)} completions, actor.group_size is {G}; "
                                 "the rollout and trainer configs must agree")
        self._pending.extend(fresh)

    def _collect(self, deadline: float | None) -> list[tuple[str, Any]] | None:
        """Block until a full batch is pending (None if stopping or past the deadline)."""
        bs = self.cfg.train_dataset.batch_size
        if not self._replayed:
            self._admit(self.queue.consume_own_pending(self.consumer, count=1000))
            self._replayed = True
        # Groups may have gone stale while waiting for the rest of the batch.
        if self._pending:
            keep = self._pending
            self._pending = []
            self._admit(keep)
        while len(self._pending) < bs:
            if self.stop_requested or (deadline is not None and time.monotonic() > deadline):
                return None
            block = int(self.cfg.trainer.poll_timeout_s * 1000)
            self._admit(self.queue.consume(self.consumer, count=bs - len(self._pending), block_ms=block))
        batch, self._pending = self._pending[:bs], self._pending[bs:]
        return batch

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

    def run(self, max_steps: int | None = None, idle_timeout_s: float | None = None) -> LoopStats:
        """Train until stopped, `max_steps` steps were taken in this call, or (if given) no full batch
        arrived for idle_timeout_s seconds."""
        from asyncgrpo.trainer.checkpoint import save_checkpoint

        t = self.cfg.trainer
        max_steps = max_steps if max_steps is not None else t.max_steps
        taken = 0
        while max_steps is None or taken < max_steps:
            entries = None
            if self.rank == 0:
                deadline = time.monotonic() + idle_timeout_s if idle_timeout_s is not None else None
                entries = self._collect(deadline)
            payload = None if entries is None else [group_to_samples(g) for _, g in entries]
            payload = self._broadcast(payload if self.rank == 0 else None)
            if payload is None:
                break
            batch = Batch([s for group in payload for s in group])
            stats = self.trainer.train_step(batch)
            version = self.trainer.version
            if self.rank == 0:
                self.queue.ack([m for m, _ in entries])
                self.state.set_version(version)
                self.metrics.record(stats, batch, version)
                log.info("step %d: loss %.4f reward %.3f clip %.3f grad_norm %.3f %.0f tok/s", version, stats["loss"],
                         stats["reward_mean"], stats.get("clip_frac", 0.0), stats["grad_norm"], stats["tokens_per_s"])
            self._publish()
            self.stats.steps += 1
            taken += 1
            self.stats.groups_trained += batch.n_groups
            self.stats.last = stats
            if t.checkpoint_interval and version % t.checkpoint_interval == 0:
                save_checkpoint(self.trainer, checkpoint_dir(self.cfg), {"version": version}, keep=t.keep_checkpoints)
                self._saved_version = version
            if t.hf_save_interval and version % t.hf_save_interval == 0:
                from asyncgrpo.trainer.model import save_hf_checkpoint

                save_hf_checkpoint(self.trainer.model, self.trainer.arch, self.cfg.actor.path,
                                   checkpoint_dir(self.cfg).parent / "hf" / f"version_{version}")
            stop = self._broadcast(self.stop_requested if self.rank == 0 else None)
            if stop:
                break
        # A clean stop checkpoints too, so a restart continues exactly where this run ended.
        if t.checkpoint_interval and self.stats.steps and self._saved_version != self.trainer.version:
            save_checkpoint(self.trainer, checkpoint_dir(self.cfg), {"version": self.trainer.version}, keep=t.keep_checkpoints)
            self._saved_version = self.trainer.version
        if self.rank == 0 and self._pending:
            log.info("%d consumed groups left unacknowledged; a restart re-reads them", len(self._pending))
        return self.stats
