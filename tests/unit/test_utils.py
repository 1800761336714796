"""The shared plumbing: one metrics registry with get-or-create, one logging setup."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client import generate_latest

from asyncgrpo.utils.logging import setup_logging
from asyncgrpo.utils.metrics import REGISTRY, counter, gauge, histogram


def test_metric_get_or_create_returns_the_same_collector() -> None:
    a = counter("test_things_total", "things", ["kind"])
    b = counter("test_things_total", "things", ["kind"])
    assert a is b
    a.labels(kind="x").inc(3)
    text = generate_latest(REGISTRY).decode()
    assert 'asyncgrpo_test_things_total{kind="x"} 3.0' in text


def test_metric_conflicting_redeclaration_is_an_error() -> None:
    gauge("test_conflict", "a gauge")
    with pytest.raises(ValueError, match="already registered"):
        histogram("test_conflict", "now a histogram")
    with pytest.raises(ValueError, match="already registered"):
        gauge("test_conflict", "a gauge", ["label"])


def test_json_logs_carry_the_service(capsys: pytest.CaptureFixture[str]) -> None:
    log = setup_logging("unit", level="INFO", json_logs=True)
    log.info("hello %s", "world")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    rec = json.loads(line)
    assert rec["service"] == "unit" and rec["msg"] == "hello world" and rec["level"] == "INFO"
    logging.getLogger().handlers.clear()
