"""Helpers of the deployment checks: the Compose v5 binary, hadolint, the Helm SDK, kubernetes-validate, and a
parse check of every container command against the CLI it names. All offline; no container engine."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "asyncgrpo"
VALUES = {"default": None, "cpu": ROOT / "helm" / "examples" / "values-cpu.yaml",
          "multinode-gpu": ROOT / "helm" / "examples" / "values-multinode-gpu.yaml"}
KUBE_VERSIONS = ("1.30.0", "1.34.0")
DOCKERFILES = sorted(p for p in (ROOT / "deploy").glob("Dockerfile*") if p.suffix != ".dockerignore")
OUR_IMAGES = ("asyncgrpo", "asyncgrpo-trainer-gpu")  # repositories built from deploy/


def tool(name: str) -> str:
    """A console script of a test dependency (pyproject's test extra): next to this Python, else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -c constraints.txt -e '.[test]' (as .ci/run does)")
    return found


def run(args: list[str], cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# -- compose ---------------------------------------------------------------------------------------------
def compose(profile: str, *args: str, file: Path = ROOT / "docker-compose.yml",
            env_file: Path = ROOT / ".env.example", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`docker-compose --profile P ... ARGS` on `file`, relative paths resolved against the repository root."""
    import os

    cmd = [tool("docker-compose"), "--project-directory", str(ROOT), "-f", str(file), "--env-file", str(env_file),
           "--profile", profile, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def compose_model(profile: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The resolved compose model of a profile (interpolated by the real Compose binary)."""
    out = compose(profile, "config", "--format", "json", env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# -- helm ------------------------------------------------------------------------------------------------
def values(name: str) -> dict[str, Any] | None:
    path = VALUES[name]
    return yaml.safe_load(path.read_text()) if path else None


def render(chart: Path = CHART, vals: dict[str, Any] | None = None, name: str = "demo",
           namespace: str = "rl") -> dict[str, str]:
    """template path -> rendered text, as `helm template` (Helm SDK v4, no helm binary)."""
    from helm_python import Chart

    chart_obj = Chart.load(str(chart))
    try:
        return chart_obj.render(vals, name=name, namespace=namespace)
    finally:
        chart_obj.close()


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def write_manifests(rendered: dict[str, str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml") and text.strip():
            f = out / Path(path).name
            f.write_text(text)
            files.append(f)
    return files


def kube_validate(files: list[Path], version: str) -> subprocess.CompletedProcess[str]:
    return run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *map(str, files)], timeout=300)


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec) of every workload."""
    return [(d, d["spec"]["template"]["spec"]) for d in docs
            if d["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet")]


# -- the parse check: a container command against the CLI ------------------------------------------------
def _parse(parser: argparse.ArgumentParser, args: list[str], what: str) -> tuple[argparse.Namespace, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return parser.parse_known_args(args)
        except SystemExit:
            raise AssertionError(f"{what}: the CLI refuses {args}: {err.getvalue().strip()}") from None


def unwrap_sh(argv: list[str]) -> list[str]:
    """What a command that reads its keys at run time execs: `sh -c 'exec "$@" FLAGS...' NAME PROGRAM ARGS...`
    -> PROGRAM ARGS FLAGS (the compose model's `$$` unescaped; FLAGS' values as written, e.g. "$(cat FILE)" or
    "$VAR"). Any other command is returned as is."""
    if argv[:2] != ["sh", "-c"]:
        return argv
    words = shlex.split(argv[2].replace("$$", "$"))
    assert words[:2] == ["exec", "$@"] and len(argv) > 4, f"not an `exec \"$@\" FLAGS` wrapper: {argv[:4]}"
    return [*argv[4:], *words[2:]]


def check_command(argv: list[str], files: dict[str, Path], what: str) -> list[str]:
    """Parse a container's command line as its program would and return it in `asyncgrpo ...` form.
    torchrun's and sglang-router's own parsers, then `asyncgrpo COMMAND`'s parser; for a command with
    --config the run config is loaded with its dotted overrides (a wrong key or value fails). `files` maps
    the container paths of config files to local copies. A `sh -c 'exec "$@" ...'` wrapper is unwrapped first."""
    argv = unwrap_sh(argv)
    if argv[:3] == ["python", "-m", "sglang_router.launch_router"]:
        from sglang_router.launch_router import parse_router_args

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                parse_router_args(argv[3:])
            except SystemExit:
                raise AssertionError(f"{what}: sglang-router refuses {argv[3:]}: {err.getvalue().strip()}") from None
        return argv
    if argv[:3] == ["python", "-m", "torch.distributed.run"]:
        from torch.distributed.run import get_args_parser

        targs = _parse(get_args_parser(), argv[3:], f"{what} (torchrun)")[0]
        assert targs.module and targs.training_script == "asyncgrpo.cli", f"{what}: torchrun must run -m asyncgrpo.cli"
        argv = ["asyncgrpo", *targs.training_script_args]
    elif argv[:3] == ["python", "-m", "asyncgrpo.cli"]:
        argv = ["asyncgrpo", *argv[3:]]
    assert argv[0] == "asyncgrpo", f"{what}: not an asyncgrpo command: {argv}"
    from asyncgrpo.cli import COMMANDS

    assert argv[1] in COMMANDS, f"{what}: unknown command {argv[1]!r}"
    module = importlib.import_module(COMMANDS[argv[1]][0])
    parser = argparse.ArgumentParser(prog=f"asyncgrpo {argv[1]}")
    module.add_arguments(parser)
    args, extra = _parse(parser, argv[2:], what)
    assert not extra or getattr(module, "ACCEPTS_OVERRIDES", False), f"{what}: unrecognized arguments {extra}"
    if getattr(args, "config", None) is not None:
        from asyncgrpo.config import load_config

        local = []
        for c in args.config:
            assert c in files, f"{what}: --config {c} is not a file the deployment mounts ({sorted(files)})"
            local.append(str(files[c]))
        load_config(local, extra)  # ConfigError on a wrong key or value
    return argv


def expand_k8s(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of a container's args from its env (values from elsewhere: a stand-in)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)
