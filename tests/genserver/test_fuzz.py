"""Schemathesis over genserver's OpenAPI, against a real `asyncgrpo genserver` process with both keys: every
operation gets positive and negative (schema-violating) bodies and parameters, and must answer without a 5xx,
with a status, content type and body its OpenAPI documents (400 for every bad body, in SGLang's error shape),
reject every schema-violating request, and refuse a missing or wrong key (schemathesis' ignored_auth probes).

Reproducible: Hypothesis runs derandomized (the examples follow from the test and the schema alone) and without
its example database. What the fuzz may not do, and why:
- generate for long: a valid max_new_tokens / min_new_tokens / n / stream_interval is lowered to a few tokens
  (their bounds are tested in test_units.py and test_hostile.py); out-of-range values are left as generated;
- rendezvous with arbitrary hosts: a valid master_address of /init_weights_update_group becomes 127.0.0.1 (a
  generated host name would make each example a DNS lookup); the server's --dist-timeout-s 0.5 bounds each
  join attempt, so no example can hang on a group. A join attempt still costs torch's connect retry (0.5-1 s),
  so this operation gets the fuzzing examples but not schemathesis' boundary sweep (the coverage phase);
- load arbitrary files: /update_weights_from_disk takes only a checkpoint directory or a regular .safetensors
  file (never a FIFO or device), and the server's --dist-timeout-s bounds a load; generated paths do not exist;
- leave the server paused: every /pause_generation is followed by /continue_generation.
positive_data_acceptance is not checked: a well-formed request may rightly be refused for the server's state
(no update session, no such group, an unknown parameter name, a prompt longer than the context).
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from pydantic import TypeAdapter, ValidationError
from schemathesis.checks import positive_data_acceptance

from asyncgrpo.genserver.requests import MAX_N, MAX_TOKENS, Host

from .procs import GenServer

pytestmark = pytest.mark.slow
API, ADMIN = "fuzz-api-key", "fuzz-admin-key"
FEW = {"max_new_tokens": (0, MAX_TOKENS, 3), "min_new_tokens": (0, MAX_TOKENS, 2), "n": (1, MAX_N, 2),
       "stream_interval": (1, MAX_TOKENS, 2)}


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tmp_path_factory):
    srv = GenServer(tiny_model_dir, tmp_path_factory.mktemp("gs_fuzz") / "server.log", "--api-key", API,
                    "--admin-api-key", ADMIN, "--dist-timeout-s", "0.5")
    try:
        yield srv
    finally:
        srv.stop()
        log = srv.log.read_text(errors="replace")
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-4000:]


@pytest.fixture(scope="module")
def genserver_api(fuzz_server):
    config = schemathesis.Config.from_dict({"operations": [
        # each valid join attempt costs torch's connect retry (0.5-1 s): no boundary sweep for this one
        {"include-path": "/init_weights_update_group", "phases": {"coverage": {"enabled": False}}}]})
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", config=config,
                                         headers={"Authorization": f"Bearer {API}"})


schema = schemathesis.pytest.from_fixture("genserver_api")


def _valid_int(v: object, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def tame(case: schemathesis.Case) -> None:
    """Shrink what is valid but slow (see the module docstring); never touches an invalid value."""
    body = case.body
    if case.path == "/generate" and isinstance(body, dict):
        sps = body.get("sampling_params")
        for sp in sps if isinstance(sps, list) else [sps]:
            if isinstance(sp, dict):
                for key, (lo, hi, few) in FEW.items():
                    if _valid_int(sp.get(key), lo, hi) and sp[key] > few:
                        sp[key] = few
                if "max_new_tokens" not in sp:
                    sp["max_new_tokens"] = FEW["max_new_tokens"][2]  # SGLang's default is 128
        if "sampling_params" not in body or body["sampling_params"] is None:
            body["sampling_params"] = {"max_new_tokens": FEW["max_new_tokens"][2]}
    if case.path == "/init_weights_update_group" and isinstance(body, dict) and "master_address" in body:
        try:
            TypeAdapter(Host).validate_python(body["master_address"])
        except ValidationError:
            return
        body["master_address"] = "127.0.0.1"


@schema.parametrize()
@settings(max_examples=10, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_genserver_api(case: schemathesis.Case, fuzz_server) -> None:
    tame(case)
    scheme = (case.operation.definition.raw.get("security") or [{}])[0]
    key = ADMIN if "adminBearer" in scheme else API
    try:
        case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, excluded_checks=[positive_data_acceptance],
                               timeout=60)
    finally:
        if case.path == "/pause_generation":
            httpx.post(f"{fuzz_server.url}/continue_generation", json={},
                       headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).raise_for_status()
