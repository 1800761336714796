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
            if c["image"].strip('"').rsplit(":", 1)[0] not in OUR_IMAGES or "args" not in c or c["args"][0] == "sh":
                continue  # SGLang's image (see test_sglang_flags) and the tiny-task wait loop
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
