"""`asyncgrpo genserver --model PATH --port N`: serve an HF causal LM over SGLang's HTTP API subset."""

from __future__ import annotations

import argparse
import logging
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--model-path", dest="model", required=True, help="HF checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=30000, help="HTTP port (SGLang's default is 30000)")
    p.add_argument("--max-batch-size", type=int, default=64, help="most requests decoded together (SGLang: max_running_requests)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--weight-version", default="default", help="initial weight_version label")
    p.add_argument("--dist-timeout-s", type=float, default=600.0, help="timeout of every weight-sync collective")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1), help="torch intra-op threads")
    p.add_argument("--served-model-name", default=None, help="name reported by /model_info (default: the path)")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch
    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyncgrpo.genserver.app import create_app
    from asyncgrpo.genserver.engine import Engine
    from asyncgrpo.utils.logging import setup_logging

    log = setup_logging("genserver")
    torch.set_num_threads(max(1, args.threads))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device)
    tok = AutoTokenizer.from_pretrained(args.model)
    engine = Engine(model, tok, model_path=str(args.model), max_batch_size=args.max_batch_size,
                    weight_version=args.weight_version)
    app = create_app(engine, host=args.host, port=args.port, dist_timeout_s=args.dist_timeout_s,
                     served_model_name=args.served_model_name)
    log.info("genserver: %s on http://%s:%d (max batch %d, %s)", args.model, args.host, args.port,
             args.max_batch_size, args.dtype)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)
    return 0
