"""The HTTP side of genserver: SGLang's endpoint subset on FastAPI, talking to the engine thread.

Every body is a typed model (genserver/requests.py) that FastAPI validates before the handler runs, and every
failure a client can cause answers 400 with SGLang's error body naming the field (utils/api_errors.py); the
OpenAPI document says so. Keys work as SGLang's --api-key / --admin-api-key (utils/auth.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import orjson
import torch
from fastapi import FastAPI, Query, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from asyncgrpo import __version__
from asyncgrpo.genserver.engine import Engine, EngineError, Request
from asyncgrpo.genserver.requests import (
    MAX_PARAM_NAME_CHARS, MAX_TRUNCATE, AbortReq, BeginWeightUpdateReqInput, ContinueGenerationReqInput,
    DestroyWeightsUpdateGroupReqInput, EndWeightUpdateReqInput, GenerateReqInput, GenerateRequestError,
    GetWeightsByNameReqInput, InitWeightsUpdateGroupReqInput, PauseGenerationReqInput, UpdateResult,
    UpdateWeightFromDiskReqInput, UpdateWeightsFromDistributedReqInput, UpdateWeightsFromTensorReqInput,
    UpdateWeightVersionReqInput, expand_generate, set_token_id_maximum)
from asyncgrpo.genserver.sampling import SamplingSpec
from asyncgrpo.utils.api_errors import customize_openapi, document_bad_request, error_response, install_error_handlers
from asyncgrpo.utils.auth import AuthLevel, add_api_key_middleware, auth_level, document_auth
from asyncgrpo.utils.metrics import REGISTRY

ADMIN = auth_level(AuthLevel.ADMIN_OPTIONAL)  # SGLang marks these ADMIN_OPTIONAL in http_server.py


def error(message: str, code: int = 400) -> JSONResponse:
    return error_response(message, code)


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
        self.joining: set[str] = set()  # groups whose rendezvous is under way
        self.backends: dict[str, str] = {}
        self.in_update_session = False
        self.weight_lock = asyncio.Lock()
        # an update can never carry more elements than the model has: a bound checked before allocating
        self.model_numel = sum(p.numel() for p in engine.model.state_dict().values())


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




def checkpoint_problem(model_path: str) -> str | None:
    """Why `model_path` cannot be loaded as weights (None when it can): it must be an HF checkpoint directory
    holding *.safetensors files or one .safetensors file, all regular files (never a FIFO or a device that
    could block a loader thread forever)."""
    try:
        p = Path(model_path)
        if p.is_dir():
            files = sorted(p.glob("*.safetensors"))
            if not files:
                return f"model_path {model_path!r}: no *.safetensors under it; give an HF checkpoint directory"
            odd = [f.name for f in files if not f.is_file()]
            return f"model_path {model_path!r}: {odd[0]} is not a regular file" if odd else None
        if p.is_file() and p.suffix == ".safetensors":
            return None
        return (f"model_path {model_path!r}: not an HF checkpoint directory or a .safetensors file "
                f"({'does not exist' if not p.exists() else 'not a directory or .safetensors file'})")
    except (OSError, ValueError) as e:  # unreadable, or a name the OS refuses (NUL, too long)
        return f"model_path {model_path!r}: {e}"


def _empty_cuda_cache(engine: Engine, wanted: bool) -> None:
    if wanted and engine.device.type == "cuda":
        torch.cuda.empty_cache()


_OK = {"description": "Success", "model": UpdateResult}
_FAILED = {"description": "The update or group call failed; weights and version are unchanged",
           "model": UpdateResult}
_PAUSE_OK = {"success": True, "message": "Generation paused successfully.", "status": "ok"}
_CONTINUE_OK = {"success": True, "message": "Generation continued successfully.", "status": "ok"}


def create_app(engine: Engine, *, host: str = "127.0.0.1", port: int = 0, dist_timeout_s: float = 600.0,
               served_model_name: str | None = None, api_key: str | None = None,
               admin_api_key: str | None = None) -> FastAPI:
    """The genserver app. With api_key and/or admin_api_key set, requests need `Authorization: Bearer` as in
    SGLang (utils/auth.py); the keys are used as given (resolve_keys() reads the environment)."""
    app = FastAPI(title="genserver", version=__version__,
                  description="SGLang-compatible generation server (the subset asyncgrpo uses).")
    st = _State(engine, host, port, dist_timeout_s)
    name = served_model_name or engine.model_path
    install_error_handlers(app)
    add_api_key_middleware(app, api_key=api_key, admin_api_key=admin_api_key)
    customize_openapi(app, document_bad_request, lambda doc: set_token_id_maximum(doc, engine.vocab_size),
                      lambda doc: document_auth(doc, app, api_key=api_key, admin_api_key=admin_api_key))

    @app.on_event("startup")
    async def _start() -> None:  # noqa: ANN202
        engine.start()

    @app.on_event("shutdown")
    async def _stop() -> None:  # noqa: ANN202
        engine.shutdown()

    # ---------- generation ----------
    @app.post("/generate", responses={200: {
        "description": "One response object, or a list of them for a batch or n > 1; with stream, SSE chunks "
                       "`data: {json}` (cumulative) then `data: [DONE]`",
        "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def generate(body: GenerateReqInput, request: HTTPRequest) -> Response:
        try:
            items, is_list = expand_generate(body, encode=engine.tok.encode, vocab_size=engine.vocab_size,
                                             max_context=engine.max_context)
        except GenerateRequestError as e:
            return error(str(e))
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[int, dict[str, Any], bool]] = asyncio.Queue()
        stream = body.stream
        reqs = []
        for idx, item in enumerate(items):
            def on_event(r: Request, finished: bool, idx: int = idx) -> None:
                snap = build_response(engine, r)
                loop.call_soon_threadsafe(q.put_nowait, (idx, snap, finished))
            reqs.append(Request(rid=item.rid, input_ids=list(item.input_ids), spec=item.spec,
                                return_logprob=item.return_logprob, on_event=on_event, stream=stream))
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
                        yield b"data: " + orjson.dumps(snap) + b"\n\n"
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
        # orjson: the response of a group is most of the HTTP side's work, and this process's event loop shares
        # the GIL with the engine thread
        return Response(orjson.dumps(results if is_list else results[0]), media_type="application/json")

    @app.post("/abort_request")
    @ADMIN
    async def abort_request(body: AbortReq | None = None) -> Response:
        b = body or AbortReq()
        n = await run_on_engine(engine, lambda: engine.cmd_abort(rid=b.rid or "", abort_all=b.abort_all))
        return JSONResponse({"success": True, "aborted": n})

    @app.post("/pause_generation")
    @ADMIN
    async def pause_generation(body: PauseGenerationReqInput | None = None) -> Response:
        mode = (body or PauseGenerationReqInput()).mode
        try:
            await run_on_engine(engine, lambda: engine.cmd_pause(mode))
        except EngineError as e:
            return error(str(e))
        return JSONResponse(_PAUSE_OK)

    @app.post("/continue_generation")
    @ADMIN
    async def continue_generation(body: ContinueGenerationReqInput | None = None) -> Response:
        _empty_cuda_cache(engine, (body or ContinueGenerationReqInput()).torch_empty_cache)
        await run_on_engine(engine, engine.cmd_continue)
        return JSONResponse(_CONTINUE_OK)

    # ---------- inspection ----------
    @app.get("/health", response_class=Response, responses={
        200: {"description": "The scheduler thread is alive"}, 503: {"description": "The scheduler thread died"}})
    async def health() -> Response:
        alive = engine._thread is not None and engine._thread.is_alive()
        return Response(status_code=200 if alive else 503)

    @app.get("/health_generate", response_class=Response, responses={
        200: {"description": "A 1-token generation finished (or generation is paused on purpose)"},
        503: {"description": "No token within 30 s"}})
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
            "vocab_size": engine.vocab_size, "tp_size": 1,
            "internal_states": [{**engine.stats, "paused": engine.paused, "num_running_reqs": engine.num_running,
                                 "num_waiting_reqs": engine.num_waiting}],
        })

    @app.get("/v1/loads")
    async def loads() -> Response:
        return JSONResponse({"timestamp": time.time(), "loads": [{
            "dp_rank": 0, "num_running_reqs": engine.num_running, "num_waiting_reqs": engine.num_waiting,
            "num_total_tokens": int(engine.mask.sum()) if engine.mask.numel() else 0,
            "max_running_requests": engine.max_batch_size, "paused": engine.paused is not None}]})

    flush_responses: dict[int | str, dict[str, Any]] = {
        400: {"description": "Requests are running or waiting", "content": {"text/plain": {}}}}

    @app.post("/flush_cache", response_class=PlainTextResponse, responses=flush_responses)
    @ADMIN
    async def flush_cache() -> Response:
        busy = await run_on_engine(engine, lambda: engine.num_running + engine.num_waiting)
        if busy:
            return PlainTextResponse(f"Cache not flushed: {busy} requests are running or waiting.", status_code=400)
        return PlainTextResponse("Cache flushed.", status_code=200)

    @app.get("/flush_cache", response_class=PlainTextResponse, responses=flush_responses)
    @ADMIN
    async def flush_cache_get() -> Response:  # SGLang serves both methods
        return await flush_cache()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    # ---------- weights ----------
    def ok(message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"success": True, "message": message, **extra})

    def fail(message: str) -> JSONResponse:
        return JSONResponse({"success": False, "message": message}, status_code=400)

    weight_responses: dict[int | str, dict[str, Any]] = {200: _OK, 400: _FAILED}

    @app.post("/init_weights_update_group", responses=weight_responses)
    @ADMIN
    async def init_weights_update_group(body: InitWeightsUpdateGroupReqInput) -> Response:
        from asyncgrpo.sglang.dist_group import init_custom_process_group

        gname = body.group_name
        if gname in st.groups or gname in st.joining:
            return fail(f"group {gname!r} already exists; destroy it first")
        st.joining.add(gname)
        try:
            # bounded: every rendezvous and collective of the group times out after --dist-timeout-s
            pg = await asyncio.to_thread(
                init_custom_process_group, body.backend, master_address=body.master_address,
                master_port=body.master_port, world_size=body.world_size, rank=body.rank_offset, group_name=gname,
                timeout=timedelta(seconds=st.dist_timeout_s))
        except Exception as e:  # noqa: BLE001 - reported to the caller
            return fail(f"joining group {gname!r} failed: {type(e).__name__}: {e}")
        finally:
            st.joining.discard(gname)
        st.groups[gname] = pg
        st.backends[gname] = body.backend
        return ok(f"joined group {gname!r} as rank {body.rank_offset}")

    @app.post("/destroy_weights_update_group", responses=weight_responses)
    @ADMIN
    async def destroy_weights_update_group(body: DestroyWeightsUpdateGroupReqInput | None = None) -> Response:
        from asyncgrpo.sglang.dist_group import destroy_custom_process_group

        gname = (body or DestroyWeightsUpdateGroupReqInput()).group_name
        async with st.weight_lock:  # waits for an update still receiving on this group (it fails or times out)
            pg = st.groups.pop(gname, None)
            if pg is None:
                return fail(f"no group {gname!r}; known: {sorted(st.groups)}")
            await asyncio.to_thread(destroy_custom_process_group, pg)
        return ok(f"left group {gname!r}")

    @app.post("/begin_weight_update", responses=weight_responses)
    @ADMIN
    async def begin_weight_update(body: BeginWeightUpdateReqInput | None = None) -> Response:
        st.in_update_session = True
        return ok("weight update session started")

    @app.post("/end_weight_update", responses=weight_responses)
    @ADMIN
    async def end_weight_update(body: EndWeightUpdateReqInput | None = None) -> Response:
        was = st.in_update_session
        st.in_update_session = False
        return ok("weight update session ended" if was else "no weight update session was open")

    @app.post("/update_weights_from_distributed", responses=weight_responses)
    @ADMIN
    async def update_weights_from_distributed(body: UpdateWeightsFromDistributedReqInput) -> Response:
        from asyncgrpo.genserver.weights import receive_broadcast

        if not st.in_update_session:
            return fail("no weight update session: call /begin_weight_update first (SGLang >= 0.5.21 requires it)")
        gname = body.group_name
        pg = st.groups.get(gname)
        if pg is None:
            return fail(f"no group {gname!r}; call /init_weights_update_group first")
        numel = sum(_numel(s) for s in body.shapes)
        if numel > st.model_numel:
            return fail(f"shapes announce {numel} elements, more than the model's {st.model_numel}: nothing "
                        "received, weights unchanged")
        async with st.weight_lock:
            try:
                device = engine.device if st.backends.get(gname) == "nccl" else "cpu"
                tensors = await asyncio.to_thread(receive_broadcast, pg, list(body.names), list(body.dtypes),
                                                  [list(s) for s in body.shapes], body.load_format, device)
            except Exception as e:  # noqa: BLE001 - old weights stay
                return fail(f"receiving weights over group {gname!r} failed, weights unchanged: {type(e).__name__}: {e}")
            res = await _apply(tensors, body.weight_version, body.abort_all_requests)
        _empty_cuda_cache(engine, body.torch_empty_cache)
        return res

    @app.post("/update_weights_from_tensor", responses=weight_responses)
    @ADMIN
    async def update_weights_from_tensor(body: UpdateWeightsFromTensorReqInput) -> Response:
        from asyncgrpo.sglang.tensor_payload import PayloadError, bucket_tensors, deserialize, named_tensors

        if not st.in_update_session:
            return fail("no weight update session: call /begin_weight_update first (SGLang >= 0.5.21 requires it)")
        async with st.weight_lock:
            try:
                def load() -> dict[str, Any]:
                    obj = deserialize(body.serialized_named_tensors[0], max_bytes=st.model_numel * 8)
                    return bucket_tensors(obj) if body.load_format == "flattened_bucket" else named_tensors(obj)
                tensors = await asyncio.wait_for(asyncio.to_thread(load), st.dist_timeout_s)
                numel = sum(t.numel() for t in tensors.values())
                if numel > st.model_numel:
                    return fail(f"the payload holds {numel} elements, more than the model's {st.model_numel}: "
                                "weights unchanged")
            except PayloadError as e:
                return fail(f"{e}; weights unchanged")
            except asyncio.TimeoutError:
                return fail(f"mapping the tensors took over {st.dist_timeout_s:g} s, weights unchanged")
            # the tensors map the sender's memory: copied into the parameters here, then let go
            res = await _apply(tensors, body.weight_version, body.abort_all_requests)
            del tensors
        _empty_cuda_cache(engine, body.torch_empty_cache)
        return res

    async def _apply(tensors: dict[str, Any], version: str | None, abort_all: bool) -> Response:
        try:
            await run_on_engine(engine, lambda: engine.cmd_apply_weights(tensors, version, abort_all))
        except Exception as e:  # noqa: BLE001 - EngineError or a tensor torch cannot check/copy: weights stay
            return fail(f"weights rejected, unchanged: {e}")
        return ok(f"updated {len(tensors)} tensors", weight_version=engine.weight_version)

    @app.post("/update_weights_from_disk", responses=weight_responses)
    @ADMIN
    async def update_weights_from_disk(body: UpdateWeightFromDiskReqInput) -> Response:
        from asyncgrpo.genserver.weights import load_safetensors_dir

        problem = checkpoint_problem(body.model_path)
        if problem is not None:
            return fail(f"{problem}; weights unchanged")
        async with st.weight_lock:
            try:  # bounded like a collective: a stuck filesystem cannot hold the weight lock forever
                tensors = await asyncio.wait_for(asyncio.to_thread(load_safetensors_dir, body.model_path),
                                                 st.dist_timeout_s)
            except asyncio.TimeoutError:
                return fail(f"loading {body.model_path} took over {st.dist_timeout_s:g} s, weights unchanged")
            except Exception as e:  # noqa: BLE001
                return fail(f"loading {body.model_path} failed, weights unchanged: {type(e).__name__}: {e}")
            res = await _apply(tensors, body.weight_version, body.abort_all_requests)
        _empty_cuda_cache(engine, body.torch_empty_cache)
        return res

    @app.post("/update_weight_version", responses={200: _OK})
    @ADMIN
    async def update_weight_version(body: UpdateWeightVersionReqInput) -> Response:
        await run_on_engine(engine, lambda: engine.cmd_set_version(body.new_version, body.abort_all_requests))
        return ok(f"weight version set to {body.new_version}", weight_version=engine.weight_version)

    async def weights_by_name(wname: str, trunc: int) -> Response:
        def read() -> Any:
            p = engine.state().get(wname)
            if p is None:
                raise EngineError(f"name: unknown parameter {wname!r} (HF names, e.g. model.embed_tokens.weight)")
            return p.detach().float().narrow(0, 0, min(trunc, p.shape[0])).tolist() if p.dim() else p.item()

        try:
            return JSONResponse(await run_on_engine(engine, read))
        except EngineError as e:
            return error(str(e))

    @app.get("/get_weights_by_name")
    @ADMIN
    async def get_weights_by_name_query(
            name: Annotated[str, Query(min_length=1, max_length=MAX_PARAM_NAME_CHARS)],
            truncate_size: Annotated[int, Query(ge=0, le=MAX_TRUNCATE)] = 100) -> Response:
        return await weights_by_name(name, truncate_size)

    @app.post("/get_weights_by_name")
    @ADMIN
    async def get_weights_by_name(body: GetWeightsByNameReqInput) -> Response:
        return await weights_by_name(body.name, body.truncate_size)

    return app


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
