"""The control plane steering a real run: redis-server, genserver, weight-sync, rollout, trainer and the
control plane as processes, planned exactly as `asyncgrpo up` plans them.

The pause is a click on the dashboard's Pause button in headless Chromium, once its plots are drawn from the
run's live data; the API confirms it. Pause while groups are in flight: admission stops, the groups in flight land in the queue, the trainer stops
at a step boundary and stays there. Knobs changed while paused are validated, audited, and in force after
resume (every later step trains at the new temperature, every later group was sampled at it). Resume: the run
trains to its last step. Every pushed group is accounted for (trained once, dropped stale, dead-lettered or
still queued). A second run is drained: rollout exits after its admitted groups, the trainer trains full
batches and stops, and nothing admitted is lost."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from asyncgrpo.utils.net import free_port
from control.browser import chromium_page
from faults.system import System, fault_config, write_dataset

pytestmark = pytest.mark.slow
STEPS = 60  # the dashboard must catch the run while it trains: a tiny step takes ~0.2 s, and 16 steps were
# over before a loaded machine's browser clicked Pause


def _token(run: System) -> str:
    """The control token: in the run directory (mode 600) and in the control plane's environment only."""
    path = run.plan.run_dir / "control_token"
    assert path.stat().st_mode & 0o077 == 0 and "ASYNCGRPO_CONTROL_TOKEN" not in run.plan.env
    return path.read_text().strip()


def _api(run: System) -> tuple[str, dict[str, str]]:
    c = run.plan.cfg
    exp, trial = c.run_id.split("/")
    return (f"http://{c.control.host}:{c.control.port}/v1/runs/{exp}/{trial}",
            {"Authorization": f"Bearer {_token(run)}", "x-asyncgrpo-actor": "test"})


def _until(what: str, cond, timeout: float, run: System):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while True:
        run._check_alive()
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout:.0f}s\n{run.logs()}")
        time.sleep(0.2)


def _pause_from_the_dashboard(run: System, screenshot: Path) -> None:
    """Open the dashboard, wait until its reward plot shows steps of this run, enter the token, click Pause."""
    c = run.plan.cfg
    with chromium_page() as page:
        page.goto(f"http://{c.control.host}:{c.control.port}/")
        page.wait_for_function("Number(document.body.dataset.version) >= 2", timeout=240_000, polling=200)
        points = page.evaluate("document.getElementById('plot-reward').data[0].x.length")
        assert points >= 2, f"the reward plot shows {points} steps"
        assert page.locator("#plot-reward .scatterlayer .trace").count() >= 1  # drawn by plotly, not just data
        assert page.locator("#status").inner_text() == "running"
        token = _token(run)
        page.evaluate("t => sessionStorage.setItem('asyncgrpo-token', t)", token)
        page.click("#pause")
        page.wait_for_function("document.body.dataset.status === 'paused'", timeout=30_000)
        page.screenshot(path=str(screenshot), full_page=True)
        if os.environ.get("ASYNCGRPO_DASHBOARD_SCREENSHOT"):  # docs/: written on request, never by CI
            page.screenshot(path=os.environ["ASYNCGRPO_DASHBOARD_SCREENSHOT"], full_page=True)
        assert not page.js_errors, page.js_errors


def _check_metrics(run: System) -> None:
    """Every service's /metrics passes `promtool check metrics` (exposition format and naming lint)."""
    c = run.plan.cfg
    urls = {"genserver": f"{c.rollout.server_urls[0]}/metrics",
            "weight-sync": f"http://{c.weight_sync.host}:{c.weight_sync.port}/metrics",
            "control": f"http://{c.control.host}:{c.control.port}/metrics",
            "trainer": f"http://127.0.0.1:{c.trainer.metrics_port}/metrics",
            "rollout": f"http://127.0.0.1:{c.rollout.metrics_port}/metrics"}
    served: set[str] = set()
    for name, u in urls.items():
        body = httpx.get(u, timeout=10).text
        assert "asyncgrpo_" in body, f"{name}: no asyncgrpo metric at {u}"
        out = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{name} /metrics: promtool says\n{out.stdout}{out.stderr}"
        for line in body.splitlines():
            if line.startswith("# TYPE "):
                metric, kind = line.split()[2:4]
                served |= {metric, f"{metric}_total"} | ({f"{metric}_bucket"} if kind == "histogram" else set())
    # the Grafana dashboard in deploy/ plots only metrics the services serve
    grafana = (Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "asyncgrpo.json").read_text()
    wanted = set(re.findall(r"asyncgrpo_[a-z_]+", grafana))
    assert wanted and not wanted - served, f"deploy/grafana/asyncgrpo.json plots metrics nobody serves: {wanted - served}"


def _check_fleet(run: System, version: int) -> None:
    """The gRPC fleet API reads the run's weight-sync membership (and refuses an unknown server by name)."""
    import grpc

    from asyncgrpo.v1 import control_pb2 as pb
    from asyncgrpo.v1 import control_pb2_grpc as pb_grpc

    c = run.plan.cfg
    auth = (("authorization", f"Bearer {_token(run)}"),)
    with grpc.insecure_channel(f"{c.control.host}:{c.control.grpc_port}") as ch:
        fleet = pb_grpc.FleetServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:  # it asks weight-sync with the control plane's key: token only
            fleet.ListServers(pb.ListServersRequest(run_id=c.run_id), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        servers = fleet.ListServers(pb.ListServersRequest(run_id=c.run_id), metadata=auth, timeout=30).servers
        assert [(s["url"], int(s["version"])) for s in servers] == [(c.rollout.server_urls[0], version)], servers
        with pytest.raises(grpc.RpcError) as e:
            fleet.DeregisterServer(pb.DeregisterServerRequest(run_id=c.run_id, url="http://127.0.0.1:9"), metadata=auth,
                                   timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()


def test_pause_knobs_resume_with_nothing_lost(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "train.jsonl", 400)
    cfg = fault_config(tiny_model_dir, data, "control", steps=STEPS, checkpoint_interval=4)
    cfg.trainer.metrics_port, cfg.rollout.metrics_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    run = System(tmp_path, cfg)
    try:
        run.start()
        url, auth = _api(run)
        _pause_from_the_dashboard(run, tmp_path / "dashboard.png")  # the page is open before the run trains
        assert httpx.get(url, timeout=10).json()["status"] == "paused"
        # the groups in flight finish and are queued; the trainer stops at a step boundary
        _until("no group running", lambda: run.state.running() == 0, 60, run)
        _until("trainer paused", lambda: httpx.get(url, timeout=10).json()["trainer_state"] == "paused", 120, run)
        paused_at, started = run.state.get_version(), run.state.counters().get("groups_started")
        time.sleep(4.0)
        assert run.state.get_version() == paused_at, "the trainer stepped while paused"
        assert run.state.counters().get("groups_started") == started, "a group was admitted while paused"
        # knobs while paused: a bad one is refused naming the key, good ones are audited
        bad = httpx.patch(f"{url}/knobs", headers=auth, json={"knobs": {"actor.temperature": 0}}, timeout=10)
        assert bad.status_code == 400 and "actor.temperature" in bad.json()["message"]
        r = httpx.patch(f"{url}/knobs", headers=auth, timeout=10,
                        json={"knobs": {"actor.temperature": 0.9, "rollout.max_head_offpolicyness": 0}})
        assert r.status_code == 200, r.text
        insp = httpx.get(f"{url}/inspect", timeout=20).json()
        assert insp["running_groups"] == 0 and insp["version"] == paused_at
        assert insp["servers"][0]["healthy"] and insp["servers"][0]["weight_version"] == paused_at
        _check_metrics(run)
        _check_fleet(run, paused_at)
        assert httpx.post(f"{url}/resume", headers=auth, timeout=10).json()["status"] == "running"
        run.finish(300)
        acc = run.accounting()
        print(f"\n[control] paused at version {paused_at}; {acc.summary()}")
        assert not acc.lost, f"lost groups {sorted(acc.lost)}: {acc.summary()}"
        assert not acc.trained_twice and not any(acc.overlaps.values()), acc.overlaps
        assert len(acc.trained) == STEPS * run.cfg.train_dataset.batch_size
        steps = httpx.get(f"{url}/steps", timeout=10).json()["steps"]
        assert [s["version"] for s in steps] == list(range(1, STEPS + 1))
        after = [s for s in steps if s["version"] > paused_at]
        assert after and all(s["temperature"] == 0.9 and s["max_head_offpolicyness"] == 0 for s in after), after
        # trained groups sampled after the resume were sampled at 0.9 (the trainer drops other temperatures as stale)
        assert all(s["staleness_max"] <= 0 for s in after[1:]), after
        audit = httpx.get(f"{url}/audit", timeout=10).json()["entries"]
        assert [(e["action"], e["key"]) for e in audit] == [
            ("resume", None), ("set", "rollout.max_head_offpolicyness"), ("set", "actor.temperature"), ("pause", None)]
        assert [e["who"].split("@")[0] for e in audit] == ["test", "test", "test", "dashboard"]
        assert httpx.get(url, timeout=10).json()["status"] == "stopped"
        metrics = (run.plan.run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == STEPS
    finally:
        run.stop()
    assert not run.log_problems(), run.log_problems()


def test_drain_finishes_what_is_admitted_then_stops(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "train.jsonl", 400)
    run = System(tmp_path, fault_config(tiny_model_dir, data, "drain", steps=50, checkpoint_interval=4))
    run.may_exit = {"rollout"}
    try:
        run.start()
        url, auth = _api(run)
        run.wait_version(2, 240)
        assert httpx.post(f"{url}/drain", headers=auth, timeout=10).json()["status"] == "draining"
        rollout, trainer = run.svc("rollout"), run.svc("trainer")
        _until("rollout exits", lambda: rollout.proc.poll() is not None, 120, run)
        assert rollout.proc.returncode == 0
        _until("trainer exits", lambda: trainer.proc.poll() is not None, 180, run)
        assert trainer.proc.returncode == 0, run.logs()
        final = run.state.get_version()
        assert final < 50 and httpx.get(url, timeout=10).json()["status"] == "stopped"
        assert run.state.running() == 0
        c = run.plan.cfg
        acc = run.accounting(steps=final)
        print(f"\n[drain] stopped at version {final}; {acc.summary()}")
        assert not acc.lost and not acc.trained_twice and not any(acc.overlaps.values()), acc.summary()
        # fewer than one batch of untrained groups is left, kept in the queue for a resumed run
        assert len(acc.pending) < c.train_dataset.batch_size
        assert (run.plan.run_dir / "hf" / f"version_{final}" / "config.json").is_file()
    finally:
        run.stop()
    assert not run.log_problems(), run.log_problems()
