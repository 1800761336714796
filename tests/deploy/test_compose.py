"""docker-compose.yml: the Compose v5 binary validates it for both profiles (and refuses broken copies); the
profiles hold the services the deployment needs, wired with healthchecks, and the cpu profile's services use
the same images and entry points as the gpu profile's."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from .tools import ROOT, compose, compose_model, unwrap_sh

GPU = {"redis", "sglang-0", "sglang-1", "sglang-2", "sglang-3", "router", "trainer", "weight-sync", "rollout", "control",
       "prometheus", "grafana"}
CPU = {"redis", "prepare", "genserver-0", "router-cpu", "trainer-cpu", "weight-sync-cpu", "rollout-cpu", "control-cpu",
       "prometheus", "grafana"}


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_config_is_valid(profile: str) -> None:
    out = compose(profile, "config", "-q")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("breakage", [
    ("condition: service_healthy}", "condition: service_healthyy}"),  # not a depends_on condition
    ("  shm_size: 16gb\n", "  shm_size: 16gb\n  gpus_count: 1\n"),  # not a service key
    ("  trainer:\n", "  trainer:\n    command: [\n"),  # not YAML
    ("trainer: {condition: service_started}", "nosuchservice: {condition: service_started}"),  # a dependency on nothing
], ids=["condition", "unknown-key", "yaml", "dangling-service"])
@pytest.mark.parametrize("profile", ["gpu"])
def test_compose_config_fails_on_a_broken_copy(tmp_path: Path, profile: str, breakage: tuple[str, str]) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert breakage[0] in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(breakage[0], breakage[1], 1))
    out = compose(profile, "config", "-q", file=broken)
    assert out.returncode != 0, f"compose accepted {breakage}"


@pytest.mark.parametrize("missing", ["ASYNCGRPO_API_KEY", "ASYNCGRPO_ADMIN_API_KEY"])
def test_compose_needs_the_keys(tmp_path: Path, missing: str) -> None:
    """An unset or empty key leaves its secret without a source: compose refuses the file, naming the secret."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    keys = {"ASYNCGRPO_API_KEY": "k", "ASYNCGRPO_ADMIN_API_KEY": "a", missing: ""}
    for profile in ("cpu", "gpu"):
        out = compose(profile, "config", "-q", env_file=empty, env=keys)
        secret = missing.removeprefix("ASYNCGRPO_").lower()
        assert out.returncode != 0 and f'secret "{secret}"' in out.stderr, out.stderr


@pytest.fixture(scope="module")
def models() -> dict[str, dict[str, Any]]:
    return {p: compose_model(p) for p in ("gpu", "cpu")}


def test_profiles_hold_their_services(models: dict[str, dict[str, Any]]) -> None:
    assert set(models["gpu"]["services"]) == GPU
    assert set(models["cpu"]["services"]) == CPU


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_wiring(models: dict[str, dict[str, Any]], profile: str) -> None:
    services = models[profile]["services"]
    for name, svc in services.items():
        if name != "prepare":  # a one-shot job
            assert "healthcheck" in svc, f"{name} has no healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on {dep}, not in the {profile} profile"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])
    assert snapshot_problems(models[profile], profile) == []
    control = services["control" if profile == "gpu" else "control-cpu"]
    assert [s["source"] for s in control["secrets"]] == ["api_key", "admin_api_key", "control_token"]
    assert control["environment"]["ASYNCGRPO_CONTROL_TOKEN_FILE"] == "/run/secrets/control_token"
    mounts = {v["target"] for s in services.values() for v in s.get("volumes", [])}
    assert {"/checkpoints", "/data"} <= mounts and (profile == "cpu" or "/models" in mounts)


def snapshot_problems(model: dict[str, Any], profile: str) -> list[str]:
    """The weight snapshot's hand-over as it must be: a tmpfs named volume (size from .env) mounted at
    weight_sync.snapshot_dir in both the trainer and weight-sync; weight-sync an ordinary peer (no namespace of
    the trainer's, which a restarted trainer container would leave behind), reached by the trainer's publisher
    and the servers' rendezvous under its own name; the trainer keeps its shm for NCCL."""
    import yaml

    services = model["services"]
    trainer = services["trainer" if profile == "gpu" else "trainer-cpu"]
    ws = services["weight-sync" if profile == "gpu" else "weight-sync-cpu"]
    deploy = yaml.safe_load(model["configs"][f"deploy-{profile}"]["content"])["weight_sync"]
    problems = []
    for name, svc in (("trainer", trainer), ("weight-sync", ws)):
        for key in ("ipc", "network_mode", "pid"):
            if str(svc.get(key, "")).startswith(("service:", "container:")) or svc.get(key) == "shareable":
                problems.append(f"{name} shares a namespace: {key}: {svc[key]}")
        mounts = [v for v in svc.get("volumes", []) if v["target"] == deploy["snapshot_dir"]]
        if len(mounts) != 1 or mounts[0]["type"] != "volume":
            problems.append(f"{name} does not mount a volume at snapshot_dir {deploy['snapshot_dir']}")
            continue
        volume = model["volumes"].get(mounts[0]["source"], {})
        opts = volume.get("driver_opts") or {}
        if volume.get("driver", "local") != "local" or opts.get("type") != "tmpfs" or "size=" not in opts.get("o", ""):
            problems.append(f"{name}'s snapshot volume {mounts[0]['source']} is not a sized local tmpfs: {volume}")
        import re

        users = {re.findall(r"^USER (\d+)", (ROOT / "deploy" / f).read_text(), re.M)[-1]
                 for f in ("Dockerfile", "Dockerfile.trainer-gpu")}
        if not any(f"uid={u}" in opts.get("o", "").split(",") for u in users):  # the images' user must write it
            problems.append(f"the snapshot tmpfs is not owned by the images' user {users}: {opts.get('o')}")
    sources = {v["source"] for s in (trainer, ws) for v in s.get("volumes", []) if v["target"] == deploy["snapshot_dir"]}
    if len(sources) != 1:
        problems.append(f"trainer and weight-sync mount different snapshot volumes: {sorted(sources)}")
    names = {"weight-sync"} | set(((ws.get("networks") or {}).get("default") or {}).get("aliases") or [])
    if deploy["master_address"] not in names:
        problems.append(f"weight_sync.master_address {deploy['master_address']} is not weight-sync's name")
    cmd = unwrap_sh(trainer["command"])
    if not any(a.startswith("--weight_sync.host=") and a.split("=", 1)[1] in names for a in cmd):
        problems.append("the trainer's publisher is not pointed at weight-sync (--weight_sync.host=weight-sync)")
    if not trainer.get("shm_size"):
        problems.append("the trainer has no shm_size (NCCL)")
    return problems


def test_snapshot_check_fails_on_broken_copies(models: dict[str, dict[str, Any]]) -> None:
    for profile in ("gpu", "cpu"):
        tr, ws = ("trainer", "weight-sync") if profile == "gpu" else ("trainer-cpu", "weight-sync-cpu")
        shared = copy.deepcopy(models[profile])  # the old way: weight-sync in the trainer's namespaces
        shared["services"][ws].update(ipc=f"service:{tr}", network_mode=f"service:{tr}")
        assert any("shares a namespace" in p for p in snapshot_problems(shared, profile))
        unmounted = copy.deepcopy(models[profile])
        unmounted["services"][ws]["volumes"] = [v for v in unmounted["services"][ws]["volumes"] if v["target"] != "/snapshot"]
        assert any("weight-sync does not mount" in p for p in snapshot_problems(unmounted, profile))
        on_disk = copy.deepcopy(models[profile])
        on_disk["volumes"]["snapshot"] = {"name": "x"}
        assert any("not a sized local tmpfs" in p for p in snapshot_problems(on_disk, profile))


def test_snapshot_size_is_a_knob() -> None:
    model = compose_model("cpu", env={"ASYNCGRPO_SNAPSHOT_SIZE": "3g"})
    assert "size=3g" in model["volumes"]["snapshot"]["driver_opts"]["o"]
    assert "ASYNCGRPO_SNAPSHOT_SIZE=" in (ROOT / ".env.example").read_text()


# what each GPU-profile service reads from its own mounts: the model (actor.path, the tokenizer, the disk
# fallback's base config), the prompts, the checkpoints volume (deploy.yaml's paths)
GPU_NEEDS = {"trainer": {"/models", "/checkpoints"}, "rollout": {"/models", "/data"},
             "weight-sync": {"/models", "/checkpoints"}, **{f"sglang-{i}": {"/models"} for i in range(4)}}


def missing_mounts(services: dict[str, Any]) -> dict[str, set[str]]:
    got = {n: {v["target"] for v in services[n].get("volumes", [])} for n in GPU_NEEDS}
    return {n: want - got[n] for n, want in GPU_NEEDS.items() if want - got[n]}


def test_each_gpu_service_mounts_what_it_reads(models: dict[str, dict[str, Any]]) -> None:
    assert missing_mounts(models["gpu"]["services"]) == {}
    broken = copy.deepcopy(models["gpu"]["services"])  # a union over services would not notice this
    broken["trainer"]["volumes"] = [v for v in broken["trainer"]["volumes"] if v["target"] != "/models"]
    assert missing_mounts(broken) == {"trainer": {"/models"}}


def test_gpu_services_reserve_gpus_and_run_torchrun(models: dict[str, dict[str, Any]]) -> None:
    services = models["gpu"]["services"]
    ids = []
    for name in ("sglang-0", "sglang-1", "sglang-2", "sglang-3", "trainer"):
        (dev,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
        ids.extend(",".join(dev["device_ids"]).split(","))
    assert len(ids) == len(set(ids)) == 8, f"the servers and the trainer share GPUs: {ids}"
    assert services["trainer"]["command"][:3] == ["python", "-m", "torch.distributed.run"]
    sg = unwrap_sh(services["sglang-0"]["command"])
    assert sg[:3] == ["python3", "-m", "sglang.launch_server"]
    for flag in ("--api-key", "--admin-api-key", "--port", "--model-path", "--host"):
        assert flag in sg
    assert sg[sg.index("--host") + 1] == "0.0.0.0" and services["sglang-0"]["image"].startswith("lmsysorg/sglang:v")


def test_cpu_profile_uses_the_same_images_and_entry_points(models: dict[str, dict[str, Any]]) -> None:
    gpu, cpu = models["gpu"]["services"], models["cpu"]["services"]
    for g, c in (("router", "router-cpu"), ("rollout", "rollout-cpu"), ("control", "control-cpu")):
        assert gpu[g]["image"] == cpu[c]["image"], (g, c)
        assert gpu[g]["command"][:3] == cpu[c]["command"][:3], (g, c)
    # the trainer and weight-sync: the same `asyncgrpo` entry point, the GPU variant of the image on GPUs
    assert cpu["trainer-cpu"]["command"][:2] == ["asyncgrpo", "trainer"]
    assert gpu["trainer"]["command"][-5:] == cpu["trainer-cpu"]["command"][-5:]  # trainer --config run --config deploy
    assert gpu["weight-sync"]["command"] == cpu["weight-sync-cpu"]["command"]
    assert cpu["genserver-0"]["image"] == cpu["rollout-cpu"]["image"]
    # each cpu service answers to the gpu service's name
    for g, c in (("router", "router-cpu"), ("trainer", "trainer-cpu"), ("rollout", "rollout-cpu"), ("control", "control-cpu")):
        assert g in cpu[c]["networks"]["default"]["aliases"]


def config_files(model: dict[str, Any], svc: dict[str, Any], out: Path) -> dict[str, Path]:
    """Container path -> local file of each compose config a service mounts (file: as is; content: written)."""
    files = {}
    for ref in svc.get("configs", []):
        cfg = model["configs"][ref["source"]]
        if "content" in cfg:
            path = out / f"{ref['source']}.yaml"
            path.write_text(cfg["content"])
        else:
            path = Path(cfg["file"])
        files[ref["target"]] = path
    return files


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_commands_parse_with_the_cli(models: dict[str, dict[str, Any]], tmp_path: Path, profile: str) -> None:
    from .tools import check_command

    model = models[profile]
    checked = set()
    for name, svc in model["services"].items():
        if svc["image"].rsplit(":", 1)[0] not in ("asyncgrpo", "asyncgrpo-trainer-gpu"):
            continue  # redis, SGLang, Prometheus, Grafana
        argv = check_command(list(svc["command"]), config_files(model, svc, tmp_path), name)
        checked.add(argv[1] if argv[0] == "asyncgrpo" else "router")
    want = {"trainer", "weight-sync", "rollout", "control", "router"} | ({"genserver", "prepare"} if profile == "cpu" else set())
    assert checked == want


def test_a_wrong_override_fails_the_parse_check(models: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    from asyncgrpo.config import ConfigError

    from .tools import check_command

    model = models["cpu"]
    svc = model["services"]["rollout-cpu"]
    files = config_files(model, svc, tmp_path)
    with pytest.raises(ConfigError):
        check_command([*svc["command"], "--rollout.max_concurent_rollouts=4"], files, "rollout-cpu")
    with pytest.raises(AssertionError, match="refuses"):
        check_command(["asyncgrpo", "genserver", "--modle", "/data/tiny/warm"], files, "genserver-0")
    with pytest.raises(AssertionError, match="refuses"):
        check_command(["python", "-m", "sglang_router.launch_router", "--no-such-flag"], files, "router")
    deploy = model["configs"]["deploy-cpu"]["content"]
    (tmp_path / "deploy-cpu.yaml").write_text(deploy.replace("worker_id: rollout-0", "worker_idd: rollout-0"))
    with pytest.raises(ConfigError):
        check_command(list(svc["command"]), {**files, "/etc/asyncgrpo/deploy.yaml": tmp_path / "deploy-cpu.yaml"}, "x")


def test_grafana_is_provisioned_with_the_dashboard(models: dict[str, dict[str, Any]]) -> None:
    """The provisioning files Grafana reads point at the compose Prometheus and at the folder the dashboard
    (deploy/grafana/asyncgrpo.json) is mounted into."""
    import yaml

    for profile in ("gpu", "cpu"):
        services = models[profile]["services"]
        grafana, prometheus = services["grafana"], services["prometheus"]
        mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
        prov = mounts["/etc/grafana/provisioning"]
        (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
        assert ds["type"] == "prometheus" and ds["url"] == f"http://prometheus:{prometheus['ports'][0]['target']}"
        (provider,) = yaml.safe_load((prov / "dashboards" / "asyncgrpo.yml").read_text())["providers"]
        board = Path(provider["options"]["path"]) / "asyncgrpo.json"
        assert mounts[str(board)] == ROOT / "deploy" / "grafana" / "asyncgrpo.json"
        prom = {v["target"]: Path(v["source"]) for v in prometheus["volumes"] if v["type"] == "bind"}
        assert prom["/etc/prometheus/prometheus.yml"] == ROOT / "deploy" / "prometheus" / "prometheus.yml"
