"""The gRPC API (proto/asyncgrpo/v1): stubs fresh and lint clean; the run API over a real redis-server with the
same answers and errors as REST; WatchRun streams pause, resume, knob and version events as they happen."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import redis
from google.protobuf import struct_pb2

from asyncgrpo.config import load_config
from asyncgrpo.control.grpc_api import RunServicer, start_grpc
from asyncgrpo.control.handlers import ControlPlane
from asyncgrpo.queue import RunState
from asyncgrpo.queue.run_control import RunControl, redacted_config
from asyncgrpo.utils.net import free_port
from asyncgrpo.v1 import control_pb2 as pb
from asyncgrpo.v1 import control_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "grpc-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"), ("x-asyncgrpo-actor", "prog"))


def test_stubs_are_generated_fresh_from_the_protos(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in mod.generate(tmp_path)}
    committed = {p.relative_to(ROOT / "services"): p.read_bytes() for p in (ROOT / "services").rglob("*_pb2*.py*")}
    assert fresh.keys() == committed.keys(), (sorted(fresh), sorted(committed))
    stale = [str(k) for k in fresh if fresh[k] != committed[k]]
    assert not stale, f"stubs differ from proto/: {stale}; run python scripts/gen_proto.py"


def test_buf_lint_passes() -> None:
    buf = shutil.which("buf")
    assert buf, "buf is not installed (pip install buf-bin, in the test extra)"
    out = subprocess.run([buf, "lint"], cwd=ROOT / "proto", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_run_api_and_watch(redis_server) -> None:
    r = redis.Redis.from_url(redis_server.url)
    cfg = load_config(overrides={"experiment_name": "exp", "trial_name": "t1",
                                 "rollout": {"server_urls": ["http://127.0.0.1:9"]}})
    RunControl(r, cfg.run_id).register(redacted_config(cfg))
    state = RunState(r, cfg.run_id)
    asyncio.run(asyncio.wait_for(_exercise(r, redis_server.url, state), 60))


async def _exercise(r: redis.Redis, url: str, state: RunState) -> None:
    port = free_port("127.0.0.1")
    servicer = RunServicer(ControlPlane(r, server_timeout_s=0.5), token=TOKEN, redis_url=url, admin_api_key=None)
    server = await start_grpc(servicer, "127.0.0.1", port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            runs = pb_grpc.RunServiceStub(ch)
            listed = await runs.ListRuns(pb.ListRunsRequest())
            assert [(x.run_id, x.status) for x in listed.runs] == [("exp/t1", pb.RUN_STATUS_RUNNING)]
            got = (await runs.GetRun(pb.GetRunRequest(run_id="exp/t1"))).run
            assert got.summary.version == 0 and got.knobs["actor.temperature"] == 1.0
            assert not got.servers[0].healthy and not got.servers[0].HasField("weight_version")
            for call, code, words in [
                (runs.GetRun(pb.GetRunRequest(run_id="exp/none")), grpc.StatusCode.NOT_FOUND, "not found"),
                (runs.GetRun(pb.GetRunRequest(run_id="no-slash")), grpc.StatusCode.INVALID_ARGUMENT, "experiment/trial"),
                (runs.Pause(pb.PauseRequest(run_id="exp/t1")), grpc.StatusCode.UNAUTHENTICATED, "bearer token"),
                (runs.Pause(pb.PauseRequest(run_id="exp/t1"), metadata=(("authorization", "Bearer nope"),)),
                 grpc.StatusCode.UNAUTHENTICATED, "bearer token"),
                (runs.SetKnobs(pb.SetKnobsRequest(run_id="exp/t1", knobs=_struct({"rollout.top_p": 2})), metadata=AUTH),
                 grpc.StatusCode.INVALID_ARGUMENT, "rollout.top_p"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                assert e.value.code() == code and words in e.value.details(), (e.value.code(), e.value.details())
            assert not state.is_paused()

            watch = runs.WatchRun(pb.WatchRunRequest(run_id="exp/t1"))
            first = await watch.read()
            assert first.kind == pb.EVENT_KIND_SNAPSHOT and first.status == pb.RUN_STATUS_RUNNING
            p = await runs.Pause(pb.PauseRequest(run_id="exp/t1"), metadata=AUTH)
            assert p.status == pb.RUN_STATUS_PAUSED and p.audit.who.startswith("prog@")
            k = await runs.SetKnobs(pb.SetKnobsRequest(run_id="exp/t1", knobs=_struct({"actor.temperature": 0.5})),
                                    metadata=AUTH)
            assert [(c.key, c.old.number_value, c.new.number_value) for c in k.changes] == [("actor.temperature", 1.0, 0.5)]
            await runs.Resume(pb.ResumeRequest(run_id="exp/t1"), metadata=AUTH)
            await asyncio.to_thread(state.set_version, 3)  # what the trainer's step commit publishes
            events = [await watch.read() for _ in range(4)]
            # in order; status, knobs and (but on VERSION events) version are as read when each event is sent
            assert [e.kind for e in events] == [
                pb.EVENT_KIND_PAUSED, pb.EVENT_KIND_KNOBS, pb.EVENT_KIND_RESUMED, pb.EVENT_KIND_VERSION]
            assert events[0].version in (0, 3) and events[3].version == 3
            assert events[1].knobs["actor.temperature"] == 0.5
            watch.cancel()
    finally:
        await server.stop(grace=1.0)


def _struct(d: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s
