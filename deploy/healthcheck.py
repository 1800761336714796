"""HEALTHCHECK of the asyncgrpo images (Docker) and their exec probes (Kubernetes): GET $ASYNCGRPO_HEALTH_URL
must answer 200 within 4 s. Each service points it at its own endpoint (/health of genserver, weight-sync and
control plane; /metrics of the trainer and rollout, which serve no /health). Unset: the command has no
endpoint (prepare, a CLI) and the container's liveness is its process. ASYNCGRPO_HEALTH_INDEX=K (with
ASYNCGRPO_RUN_ON_INDEX, see entrypoint.sh): only the pod of index K has the endpoint, the others pass."""

import os
import sys
import urllib.request

url = os.environ.get("ASYNCGRPO_HEALTH_URL")
only = os.environ.get("ASYNCGRPO_HEALTH_INDEX") or os.environ.get("ASYNCGRPO_RUN_ON_INDEX")
index = os.environ.get("ASYNCGRPO_POD_INDEX") or os.environ.get("JOB_COMPLETION_INDEX")
if not url or (only and index is not None and index != only):
    sys.exit(0)
try:
    with urllib.request.urlopen(url, timeout=4) as r:  # noqa: S310 - a URL the deployment configures
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:  # noqa: BLE001 - any failure is "unhealthy", said in one line
    print(f"unhealthy: {url}: {e}", file=sys.stderr)
    sys.exit(1)
