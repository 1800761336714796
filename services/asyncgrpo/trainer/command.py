"""`asyncgrpo trainer --config run.yaml [--trainer.tensor_parallel_size=2 ...]`: train the policy on the
scored groups in Redis. World size 1 by default; under `torchrun --nproc-per-node N -m asyncgrpo.cli
trainer ...` it runs TP x DP over N processes (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from asyncgrpo.config.command import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop once the policy version reaches this (overrides trainer.max_steps; resumes count)")
    parser.add_argument("--idle-timeout-s", type=float, default=None,
                        help="exit when no full batch arrived for this long (default: wait forever)")
    parser.add_argument("--no-weight-sync", action="store_true", help="do not publish new weights to the weight-sync service")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from asyncgrpo.config import ConfigError, load_config
    from asyncgrpo.utils.logging import setup_logging
    from asyncgrpo.utils.metrics import serve_metrics

    setup_logging("trainer")
    log = logging.getLogger("asyncgrpo.trainer")
    # megatron-core logs every DDP bucket and optimizer field at INFO and warns about the missing
    # Apex / Transformer Engine on every CPU start: keep the trainer's own log readable.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\..*")
    cfg = load_config(args.config, overrides)
    if not cfg.actor.path or not (Path(cfg.actor.path) / "config.json").exists():
        raise ConfigError(f"actor.path {cfg.actor.path!r} is not an HF checkpoint directory (no config.json); set actor.path")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    import torch.distributed as dist

    from asyncgrpo.queue import Claim, GroupQueue, RedisGuard, RedisUnavailable, RoleTaken, RunState, make_redis
    from asyncgrpo.queue.run_control import RunControl, redacted_config
    from asyncgrpo.trainer.model import destroy_parallel
    from asyncgrpo.trainer.service import TrainerService
    from asyncgrpo.trainer.train_step import GRPOTrainer

    try:
        trainer = GRPOTrainer(cfg)
    except ValueError as e:  # bad sizes or paths in the config: one clear line
        raise ConfigError(str(e)) from None
    rank = dist.get_rank()
    queue = state = publisher = claim = service = control = None
    guard = RedisGuard(cfg.redis.url, cfg.redis.outage_deadline_s)
    try:
        if rank == 0:
            # One client: its socket timeout exceeds the XREADGROUP block of trainer.poll_timeout_s.
            client = make_redis(cfg.redis.url, max_block_s=cfg.trainer.poll_timeout_s)
            guard.wait_reachable(client)
            claim = Claim(client, cfg.run_id, "trainer", guard)
            try:  # one live trainer per run (waits for a killed predecessor's claim to lapse)
                claim.acquire()
            except RoleTaken as e:
                raise ConfigError(str(e)) from None
            queue = GroupQueue(client, cfg.run_id, max_message_bytes=cfg.rollout.max_message_bytes)
            state = RunState(client, cfg.run_id)
            control = RunControl(client, cfg.run_id)
            guard.call(control.register, redacted_config(cfg))
            serve_metrics(cfg.trainer.metrics_port, cfg.bind_host)
            if not args.no_weight_sync:
                from asyncgrpo.weight_sync.publisher import WeightPublisher
                from asyncgrpo.weight_sync.snapshot import SnapshotInUse

                try:
                    publisher = WeightPublisher.from_config(cfg)
                except SnapshotInUse as e:
                    raise ConfigError(str(e)) from None
        service = TrainerService(cfg, trainer, queue, state, weight_sink=publisher.publish if publisher else None,
                                 guard=guard, claim=claim, control=control)
        service.install_signal_handlers()
        service.start_heartbeat()
        version = service.resume()
        log.info("trainer %s: world %d, TP %d, version %d, batch %d groups x G=%d", cfg.run_id, dist.get_world_size(),
                 cfg.trainer.tensor_parallel_size, version, cfg.train_dataset.batch_size, cfg.actor.group_size)
        target = args.max_steps if args.max_steps is not None else cfg.trainer.max_steps
        if target is not None and version >= target:
            log.info("already at version %d (max steps %d): nothing to train", version, target)
        stats = service.run(max_steps=None if target is None else max(0, target - version),
                            idle_timeout_s=args.idle_timeout_s)
        if rank == 0:
            service.mark_stopped()
    except RedisUnavailable as e:
        log.error("%s; stopping (the groups trained since the last checkpoint are replayed on restart)", e)
        return 3
    finally:
        if publisher is not None:
            publisher.close()
        if claim is not None:
            if service is not None:
                service.stop_heartbeat()
            claim.release()
        destroy_parallel()
    if service.fenced:
        return 4
    log.info("trainer done: %d steps, %d groups trained, %d dropped as stale, %d dead-lettered, version %d", stats.steps,
             stats.groups_trained, stats.groups_dropped_stale, stats.groups_dead_lettered, trainer.version)
    return 0
