"""Contract: what our client sends and what genserver answers validate against SGLang's own published API
types (sglang/api/v1/api_types.py from the sglang==0.5.23 wheel, loaded by path with msgspec).

The wheel is downloaded by .ci/run (`pip download --no-deps sglang==0.5.23 -d .cache/wheels`); the test
reads ASYNCGRPO_SGLANG_WHEEL_DIR (default .cache/wheels). Without the wheel it skips, except under CI=true
where it fails."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import httpx
import pytest

from asyncgrpo.genserver.sampling import KNOWN_KEYS
from asyncgrpo.sglang.client import SGLangClient

from . import sglang_wheel

PROMPT = [81, 58, 32, 49, 43, 49, 61, 63, 10, 65, 58]


@pytest.fixture(scope="module")
def api(tmp_path_factory):  # noqa: ANN201
    return sglang_wheel.load_module("sglang/api/v1/api_types.py", "sglang_api_types_0_5_23", tmp_path_factory.mktemp("sglang_api"))


def test_sampling_keys_are_exactly_sglangs(api) -> None:
    assert set(api.SamplingParams.__struct_fields__) == set(KNOWN_KEYS)
    with pytest.raises(api.JsonContractError, match="unknown field `max_tokens`"):
        api.SamplingParams.from_json_value({"max_tokens": 3})


@pytest.mark.slow
def test_client_requests_and_server_responses_validate(api, genserver) -> None:
    sent: list[tuple[str, dict]] = []

    trace = aiohttp.TraceConfig()  # the bytes the client's session puts on the wire, per request

    async def start(session, ctx, params) -> None:  # noqa: ANN001
        ctx.body = []

    async def chunk(session, ctx, params) -> None:  # noqa: ANN001
        ctx.body.append(params.chunk)

    async def end(session, ctx, params) -> None:  # noqa: ANN001
        if params.method == "POST" and ctx.body:
            sent.append((params.url.path, json.loads(b"".join(ctx.body))))

    trace.on_request_start.append(start)
    trace.on_request_chunk_sent.append(chunk)
    trace.on_request_end.append(end)

    async def main():
        c = SGLangClient(genserver.url)
        c._http = aiohttp.ClientSession(trace_configs=[trace])
        async with c:
            await c.generate(PROMPT, {"max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
                                      "stop": ["\n"], "stop_token_ids": [256], "sampling_seed": 1,
                                      "ignore_eos": False, "min_p": 0.0}, rid="contract-1")
            await c.generate_n(PROMPT, {"max_new_tokens": 2}, n=2, rid="contract-n")
            await c.abort("contract-")
            await c.abort(abort_all=True)

    asyncio.run(main())
    gen = [b for p, b in sent if p == "/generate"]
    aborts = [b for p, b in sent if p == "/abort_request"]
    assert len(gen) == 2 and len(aborts) == 2
    for body in gen:
        assert set(body) <= set(api.GenerateRequest.__struct_fields__), body  # unknown top-level keys are ignored by SGLang: none allowed
        req = api.GenerateRequest.from_json_value(body)
        api.SamplingParams.from_json_value(body["sampling_params"])  # strict: rejects unknown keys
        assert req.input_ids == PROMPT
    for body in aborts:
        assert set(body) <= set(api.AbortRequest.__struct_fields__)
        api.AbortRequest.from_json_value(body)

    # genserver's answers parse as SGLang's response types
    single = httpx.post(f"{genserver.url}/generate", json={"input_ids": PROMPT, "return_logprob": True,
                                                           "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}, timeout=60).json()
    r = api.GenerateResponse.from_json_value(single)
    assert r.meta_info.completion_tokens == 3 and len(r.meta_info.output_token_logprobs) == 3
    assert r.meta_info.weight_version == "default"
    many = httpx.post(f"{genserver.url}/generate", json={"input_ids": [PROMPT, PROMPT], "sampling_params":
                                                         {"max_new_tokens": 2, "n": 2}}, timeout=60).json()
    assert len(many) == 4
    for o in many:
        api.GenerateResponse.from_json_value(o)
    api.GetModelInfoResponse.from_json_value(httpx.get(f"{genserver.url}/model_info").json())
    api.GetServerInfoResponse.from_json_value(httpx.get(f"{genserver.url}/server_info").json())
    err = httpx.post(f"{genserver.url}/generate", json={"input_ids": PROMPT, "sampling_params": {"max_tokens": 1}})
    assert err.status_code == 400 and api.ErrorBody.from_json_value(err.json()).code == 400


@pytest.mark.slow
def test_aborted_response_validates(api, genserver) -> None:
    async def main():
        async with SGLangClient(genserver.url) as c:
            task = asyncio.create_task(httpx.AsyncClient(timeout=60).post(
                f"{genserver.url}/generate", json={"input_ids": PROMPT, "rid": "contract-abort", "return_logprob": True,
                                                   "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}}))
            for _ in range(500):
                if (await c.loads())["loads"][0]["num_running_reqs"]:
                    break
                await asyncio.sleep(0.02)
            await c.pause("in_place")
            await c.abort("contract-abort")
            body = (await task).json()
            await c.resume()
            return body

    body = asyncio.run(main())
    r = api.GenerateResponse.from_json_value(body)
    assert isinstance(r.meta_info.finish_reason, api.FinishAbort)
    assert len(r.meta_info.output_token_logprobs) == len(r.output_ids) > 0


def sglang_dataclass_fields(cls: str) -> dict[str, object]:
    """Field -> default (a literal, or ... when not a literal) of a class in the wheel's io_struct.py, read
    with ast (the module itself needs torch and SGLang's compiled parts); BaseReq's fields come along."""
    import ast

    tree = ast.parse(sglang_wheel.read("sglang/srt/managers/io_struct.py"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    def fields(name: str) -> dict[str, object]:
        node = classes[name]
        out: dict[str, object] = {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                out.update(fields(base.id))
        for st in node.body:
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                try:
                    out[st.target.id] = ast.literal_eval(st.value) if st.value is not None else ...
                except ValueError:
                    out[st.target.id] = ...
        return out

    return fields(cls)


def test_generate_body_knows_every_sglang_field() -> None:
    """Every field of SGLang's GenerateReqInput is understood (served, ignored, or accepted at its default), so
    a body from an SGLang client or sglang-router is never refused for a field SGLang knows; anything else is."""
    from asyncgrpo.genserver.requests import GENERATE_IGNORED, GENERATE_NEUTRAL, GenerateReqInput

    sglang = set(sglang_dataclass_fields("GenerateReqInput"))
    ours = set(GenerateReqInput.model_fields)
    assert ours == sglang | {"model"}  # "model": sglang-router adds it
    assert set(GENERATE_IGNORED) | set(GENERATE_NEUTRAL) == ours - {
        "text", "input_ids", "rid", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num", "stream"}


@pytest.mark.parametrize("ours, theirs, differs", [
    ("AbortReq", "AbortReq", {}),
    ("PauseGenerationReqInput", "PauseGenerationReqInput", {}),
    ("ContinueGenerationReqInput", "ContinueGenerationReqInput", {}),
    ("InitWeightsUpdateGroupReqInput", "InitWeightsUpdateGroupReqInput", {"backend": "gloo"}),  # a CPU server
    ("DestroyWeightsUpdateGroupReqInput", "DestroyWeightsUpdateGroupReqInput", {}),
    ("BeginWeightUpdateReqInput", "BeginWeightUpdateReqInput", {}),
    ("EndWeightUpdateReqInput", "EndWeightUpdateReqInput", {}),
    ("UpdateWeightsFromDistributedReqInput", "UpdateWeightsFromDistributedReqInput", {}),
    ("UpdateWeightFromDiskReqInput", "UpdateWeightFromDiskReqInput", {}),
    ("UpdateWeightVersionReqInput", "UpdateWeightVersionReqInput", {}),
    ("GetWeightsByNameReqInput", "GetWeightsByNameReqInput", {}),
])
def test_control_bodies_use_sglangs_names_and_defaults(ours, theirs, differs) -> None:
    import asyncgrpo.genserver.requests as req

    model = getattr(req, ours)
    sglang = sglang_dataclass_fields(theirs)
    assert set(model.model_fields) <= set(sglang), set(model.model_fields) - set(sglang)
    for name, f in model.model_fields.items():
        want = differs.get(name, sglang[name])
        if f.is_required():
            assert sglang[name] is ..., f"{ours}.{name} is required here but has a default in SGLang"
        elif want is not ...:
            assert f.default == want or (name == "rid" and f.default == ""), (ours, name, f.default, want)
