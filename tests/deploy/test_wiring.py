"""The deployment, run without a container engine or a cluster: each of our containers' commands, with its
environment, as a local process on loopback through the images' entrypoint script (tests/deploy/local_run.py).
Names and ports are remapped to 127.0.0.1 and free ports, volumes and secrets to temp dirs, Redis to a private
redis-server; everything else is as the real Compose binary resolves the cpu profile (ASYNCGRPO_STEPS=3) or the
Helm SDK renders the chart for helm/examples/values-cpu.yaml (run.steps=3). Each run must train its steps, sync
the weights to the genserver, leave its checkpoint and final model, and answer on the control plane."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from service_procs import Proc

from .local_run import Remap, Unit, check_trained_run, start_all
from .tools import ROOT, check_command, compose_model, expand_k8s, manifests, render, values

pytestmark = pytest.mark.slow

NOT_OURS = {"redis", "prometheus", "grafana"}  # redis: the private redis-server stands in; monitoring: images of others
KEYS = {"ASYNCGRPO_API_KEY": "wiring-api-key", "ASYNCGRPO_ADMIN_API_KEY": "wiring-admin-key"}
TOKEN = "wiring-token"


def start_order(units: dict[str, Unit]) -> list[str]:
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dep in units[name].after:
                visit(dep)
            order.append(name)

    for name in units:
        visit(name)
    return order


def test_compose_cpu_profile_trains_as_local_processes(redis_server, tmp_path: Path) -> None:  # noqa: ANN001
    token = tmp_path / "control_token"
    token.write_text(TOKEN + "\n")
    model = compose_model("cpu", env={"ASYNCGRPO_STEPS": "3", "ASYNCGRPO_CONTROL_TOKEN_FILE": str(token), **KEYS})
    services = {n: s for n, s in model["services"].items() if n not in NOT_OURS}
    units, dns, mounts = [], {}, {}
    for name, svc in services.items():
        mode = svc.get("network_mode", "")
        ns = mode.removeprefix("service:") if mode.startswith("service:") else name
        for alias in ((svc.get("networks") or {}).get("default") or {}).get("aliases") or []:
            dns[alias] = ns
        env = {k: str(v) for k, v in svc.get("environment", {}).items()}
        after = [d for d, c in (svc.get("depends_on") or {}).items()
                 if d not in NOT_OURS and c["condition"] in ("service_healthy", "service_completed_successfully")]
        argv = [a.replace("$$", "$") for a in svc["command"]]  # the model escapes `$` as compose reads it
        units.append(Unit(name, ns, argv, env, health="ASYNCGRPO_HEALTH_URL" in env,
                          oneshot=svc.get("restart") == "no", after=after))
        mounts.update({v["target"]: v["source"] for v in svc.get("volumes", [])})
    texts = [c["content"] for c in model["configs"].values() if "content" in c]
    remap = Remap(units, dns, mounts, texts, ("redis", 6379), redis_server.port, tmp_path / "vol")
    files: dict[str, dict[str, Path]] = {}  # unit -> container path -> local file (for the parse check)
    for name, svc in services.items():
        files[name] = {}
        for ref in svc.get("configs", []):
            cfg = model["configs"][ref["source"]]
            local = Path(cfg.get("file") or tmp_path / f"{ref['source']}.yaml")
            if "content" in cfg:
                local.write_text(yaml.safe_dump(remap.config(yaml.safe_load(cfg["content"]))))
            files[name][ref["target"]] = local
            remap.paths[ref["target"]] = str(local)
        for ref in svc.get("secrets", []):
            secret = model["secrets"][ref["source"]]
            if "environment" in secret:  # compose copies the variable's value into the container as the file
                local = tmp_path / "secrets" / ref["source"]
                local.parent.mkdir(exist_ok=True)
                local.write_text(KEYS[secret["environment"]])
                remap.paths[ref["target"]] = str(local)
            else:
                remap.paths[ref["target"]] = secret["file"]
        check_command(remap.units[name].argv, files[name], name)  # a compose/CLI mismatch fails here first

    procs: dict[str, Proc] = {}
    try:
        start_all(remap, start_order(remap.units), tmp_path / "logs", procs)
        check_trained_run(remap, procs, "trainer-cpu", "control-cpu", "weight-sync-cpu", "asyncgrpo/trial0", 3, TOKEN,
                          KEYS["ASYNCGRPO_API_KEY"], Path(remap.paths["/checkpoints"]))
    finally:
        for p in reversed(list(procs.values())):
            p.stop(grace_s=30)


def _env(container: dict[str, Any], secret: dict[str, str], index: str | None) -> dict[str, str]:
    """A container's environment as the kubelet builds it: $(VAR) of earlier entries expanded, secrets from the
    rendered Secret, the pod IP as loopback, the Job's completion index."""
    env = {"JOB_COMPLETION_INDEX": index} if index is not None else {}
    for e in container.get("env", []):
        src = e.get("valueFrom", {})
        if "secretKeyRef" in src:
            env[e["name"]] = secret[src["secretKeyRef"]["key"]]
        elif src.get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[e["name"]] = "127.0.0.1"
        elif "job-completion-index" in src.get("fieldRef", {}).get("fieldPath", ""):
            assert index is not None, f"{container['name']}: a completion index outside an Indexed Job"
            env[e["name"]] = index
        else:
            env[e["name"]] = expand_k8s(str(e["value"]), env)
    return env


def _probe_url(container: dict[str, Any]) -> str | None:
    """The kubelet's httpGet probe as a URL (the exec probes run the healthcheck with ASYNCGRPO_HEALTH_URL)."""
    probe = (container.get("readinessProbe") or container.get("startupProbe") or {}).get("httpGet")
    if not probe:
        return None
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    return f"http://127.0.0.1:{ports.get(probe['port'], probe['port'])}{probe['path']}"


def test_helm_cpu_values_train_as_local_processes(redis_server, tmp_path: Path) -> None:  # noqa: ANN001
    vals = values("cpu")
    vals["run"]["steps"] = 3
    vals["keys"] = {"apiKey": KEYS["ASYNCGRPO_API_KEY"], "adminApiKey": KEYS["ASYNCGRPO_ADMIN_API_KEY"],
                    "controlToken": TOKEN}
    docs = manifests(render(vals=vals))
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    secret_data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    workloads = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")}
    component = {w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: n for n, w in workloads.items()}
    dns = {}
    for svc in (d for d in docs if d["kind"] == "Service"):
        dns[svc["metadata"]["name"]] = component[svc["spec"]["selector"]["app.kubernetes.io/component"]]
    for name, w in workloads.items():
        sub = w["spec"]["template"]["spec"].get("subdomain")
        if sub:  # an Indexed Job's pod 0 through its headless Service
            dns[f"{name}-0.{sub}.rl.svc"] = name
    units, mounts, readiness = [], {}, {}
    gen, router = component["generation"], component["router"]
    for name, w in workloads.items():
        if w["kind"] == "StatefulSet":  # Redis: the private redis-server stands in
            continue
        spec = w["spec"]["template"]["spec"]
        claims = {v["name"]: (v.get("persistentVolumeClaim") or {}).get("claimName", v["name"]) for v in spec.get("volumes", [])}
        index = "0" if w["spec"].get("completionMode") == "Indexed" else None
        sidecars = []
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            if c["name"] == "wait-for-task":  # a shell loop for the prepare Job: the start order does its work
                continue
            env = _env(c, secret_data, index)
            if "ASYNCGRPO_HEALTH_URL" not in env and _probe_url(c):
                env["ASYNCGRPO_HEALTH_URL"] = _probe_url(c)
            argv = [*c.get("command", []), *(expand_k8s(a, env) for a in c["args"])]
            if name == router:  # the router's Kubernetes service discovery needs an API server: name its worker
                i = argv.index("--service-discovery")
                argv = [*argv[:i], "--worker-urls", f"http://{gen}:30000"]
            probe = (c.get("readinessProbe") or {}).get("exec", {}).get("command")
            if probe:
                readiness[f"{name}/{c['name']}"] = probe
            after = list(sidecars)  # the kubelet starts a pod's native sidecars (and waits for them) first
            if c.get("restartPolicy") == "Always":
                sidecars.append(f"{name}/{c['name']}")
            units.append(Unit(f"{name}/{c['name']}", name, argv, env, health="ASYNCGRPO_HEALTH_URL" in env,
                              oneshot=w["kind"] == "Job" and index is None, after=after))
            mounts.update({m["mountPath"]: claims[m["name"]] for m in c.get("volumeMounts", []) if m["name"] not in ("config", "shm")})
    by = {u.name: u for u in units}
    prepare = f"{component['prepare']}/prepare"
    for u in units:  # no start order in a cluster (each pod retries); here: prepare, servers, router, the rest
        if u.name != prepare:
            u.after.append(prepare)
    by[f"{router}/router"].after.append(f"{gen}/server")
    by[f"{component['rollout']}/rollout"].after.append(f"{router}/router")
    remap = Remap(units, dns, mounts, [cm["data"]["deploy.yaml"]], (component["redis"], 6379), redis_server.port,
                  tmp_path / "vol")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "run.yaml").write_text(cm["data"]["run.yaml"])
    (etc / "deploy.yaml").write_text(yaml.safe_dump(remap.config(yaml.safe_load(cm["data"]["deploy.yaml"]))))
    (etc / "register.py").write_text(cm["data"]["register.py"])
    remap.paths["/etc/asyncgrpo"] = str(etc)
    files = {f"/etc/asyncgrpo/{n}": etc / n for n in ("run.yaml", "deploy.yaml")}
    for u in units:
        if u.argv[0] != "python" or u.argv[1] != "/etc/asyncgrpo/register.py":
            check_command(u.argv, files, u.name)

    procs: dict[str, Proc] = {}
    trainer = component["trainer"]
    try:
        start_all(remap, start_order(remap.units), tmp_path / "logs", procs)
        check_trained_run(remap, procs, f"{trainer}/trainer", f"{component['control']}/control",
                          f"{trainer}/weight-sync", "tiny-arithmetic/trial0", 3, TOKEN, KEYS["ASYNCGRPO_API_KEY"],
                          Path(remap.paths["/checkpoints"]))
        # the generation pod's register sidecar put it into weight-sync's fleet, and takes it out when the pod
        # stops (a scale-down): weight-sync lists it, then not
        ws = f"http://127.0.0.1:{remap.port(f'{trainer}/weight-sync', 30100)}"
        server = f"http://127.0.0.1:{remap.port(f'{gen}/server', 30000)}"
        head = {"Authorization": f"Bearer {KEYS['ASYNCGRPO_API_KEY']}"}
        assert [m["url"] for m in httpx.get(f"{ws}/servers", headers=head, timeout=5).json()] == [server]

        # the pod's readiness gate (the register sidecar's readinessProbe, run as the kubelet would: the
        # container's environment, no entrypoint): ready once weight-sync lists the server ready
        def gate(state: Path, keep: str = "1") -> subprocess.CompletedProcess[str]:
            cmd = readiness[f"{gen}/register"]
            assert cmd[:2] == ["python", "/usr/local/bin/asyncgrpo-healthcheck"], cmd
            env = {**remap.environment(by[f"{gen}/register"]), "ASYNCGRPO_READY_STATE": str(state),
                   "ASYNCGRPO_READY_KEEP": keep}
            return subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py"), *cmd[2:]], env=env,
                                  capture_output=True, text=True, timeout=30)

        was_ready = tmp_path / "ready-state"
        assert gate(was_ready).returncode == 0 and was_ready.is_file()
        register = procs.pop(f"{gen}/register")
        register.stop(grace_s=30)
        assert register.p.returncode == 0 and f"removed {server}" in register.tail(), register.tail()
        assert httpx.get(f"{ws}/servers", headers=head, timeout=5).json() == []
        # not registered: a pod that never was ready stays out; one that was stays in (keepWhenUnknown) unless
        # the gate is strict
        assert gate(tmp_path / "never-ready").returncode == 1
        assert gate(was_ready).returncode == 0
        assert gate(was_ready, keep="0").returncode == 1
    finally:
        for p in reversed(list(procs.values())):
            p.stop(grace_s=30)
