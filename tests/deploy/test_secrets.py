"""No key in a command line or a spec: rendered with sentinel keys, `docker compose config` (both profiles) never shows
them (the keys are compose secrets from .env's variables; the SGLang and router commands read them inside the
container at run time) and `helm template` has them only in the Secret (containers get them through
secretKeyRef, the SGLang and router args as $(VAR), expanded by the kubelet). Every service is still handed its
keys (the same variables everywhere: ASYNCGRPO_API_KEY / ASYNCGRPO_ADMIN_API_KEY / ASYNCGRPO_CONTROL_TOKEN, or
NAME_FILE, which the images' entrypoint turns into NAME). Each check fails on a broken copy."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from .tools import CHART, ROOT, VALUES, compose, manifests, pod_specs, render, unwrap_sh, values

SENTINELS = {"ASYNCGRPO_API_KEY": "SENTINEL-api-7d1f", "ASYNCGRPO_ADMIN_API_KEY": "SENTINEL-admin-9c2e"}
TOKEN = "SENTINEL-token-4b0a"


def leaks(text: str, secrets: list[str]) -> list[str]:
    """Which secrets (or their base64) appear in `text`."""
    return [s for s in secrets if s in text or base64.b64encode(s.encode()).decode() in text]


# -- compose -----------------------------------------------------------------------------------------------
def compose_text(profile: str, file: Path = ROOT / "docker-compose.yml") -> tuple[str, dict[str, Any]]:
    out = compose(profile, "config", file=file, env=SENTINELS)
    assert out.returncode == 0, out.stderr
    js = compose(profile, "config", "--format", "json", file=file, env=SENTINELS)
    assert js.returncode == 0, js.stderr
    return out.stdout + js.stdout, json.loads(js.stdout)


def compose_key_problems(model: dict[str, Any]) -> list[str]:
    """Every service that checks keys gets both, as secret files: ours through NAME_FILE (the entrypoint), SGLang
    and the router on their command line read at run time from the file / the variable."""
    problems = []
    for name, svc in model["services"].items():
        image = svc["image"].rsplit(":", 1)[0]
        mounted = {s["target"] for s in svc.get("secrets", [])}
        env = svc.get("environment") or {}
        argv = unwrap_sh(svc.get("command") or [])
        if image in ("asyncgrpo", "asyncgrpo-trainer-gpu"):
            for var, target in (("ASYNCGRPO_API_KEY", "/run/secrets/api_key"),
                                ("ASYNCGRPO_ADMIN_API_KEY", "/run/secrets/admin_api_key")):
                if env.get(f"{var}_FILE") != target or target not in mounted:
                    problems.append(f"{name}: no {var}_FILE={target} from a mounted secret")
            for var in env:
                if var in SENTINELS:
                    problems.append(f"{name}: the key {var} is in the environment")
        if argv[:3] == ["python3", "-m", "sglang.launch_server"]:
            for flag, target in (("--api-key", "/run/secrets/api_key"), ("--admin-api-key", "/run/secrets/admin_api_key")):
                if flag not in argv or argv[argv.index(flag) + 1] != f"$(cat {target})" or target not in mounted:
                    problems.append(f"{name}: {flag} is not read from the secret {target} at run time")
        if argv[:3] == ["python", "-m", "sglang_router.launch_router"]:
            if "--api-key" not in argv or argv[argv.index("--api-key") + 1] != "$ASYNCGRPO_API_KEY":
                problems.append(f"{name}: --api-key is not the run-time $ASYNCGRPO_API_KEY")
    for name in ("api_key", "admin_api_key"):
        if "environment" not in model["secrets"].get(name, {}):
            problems.append(f"secret {name} is not from .env's variable")
    return problems


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_config_never_shows_the_keys(profile: str) -> None:
    text, model = compose_text(profile)
    assert leaks(text, list(SENTINELS.values())) == []
    assert compose_key_problems(model) == []


def test_compose_key_checks_fail_on_a_broken_copy(tmp_path: Path) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    old = """[sh, -c, 'exec "$$@" --api-key "$$ASYNCGRPO_API_KEY"',
              router, python, -m, sglang_router.launch_router, --host, 0.0.0.0, --port, "30000", --policy, round_robin,"""
    assert old in text
    broken = tmp_path / "docker-compose.yml"  # the key interpolated into the router's command, as it was
    broken.write_text(text.replace(old, """[python, -m, sglang_router.launch_router, --api-key, "${ASYNCGRPO_API_KEY}",
              --host, 0.0.0.0, --port, "30000", --policy, round_robin,""", 1))
    shown, model = compose_text("cpu", file=broken)
    assert leaks(shown, list(SENTINELS.values())) == [SENTINELS["ASYNCGRPO_API_KEY"]]
    assert any("router-cpu: --api-key" in p for p in compose_key_problems(model))
    env = text.replace("    ASYNCGRPO_API_KEY_FILE: /run/secrets/api_key\n",
                       "    ASYNCGRPO_API_KEY: ${ASYNCGRPO_API_KEY}\n", 1)
    broken.write_text(env)
    shown, model = compose_text("cpu", file=broken)
    assert leaks(shown, list(SENTINELS.values())) and any("in the environment" in p for p in compose_key_problems(model))


def test_the_entrypoint_knows_every_key_the_deployment_hands_as_a_file() -> None:
    """compose's NAME_FILE variables are ones entrypoint.sh turns into NAME (else a service would run keyless)."""
    script = (ROOT / "deploy" / "entrypoint.sh").read_text()
    handled = set(script.split("for name in ", 1)[1].split(";", 1)[0].split())
    for profile in ("gpu", "cpu"):
        _, model = compose_text(profile)
        for name, svc in model["services"].items():
            if svc["image"].rsplit(":", 1)[0] in ("asyncgrpo", "asyncgrpo-trainer-gpu"):
                files = {v.removesuffix("_FILE") for v in (svc.get("environment") or {}) if v.endswith("_FILE")}
                assert files <= handled, (name, files - handled)


# -- helm --------------------------------------------------------------------------------------------------
def sentinel_values(name: str) -> dict[str, Any]:
    vals = values(name) or {}
    vals["keys"] = {"apiKey": SENTINELS["ASYNCGRPO_API_KEY"], "adminApiKey": SENTINELS["ASYNCGRPO_ADMIN_API_KEY"],
                    "controlToken": TOKEN}
    return vals


def helm_key_problems(docs: list[dict[str, Any]]) -> list[str]:
    """The sentinels appear in the Secret only; every container that needs a key takes it from the Secret."""
    secrets = [*SENTINELS.values(), TOKEN]
    problems = []
    for d in docs:
        if d["kind"] == "Secret":
            continue
        found = leaks(json.dumps(d), secrets)
        if found:
            problems.append(f"{d['kind']}/{d['metadata']['name']} holds {found}")
    for workload, spec in pod_specs(docs):
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            env = {e["name"]: e for e in c.get("env", [])}
            argv = [*c.get("command", []), *c.get("args", [])]
            if workload["kind"] != "StatefulSet" and argv[:2] not in (["python", "-c"], ["sh", "-c"], ["asyncgrpo", "prepare"]):
                # every service container (not Redis, the wait loops or the tiny task's one-shot prepare)
                need = ["ASYNCGRPO_API_KEY", "ASYNCGRPO_ADMIN_API_KEY"] + (["ASYNCGRPO_CONTROL_TOKEN"] if "control" in argv[:2] else [])
                for var in need:
                    if "secretKeyRef" not in env.get(var, {}).get("valueFrom", {}):
                        problems.append(f"{workload['metadata']['name']}/{c['name']}: {var} is not from the Secret")
            for flag, var in (("--api-key", "ASYNCGRPO_API_KEY"), ("--admin-api-key", "ASYNCGRPO_ADMIN_API_KEY")):
                if flag in argv:
                    ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
                    if argv[argv.index(flag) + 1] != f"$({var})" or not ref:
                        problems.append(f"{workload['metadata']['name']}/{c['name']}: {flag} not $({var}) from the Secret")
    return problems


@pytest.mark.parametrize("name", list(VALUES))
def test_helm_template_has_the_keys_only_in_the_secret(name: str) -> None:
    docs = manifests(render(vals=sentinel_values(name)))
    assert helm_key_problems(docs) == []
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert base64.b64decode(secret["data"]["api-key"]).decode() == SENTINELS["ASYNCGRPO_API_KEY"]


def test_helm_key_check_fails_on_a_broken_copy(tmp_path: Path) -> None:
    chart = tmp_path / "asyncgrpo"
    shutil.copytree(CHART, chart)
    router = chart / "templates" / "router.yaml"
    text = router.read_text()
    assert "            - $(ASYNCGRPO_API_KEY)\n" in text
    router.write_text(text.replace("            - $(ASYNCGRPO_API_KEY)\n", "            - {{ .Values.keys.apiKey }}\n", 1))
    problems = helm_key_problems(manifests(render(chart, vals=sentinel_values("default"))))
    assert any("router" in p and "holds" in p for p in problems) and any("--api-key not" in p for p in problems)
