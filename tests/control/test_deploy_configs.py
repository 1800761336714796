"""deploy/'s monitoring configs are valid: promtool accepts the scrape config, and the Grafana dashboard is a
dashboard whose every panel queries asyncgrpo metrics of the selected run (test_live_run.py checks that the
services serve every metric it names)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_prometheus_scrape_config_is_valid() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (Debian package prometheus)"
    out = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_dashboard_queries_the_selected_run() -> None:
    d = json.loads((DEPLOY / "grafana" / "asyncgrpo.json").read_text())
    assert {v["name"] for v in d["templating"]["list"]} == {"datasource", "run"}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for p in d["panels"]:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert "asyncgrpo_" in t["expr"] and 'run=~"$run"' in t["expr"], (p["title"], t["expr"])
