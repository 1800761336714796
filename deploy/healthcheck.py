"""HEALTHCHECK of the asyncgrpo images (Docker) and their exec probes (Kubernetes).

Default: GET $ASYNCGRPO_HEALTH_URL must answer 200 within 4 s. Each service points it at its own endpoint
(/health of genserver, weight-sync and control plane; /metrics of the trainer and rollout, which serve no
/health). Unset: the command has no endpoint (prepare, a CLI) and the container's liveness is its process.
ASYNCGRPO_HEALTH_INDEX=K (with ASYNCGRPO_RUN_ON_INDEX, see entrypoint.sh): only the pod of index K has the
endpoint, the others pass.

`--weight-sync-ready`: the readiness gate of a generation server (the Helm chart's register sidecar runs it as
its readinessProbe, so the pod is Ready, and the router routes to it, only once weight-sync has synced it).
GET $WEIGHT_SYNC_URL/servers and pass only when $SERVER_URL is listed with "ready": true. The request carries
the api key (ASYNCGRPO_API_KEY, or the file ASYNCGRPO_API_KEY_FILE names; the admin key when there is no api
key), as weight-sync's ordinary endpoints want. A server listed as not ready (joining, or dropped after a failed
update) fails. When weight-sync cannot answer (restarting, its trainer pod not scheduled) or does not list the
server yet (a restarted weight-sync before the sidecar registers it again), the last answer stands: a server
that was ready stays ready, one that never was stays out. The last answer is kept in $ASYNCGRPO_READY_STATE
(default /tmp/asyncgrpo-weight-sync-ready); ASYNCGRPO_READY_KEEP=0 makes those cases fail instead.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request


def key(name: str) -> str | None:
    """A key from the environment, or from the file NAME_FILE names (the entrypoint does not run for probes)."""
    value = os.environ.get(name)
    if value:
        return value
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError:
            return None
    return None


def health() -> int:
    url = os.environ.get("ASYNCGRPO_HEALTH_URL")
    only = os.environ.get("ASYNCGRPO_HEALTH_INDEX") or os.environ.get("ASYNCGRPO_RUN_ON_INDEX")
    index = os.environ.get("ASYNCGRPO_POD_INDEX") or os.environ.get("JOB_COMPLETION_INDEX")
    if not url or (only and index is not None and index != only):
        return 0
    try:
        with urllib.request.urlopen(url, timeout=4) as r:  # noqa: S310 - a URL the deployment configures
            return 0 if r.status == 200 else 1
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy", said in one line
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1


def weight_sync_ready() -> int:
    server = os.environ["SERVER_URL"].rstrip("/")
    ws = os.environ["WEIGHT_SYNC_URL"].rstrip("/")
    state = os.environ.get("ASYNCGRPO_READY_STATE", "/tmp/asyncgrpo-weight-sync-ready")  # noqa: S108 - the container's own /tmp
    keep = os.environ.get("ASYNCGRPO_READY_KEEP", "1") not in ("0", "false", "no", "")
    token = key("ASYNCGRPO_API_KEY") or key("ASYNCGRPO_ADMIN_API_KEY")
    req = urllib.request.Request(f"{ws}/servers", headers={"Authorization": f"Bearer {token}"} if token else {})

    def set_state(ready: bool) -> None:
        try:
            if ready:
                with open(state, "w", encoding="utf-8") as f:
                    f.write(server)
            elif os.path.exists(state):
                os.remove(state)
        except OSError as e:
            print(f"cannot keep the readiness state in {state}: {e}", file=sys.stderr)

    def last(why: str) -> int:
        was = keep and os.path.exists(state)
        print(f"{why}; {'was ready: stays ready' if was else 'not ready'}", file=sys.stderr)
        return 0 if was else 1

    try:
        with urllib.request.urlopen(req, timeout=4) as r:  # noqa: S310 - a URL the deployment configures
            members = json.load(r)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # a wrong key is a configuration error, never "unknown"
            set_state(False)
            print(f"not ready: weight-sync {ws} refuses the key ({e.code})", file=sys.stderr)
            return 1
        return last(f"weight-sync {ws} answered {e.code}")
    except Exception as e:  # noqa: BLE001 - unreachable, timeout, a body that is not JSON
        return last(f"weight-sync {ws} unreachable ({type(e).__name__}: {e})")
    mine = [m for m in members if isinstance(m, dict) and str(m.get("url", "")).rstrip("/") == server]
    if not mine:
        return last(f"{server} is not registered with weight-sync {ws} (yet)")
    if mine[0].get("ready") is True:
        set_state(True)
        return 0
    set_state(False)
    print(f"not ready: weight-sync {ws} has {server} {mine[0].get('state')!r} (version {mine[0].get('version')})",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(weight_sync_ready() if sys.argv[1:] == ["--weight-sync-ready"] else health())
