"""utils/auth.py: SGLang's bearer-key decision table (written out, and compared case by case with SGLang 0.5.23's
own sglang/srt/utils/auth.py from the wheel), resolve_keys, and the ASGI middleware on a small app."""

from __future__ import annotations

import itertools

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from asyncgrpo.utils.auth import (
    ENV_ADMIN_API_KEY, ENV_API_KEY, AuthLevel, add_api_key_middleware, auth_level, bearer_matches, decide,
    document_auth, resolve_keys)

from . import sglang_wheel

N, A = AuthLevel.NORMAL, AuthLevel.ADMIN_OPTIONAL
K, ADM = "k-123", "adm-456"
GOOD, ADMIN, WRONG = f"Bearer {K}", f"Bearer {ADM}", "Bearer nope"


# (level, api_key, admin_api_key, Authorization, allowed): SGLang's comments in decide_request_auth, row by row
TABLE = [
    # no keys: everything open
    (N, None, None, None, True), (A, None, None, None, True), (A, None, None, WRONG, True),
    # api_key only: every endpoint needs it (legacy behaviour)
    (N, K, None, None, False), (N, K, None, WRONG, False), (N, K, None, GOOD, True),
    (A, K, None, None, False), (A, K, None, GOOD, True), (A, K, None, ADMIN, False),
    # admin key only: normal endpoints open, admin endpoints need it
    (N, None, ADM, None, True), (N, None, ADM, WRONG, True),
    (A, None, ADM, None, False), (A, None, ADM, GOOD, False), (A, None, ADM, ADMIN, True),
    # both: normal endpoints take only the api key, admin endpoints only the admin key
    (N, K, ADM, GOOD, True), (N, K, ADM, ADMIN, False), (N, K, ADM, None, False),
    (A, K, ADM, ADMIN, True), (A, K, ADM, GOOD, False), (A, K, ADM, None, False),
]


@pytest.mark.parametrize("level, api_key, admin_key, header, allowed", TABLE)
def test_decision_table(level, api_key, admin_key, header, allowed) -> None:
    d = decide(method="POST", path="/generate", authorization=header, api_key=api_key, admin_api_key=admin_key,
               level=level)
    assert d.allowed is allowed and d.status_code == 401


@pytest.mark.parametrize("path", ["/health", "/health_generate", "/ready", "/readyz", "/metrics", "/metrics/x"])
def test_probes_and_scraping_stay_open_and_options_is_allowed(path) -> None:
    for level in (N, A):
        assert decide(method="GET", path=path, authorization=None, api_key=K, admin_api_key=ADM, level=level).allowed
    assert decide(method="OPTIONS", path="/generate", authorization=None, api_key=K, admin_api_key=ADM, level=A).allowed
    assert not decide(method="GET", path="/model_info", authorization=None, api_key=K, admin_api_key=None, level=N).allowed


def test_bearer_parsing() -> None:
    assert bearer_matches(f"bearer {K}", K) and bearer_matches(f"BEARER {K}", K)
    for bad in (None, "", K, f"Basic {K}", f"Bearer{K}", f"Bearer  {K}", f"Bearer {K} ", "Bearer ", f"Token {K}"):
        assert not bearer_matches(bad, K), bad
    assert not bearer_matches("Bearer k-12\u00e9", K)  # non-ASCII: refused, not a TypeError (SGLang's str compare)


@pytest.fixture(scope="module")
def sglang_auth(tmp_path_factory):  # noqa: ANN201
    return sglang_wheel.load_module("sglang/srt/utils/auth.py", "sglang_auth_0_5_23", tmp_path_factory.mktemp("sglang_auth"))


def test_same_decisions_as_sglang(sglang_auth) -> None:
    """Every combination of method, path, header, keys and level decides as SGLang 0.5.23 does."""
    levels = {N: sglang_auth.AuthLevel.NORMAL, A: sglang_auth.AuthLevel.ADMIN_OPTIONAL}
    keys = [None, "", K, ADM]
    headers = [None, "", GOOD, ADMIN, WRONG, f"bearer {K}", f"Basic {K}", K, f"Bearer {K}x", "Bearer "]
    paths = ["/generate", "/update_weights_from_disk", "/health", "/health_generate", "/metrics", "/ready", "/v1/loads"]
    n = 0
    for method, path, header, api_key, admin_key, level in itertools.product(
            ["GET", "POST", "OPTIONS"], paths, headers, keys, keys, (N, A)):
        theirs = sglang_auth.decide_request_auth(method=method, path=path, authorization_header=header,
                                                 api_key=api_key, admin_api_key=admin_key, auth_level=levels[level])
        ours = decide(method=method, path=path, authorization=header, api_key=api_key, admin_api_key=admin_key,
                      level=level)
        assert (ours.allowed, ours.status_code) == (theirs.allowed, theirs.error_status_code), (
            method, path, header, api_key, admin_key, level)
        n += 1
    assert n == 3 * 7 * 10 * 4 * 4 * 2


def test_resolve_keys_falls_back_to_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(ENV_API_KEY, raising=False)
    monkeypatch.delenv(ENV_ADMIN_API_KEY, raising=False)
    assert resolve_keys(None, None) == (None, None)
    monkeypatch.setenv(ENV_API_KEY, "from-env")
    monkeypatch.setenv(ENV_ADMIN_API_KEY, "admin-env")
    assert resolve_keys(None, None) == ("from-env", "admin-env")
    assert resolve_keys("arg", None) == ("arg", "admin-env")
    assert resolve_keys(None, "adm") == ("from-env", "adm")
    assert resolve_keys("", "") == (None, None)  # an empty argument means no key, whatever the environment says
    monkeypatch.setenv(ENV_API_KEY, "")
    assert resolve_keys(None, None) == (None, "admin-env")  # an empty variable too


def small_app(api_key: str | None, admin_api_key: str | None) -> FastAPI:
    app = FastAPI()
    add_api_key_middleware(app, api_key=api_key, admin_api_key=admin_api_key)

    @app.post("/work")
    async def work() -> dict:
        return {"ok": True}

    @app.post("/admin")
    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def admin() -> dict:
        return {"ok": True}

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    return app


def test_middleware_answers_401_in_sglangs_shape() -> None:
    c = TestClient(small_app(K, ADM))
    r = c.post("/admin", headers={"Authorization": GOOD})
    assert r.status_code == 401 and r.json() == {"error": "Unauthorized"} and r.headers["www-authenticate"] == "Bearer"
    assert c.post("/admin", headers={"Authorization": ADMIN}).json() == {"ok": True}
    assert c.post("/work", headers={"Authorization": GOOD}).json() == {"ok": True}
    assert c.post("/work").status_code == 401
    assert c.post("/nowhere").status_code == 401  # an unknown path is NORMAL: no route is revealed without the key
    assert c.post("/nowhere", headers={"Authorization": GOOD}).status_code == 404
    assert c.get("/health").status_code == 200
    open_app = small_app(None, None)
    assert TestClient(open_app).post("/admin").json() == {"ok": True}
    assert len(open_app.user_middleware) == 0  # no key, no middleware (as SGLang)


def test_openapi_declares_the_scheme_where_a_key_is_needed() -> None:
    app = small_app(None, ADM)
    doc = app.openapi()
    document_auth(doc, app, api_key=None, admin_api_key=ADM)
    assert doc["components"]["securitySchemes"] == {"adminBearer": {
        "type": "http", "scheme": "bearer", "description": "the admin key (--admin-api-key)"}}
    assert doc["paths"]["/admin"]["post"]["security"] == [{"adminBearer": []}]
    assert "401" in doc["paths"]["/admin"]["post"]["responses"]
    assert "security" not in doc["paths"]["/work"]["post"]  # admin key only: normal endpoints are open
    assert "security" not in doc["paths"]["/health"]["get"]
    app = small_app(K, None)  # api key only: it guards both levels
    doc = app.openapi()
    document_auth(doc, app, api_key=K, admin_api_key=None)
    assert doc["paths"]["/admin"]["post"]["security"] == doc["paths"]["/work"]["post"]["security"] == [{"bearer": []}]
