"""`asyncgrpo runs | status RUN | pause RUN | resume RUN | drain RUN | stop RUN | set RUN KEY=VALUE ...`:
the control plane's REST API from a shell. The address is --url (default: env ASYNCGRPO_CONTROL_URL, else
http://127.0.0.1:30200); the token comes from ASYNCGRPO_CONTROL_TOKEN. RUN is experiment/trial."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from typing import Any

ENV_URL = "ASYNCGRPO_CONTROL_URL"
DEFAULT_URL = "http://127.0.0.1:30200"


def _common(parser: argparse.ArgumentParser, run: bool = True) -> None:
    parser.add_argument("--url", default=os.environ.get(ENV_URL, DEFAULT_URL),
                        help=f"control plane address (env {ENV_URL}; default {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
    if run:
        parser.add_argument("run", metavar="RUN", help="experiment/trial")


def _request(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    import httpx

    from asyncgrpo.control.api import ENV_CONTROL_TOKEN

    headers = {"x-asyncgrpo-actor": getpass.getuser()}
    token = os.environ.get(ENV_CONTROL_TOKEN)
    if token:
        headers["authorization"] = f"Bearer {token}"
    try:
        r = httpx.request(method, args.url.rstrip("/") + path, json=body, headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise SystemExit(f"asyncgrpo: cannot reach the control plane at {args.url} ({e}); start it with "
                         "`asyncgrpo control --config RUN.yaml` or pass --url")
    try:
        data = r.json()
    except ValueError:
        data = {"message": r.text}
    if r.status_code >= 400:
        msg = data.get("message") if isinstance(data, dict) else None
        raise SystemExit(f"asyncgrpo: {r.status_code}: {msg or data}")
    return data


def _run_path(run: str) -> str:
    exp, sep, trial = run.partition("/")
    if not sep or not exp or not trial or "/" in trial:
        raise SystemExit(f"asyncgrpo: RUN {run!r} must be experiment/trial (see `asyncgrpo runs`)")
    return f"/v1/runs/{exp}/{trial}"


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0, time.time() - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def _print(args: argparse.Namespace, data: Any, text: str) -> int:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)
    return 0


def runs(args: argparse.Namespace) -> int:
    data = _request(args, "GET", "/v1/runs")
    lines = [f"{'RUN':<40} {'STATUS':<9} {'VERSION':>7}  UPDATED"]
    lines += [f"{r['run_id']:<40} {r['status']:<9} {r['version']:>7}  {_ago(r['updated_at'])}" for r in data]
    return _print(args, data, "\n".join(lines) if data else "no runs registered")


def status(args: argparse.Namespace) -> int:
    d = _request(args, "GET", _run_path(args.run))
    i = _request(args, "GET", _run_path(args.run) + "/inspect")
    last = i["steps"][-1] if i["steps"] else {}
    lines = [
        f"run {d['run_id']}: {d['status']} (trainer {d['trainer_state']}{'' if d['trainer_alive'] else ', not running'})",
        f"version {d['version']}" + (f" of {d['max_steps']}" if d.get("max_steps") else "") + f", updated {_ago(d['updated_at'])}",
        f"queue {i['queue_depth']} (waiting {i['waiting_groups']}, running {i['running_groups']}), "
        f"dead letters {i['dead_letters']['count']} {i['dead_letters']['by_kind'] or ''}",
        f"staleness of queued groups {i['staleness_histogram'] or '{}'}, stale drops {i['counters'].get('stale_requeued', 0)}",
        "knobs " + ", ".join(f"{k}={v}" for k, v in d["knobs"].items()),
    ]
    if last:
        lines.append(f"last step {last.get('version')}: reward {last.get('reward_mean', float('nan')):.3f} "
                     f"loss {last.get('loss', float('nan')):.4f} {last.get('tokens_per_s', 0):.0f} tok/s")
    for s in d["servers"]:
        lines.append(f"server {s['url']}: " + (f"healthy, version {s['weight_version']}, running {s['running_requests']}"
                                               if s["healthy"] else f"DOWN ({s['error']})"))
    return _print(args, {"run": d, "inspect": i}, "\n".join(lines))


def action(args: argparse.Namespace) -> int:
    d = _request(args, "POST", f"{_run_path(args.run)}/{args.command}")
    return _print(args, d, f"run {d['run_id']}: {d['action']} -> {d['status']}")


def set_knobs(args: argparse.Namespace) -> int:
    import yaml

    knobs: dict[str, Any] = {}
    for kv in args.assignments:
        key, sep, raw = kv.partition("=")
        if not sep or not key:
            raise SystemExit(f"asyncgrpo set: {kv!r} must be KEY=VALUE, e.g. actor.temperature=0.8")
        knobs[key] = yaml.safe_load(raw)
    d = _request(args, "PATCH", f"{_run_path(args.run)}/knobs", {"knobs": knobs})
    text = "\n".join(f"{c['key']}: {c['old']} -> {c['new']}" for c in d["changes"]) or "no change"
    return _print(args, d, text)


COMMANDS = {
    "runs": ("List the runs the control plane knows.", runs, False),
    "status": ("Show a run: status, version, queue, staleness, knobs, servers.", status, True),
    "pause": ("Pause a run: no new groups; the trainer stops at a step boundary.", action, True),
    "resume": ("Resume a paused run.", action, True),
    "drain": ("Finish what is admitted, then stop.", action, True),
    "stop": ("Stop a run after the current step.", action, True),
    "set": ("Change live knobs: asyncgrpo set RUN actor.temperature=0.8 ...", set_knobs, True),
}


def main(command: str, argv: list[str]) -> int:
    doc, fn, takes_run = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"asyncgrpo {command}", description=doc)
    _common(parser, takes_run)
    if command == "set":
        parser.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    args.command = command
    try:
        return fn(args)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        raise
