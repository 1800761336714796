"""Run a deployment's containers as local processes on loopback, without a container engine or a cluster.

A deployment is described neutrally (`Unit`: a container's command, environment, the network namespace it
lives in, the container paths it reads) by test_wiring.py from the compose model or the rendered chart. `Remap`
turns container names and ports into 127.0.0.1 and free ports (one per (namespace, port)), container paths into
temp dirs, and each command into `sh deploy/entrypoint.sh <command>` as the images run it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from service_procs import Proc, free_port, wait_until

from .tools import ROOT

LOOPBACK = ("127.0.0.1", "localhost", "0.0.0.0")
URL_HOST = re.compile(r"(?<=//)([A-Za-z0-9_.-]+):(\d+)")


@dataclass
class Unit:
    """One container: its command, environment and network namespace (compose service or pod)."""

    name: str
    ns: str
    argv: list[str]
    env: dict[str, str]
    health: bool = True  # has an ASYNCGRPO_HEALTH_URL to wait for
    oneshot: bool = False  # runs to completion (prepare)
    after: list[str] = field(default_factory=list)  # units that must be healthy (or done, if one-shot) first


class Remap:
    """Container names, ports and paths -> this machine."""

    def __init__(self, units: list[Unit], dns: dict[str, str], mounts: dict[str, str], config_texts: list[str],
                 redis: tuple[str, int], redis_port: int, root: Path) -> None:
        """mounts: container path -> volume name (one local dir per volume)."""
        self.units = {u.name: u for u in units}
        self.dns = {redis[0]: redis[0], **dns, **{u.name: u.ns for u in units}}  # host name -> namespace
        self.ports: dict[tuple[str, int], int] = {(self.dns[redis[0]], redis[1]): redis_port}
        self.paths = {"/dev/shm/": f"{root / 'shm'}/"}  # the trainer's IPC namespace, shared with weight-sync
        (root / "shm").mkdir(parents=True, exist_ok=True)
        for target, volume in mounts.items():
            self.paths[target] = str(root / volume)
            Path(self.paths[target]).mkdir(parents=True, exist_ok=True)
        for u in units:  # every host:port a command, environment or config names; every --port
            for text in [*u.argv, *u.env.values()] + config_texts:
                for host, port in URL_HOST.findall(str(text)):
                    self.local(u.ns if host in LOOPBACK else self.dns[host], int(port))
            for flag, value in zip(u.argv, u.argv[1:], strict=False):
                if flag == "--port":
                    self.local(u.ns, int(value))

    def local(self, ns: str, port: int) -> int:
        if (ns, port) not in self.ports:
            self.ports[(ns, port)] = free_port()
        return self.ports[(ns, port)]

    def port(self, unit: str, port: int) -> int:
        return self.ports[(self.units[unit].ns, port)]

    def text(self, s: str, own: Unit | None = None) -> str:
        def url(m: re.Match[str]) -> str:
            ns = own.ns if m.group(1) in LOOPBACK and own else self.dns.get(m.group(1), m.group(1))
            return f"127.0.0.1:{self.local(ns, int(m.group(2)))}"

        s = URL_HOST.sub(url, s)
        for src, dst in sorted(self.paths.items(), key=lambda kv: -len(kv[0])):
            if s == src or s.startswith(src.rstrip("/") + "/"):
                return dst + s[len(src):]
        return s

    def config(self, data: Any, key: str = "") -> Any:
        """A run config (deploy.yaml): names and URLs remapped, each listener's port to its local port."""
        if isinstance(data, dict):
            return {k: self.config(v, k) for k, v in data.items()}
        if isinstance(data, list):
            return [self.config(v, key) for v in data]
        if isinstance(data, str):
            return "127.0.0.1" if data in LOOPBACK or data in self.dns else self.text(data)
        if isinstance(data, int) and key.endswith("port") and data > 0:
            owners = {ns for ns, port in self.ports if port == data}
            return self.local(owners.pop() if len(owners) == 1 else f"?{key}", data)
        return data

    def command(self, u: Unit) -> list[str]:
        out = []
        for a in u.argv:  # --flag=NAME of a container name (torchrun's --master-addr) -> loopback
            flag, eq, value = a.partition("=")
            out.append(self.text(f"{flag}=127.0.0.1" if eq and value in self.dns else a, u))
        master = next((a.split("=", 1)[1] for a in u.argv if a.startswith("--master-addr=")), None)
        for i, a in enumerate(out):  # torchrun's rendezvous port: a listener in the master's namespace
            if a.startswith("--master-port=") and master is not None:
                out[i] = f"--master-port={self.local(self.dns.get(master, u.ns), int(a.split('=', 1)[1]))}"
        for i, a in enumerate(u.argv[:-1]):
            if a == "--port":
                out[i + 1] = str(self.local(u.ns, int(u.argv[i + 1])))
            if a == "--host" and u.argv[i + 1] in LOOPBACK:
                out[i + 1] = "127.0.0.1"
        head = {"asyncgrpo": [sys.executable, "-m", "asyncgrpo.cli"], "python": [sys.executable]}
        if out[:2] == ["sh", "-c"] and len(out) > 4:  # sh -c 'exec "$@" KEY FLAGS' NAME PROGRAM ...: the program
            out = [*out[:4], *head.get(out[4], [out[4]]), *out[5:]]
            return ["sh", str(ROOT / "deploy" / "entrypoint.sh"), *out]
        return ["sh", str(ROOT / "deploy" / "entrypoint.sh"), *head.get(out[0], [out[0]]), *out[1:]]

    def environment(self, u: Unit) -> dict[str, str]:
        return {k: self.text(str(v), u) for k, v in u.env.items()}


PREPARED: dict[str, Path] = {}  # the tiny task `asyncgrpo prepare --out X` built, shared by the tests that need it


def start_all(remap: Remap, order: list[str], logs: Path, procs: dict[str, Proc]) -> None:
    """Start the units in `order`, each after what it waits for; `procs` fills as they start (the caller stops
    them). A one-shot `asyncgrpo prepare --out DIR` already run by an earlier test is copied, not run again."""
    logs.mkdir(parents=True, exist_ok=True)
    for name in order:
        u = remap.units[name]
        for dep in u.after:
            if remap.units[dep].oneshot:
                if dep in procs:
                    assert procs[dep].wait(240) == 0, f"{dep} failed:\n{procs[dep].tail()}"
            elif remap.units[dep].health:  # one without an endpoint (the register sidecar) is up once started
                wait_healthy(remap, dep, procs, timeout=180)
        argv = remap.command(u)
        if u.oneshot and u.argv[:2] == ["asyncgrpo", "prepare"]:
            out = Path(argv[argv.index("--out") + 1])
            if "tiny" in PREPARED:
                shutil.copytree(PREPARED["tiny"], out, dirs_exist_ok=True)
                continue
            procs[name] = Proc(argv, logs / f"{name.replace('/', '.')}.log", env=remap.environment(u))
            assert procs[name].wait(240) == 0, procs[name].tail()
            PREPARED["tiny"] = out
            continue
        procs[name] = Proc(argv, logs / f"{name.replace('/', '.')}.log", env={**remap.environment(u), "ASYNCGRPO_LOG_LEVEL": "INFO"})
    for name in order:
        if remap.units[name].health and not remap.units[name].oneshot:
            wait_healthy(remap, name, procs, timeout=180)


def wait_healthy(remap: Remap, name: str, procs: dict[str, Proc], timeout: float) -> None:
    """The image's HEALTHCHECK script (the chart's exec probe), with the unit's remapped environment."""
    env = remap.environment(remap.units[name])
    assert env.get("ASYNCGRPO_HEALTH_URL"), f"{name} has no health URL"
    script = ROOT / "deploy" / "healthcheck.py"
    wait_until(f"{name} healthy", lambda: subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                                                         timeout=10).returncode == 0,
               timeout, procs=list(procs.values()), watch=procs[name], interval=0.5)


def check_trained_run(remap: Remap, procs: dict[str, Proc], trainer: str, control: str, weight_sync: str,
                      run_id: str, steps: int, token: str, api_key: str, checkpoints: Path) -> None:
    """The trainer took its steps and exited 0, the control plane answers (reads open, mutations need the
    token), weight-sync synced a trained version, the checkpoints volume holds a checkpoint and the final model."""
    assert procs[trainer].wait(240) == 0, procs[trainer].tail()
    api = f"http://127.0.0.1:{remap.port(control, 30200)}"
    runs = httpx.get(f"{api}/v1/runs", timeout=10).json()
    assert [(r["run_id"], r["version"]) for r in runs] == [(run_id, steps)], runs
    assert httpx.post(f"{api}/v1/runs/{run_id}/pause", timeout=10).status_code in (401, 403)
    r = httpx.post(f"{api}/v1/runs/{run_id}/pause", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    # the token reached the control plane: it passes, and the finished run answers it has nothing to pause
    assert r.status_code == 409 and "stopped" in r.json()["message"], r.text
    ws = f"http://127.0.0.1:{remap.port(weight_sync, 30100)}"
    head = {"Authorization": f"Bearer {api_key}"}
    wait_until("weight-sync synced a trained version to the generation server",
               lambda: (httpx.get(f"{ws}/status", headers=head, timeout=5).json().get("synced_version") or 0) >= 1,
               60, procs=list(procs.values()))
    assert list((checkpoints / "checkpoints").iterdir()), "no checkpoint"
    assert (checkpoints / "hf" / f"version_{steps}" / "config.json").is_file(), "no final HF model on the volume"
    for name, p in procs.items():
        assert p.p.poll() is None or p.p.returncode == 0, f"{name} exited {p.p.returncode}:\n{p.tail()}"
