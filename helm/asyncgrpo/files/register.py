"""Generation pod sidecar: registers this pod's server with the weight-sync service (POST /servers, admin key)
once the server answers /health, again every REGISTER_INTERVAL_S (weight-sync keeps members in memory: a
restarted weight-sync learns them back), and removes it (DELETE /servers) when the pod stops, so scaling the
generation Deployment up or down changes the synced fleet. The router finds the pods itself (service discovery).
Env: SERVER_URL, WEIGHT_SYNC_URL, ASYNCGRPO_ADMIN_API_KEY, REGISTER_INTERVAL_S (default 30)."""

import os
import signal
import sys
import threading

import httpx

server, ws = os.environ["SERVER_URL"].rstrip("/"), os.environ["WEIGHT_SYNC_URL"].rstrip("/")
key = os.environ.get("ASYNCGRPO_ADMIN_API_KEY")
headers = {"Authorization": f"Bearer {key}"} if key else {}
interval = float(os.environ.get("REGISTER_INTERVAL_S", "30"))
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())
registered = False
while not stop.is_set():
    try:
        if httpx.get(f"{server}/health", timeout=5).status_code == 200:
            r = httpx.post(f"{ws}/servers", json={"url": server}, headers=headers, timeout=10)
            r.raise_for_status()
            if not registered:
                print(f"registered {server} with {ws}: {r.json().get('state')}", flush=True)
            registered = True
    except httpx.HTTPError as e:  # weight-sync or the server not up yet: try again
        print(f"not registered yet ({type(e).__name__}: {e})", flush=True)
    stop.wait(interval if registered else 5)
if registered:
    try:
        httpx.delete(f"{ws}/servers", params={"url": server}, headers=headers, timeout=10)
        print(f"removed {server} from {ws}", flush=True)
    except httpx.HTTPError as e:
        print(f"could not remove {server}: {e}", file=sys.stderr, flush=True)
