"""`asyncgrpo rollout --config run.yaml [--rollout.server_urls=[...]]`: sample G completions per prompt,
score them and stream the groups into Redis until the prompts run out (or forever, waiting for
re-queued prompts, unless rollout.exit_when_exhausted)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from asyncgrpo.config.command import add_config_arguments

    add_config_arguments(parser)


async def serve(cfg) -> int:  # type: ignore[no-untyped-def]
    """Run the service for a resolved RunConfig until done or signalled; returns an exit code."""
    import logging

    from asyncgrpo.queue import Claim, GroupQueue, RedisGuard, RunState, make_redis
    from asyncgrpo.rollout.dataset import PromptDataset, load_records, tokenizer_encoder
    from asyncgrpo.rollout.rewards import RewardRunner
    from asyncgrpo.rollout.service import RolloutParams, RolloutService
    from asyncgrpo.utils.auth import resolve_keys
    from asyncgrpo.utils.metrics import serve_metrics

    log = logging.getLogger("asyncgrpo.rollout")
    if not cfg.actor.path or not Path(cfg.actor.path).is_dir():
        from asyncgrpo.config import ConfigError

        raise ConfigError(f"actor.path {cfg.actor.path!r} is not a directory; set it to the policy's HF directory "
                          "(its tokenizer encodes the prompts)")
    try:  # the reward plug-ins import now, before anything starts: a bad import path is one line, not a traceback
        rewards = RewardRunner.from_config(cfg)
    except ValueError as e:
        from asyncgrpo.config import ConfigError

        raise ConfigError(str(e)) from None
    ds_cfg = cfg.train_dataset
    records = load_records(ds_cfg.path, ds_cfg.prompt_key, ds_cfg.answer_key)
    encode, decode = tokenizer_encoder(cfg.actor.path)
    from asyncgrpo.sglang.client import SGLangClient
    dataset = PromptDataset(records, encode, template=ds_cfg.prompt_template, prompt_key=ds_cfg.prompt_key,
                            answer_key=ds_cfg.answer_key, seed=cfg.seed, shuffle=ds_cfg.shuffle)
    r = cfg.rollout
    client = make_redis(cfg.redis.url)
    guard = RedisGuard(cfg.redis.url, cfg.redis.outage_deadline_s)
    await guard.acall(client.ping)
    params = RolloutParams.from_config(cfg)
    # one live process per worker_id: a second one would take this one's leases (waits for a killed one's to lapse)
    claim = Claim(client, cfg.run_id, f"rollout:{params.worker_id}", guard)
    await asyncio.to_thread(claim.acquire)
    from asyncgrpo.queue.run_control import RunControl

    state = RunState(client, cfg.run_id)
    queue = GroupQueue(client, cfg.run_id, max_message_bytes=r.max_message_bytes)
    serve_metrics(r.metrics_port, cfg.bind_host)
    async with contextlib.AsyncExitStack() as stack:
        api_key, admin_key = resolve_keys(cfg.auth.api_key, cfg.auth.admin_api_key)
        clients = [await stack.enter_async_context(SGLangClient(url, timeout_s=r.request_timeout_s, api_key=api_key,
                                                                admin_api_key=admin_key)) for url in r.server_urls]
        service = RolloutService(params, state=state, queue=queue, dataset=dataset, decode=decode, clients=clients,
                                 rewards=rewards, redis_url=cfg.redis.url, guard=guard, claim=claim,
                                 control=RunControl(client, cfg.run_id))
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()
        signals = 0

        def on_signal() -> None:
            # first signal: stop admitting, let running groups finish and be queued; second: cut them short
            # (their leases are handed back at once, so another process re-runs those prompts)
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("stopping: no new groups; running groups finish (signal again to abandon them)")
                service.stop()
                guard.stopping()
            elif main_task is not None:
                main_task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        log.info("rollout %s: %d prompts, G=%d, %d workers, servers %s", cfg.run_id, len(dataset),
                 cfg.actor.group_size, r.max_concurrent_rollouts, r.server_urls)
        try:
            stats = await service.run()
        except asyncio.CancelledError:
            log.info("rollout cut short; leases of unfinished groups handed back")
            return 130
        finally:
            rewards.close()
            claim.release()
        if service.fenced:
            return 4
        log.info("rollout done: %d groups pushed, %d filtered, %d failed, %d tokens, %d reward errors",
                 stats.groups_pushed, stats.groups_filtered, stats.groups_failed, stats.tokens, stats.reward_errors)
    return 0


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from asyncgrpo.config import load_config
    from asyncgrpo.utils.logging import setup_logging

    from asyncgrpo.config import ConfigError
    from asyncgrpo.queue import CursorMismatchError, RedisUnavailable, RoleTaken
    from asyncgrpo.tasks.jsonl import TaskDataError

    log = setup_logging("rollout")
    cfg = load_config(args.config, overrides)
    try:
        return asyncio.run(serve(cfg))
    except (TaskDataError, CursorMismatchError, RoleTaken) as e:  # the user's data or run, not a bug: one clear line
        raise ConfigError(str(e)) from None
    except RedisUnavailable as e:
        log.error("%s; stopping (leases of unfinished groups are taken back when this worker_id restarts)", e)
        return 3
