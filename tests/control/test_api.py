"""The control plane's REST API against a real redis-server: a registered run (as its trainer registers it)
is listed, read, inspected, paused, resumed, drained, stopped and re-knobbed; every user mistake answers 4xx
with a message naming the problem, and every mutation is in the audit list."""

from __future__ import annotations

import json

import pytest
import redis
from fastapi.testclient import TestClient

from asyncgrpo.config import load_config
from asyncgrpo.control.api import create_app
from asyncgrpo.control.handlers import ControlPlane
from asyncgrpo.queue import GroupQueue, RunState
from asyncgrpo.queue.run_control import RunControl, redacted_config
from asyncgrpo.queue.schema import Completion, Group, PromptRef

TOKEN = "control-test-token"
RUN = "exp/t1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _config(**over):
    return load_config(overrides={"experiment_name": "exp", "trial_name": "t1",
                                  "redis": {"url": "redis://:secret-pw@127.0.0.1:6379/0"},
                                  "auth": {"api_key": "gen-key"}, "control": {"token": "tok"},
                                  "reward": {"fns": ["gsm8k"], "orm": {"url": "http://127.0.0.1:9", "api_key": "orm-key"}},
                                  # nothing listens on port 9: a server that cannot be asked
                                  "rollout": {"server_urls": ["http://127.0.0.1:9"], "max_head_offpolicyness": 2},
                                  "trainer": {"max_steps": 40}, **over})


def _group(gid: str, version: int) -> Group:
    c = Completion(output_ids=[1, 2], logprobs=[-0.5, -0.5], version_spans=[(version, 0, 2)], finish_reason="stop",
                   reward=1.0)
    return Group(run_id=RUN, group_id=gid, prompt_id="p", epoch=0, position=0, attempt=0, prompt_ids=[3, 4],
                 completions=[c])


@pytest.fixture
def client(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    RunControl(r, RUN).register(redacted_config(_config()))
    plane = ControlPlane(r, server_timeout_s=1.0)
    with TestClient(create_app(plane, token=TOKEN)) as c:
        c.redis = r  # type: ignore[attr-defined]
        yield c


def test_list_get_and_secrets_redacted(client) -> None:
    runs = client.get("/v1/runs").json()
    assert [(r["run_id"], r["status"], r["version"]) for r in runs] == [(RUN, "running", 0)]
    d = client.get("/v1/runs/exp/t1").json()
    assert d["status"] == "running" and d["max_steps"] == 40 and d["trainer_alive"] is False
    assert d["knobs"] == {"rollout.max_head_offpolicyness": 2, "actor.temperature": 1.0, "rollout.top_p": 1.0}
    assert d["servers"] == [{"url": "http://127.0.0.1:9", "healthy": False, "weight_version": None,
                             "running_requests": None, "waiting_requests": None,
                             "error": "GET /health did not answer 200"}]
    text = json.dumps(d)
    assert "secret-pw" not in text and "gen-key" not in text and '"tok"' not in text and "orm-key" not in text, text


def test_pause_resume_drain_stop_with_audit(client) -> None:
    state = RunState(client.redis, RUN)
    r = client.post("/v1/runs/exp/t1/pause", headers={**AUTH, "x-asyncgrpo-actor": "alice"})
    assert r.status_code == 200 and r.json()["status"] == "paused" and state.is_paused()
    assert client.post("/v1/runs/exp/t1/resume", headers=AUTH).json()["status"] == "running" and not state.is_paused()
    assert client.post("/v1/runs/exp/t1/drain", headers=AUTH).json()["status"] == "draining"
    # a draining run is not paused or resumed: 409 naming why
    r = client.post("/v1/runs/exp/t1/pause", headers=AUTH)
    assert r.status_code == 409 and "draining" in r.json()["message"]
    assert client.post("/v1/runs/exp/t1/stop", headers=AUTH).json()["status"] == "stopping"
    RunControl(client.redis, RUN).set_status("stopped")  # what the trainer writes when it has stopped
    r = client.post("/v1/runs/exp/t1/resume", headers=AUTH)
    assert r.status_code == 409 and "--resume" in r.json()["message"]
    audit = client.get("/v1/runs/exp/t1/audit").json()["entries"]
    assert [(e["action"], e["old"]) for e in audit] == [("stop", "draining"), ("drain", "running"),
                                                       ("resume", "paused"), ("pause", "running")]
    assert audit[-1]["who"] == "alice@testclient"


def test_knobs_are_validated_applied_and_audited(client) -> None:
    r = client.patch("/v1/runs/exp/t1/knobs", headers=AUTH,
                     json={"knobs": {"actor.temperature": 0.7, "rollout.max_head_offpolicyness": 2}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["knobs"]["actor.temperature"] == 0.7
    # only what changed is recorded (max_head_offpolicyness was already 2)
    assert [(c["key"], c["old"], c["new"]) for c in body["changes"]] == [("actor.temperature", 1.0, 0.7)]
    assert RunControl(client.redis, RUN).knobs() == {"actor.temperature": 0.7}
    # the admission script uses the live bound, and hands the sampling knobs to the worker
    client.patch("/v1/runs/exp/t1/knobs", headers=AUTH, json={"knobs": {"rollout.max_head_offpolicyness": 0}})
    state = RunState(client.redis, RUN)
    state.init_cursor(10, 1)
    adm = [state.admit(max_head_offpolicyness=5, batch_groups=2, dataset_size=10, total_epochs=1, lease_ttl_s=60,
                       owner="w#0") for _ in range(3)]
    assert [a.status for a in adm] == ["ok", "ok", "over_budget"] and adm[0].capacity == 2
    assert adm[0].knobs == {"actor.temperature": 0.7, "rollout.max_head_offpolicyness": 0}
    entries = client.get("/v1/runs/exp/t1/audit").json()["entries"]
    assert [(e["key"], e["old"], e["new"]) for e in entries] == [("rollout.max_head_offpolicyness", 2, 0),
                                                                ("actor.temperature", 1.0, 0.7)]


@pytest.mark.parametrize(("knobs", "message"), [
    ({"actor.temperature": -1}, "actor.temperature: Input should be greater than or equal to 0.01"),
    ('{"actor.temperature": 1e309}', "actor.temperature: Input should be a finite number"),  # JSON that parses to inf
    ({"rollout.max_head_offpolicyness": 10**41}, "rollout.max_head_offpolicyness: Input should be less than or equal to 10000"),
    ({"rollout.top_p": 1.5}, "rollout.top_p: Input should be less than or equal to 1"),
    ({"rollout.max_head_offpolicyness": "two"}, "rollout.max_head_offpolicyness: Input should be a valid integer"),
    ({"optimizer.lr": 1.0}, "optimizer.lr: not a live knob; live knobs are"),
])
def test_bad_knobs_are_400_naming_the_key(client, knobs, message) -> None:
    if isinstance(knobs, str):
        r = client.patch("/v1/runs/exp/t1/knobs", headers={**AUTH, "content-type": "application/json"},
                         content=f'{{"knobs": {knobs}}}')
    else:
        r = client.patch("/v1/runs/exp/t1/knobs", headers=AUTH, json={"knobs": knobs})
    assert r.status_code == 400 and message in r.json()["message"], r.text
    assert RunControl(client.redis, RUN).knobs() == {} and client.get("/v1/runs/exp/t1/audit").json()["entries"] == []


@pytest.mark.parametrize(("method", "path", "kw", "code", "message"), [
    ("get", "/v1/runs/exp/nope", {}, 404, "run 'exp/nope' not found; known runs: exp/t1"),
    ("post", "/v1/runs/exp/nope/pause", {"headers": AUTH}, 404, "not found"),
    ("post", "/v1/runs/exp/t1/pause", {}, 401, "missing or wrong bearer token"),
    ("post", "/v1/runs/exp/t1/pause", {"headers": {"Authorization": "Bearer wrong"}}, 401, "missing or wrong"),
    ("patch", "/v1/runs/exp/t1/knobs", {"headers": AUTH, "content": b"{not json"}, 400, "JSON"),
    ("patch", "/v1/runs/exp/t1/knobs", {"headers": AUTH, "json": {"knobs": {}}}, 400, "knobs"),
    ("patch", "/v1/runs/exp/t1/knobs", {"headers": AUTH, "json": {"knob": {"actor.temperature": 1}}}, 400, "knob"),
    ("get", "/v1/runs/exp/t1/steps?limit=0", {}, 400, "limit"),
])
def test_user_mistakes_are_4xx_naming_the_problem(client, method, path, kw, code, message) -> None:
    r = getattr(client, method)(path, **kw)
    assert r.status_code == code and message in r.json()["message"], r.text
    assert not RunState(client.redis, RUN).is_paused()


def test_without_a_token_mutations_are_refused_and_reads_can_be_protected(redis_server) -> None:
    r = redis.Redis.from_url(redis_server.url)
    RunControl(r, RUN).register(redacted_config(_config()))
    with TestClient(create_app(ControlPlane(r), token=None)) as c:
        resp = c.post("/v1/runs/exp/t1/pause", headers=AUTH)
        assert resp.status_code == 401 and "ASYNCGRPO_CONTROL_TOKEN" in resp.json()["message"]
        assert c.get("/v1/runs").status_code == 200
    with TestClient(create_app(ControlPlane(r), token=TOKEN, protect_reads=True)) as c:
        assert c.get("/v1/runs").status_code == 401 and c.get("/v1/runs", headers=AUTH).status_code == 200
    assert not RunState(r, RUN).is_paused()


def test_inspect_reports_queue_staleness_dead_letters_and_steps(client) -> None:
    r = client.redis
    state, q, ctl = RunState(r, RUN), GroupQueue(r, RUN), RunControl(r, RUN)
    q.push(_group("bad", 0), PromptRef(0, 9, 0))
    [(msg_id, _)] = q.consume("trainer-0", count=1)  # delivered to the trainer, which dead-letters it
    q.dead_letter([(msg_id, "bad", "vocab", "token id 999 is outside the vocabulary")])
    for i, v in enumerate([0, 0, 1, 2]):
        q.push(_group(f"g{i}", v), PromptRef(0, i, 0))
    state.set_version(2)
    ctl.record_step({"version": 1, "loss": 0.1, "reward_mean": 0.5, "tokens_per_s": 100.0})
    ctl.record_step({"version": 2, "loss": 0.2, "reward_mean": 0.6, "tokens_per_s": 120.0})
    ctl.record_completion({"group_id": "g0", "rewards": [1.0], "text": "#### 3"})
    i = client.get("/v1/runs/exp/t1/inspect").json()
    assert i["queue_depth"] == 4 and i["staleness_histogram"] == {"0": 1, "1": 1, "2": 2}
    assert i["dead_letters"]["count"] == 1 and i["dead_letters"]["by_kind"] == {"vocab": 1}
    assert "vocabulary" in i["dead_letters"]["recent"][0]["reason"]
    assert [s["version"] for s in i["steps"]] == [1, 2] and i["trainer_tokens_per_s"] == 120.0
    assert i["completions"][0]["text"] == "#### 3"
    assert client.get("/v1/runs/exp/t1/steps?limit=1").json()["steps"] == [i["steps"][-1]]
    # a held-out evaluation at version 2 (the newest of two wins) rides on that version's step row
    ctl.record_eval({"version": 2, "reward": 0.4, "greedy_reward": 0.6})
    ctl.record_eval({"version": 2, "reward": 0.55, "greedy_reward": 0.7})
    steps = client.get("/v1/runs/exp/t1/steps").json()["steps"]
    assert [(s["version"], s.get("eval_accuracy"), s.get("eval_greedy_accuracy")) for s in steps] == [
        (1, None, None), (2, 0.55, 0.7)], steps


def test_redis_down_is_503_with_a_clear_line(redis_server) -> None:
    r = redis.Redis.from_url(redis_server.url, socket_timeout=1, socket_connect_timeout=1)
    RunControl(r, RUN).register(redacted_config(_config()))
    redis_server.stop()
    with TestClient(create_app(ControlPlane(r), token=TOKEN)) as c:
        resp = c.get("/v1/runs/exp/t1")
        assert resp.status_code == 503 and "Redis does not answer" in resp.json()["message"]
