"""deploy/'s Dockerfiles: hadolint (error threshold) passes on each and fails on a broken copy; each image is
multi-stage, on pinned bases, runs as a non-root user, has a HEALTHCHECK and the asyncgrpo entry point."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .tools import DOCKERFILES, ROOT, run, tool


def hadolint(path: Path):  # noqa: ANN201
    return run([tool("hadolint"), "--no-color", "--failure-threshold", "error", str(path)])


def test_there_are_the_two_images() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile", "Dockerfile.trainer-gpu"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    out = hadolint(dockerfile)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("breakage", [
    ("WORKDIR /home/asyncgrpo", "WORKDIR home/asyncgrpo"),  # DL3000: relative WORKDIR
    ("USER 10001:10001", "USER 10001:10001\nMAINTAINER someone"),  # DL4000: deprecated MAINTAINER
    ("FROM ${PYTHON_IMAGE} AS build", "FROMM ${PYTHON_IMAGE} AS build"),  # not a Dockerfile
], ids=["relative-workdir", "maintainer", "syntax"])
def test_hadolint_fails_on_a_broken_copy(tmp_path: Path, breakage: tuple[str, str]) -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert breakage[0] in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(breakage[0], breakage[1], 1))
    out = hadolint(broken)
    assert out.returncode != 0, out.stdout


def image_policy(text: str) -> list[str]:
    """What an image of ours must be; the problems found (empty: fine)."""
    problems = []
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    if len(froms) < 2:
        problems.append("not multi-stage")
    for ref in froms:
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), ref)
        name, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "")
        if not tag or tag == "latest" or "$" in ref:
            problems.append(f"base {ref} is not pinned by a tag")
    users = re.findall(r"^USER (\S+)", text, re.M)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("runs as root")
    if not re.search(r"^HEALTHCHECK .*CMD", text, re.M):
        problems.append("no HEALTHCHECK")
    if 'ENTRYPOINT ["/usr/local/bin/asyncgrpo-entrypoint"]' not in text:
        problems.append("not the asyncgrpo entrypoint")
    return problems


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_policy(dockerfile: Path) -> None:
    assert image_policy(dockerfile.read_text()) == []


def test_image_policy_fails_on_broken_copies() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert image_policy(text.replace("USER 10001:10001", "USER root"))
    assert image_policy(text.replace("python:3.11.13-slim-bookworm", "python"))
    assert image_policy(text.replace("python:3.11.13-slim-bookworm", "python:latest"))
    assert image_policy(re.sub(r"^HEALTHCHECK.*$", "", text, flags=re.M))


def test_entrypoint_turns_secret_files_into_the_environment(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    script = ROOT / "deploy" / "entrypoint.sh"
    env = {**os.environ, "ASYNCGRPO_CONTROL_TOKEN_FILE": str(token)}
    out = subprocess.run(["sh", str(script), "sh", "-c", 'echo "$ASYNCGRPO_CONTROL_TOKEN|${ASYNCGRPO_CONTROL_TOKEN_FILE:-gone}"'],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "s3cret|gone", out.stderr
    # the file wins over a variable already set, and says so; every key the deployment hands as a file is known
    for name in ("ASYNCGRPO_API_KEY", "ASYNCGRPO_ADMIN_API_KEY", "ASYNCGRPO_CONTROL_TOKEN", "ASYNCGRPO_REWARD_API_KEY"):
        both = {**os.environ, name: "old", f"{name}_FILE": str(token)}
        out = subprocess.run(["sh", str(script), "sh", "-c", f'echo "${name}"'], env=both, capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.strip() == "s3cret" and "using the file" in out.stderr, (name, out)
    env["ASYNCGRPO_CONTROL_TOKEN_FILE"] = str(tmp_path / "missing")
    out = subprocess.run(["sh", str(script), "true"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "not a readable file" in out.stderr


def test_entrypoint_idles_a_command_outside_its_pod(tmp_path: Path) -> None:
    script = ROOT / "deploy" / "entrypoint.sh"
    env = {**os.environ, "ASYNCGRPO_RUN_ON_INDEX": "0", "ASYNCGRPO_POD_INDEX": "0"}
    out = subprocess.run(["sh", str(script), "echo", "ran"], env=env, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "ran"
    env["ASYNCGRPO_POD_INDEX"] = "1"  # another pod: the command does not run, SIGTERM ends the idling at once
    log = tmp_path / "out"
    with log.open("w") as f:
        p = subprocess.Popen(["sh", str(script), "echo", "ran"], env=env, stdout=f, text=True)
    try:
        time.sleep(0.5)
        assert p.poll() is None
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
    assert "idle" in log.read_text() and "ran\n" not in log.read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_holds_what_the_image_copies(dockerfile: Path) -> None:
    """The Dockerfile's own .dockerignore keeps the context small (no runs/, caches, .git) but lets in every
    COPY source."""
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert "*" in ignore
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile.read_text(), re.M):
        for src in line.split()[:-1]:
            assert src.rstrip("/") in allowed and (ROOT / src).exists(), f"COPY {src} is not in the build context"


# -- every image the deployment pulls is pinned ------------------------------------------------------------
PINNED = re.compile(r"^(?P<name>[^@\s]+?)(?::(?P<tag>[\w][\w.-]*))?(?:@sha256:(?P<digest>[0-9a-f]{64}))?$")


def unpinned(ref: str) -> str | None:
    """Why an image reference is not pinned (None: pinned): a sha256 digest, or a tag holding a full x.y.z version
    (v0.5.23-cu129, 7.4.6, 2.9.0-cuda12.8-...); never no tag, `latest`, or a bare major / major.minor (redis:7.4)."""
    m = PINNED.match(ref.strip().strip('"'))
    if not m:
        return f"{ref}: not an image reference"
    if m["digest"]:
        return None
    tag = m["tag"]
    if not tag:
        return f"{ref}: no tag (latest)"
    if tag == "latest" or not re.search(r"(?<![\d.])v?\d+\.\d+\.\d+(?![\d])", tag):
        return f"{ref}: tag {tag} is not a full x.y.z version"
    return None


def deployment_images() -> dict[str, str]:
    """where -> image of every container compose (both profiles, .env.example's defaults and compose's own) and the
    chart (default, CPU, multi-node values) run."""
    from .tools import VALUES, compose_model, manifests, pod_specs, render, values

    images = {}
    for profile in ("gpu", "cpu"):
        for env_file in (ROOT / ".env.example", None):
            model = compose_model(profile) if env_file else _compose_defaults(profile)
            for name, svc in model["services"].items():
                images[f"compose {profile} {'env' if env_file else 'defaults'} {name}"] = svc["image"]
    for vals in VALUES:
        for workload, spec in pod_specs(manifests(render(vals=values(vals)))):
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                images[f"helm {vals} {workload['metadata']['name']}/{c['name']}"] = c["image"]
    return images


def _compose_defaults(profile: str) -> dict:
    """The compose model with no .env: the `${VAR:-default}` defaults of docker-compose.yml itself."""
    import json
    import tempfile

    from .tools import compose

    with tempfile.TemporaryDirectory() as d:
        empty = Path(d) / "keys-only.env"
        empty.write_text("ASYNCGRPO_API_KEY=k\nASYNCGRPO_ADMIN_API_KEY=a\n")
        out = compose(profile, "config", "--format", "json", env_file=empty)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_every_deployment_image_is_pinned() -> None:
    images = deployment_images()
    assert len(images) > 20
    assert [why for why in map(unpinned, images.values()) if why] == []
    for where in ("compose gpu env redis", "compose cpu defaults redis", "helm default demo-asyncgrpo-redis/redis"):
        assert unpinned(images[where]) is None and images[where].strip('"').startswith("redis:7.4.")


def test_the_pin_check_fails_on_floating_references() -> None:
    for ref in ("redis:7.4", "redis:7", "redis", "redis:latest", "grafana/grafana:12.1", "lmsysorg/sglang:v0.5-cu129",
                "registry:5000/asyncgrpo"):
        assert unpinned(ref), ref
    for ref in ("redis:7.4.6", "prom/prometheus:v3.5.0", "lmsysorg/sglang:v0.5.23-cu129", "asyncgrpo:0.1.0",
                "registry:5000/asyncgrpo:0.1.0", "redis@sha256:" + "a" * 64, '"asyncgrpo-trainer-gpu:0.1.0"'):
        assert unpinned(ref) is None, ref
