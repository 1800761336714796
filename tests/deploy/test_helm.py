"""helm/asyncgrpo: lints strictly and renders for the default, CPU and multi-node GPU values; every rendered
manifest validates with kubernetes-validate --strict for two Kubernetes versions; each check fails on a broken
copy; the multi-node rendering has what the acceptance asks (each with resources and probes); and every
container command of our images parses with the CLI it names, its run config loading with its overrides."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from .tools import (CHART, KUBE_VERSIONS, OUR_IMAGES, VALUES, check_command, expand_k8s, kube_validate, manifests,
                    pod_specs, render, values, write_manifests)


def lint_problems(chart: Path, vals: dict[str, Any] | None) -> list[Any]:
    from helm_python import lint

    report = lint(str(chart), vals, strict=True)
    return [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, str]]:
    return {name: render(vals=values(name)) for name in VALUES}


@pytest.mark.parametrize("name", list(VALUES))
def test_chart_lints_strictly(name: str) -> None:
    assert lint_problems(CHART, values(name)) == []


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", list(VALUES))
def test_rendered_manifests_validate(rendered: dict[str, dict[str, str]], tmp_path: Path, name: str, version: str) -> None:
    files = write_manifests(rendered[name], tmp_path)
    assert len(files) >= 8
    out = kube_validate(files, version)
    assert out.returncode == 0, out.stdout + out.stderr
    # only the Prometheus Operator's CRD has no schema here (kubernetes-validate warns and passes it)
    unknown = [line for line in (out.stdout + out.stderr).splitlines() if "Couldn't find schema" in line]
    assert all("ServiceMonitor" in line for line in unknown), unknown


def _copy_chart(tmp_path: Path) -> Path:
    dst = tmp_path / "asyncgrpo"
    shutil.copytree(CHART, dst)
    return dst


def test_kube_validate_fails_on_a_broken_copy(tmp_path: Path) -> None:
    chart = _copy_chart(tmp_path)
    control = chart / "templates" / "control.yaml"
    text = control.read_text()
    control.write_text(text.replace("      containers:\n        - name: control\n",
                                    "      containers:\n        - name: control\n          restartPolicyy: Always\n", 1))
    files = write_manifests(render(chart), tmp_path / "out")
    for version in KUBE_VERSIONS:
        out = kube_validate(files, version)
        assert out.returncode != 0 and "restartPolicyy" in out.stdout + out.stderr


@pytest.mark.parametrize("breakage", ["schema", "chart-version", "template-syntax"])
def test_lint_fails_on_a_broken_copy(tmp_path: Path, breakage: str) -> None:
    chart = _copy_chart(tmp_path)
    vals = None
    if breakage == "schema":
        vals = {"generation": {"engine": "vllm"}}
    elif breakage == "chart-version":
        meta = yaml.safe_load((chart / "Chart.yaml").read_text())
        del meta["version"]
        (chart / "Chart.yaml").write_text(yaml.safe_dump(meta))
    else:
        t = chart / "templates" / "rollout.yaml"
        t.write_text(t.read_text().replace("{{- include \"asyncgrpo.configArgs\" . | nindent 12 }}",
                                           "{{- include \"asyncgrpo.configArgs\" . | nindent 12 }", 1))
    assert lint_problems(chart, vals)


def test_render_refuses_values_against_the_schema() -> None:
    from helm_python import HelmError

    for bad in ({"trainer": {"nodes": 0}}, {"redis": {"externalUrl": "http://x"}}, {"unknown": 1},
                {"generation": {"replicas": "two"}}):
        with pytest.raises(HelmError):
            render(vals=bad)


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_multinode_has_what_acceptance_asks(rendered: dict[str, dict[str, str]]) -> None:
    docs = manifests(rendered["multinode-gpu"])
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    job = by[("Job", "demo-asyncgrpo-trainer")]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == "demo-asyncgrpo-trainer"
    rdzv = by[("Service", "demo-asyncgrpo-trainer")]
    assert rdzv["spec"]["clusterIP"] == "None" and rdzv["spec"]["publishNotReadyAddresses"] is True
    trainer = next(c for c in pod["containers"] if c["name"] == "trainer")
    assert "--nproc-per-node=8" in trainer["args"] and "--nnodes=2" in trainer["args"]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 8
    # weight-sync beside the trainer (a native sidecar), both on the memory-backed /dev/shm
    ws = next(c for c in pod["initContainers"] if c["name"] == "weight-sync")
    assert ws["restartPolicy"] == "Always" and ws["args"][:2] == ["asyncgrpo", "weight-sync"]
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "shm", "mountPath": "/dev/shm"} in ws["volumeMounts"] and {"name": "shm", "mountPath": "/dev/shm"} in trainer["volumeMounts"]
    gen = by[("Deployment", "demo-asyncgrpo-generation")]
    assert gen["spec"]["replicas"] == 4
    assert by[("Service", "demo-asyncgrpo-generation")]["spec"]["clusterIP"] == "None"
    redis = by[("StatefulSet", "demo-asyncgrpo-redis")]
    assert "--appendonly" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis["spec"]["volumeClaimTemplates"]
    assert ("Deployment", "demo-asyncgrpo-control") in by and ("Service", "demo-asyncgrpo-control") in by
    secret = by[("Secret", "demo-asyncgrpo-keys")]
    assert {"api-key", "admin-api-key", "control-token"} <= set(secret["data"])
    assert ("PersistentVolumeClaim", "demo-asyncgrpo-checkpoints") in by
    assert ("ServiceMonitor", "demo-asyncgrpo") in by
    # every port the ServiceMonitor scrapes is a port of the trainer Service (weight-sync's in pod 0 only)
    scraped = {e["port"] for e in by[("ServiceMonitor", "demo-asyncgrpo")]["spec"]["endpoints"]}
    assert scraped == {"metrics", "weight-sync"} and scraped <= {p["name"] for p in rdzv["spec"]["ports"]}
    for workload, spec in pod_specs(docs):
        for c in _containers(spec):
            what = f"{workload['kind']}/{workload['metadata']['name']}/{c['name']}"
            assert c["resources"].get("requests") and c["resources"].get("limits"), f"{what} has no resources"
            if c in spec.get("initContainers", []) and c.get("restartPolicy") != "Always":
                continue  # an init container that runs to completion (wait-for-peers) cannot have probes
            assert any(p in c for p in ("livenessProbe", "readinessProbe", "startupProbe")), f"{what} has no probe"
        assert workload["kind"] == "Job" or workload["spec"]["template"]["metadata"].get("annotations", {}).get(
            "prometheus.io/scrape") == "true" or workload["metadata"]["name"].endswith(("-redis", "-router"))
    for node_pool in (pod, gen["spec"]["template"]["spec"]):
        assert node_pool["nodeSelector"] and node_pool["tolerations"]


def test_cpu_values_use_no_gpu(rendered: dict[str, dict[str, str]]) -> None:
    text = "".join(rendered["cpu"].values())
    assert "nvidia.com/gpu" not in text and "lmsysorg/sglang" not in text
    docs = manifests(rendered["cpu"])
    assert any(d["kind"] == "Job" and d["metadata"]["name"] == "demo-asyncgrpo-prepare" for d in docs)


@pytest.mark.parametrize("name", list(VALUES))
def test_container_commands_parse_with_the_cli(rendered: dict[str, dict[str, str]], tmp_path: Path, name: str) -> None:
    docs = manifests(rendered[name])
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    files = {}
    for key in ("run.yaml", "deploy.yaml"):
        (tmp_path / key).write_text(cm["data"][key])
        files[f"/etc/asyncgrpo/{key}"] = tmp_path / key
    checked = set()
    for workload, spec in pod_specs(docs):
        for c in _containers(spec):
            if c["image"].strip('"').rsplit(":", 1)[0] not in OUR_IMAGES or "args" not in c or c["args"][0] == "sh" \
                    or c["args"][:2] == ["python", "-c"]:
                continue  # SGLang's image (see test_sglang_flags), the tiny-task and peer wait loops
            if c["args"][:2] == ["python", "/etc/asyncgrpo/register.py"]:
                checked.add("register")
                continue
            env = {e["name"]: e.get("value", "0") for e in c.get("env", [])}  # valueFrom: a stand-in
            argv = [expand_k8s(a, env) for a in c["args"]]
            argv = check_command(argv, files, f"{workload['metadata']['name']}/{c['name']}")
            checked.add(argv[1] if argv[0] == "asyncgrpo" else "router")
    want = {"trainer", "weight-sync", "rollout", "control", "router", "register"}
    if name == "cpu":
        want |= {"genserver", "prepare"}
    assert checked == want


def test_the_checkpoints_claim_is_mounted_across_nodes_only_when_it_can_be() -> None:
    """A ReadWriteOnce claim attaches to one node: generation pods (on other nodes) do not mount it then, and a
    trainer spanning nodes is refused with the fix; with ReadWriteMany both mount it."""
    from helm_python import HelmError

    def generation_volumes(docs: list[dict[str, Any]]) -> list[str]:
        dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-generation"))
        return [v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]]

    assert "checkpoints" not in generation_volumes(manifests(render(vals=values("default"))))
    assert "checkpoints" in generation_volumes(manifests(render(vals=values("multinode-gpu"))))
    with pytest.raises(HelmError, match="checkpoints.accessModes"):
        render(vals={"trainer": {"nodes": 2}})


# -- the generation pod's readiness gate ---------------------------------------------------------------------
def readiness_problems(docs: list[dict[str, Any]]) -> list[str]:
    """A generation pod is Ready only once weight-sync lists its server ready, and only Ready pods get traffic."""
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    gen = by[("Deployment", "demo-asyncgrpo-generation")]["spec"]["template"]["spec"]
    problems = []
    reg = next((c for c in gen.get("initContainers", []) if c["name"] == "register"), None)
    if reg is None or reg.get("restartPolicy") != "Always":
        return ["no register sidecar"]
    probe = (reg.get("readinessProbe") or {}).get("exec", {}).get("command")
    if probe != ["python", "/usr/local/bin/asyncgrpo-healthcheck", "--weight-sync-ready"]:
        problems.append(f"the register sidecar's readinessProbe is not the weight-sync gate: {probe}")
    env = {e["name"]: e for e in reg.get("env", [])}
    if not env.get("SERVER_URL", {}).get("value", "").startswith("http://$(POD_IP):"):
        problems.append("the gate does not know the pod's own server URL")
    if ":30100" not in env.get("WEIGHT_SYNC_URL", {}).get("value", ""):
        problems.append("the gate does not know weight-sync's URL")
    if "secretKeyRef" not in env.get("ASYNCGRPO_API_KEY", {}).get("valueFrom", {}):
        problems.append("the gate has no api key from the Secret")
    router = by[("Deployment", "demo-asyncgrpo-router")]["spec"]["template"]["spec"]["containers"][0]
    if "--service-discovery" not in router["args"]:  # sglang-router's discovery adds Ready, Running pods only
        problems.append("the router does not discover the pods by their readiness")
    if by[("Service", "demo-asyncgrpo-generation")]["spec"].get("publishNotReadyAddresses"):
        problems.append("the generation Service publishes pods that are not Ready")
    return problems


@pytest.mark.parametrize("name", ["default", "cpu", "multinode-gpu"])
def test_generation_pods_are_ready_only_once_synced(rendered: dict[str, dict[str, str]], name: str) -> None:
    assert readiness_problems(manifests(rendered[name])) == []


def test_the_readiness_check_fails_on_a_broken_copy() -> None:
    off = manifests(render(vals={"generation": {"readinessGate": {"enabled": False}}}))
    assert any("readinessProbe" in p for p in readiness_problems(off))
    strict = manifests(render(vals={"generation": {"readinessGate": {"keepWhenUnknown": False}}}))
    dep = next(d for d in strict if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-generation"))
    reg = next(c for c in dep["spec"]["template"]["spec"]["initContainers"] if c["name"] == "register")
    assert {"name": "ASYNCGRPO_READY_KEEP", "value": "0"} in reg["env"]


# -- the trainer's start: waiting for the other pods is no probe's business -----------------------------------
def trainer_start_problems(docs: list[dict[str, Any]], nodes: int) -> list[str]:
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "demo-asyncgrpo-trainer")
    spec = job["spec"]["template"]["spec"]
    names = [c["name"] for c in spec.get("initContainers", [])]
    problems = []
    if nodes > 1:
        wait = next((c for c in spec.get("initContainers", []) if c["name"] == "wait-for-peers"), None)
        if wait is None:
            return ["no wait-for-peers init container: pod 0's startupProbe counts the wait for unscheduled pods"]
        want = [f"demo-asyncgrpo-trainer-{i}.demo-asyncgrpo-trainer.rl.svc" for i in range(nodes)]
        if wait["args"][3:] != want:
            problems.append(f"wait-for-peers waits for {wait['args'][3:]}, not every trainer pod {want}")
        if wait.get("restartPolicy") or any(p in wait for p in ("startupProbe", "livenessProbe", "readinessProbe")):
            problems.append("wait-for-peers is not a plain init container")
        if names.index("wait-for-peers") < names.index("weight-sync"):
            problems.append("wait-for-peers holds back the weight-sync sidecar")
        # a restarted container waits in torchrun's rendezvous: its own timeout must end that, not the probe
        trainer = next(c for c in spec["containers"] if c["name"] == "trainer")
        timeout = [int(a.split("=")[-1]) for a in trainer["args"] if a.startswith("--rdzv-conf=timeout=")]
        probe = trainer["startupProbe"]
        if len(timeout) != 1 or probe["periodSeconds"] * probe["failureThreshold"] <= timeout[0]:
            problems.append(f"the startupProbe ({probe}) does not outlast torchrun's rendezvous timeout {timeout}")
    elif "wait-for-peers" in names:
        problems.append("wait-for-peers on a single node")
    return problems


def test_the_trainer_waits_for_its_peers_outside_its_probes(rendered: dict[str, dict[str, str]]) -> None:
    assert trainer_start_problems(manifests(rendered["multinode-gpu"]), 2) == []
    assert trainer_start_problems(manifests(rendered["default"]), 1) == []
    vals = values("multinode-gpu")
    vals["trainer"].update(nodes=3, waitForPeers=False)
    assert trainer_start_problems(manifests(render(vals=vals)), 3)  # the check fails on a broken copy
    vals["trainer"].update(waitForPeers=True, startupProbe={"periodSeconds": 15, "failureThreshold": 240},
                           rendezvousTimeoutSeconds=3600)
    docs = manifests(render(vals=vals))
    assert trainer_start_problems(docs, 3) == []
    job = next(d for d in docs if d["kind"] == "Job")
    trainer = next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "trainer")
    assert "--rdzv-conf=timeout=3600" in trainer["args"]
    assert trainer["startupProbe"] == {**trainer["startupProbe"], "periodSeconds": 15, "failureThreshold": 240 + 3600 // 15}
    single = next(d for d in manifests(rendered["default"]) if d["kind"] == "Job")  # one node: the values as given
    trainer = next(c for c in single["spec"]["template"]["spec"]["containers"] if c["name"] == "trainer")
    assert trainer["startupProbe"]["failureThreshold"] == 90 and not any("rdzv-conf" in a for a in trainer["args"])


def test_the_peer_wait_returns_once_every_name_resolves() -> None:
    """wait-for-peers' script, run here: done at once when the names resolve, waiting while one does not."""
    import subprocess
    import sys

    job = next(d for d in manifests(render(vals=values("multinode-gpu"))) if d["kind"] == "Job")
    wait = next(c for c in job["spec"]["template"]["spec"]["initContainers"] if c["name"] == "wait-for-peers")
    script = wait["args"][:3]
    assert script[:2] == ["python", "-c"]
    done = subprocess.run([sys.executable, "-c", script[2], "localhost", "127.0.0.1"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0 and "every trainer pod is scheduled" in done.stdout
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", script[2], "localhost", "no-such-pod.invalid"], capture_output=True,
                       timeout=3)


# -- NCCL networking: interface, port range, rendezvous ports -------------------------------------------------
def nccl_problems(docs: list[dict[str, Any]], vals: dict[str, Any]) -> list[str]:
    nccl, t, ws = vals.get("nccl", {}), vals.get("trainer", {}), vals.get("weightSync", {})
    rdzv, ws_rdzv, ws_port = t.get("rendezvousPort", 29500), ws.get("rendezvousPort", 29600), ws.get("port", 30100)
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    problems = []
    job = by[("Job", "demo-asyncgrpo-trainer")]["spec"]["template"]["spec"]
    gen = by[("Deployment", "demo-asyncgrpo-generation")]["spec"]["template"]["spec"]
    containers = {"trainer": next(c for c in job["containers"] if c["name"] == "trainer"),
                  "weight-sync": next(c for c in job["initContainers"] if c["name"] == "weight-sync"),
                  "server": next(c for c in gen["containers"] if c["name"] == "server")}
    want_env = {**({"NCCL_SOCKET_IFNAME": nccl["socketIfname"]} if nccl.get("socketIfname") else {}),
                **{k: str(v) for k, v in (nccl.get("env") or {}).items()}}
    for name, c in containers.items():
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        missing = {k: v for k, v in want_env.items() if env.get(k) != v}
        if missing:
            problems.append(f"{name} lacks {missing}")
    for name, pod in (("trainer", job), ("generation", gen)):
        sysctls = (pod.get("securityContext") or {}).get("sysctls") or []
        want = [{"name": "net.ipv4.ip_local_port_range", "value": nccl["portRange"]}] if nccl.get("portRange") else []
        if sysctls != want:
            problems.append(f"{name} pod's port range {sysctls} is not {want}")
    if f"--master-port={rdzv}" not in containers["trainer"]["args"]:
        problems.append(f"torchrun's rendezvous is not on {rdzv}")
    deploy = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["deploy.yaml"])
    if deploy["weight_sync"]["master_port"] != ws_rdzv:
        problems.append(f"weight_sync.master_port is not {ws_rdzv}")
    svc_ports = {p["port"] for p in by[("Service", "demo-asyncgrpo-trainer")]["spec"]["ports"]}
    if not {rdzv, ws_rdzv, ws_port} <= svc_ports:
        problems.append(f"the trainer Service lacks {({rdzv, ws_rdzv, ws_port}) - svc_ports}")
    if vals.get("networkPolicy", {}).get("enabled"):
        pol = by.get(("NetworkPolicy", "demo-asyncgrpo-trainer"))
        gpol = by.get(("NetworkPolicy", "demo-asyncgrpo-generation"))
        if not pol or not gpol:
            return [*problems, "no NetworkPolicies"]
        ports = [p for rule in pol["spec"]["ingress"] for p in rule.get("ports", [])]
        if nccl.get("portRange"):
            lo, hi = map(int, nccl["portRange"].split())
            for port in (rdzv, ws_rdzv, ws_port):
                if not any(p["port"] == port for p in ports):
                    problems.append(f"the trainer NetworkPolicy does not open {port}")
            for what, pp in (("trainer", ports), ("generation", [p for r in gpol["spec"]["ingress"] for p in r.get("ports", [])])):
                if {"protocol": "TCP", "port": lo, "endPort": hi} not in pp:
                    problems.append(f"the {what} NetworkPolicy does not open the NCCL range {lo}-{hi}")
    return problems


def test_nccl_settings_reach_every_nccl_container(rendered: dict[str, dict[str, str]]) -> None:
    vals = values("multinode-gpu")
    assert vals["nccl"]["portRange"] and vals["networkPolicy"]["enabled"]
    assert nccl_problems(manifests(rendered["multinode-gpu"]), vals) == []
    assert nccl_problems(manifests(rendered["default"]), {}) == []
    vals["trainer"]["rendezvousPort"] = 29511
    vals["weightSync"]["rendezvousPort"] = 29611
    vals["nccl"] = {"socketIfname": "ib0", "portRange": "41000 41499", "env": {"NCCL_IB_HCA": "mlx5"}}
    assert nccl_problems(manifests(render(vals=vals)), vals) == []


def test_the_nccl_check_fails_on_a_broken_copy(tmp_path: Path) -> None:
    vals = values("multinode-gpu")
    chart = _copy_chart(tmp_path)
    gen = chart / "templates" / "generation.yaml"
    gen.write_text(gen.read_text().replace('            {{- include "asyncgrpo.ncclEnv" . | nindent 12 }}\n', "", 1))
    assert any(p.startswith("server lacks") for p in nccl_problems(manifests(render(chart, vals=vals)), vals))
    pol = chart / "templates" / "networkpolicy.yaml"
    pol.write_text(pol.read_text().replace("endPort: {{ $hi }}", "endPort: {{ $lo }}"))
    assert any("NCCL range" in p for p in nccl_problems(manifests(render(chart, vals=vals)), vals))
    from helm_python import HelmError

    with pytest.raises(HelmError):
        render(vals={"nccl": {"portRange": "40000-40999"}})  # the schema wants "LOW HIGH"
