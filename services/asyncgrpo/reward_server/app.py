"""The reward server's HTTP API: SGLang's `/classify` request and response shapes, its auth, /health, /metrics."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from asyncgrpo import __version__
from asyncgrpo.reward_server.scorer import Scorer, ScoreError
from asyncgrpo.utils.api_errors import customize_openapi, document_bad_request, error_response, install_error_handlers
from asyncgrpo.utils.auth import add_api_key_middleware, document_auth
from asyncgrpo.utils.metrics import REGISTRY, counter


class ClassifyReqInput(BaseModel):
    """SGLang's EmbeddingReqInput as /classify uses it: texts or token ids, one or a batch."""

    model_config = ConfigDict(extra="forbid")
    text: str | list[str] | None = Field(None, description="One text or a batch of texts (the prompt and completion, as the model was trained to read them).")
    input_ids: list[int] | list[list[int]] | None = Field(None, description="Token ids instead of text: one sequence or a batch.")
    rid: str | list[str] | None = Field(None, description="Request id(s), echoed in meta_info.id.")
    model: str | None = Field(None, description="Ignored (one model per server), accepted as SGLang does.")


class ScoreStepsReqInput(BaseModel):
    """A completion's steps for a process reward model: one score per step."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(..., description="The prompt text, as the policy saw it.")
    steps: list[str] = Field(..., min_length=1, description="The completion split into steps (joined they give the completion back); each is scored at its last token.")
    rid: str | None = Field(None, description="Request id, echoed in meta_info.id.")


def create_app(scorer: Scorer, *, model_path: str, served_model_name: str | None = None, request_timeout_s: float = 60.0,
               api_key: str | None = None, admin_api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="asyncgrpo reward server", version=__version__,
                  description="A reward model: sequence classification (ORM) behind SGLang's /classify, or token "
                              "classification (PRM) behind /score_steps.")
    install_error_handlers(app)
    add_api_key_middleware(app, api_key=api_key, admin_api_key=admin_api_key)
    customize_openapi(app, document_bad_request,
                      lambda doc: document_auth(doc, app, api_key=api_key, admin_api_key=admin_api_key))
    timeouts = counter("reward_server_timeouts_total", "Requests answered 504: not scored within --request-timeout-s.")
    ids = itertools.count()

    @app.on_event("startup")
    async def _start() -> None:  # noqa: ANN202
        scorer.start()

    @app.on_event("shutdown")
    async def _stop() -> None:  # noqa: ANN202
        await scorer.stop()

    @app.post("/classify", responses={200: {"description": "For one input {embedding: [score, ...], meta_info}; for a "
                                                        "batch a list of them, in order"}})
    async def classify(body: ClassifyReqInput) -> Any:
        if scorer.process:
            return error_response("this server serves a process reward model (token classification): POST the "
                                  "prompt and steps to /score_steps")
        if (body.text is None) == (body.input_ids is None):
            return error_response("give exactly one of 'text' and 'input_ids'")
        single = isinstance(body.text, str) or (body.input_ids is not None and all(isinstance(t, int) for t in body.input_ids))
        if body.text is not None:
            texts = [body.text] if isinstance(body.text, str) else body.text
            seqs = [scorer.encode(t) for t in texts]
            field = "text"
        else:
            seqs = [body.input_ids] if single else list(body.input_ids)  # type: ignore[list-item]
            field = "input_ids"
        if not seqs:
            return error_response(f"{field}: empty batch; give at least one sequence")
        try:
            for i, s in enumerate(seqs):
                scorer.check(s, field if single else f"{field}[{i}]")
        except ScoreError as e:
            return error_response(str(e))
        rids = body.rid if isinstance(body.rid, list) else [body.rid] * len(seqs)
        if len(rids) != len(seqs):
            return error_response(f"rid: {len(rids)} ids for {len(seqs)} inputs; give one per input or none")
        try:
            scores = await asyncio.wait_for(asyncio.gather(*(scorer.score(s) for s in seqs)), request_timeout_s)
        except asyncio.TimeoutError:
            timeouts.inc()
            return error_response(f"not scored within {request_timeout_s:g}s (the server is overloaded); retry later "
                                  "or start it with a larger --request-timeout-s", 504)
        out = [{"embedding": sc, "meta_info": {"id": r or f"classify-{next(ids)}", "prompt_tokens": len(s)}}
               for sc, s, r in zip(scores, seqs, rids)]
        return out[0] if single else out

    @app.post("/score_steps", responses={200: {"description": "{step_scores: [p, ...], meta_info}: per step, the "
                                                           "model's probability that it is right"}})
    async def score_steps(body: ScoreStepsReqInput) -> Any:
        if not scorer.process:
            return error_response("this server serves an outcome reward model (sequence classification): POST the "
                                  "text to /classify, or serve a *ForTokenClassification model for /score_steps")
        seq, positions = scorer.encode_steps(body.prompt, body.steps)
        try:
            scorer.check(seq, "prompt + steps")
        except ScoreError as e:
            return error_response(str(e))
        try:
            logits = await asyncio.wait_for(scorer.score(seq, positions), request_timeout_s)
        except asyncio.TimeoutError:
            timeouts.inc()
            return error_response(f"not scored within {request_timeout_s:g}s (the server is overloaded); retry later "
                                  "or start it with a larger --request-timeout-s", 504)
        return {"step_scores": scorer.step_probability(logits),
                "meta_info": {"id": body.rid or f"steps-{next(ids)}", "prompt_tokens": len(seq), "token_positions": positions}}

    @app.get("/health", response_class=Response)
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/model_info")
    async def model_info() -> dict[str, Any]:
        return {"model_path": model_path, "served_model_name": served_model_name or model_path, "is_generation": False,
                "num_labels": scorer.num_labels, "kind": "process" if scorer.process else "outcome"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app
