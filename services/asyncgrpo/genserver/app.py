"""The HTTP side of genserver: SGLang's endpoint subset on FastAPI, talking to the engine thread."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from asyncgrpo import __version__
from asyncgrpo.genserver.engine import Engine, EngineError, Request
from asyncgrpo.genserver.sampling import SamplingParamError, SamplingSpec, parse_sampling_params
from asyncgrpo.utils.metrics import REGISTRY


def error(message: str, code: int = 400) -> JSONResponse:
    return JSONResponse({"object": "error", "message": message, "type": "BadRequest", "code": code}, status_code=code)


def version_spans(versions: list[str]) -> list[dict[str, Any]]:
    """Runs of equal versions as SGLang's weight_versions spans (end exclusive)."""
    spans: list[dict[str, Any]] = []
    for i, v in enumerate(versions):
        if spans and spans[-1]["version"] == v:
            spans[-1]["end"] = i + 1
        else:
            spans.append({"version": v, "start": i, "end": i + 1})
    return spans


def build_response(engine: Engine, r: Request) -> dict[str, Any]:
    """SGLang's /generate response object for a request (called on the engine thread: a consistent snapshot)."""
    text = engine.tok.decode(r.output_ids, skip_special_tokens=r.spec.skip_special_tokens)
    if r.stop_text and not r.spec.no_stop_trim and r.stop_text in text:
        text = text[: text.rindex(r.stop_text)]
    meta: dict[str, Any] = {
        "id": r.rid,
        "finish_reason": r.finish_reason,
        "prompt_tokens": len(r.input_ids),
        "completion_tokens": len(r.output_ids),
        "cached_tokens": 0,
        "weight_version": r.versions[-1] if r.versions else engine.weight_version,
        "e2e_latency": round(time.time() - r.created, 6),
    }
    if r.return_logprob:
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(r.logprobs, r.output_ids)]
    spans = version_spans(r.versions)
    if len(spans) > 1:
        meta["weight_versions"] = spans
    return {"text": text, "output_ids": list(r.output_ids), "meta_info": meta}


class _State:
    def __init__(self, engine: Engine, host: str, port: int, dist_timeout_s: float) -> None:
        self.engine, self.host, self.port, self.dist_timeout_s = engine, host, port, dist_timeout_s
        self.groups: dict[str, Any] = {}
        self.backends: dict[str, str] = {}
        self.in_update_session = False
        self.weight_lock = asyncio.Lock()


async def run_on_engine(engine: Engine, fn: Any) -> Any:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def done(res: Any, err: BaseException | None) -> None:
        def settle() -> None:
            if fut.done():
                return
            fut.set_exception(err) if err is not None else fut.set_result(res)
        loop.call_soon_threadsafe(settle)

    engine.submit(fn, done)
    return await fut


def _expand(body: dict[str, Any]) -> tuple[list[tuple[str, Any, SamplingSpec, bool]], bool]:
    """(rid, input_ids or text, spec, return_logprob) per sequence, and whether the answer is a list
    (a batch or n > 1, as in SGLang); SamplingParamError/ValueError on bad input."""
    if "text" in body and body["text"] is not None:
        if body.get("input_ids") is not None:
            raise ValueError("give exactly one of text and input_ids")
    elif body.get("input_ids") is None:
        raise ValueError("give exactly one of text and input_ids")
    batch = False
    if body.get("input_ids") is not None:
        ids = body["input_ids"]
        if not isinstance(ids, list) or not ids:
            raise ValueError("input_ids must be a non-empty list of token ids (or a list of such lists)")
        batch = isinstance(ids[0], list)
        prompts = ids if batch else [ids]
        for p in prompts:
            if not isinstance(p, list) or not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise ValueError("input_ids must hold non-empty lists of integer token ids")
    else:
        text = body["text"]
        batch = isinstance(text, list)
        prompts = text if batch else [text]
    sp = body.get("sampling_params")
    sps = sp if isinstance(sp, list) else [sp] * len(prompts)
    if len(sps) != len(prompts):
        raise ValueError(f"sampling_params has {len(sps)} entries for {len(prompts)} prompts")
    specs = [parse_sampling_params(s) for s in sps]
    rid = body.get("rid")
    rids = rid if isinstance(rid, list) else [None] * len(prompts) if rid is None else (
        [f"{rid}_{i}" for i in range(len(prompts))] if batch else [rid])
    if len(rids) != len(prompts):
        raise ValueError(f"rid has {len(rids)} entries for {len(prompts)} prompts")
    rl = body.get("return_logprob", False)
    rls = rl if isinstance(rl, list) else [rl] * len(prompts)
    out = []
    for i, (p, spec, r, lp) in enumerate(zip(prompts, specs, rids, rls)):
        base = r if r is not None else uuid.uuid4().hex
        for j in range(spec.n):
            sj = SamplingSpec(**{**spec.__dict__, "n": 1})
            if spec.n > 1 and spec.sampling_seed is not None:
                sj.sampling_seed = spec.sampling_seed + j  # n distinct, reproducible samples
            out.append((f"{base}_{j}" if spec.n > 1 else base, p, sj, bool(lp)))
    return out, batch or any(s.n > 1 for s in specs)


def create_app(engine: Engine, *, host: str = "127.0.0.1", port: int = 0, dist_timeout_s: float = 600.0,
               served_model_name: str | None = None) -> FastAPI:
    app = FastAPI(title="genserver", version=__version__)
    st = _State(engine, host, port, dist_timeout_s)
    name = served_model_name or engine.model_path

    @app.on_event("startup")
    async def _start() -> None:  # noqa: ANN202
        engine.start()

    @app.on_event("shutdown")
    async def _stop() -> None:  # noqa: ANN202
        engine.shutdown()

    # ---------- generation ----------
    @app.post("/generate")
    async def generate(request: HTTPRequest) -> Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            items, is_list = _expand(body)
            if body.get("text") is not None:
                items = [(r, p if isinstance(p, list) else engine.tok.encode(p), s, lp) for r, p, s, lp in items]
        except (SamplingParamError, ValueError, TypeError) as e:
            return error(str(e))
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[int, dict[str, Any], bool]] = asyncio.Queue()
        stream = bool(body.get("stream", False))
        reqs = []
        for idx, (rid, ids, spec, lp) in enumerate(items):
            def on_event(r: Request, finished: bool, idx: int = idx) -> None:
                snap = build_response(engine, r)
                loop.call_soon_threadsafe(q.put_nowait, (idx, snap, finished))
            reqs.append(Request(rid=rid, input_ids=list(ids), spec=spec, return_logprob=lp, on_event=on_event, stream=stream))
        try:
            for r in reqs:
                engine.add_request(r)
        except EngineError as e:
            for r in reqs:
                engine.submit(lambda r=r: engine.cmd_abort(rid=r.rid), lambda *_: None)
            return error(str(e))

        if stream:
            async def events() -> AsyncIterator[bytes]:
                pending = len(reqs)
                try:
                    while pending:
                        idx, snap, finished = await q.get()
                        if is_list:
                            snap["index"] = idx
                        pending -= finished
                        yield f"data: {json.dumps(snap)}\n\n".encode()
                    yield b"data: [DONE]\n\n"
                finally:
                    if pending:  # client went away: stop generating for it
                        for r in reqs:
                            engine.submit(lambda r=r: engine.cmd_abort(rid=r.rid), lambda *_: None)
            return StreamingResponse(events(), media_type="text/event-stream")

        results: list[dict[str, Any] | None] = [None] * len(reqs)
        pending = len(reqs)
        getter: asyncio.Future[tuple[int, dict[str, Any], bool]] | None = None
        try:
            while pending:
                # one persistent get() (a timed-out wait_for(q.get()) could drop an item on 3.11)
                getter = getter or asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({getter}, timeout=0.5)
                if not done:
                    if await request.is_disconnected():  # the client gave up: stop generating for it (as SGLang)
                        for r in reqs:
                            engine.submit(lambda r=r: engine.cmd_abort(rid=r.rid, message="client disconnected"),
                                          lambda *_: None)
                        return Response(status_code=499)
                    continue
                idx, snap, finished = getter.result()
                getter = None
                if finished:
                    results[idx] = snap
                    pending -= 1
        except asyncio.CancelledError:
            for r in reqs:
                engine.submit(lambda r=r: engine.cmd_abort(rid=r.rid), lambda *_: None)
            raise
        finally:
            if getter is not None:
                getter.cancel()
        return JSONResponse(results if is_list else results[0])

    @app.post("/abort_request")
    async def abort_request(request: HTTPRequest) -> Response:
        body = await _json(request)
        n = await run_on_engine(engine, lambda: engine.cmd_abort(rid=str(body.get("rid", "") or ""),
                                                                 abort_all=bool(body.get("abort_all", False))))
        return JSONResponse({"success": True, "aborted": n})

    @app.post("/pause_generation")
    async def pause_generation(request: HTTPRequest) -> Response:
        body = await _json(request)
        try:
            await run_on_engine(engine, lambda: engine.cmd_pause(str(body.get("mode", "abort"))))
        except EngineError as e:
            return error(str(e))
        return JSONResponse({"success": True, "message": "Generation paused successfully.", "status": "ok"})

    @app.post("/continue_generation")
    async def continue_generation() -> Response:
        await run_on_engine(engine, engine.cmd_continue)
        return JSONResponse({"success": True, "message": "Generation continued successfully.", "status": "ok"})

    # ---------- inspection ----------
    @app.get("/health")
    async def health() -> Response:
        alive = engine._thread is not None and engine._thread.is_alive()
        return Response(status_code=200 if alive else 503)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        if engine.paused is not None:
            return Response(status_code=200)  # paused on purpose is healthy; a generation would wait
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        r = Request(rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", input_ids=[engine.pad_id], return_logprob=False,
                    spec=SamplingSpec(max_new_tokens=1, ignore_eos=True),
                    on_event=lambda _r, fin: fin and loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None)))
        engine.add_request(r)
        try:
            await asyncio.wait_for(fut, 30)
        except asyncio.TimeoutError:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info() -> Response:
        cfg = engine.model.config
        return JSONResponse({
            "model_path": engine.model_path, "tokenizer_path": engine.model_path, "served_model_name": name,
            "is_generation": True, "preferred_sampling_params": None, "weight_version": engine.weight_version,
            "load_format": "auto", "architectures": list(getattr(cfg, "architectures", None) or []),
            "model_type": getattr(cfg, "model_type", None),
        })

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info() -> Response:
        return JSONResponse({
            "model_path": engine.model_path, "tokenizer_path": engine.model_path, "served_model_name": name,
            "max_context_length": engine.max_context, "max_total_num_tokens": engine.max_context * engine.max_batch_size,
            "version": f"genserver-{__version__}", "host": st.host, "port": st.port,
            "max_running_requests": engine.max_batch_size, "disaggregation_mode": "null",
            "incremental_streaming_output": False, "weight_version": engine.weight_version,
            "internal_states": [{**engine.stats, "paused": engine.paused, "num_running_reqs": engine.num_running,
                                 "num_waiting_reqs": engine.num_waiting}],
        })

    @app.get("/v1/loads")
    async def loads() -> Response:
        return JSONResponse({"timestamp": time.time(), "loads": [{
            "dp_rank": 0, "num_running_reqs": engine.num_running, "num_waiting_reqs": engine.num_waiting,
            "num_total_tokens": int(engine.mask.sum()) if engine.mask.numel() else 0,
            "max_running_requests": engine.max_batch_size, "paused": engine.paused is not None}]})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        busy = await run_on_engine(engine, lambda: engine.num_running + engine.num_waiting)
        if busy:
            return Response(f"Cache not flushed: {busy} requests are running or waiting.", status_code=400)
        return Response("Cache flushed.", status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    # ---------- weights ----------
    def ok(message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"success": True, "message": message, **extra})

    def fail(message: str) -> JSONResponse:
        return JSONResponse({"success": False, "message": message}, status_code=400)

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: HTTPRequest) -> Response:
        from asyncgrpo.sglang.dist_group import init_custom_process_group

        b = await _json(request)
        gname = str(b.get("group_name", "weight_update_group"))
        if gname in st.groups:
            return fail(f"group {gname!r} already exists; destroy it first")
        try:
            pg = await asyncio.to_thread(
                init_custom_process_group, str(b.get("backend", "gloo")), master_address=str(b["master_address"]),
                master_port=int(b["master_port"]), world_size=int(b["world_size"]), rank=int(b["rank_offset"]),
                group_name=gname, timeout=timedelta(seconds=st.dist_timeout_s))
        except KeyError as e:
            return fail(f"missing field {e}")
        except Exception as e:  # noqa: BLE001 - reported to the caller
            return fail(f"joining group {gname!r} failed: {type(e).__name__}: {e}")
        st.groups[gname] = pg
        st.backends[gname] = str(b.get("backend", "gloo"))
        return ok(f"joined group {gname!r} as rank {b['rank_offset']}")

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: HTTPRequest) -> Response:
        from asyncgrpo.sglang.dist_group import destroy_custom_process_group

        b = await _json(request)
        gname = str(b.get("group_name", "weight_update_group"))
        async with st.weight_lock:  # waits for an update still receiving on this group (it fails or times out)
            pg = st.groups.pop(gname, None)
            if pg is None:
                return fail(f"no group {gname!r}; known: {sorted(st.groups)}")
            await asyncio.to_thread(destroy_custom_process_group, pg)
        return ok(f"left group {gname!r}")

    @app.post("/begin_weight_update")
    async def begin_weight_update() -> Response:
        st.in_update_session = True
        return ok("weight update session started")

    @app.post("/end_weight_update")
    async def end_weight_update() -> Response:
        was = st.in_update_session
        st.in_update_session = False
        return ok("weight update session ended" if was else "no weight update session was open")

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: HTTPRequest) -> Response:
        from asyncgrpo.genserver.weights import receive_broadcast

        b = await _json(request)
        if not st.in_update_session:
            return fail("no weight update session: call /begin_weight_update first (SGLang >= 0.5.21 requires it)")
        gname = str(b.get("group_name", "weight_update_group"))
        pg = st.groups.get(gname)
        if pg is None:
            return fail(f"no group {gname!r}; call /init_weights_update_group first")
        async with st.weight_lock:
            try:
                device = engine.device if st.backends.get(gname) == "nccl" else "cpu"
                tensors = await asyncio.to_thread(receive_broadcast, pg, list(b["names"]), list(b["dtypes"]),
                                                  [list(s) for s in b["shapes"]], b.get("load_format"), device)
            except Exception as e:  # noqa: BLE001 - old weights stay
                return fail(f"receiving weights over group {gname!r} failed, weights unchanged: {type(e).__name__}: {e}")
            return await _apply(tensors, b.get("weight_version"), bool(b.get("abort_all_requests", False)))

    async def _apply(tensors: dict[str, Any], version: Any, abort_all: bool) -> Response:
        try:
            await run_on_engine(engine, lambda: engine.cmd_apply_weights(
                tensors, None if version is None else str(version), abort_all))
        except EngineError as e:
            return fail(f"weights rejected, unchanged: {e}")
        return ok(f"updated {len(tensors)} tensors", weight_version=engine.weight_version)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: HTTPRequest) -> Response:
        from asyncgrpo.genserver.weights import load_safetensors_dir

        b = await _json(request)
        if "model_path" not in b:
            return fail("missing field 'model_path'")
        async with st.weight_lock:
            try:
                tensors = await asyncio.to_thread(load_safetensors_dir, b["model_path"])
            except Exception as e:  # noqa: BLE001
                return fail(f"loading {b['model_path']} failed, weights unchanged: {type(e).__name__}: {e}")
            return await _apply(tensors, b.get("weight_version"), bool(b.get("abort_all_requests", False)))

    @app.post("/update_weight_version")
    async def update_weight_version(request: HTTPRequest) -> Response:
        b = await _json(request)
        if "new_version" not in b:
            return fail("missing field 'new_version'")
        await run_on_engine(engine, lambda: engine.cmd_set_version(str(b["new_version"]),
                                                                   bool(b.get("abort_all_requests", True))))
        return ok(f"weight version set to {b['new_version']}", weight_version=engine.weight_version)

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    async def get_weights_by_name(request: HTTPRequest) -> Response:
        b = await _json(request) if request.method == "POST" else dict(request.query_params)
        wname = str(b.get("name", ""))
        trunc = int(b.get("truncate_size", 100))

        def read() -> Any:
            p = engine.state().get(wname)
            if p is None:
                raise EngineError(f"unknown parameter {wname!r}")
            return p.detach().float().narrow(0, 0, min(trunc, p.shape[0])).tolist() if p.dim() else p.item()

        try:
            return JSONResponse(await run_on_engine(engine, read))
        except EngineError as e:
            return error(str(e))

    return app


async def _json(request: HTTPRequest) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    body = json.loads(raw)
    return body if isinstance(body, dict) else {}
