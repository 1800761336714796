"""`asyncgrpo reward-server --model PATH --port N`: serve an HF reward model, sequence classification (ORM) or token
classification (PRM)."""

from __future__ import annotations

import argparse
import logging
import sys

from asyncgrpo.utils.auth import ENV_ADMIN_API_KEY, ENV_API_KEY
from asyncgrpo.utils.cli import add_threads_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--model-path", dest="model", required=True,
                   help="HF checkpoint directory of a *ForSequenceClassification model (an ORM: /classify) or a "
                        "*ForTokenClassification model (a PRM: /score_steps)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to serve other machines: needs a key)")
    p.add_argument("--port", type=int, default=30010, help="HTTP port")
    p.add_argument("--max-batch-size", type=int, default=32, help="most sequences scored in one forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="once a request waits, how long to wait for more to fill the batch")
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="a request not scored by then answers 504")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    add_threads_argument(p)
    p.add_argument("--served-model-name", default=None, help="name reported by /model_info (default: the path)")
    p.add_argument("--api-key", default=None, help=f"bearer token /classify needs, as SGLang's (default: ${ENV_API_KEY})")
    p.add_argument("--admin-api-key", default=None, help=f"accepted as SGLang's (default: ${ENV_ADMIN_API_KEY}); no admin endpoints here")


def load_reward_model(path: str, dtype: str = "float32", device: str = "cpu"):  # type: ignore[no-untyped-def]
    """The model and tokenizer; a checkpoint that is not a sequence-classification model is a clear error."""
    import json
    from pathlib import Path

    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    cfg = json.loads((Path(path) / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if any(a.endswith("ForTokenClassification") for a in archs):
        model = AutoModelForTokenClassification.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
        return model, AutoTokenizer.from_pretrained(path)
    if not any(a.endswith("ForSequenceClassification") or a.endswith("ForRewardModel") for a in archs):
        raise ValueError(f"--model {path!r} is a {archs or 'model with no architectures'} checkpoint, not a reward "
                         "model: give a sequence-classification (ORM, e.g. Qwen2ForSequenceClassification) or "
                         "token-classification (PRM, Qwen2ForTokenClassification) checkpoint")
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    return model, AutoTokenizer.from_pretrained(path)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from pathlib import Path

    from asyncgrpo.utils.auth import resolve_keys, unprotected_listener

    api_key, admin_api_key = resolve_keys(args.api_key, args.admin_api_key)
    problem = unprotected_listener("reward-server", args.host, api_key, admin_api_key, "--api-key")
    if problem is None and not (Path(args.model) / "config.json").is_file():
        problem = f"asyncgrpo reward-server: --model {args.model!r} is not an HF checkpoint directory (no config.json)"
    if problem is None and args.max_batch_size < 1:
        problem = f"asyncgrpo reward-server: --max-batch-size {args.max_batch_size} must be >= 1"
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2

    import torch
    import uvicorn

    from asyncgrpo.reward_server.app import create_app
    from asyncgrpo.reward_server.scorer import Scorer
    from asyncgrpo.utils.logging import setup_logging

    log = setup_logging("reward-server")
    torch.set_num_threads(args.threads)
    try:
        model, tok = load_reward_model(args.model, args.dtype, args.device)
        scorer = Scorer(model, tok, max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000)
    except ValueError as e:
        print(f"asyncgrpo reward-server: {e}", file=sys.stderr)
        return 2
    app = create_app(scorer, model_path=args.model, served_model_name=args.served_model_name,
                     request_timeout_s=args.request_timeout_s, api_key=api_key, admin_api_key=admin_api_key)
    log.info("reward-server: %s %s on http://%s:%d (%d labels, max batch %d, %s, auth: %s)",
             "process (PRM, /score_steps)" if scorer.process else "outcome (ORM, /classify)", args.model, args.host,
             args.port, scorer.num_labels, args.max_batch_size, args.dtype, "api key" if api_key else "none")
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)
    return 0
