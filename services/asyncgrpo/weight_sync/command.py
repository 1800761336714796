"""`asyncgrpo weight-sync --config run.yaml`: broadcast each new policy version to the generation servers.

Runs on the trainer's host (it maps the trainer's /dev/shm snapshot); serves its HTTP API on
weight_sync.host:port until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from asyncgrpo.config.command import add_config_arguments

    add_config_arguments(parser)


async def serve(settings) -> int:  # type: ignore[no-untyped-def]
    import logging

    import uvicorn

    from asyncgrpo.utils.metrics import serve_metrics
    from asyncgrpo.weight_sync.api import build_app
    from asyncgrpo.weight_sync.service import WeightSyncService

    log = logging.getLogger("asyncgrpo.weight_sync")
    service = WeightSyncService(settings)
    server = uvicorn.Server(uvicorn.Config(build_app(service, settings.api_key, settings.admin_api_key),
                                           host=settings.host, port=settings.port,
                                           log_level="warning", lifespan="off"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    serve_metrics(settings.metrics_port, settings.host)
    await service.start()
    api = asyncio.create_task(server.serve())
    log.info("weight-sync on %s (backend %s, dtype %s, buckets %.3g MiB, snapshot %s), servers %s, disk servers %s, tensor servers %s",
             settings.service_url, settings.backend, settings.wire_dtype or "as published", settings.bucket_bytes / 2**20,
             settings.snapshot_dir, settings.servers, settings.disk_servers, settings.tensor_servers)
    done, _ = await asyncio.wait([api, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await service.stop()
    await api
    return 0 if api not in done or api.exception() is None else 1


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from asyncgrpo.config import load_config
    from asyncgrpo.utils.logging import setup_logging
    from asyncgrpo.weight_sync.settings import resolve

    from asyncgrpo.config import ConfigError
    from asyncgrpo.weight_sync.snapshot import SnapshotInUse

    from asyncgrpo.utils.auth import unprotected_listener

    setup_logging("weight-sync")
    torch.set_num_threads(1)
    settings = resolve(load_config(args.config, overrides))
    problem = unprotected_listener("weight-sync", settings.host, settings.api_key, settings.admin_api_key,
                                   "--auth.api_key/--auth.admin_api_key")
    if problem is not None:
        raise ConfigError(problem.removeprefix("asyncgrpo weight-sync: "))
    try:
        code = _run_until_stopped(serve(settings))
    except SnapshotInUse as e:
        raise ConfigError(str(e)) from None
    return code


def _run_until_stopped(main: Any) -> int:
    """Run the service; once it has stopped (tasks cancelled, group torn down, snapshot released), exit even if
    a worker thread is still blocked in a native gloo/NCCL call: a rendezvous or collective with a peer that died
    cannot be interrupted and would hold the process for its whole timeout (asyncio.run joins those threads)."""
    import logging
    import os
    import threading

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    code = loop.run_until_complete(main)
    loop.run_until_complete(loop.shutdown_asyncgens())
    blocked = [t.name for t in threading.enumerate() if t is not threading.current_thread() and t.is_alive() and not t.daemon]
    if blocked:
        logging.getLogger("asyncgrpo.weight_sync").info(
            "stopped; not waiting for %d thread(s) still inside a collective or rendezvous (%s)", len(blocked),
            ", ".join(blocked[:4]))
        logging.shutdown()
        os._exit(code)
    loop.close()
    return code
