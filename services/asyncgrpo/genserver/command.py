"""`asyncgrpo genserver --model PATH --port N`: serve an HF causal LM over SGLang's HTTP API subset."""

from __future__ import annotations

import argparse
import logging
import sys

from asyncgrpo.utils.auth import ENV_ADMIN_API_KEY, ENV_API_KEY
from asyncgrpo.utils.cli import add_threads_argument, at_least_one


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--model-path", dest="model", required=True, help="HF checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to serve other machines: needs a key)")
    p.add_argument("--port", type=int, default=30000, help="HTTP port (SGLang's default is 30000)")
    p.add_argument("--num-continuous-decode-steps", type=at_least_one, default=1,
                   help="decode steps between admissions of waiting requests (SGLang's flag): fewer, larger prefills")
    p.add_argument("--max-batch-size", type=at_least_one, default=128, help="most requests decoded together (SGLang: max_running_requests)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (bfloat16 on a GPU; log-probs are computed in fp32 from the logits either way)")
    p.add_argument("--device", default="cpu",
                   help="torch device (cpu, cuda, cuda:N): model, KV cache and sampling generators all live there")
    p.add_argument("--weight-version", default="default", help="initial weight_version label")
    p.add_argument("--dist-timeout-s", type=float, default=600.0,
                   help="timeout of every weight-sync rendezvous and collective, and of a load from disk")
    add_threads_argument(p)
    p.add_argument("--served-model-name", default=None, help="name reported by /model_info (default: the path)")
    p.add_argument("--api-key", default=None,
                   help=f"bearer token every endpoint but /health* and /metrics needs, as SGLang's (default: ${ENV_API_KEY})")
    p.add_argument("--admin-api-key", default=None,
                   help="bearer token the admin endpoints (weight updates, pause/continue, abort, flush_cache) need, as "
                        f"SGLang's (default: ${ENV_ADMIN_API_KEY})")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from pathlib import Path

    from asyncgrpo.utils.auth import resolve_keys, unprotected_listener

    api_key, admin_api_key = resolve_keys(args.api_key, args.admin_api_key)
    # before loading anything: a misconfigured server fails in a second, with one line
    problem = unprotected_listener("genserver", args.host, api_key, admin_api_key, "--api-key/--admin-api-key")
    if problem is None and not (Path(args.model) / "config.json").is_file():
        problem = f"asyncgrpo genserver: --model {args.model!r} is not an HF checkpoint directory (no config.json)"
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2

    import torch
    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyncgrpo.genserver.app import create_app
    from asyncgrpo.genserver.engine import Engine
    from asyncgrpo.utils.logging import setup_logging

    log = setup_logging("genserver")
    if not (api_key or admin_api_key):
        log.warning("genserver: no --api-key/--admin-api-key: every endpoint on %s:%d is open to local users",
                    args.host, args.port)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        print(f"asyncgrpo genserver: --device {args.device!r}: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"asyncgrpo genserver: --device {args.device} but torch sees no GPU (torch {torch.__version__}, "
                  f"cuda {torch.version.cuda}); use --device cpu", file=sys.stderr)
            return 2
        if device.index is not None:
            torch.cuda.set_device(device)  # this thread's current device (the engine thread sets its own)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
    tok = AutoTokenizer.from_pretrained(args.model)
    engine = Engine(model, tok, model_path=str(args.model), max_batch_size=args.max_batch_size,
                    weight_version=args.weight_version, num_continuous_decode_steps=args.num_continuous_decode_steps)
    app = create_app(engine, host=args.host, port=args.port, dist_timeout_s=args.dist_timeout_s,
                     served_model_name=args.served_model_name, api_key=api_key, admin_api_key=admin_api_key)
    where = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
    log.info("genserver: %s on http://%s:%d (max batch %d, %s on %s (%s), vocab %d, auth: %s)", args.model, args.host,
             args.port, args.max_batch_size, args.dtype, engine.device, where, engine.vocab_size,
             "+".join(k for k, v in (("api key", api_key), ("admin key", admin_api_key)) if v) or "none")
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)
    return 0
