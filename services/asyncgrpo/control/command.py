"""`asyncgrpo control --config run.yaml`: serve the control plane (REST /v1, dashboard at /, /metrics).

It reads every run registered in the config's Redis (redis.url); the config gives it its address
(control.host / control.port), its token (control.token or ASYNCGRPO_CONTROL_TOKEN) and the generation servers'
api key for asking them their state. Stateless: stop and start it at any time.
"""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from asyncgrpo.config.command import add_config_arguments

    add_config_arguments(parser)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    import logging

    import uvicorn

    from asyncgrpo.config import ConfigError, load_config
    from asyncgrpo.control.api import ENV_CONTROL_TOKEN, create_app, resolve_token
    from asyncgrpo.control.handlers import ControlPlane
    from asyncgrpo.queue import make_redis
    from asyncgrpo.queue.connection import redact
    from asyncgrpo.utils.auth import resolve_keys
    from asyncgrpo.utils.logging import setup_logging
    from asyncgrpo.utils.net import is_loopback

    setup_logging("control")
    log = logging.getLogger("asyncgrpo.control")
    cfg = load_config(args.config, overrides)
    c = cfg.control
    token = resolve_token(c.token)
    if not is_loopback(c.host) and token is None:
        raise ConfigError(f"asyncgrpo control: refusing to serve on {c.host} without a token: set control.token or "
                          f"{ENV_CONTROL_TOKEN}, or bind 127.0.0.1")
    api_key, _ = resolve_keys(cfg.auth.api_key, cfg.auth.admin_api_key)
    plane = ControlPlane(make_redis(cfg.redis.url), server_timeout_s=c.server_timeout_s, api_key=api_key)
    app = create_app(plane, token=token, protect_reads=c.protect_reads)
    log.info("control plane on http://%s:%d (Redis %s); mutations %s", c.host, c.port, redact(cfg.redis.url),
             "need the token" if token else f"disabled (no {ENV_CONTROL_TOKEN})")
    import asyncio
    import signal

    from asyncgrpo.control.grpc_api import RunServicer, start_grpc

    _, admin_key = resolve_keys(cfg.auth.api_key, cfg.auth.admin_api_key)  # api_key: resolved above

    async def serve() -> int:
        server = uvicorn.Server(uvicorn.Config(app, host=c.host, port=c.port, log_level="warning", lifespan="off"))
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        grpc_server = None
        if c.grpc_port:
            servicer = RunServicer(plane, token=token, redis_url=cfg.redis.url, api_key=api_key,
                                   admin_api_key=admin_key, protect_reads=c.protect_reads)
            grpc_server = await start_grpc(servicer, c.host, c.grpc_port)
            log.info("gRPC (asyncgrpo.v1.RunService, FleetService) on %s:%d", c.host, c.grpc_port)
        api = asyncio.create_task(server.serve())
        done, _ = await asyncio.wait([api, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        if grpc_server is not None:
            await grpc_server.stop(grace=2.0)
        await api
        return 0 if api not in done or api.exception() is None else 1

    return asyncio.run(serve())
