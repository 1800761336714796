"""One answer to every bad request of the HTTP services (genserver, weight-sync): HTTP 400 in SGLang's error
shape `{"object": "error", "message": ..., "type": "BadRequest", "code": 400}`, whose message names the field
(dotted path, list index) and what it allows, never a 422 or a 500. The OpenAPI document says the same
(400 instead of FastAPI's 422), so a schema-driven fuzzer can hold the servers to it.
"""

from __future__ import annotations

import typing
from http import HTTPStatus
from collections.abc import Callable, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

# Tags of the one-or-many unions (a value or a list of them): not part of a field's path in messages.
UNION_TAGS = frozenset({"one", "many"})
MAX_ERRORS = 5  # a body with many problems: name the first few, count the rest


class ErrorBody(BaseModel):
    """SGLang's error body (sglang.api.v1.api_types.ErrorBody)."""

    object: Literal["error"] = "error"
    message: str
    type: str = "BadRequest"
    code: int = 400


def error_response(message: str, code: int = 400) -> JSONResponse:
    kind = HTTPStatus(code).phrase.replace(" ", "")  # 400 -> BadRequest, as SGLang; 404 -> NotFound
    return JSONResponse(ErrorBody(message=message, type=kind, code=code).model_dump(), status_code=code)


def field_path(loc: Sequence[str | int]) -> str:
    """('body', 'sampling_params', 0, 'temperature') -> 'sampling_params[0].temperature'."""
    parts = list(loc)
    where = ""
    if parts and parts[0] in ("body", "query", "path"):
        where = "" if parts[0] == "body" else f"{parts[0]} parameter "
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p not in UNION_TAGS:
            out += f".{p}" if out else str(p)
    return where + (out or "body")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _models_in(tp: Any) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in typing.get_args(tp) for m in _models_in(arg)]


def allowed_fields(root: type[BaseModel] | None, loc: Sequence[str | int]) -> str | None:
    """What the model at `loc` (a path into `root`) accepts: its ALLOWED_HINT, else its field names."""
    models = [root] if root is not None else []
    for p in loc:
        if isinstance(p, int) or p in UNION_TAGS:
            continue
        models = [m for model in models if (f := model.model_fields.get(p)) is not None
                  for m in _models_in(f.annotation)]
    if not models:
        return None
    return getattr(models[0], "ALLOWED_HINT", None) or "allowed: " + ", ".join(models[0].model_fields)


def describe_one(err: dict[str, Any], root: type[BaseModel] | None = None) -> str:
    loc = tuple(err.get("loc") or ())
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    if kind == "json_invalid":
        return f"the body is not valid JSON: {ctx.get('error', err.get('msg'))} (at character {loc[-1] if loc else 0})"
    path = field_path(loc)
    if kind == "extra_forbidden":
        allowed = allowed_fields(root, loc[1:-1] if loc[:1] == ("body",) else ())
        hint = f"; {allowed}" if allowed else ""
        return f"{path}: unknown field{hint}"
    if kind == "missing":
        return f"{path}: required field is missing"
    if isinstance(err.get("input"), (bytes, bytearray)) and loc == ("body",):
        return "the body must be a JSON object sent with Content-Type: application/json"
    msg = str(err.get("msg", "invalid value"))
    # a whole object (a check across its fields) is not worth echoing; a single value is
    got = "" if "input" not in err or isinstance(err["input"], dict) else f" (got {_short(err['input'])})"
    return f"{path}: {msg}{got}"


def describe_errors(errors: Sequence[dict[str, Any]], root: type[BaseModel] | None = None) -> str:
    """Every validation problem of one request in one line (the first MAX_ERRORS, then a count)."""
    msgs = list(dict.fromkeys(describe_one(e, root) for e in errors))  # unions can repeat one problem
    more = f" (+{len(msgs) - MAX_ERRORS} more)" if len(msgs) > MAX_ERRORS else ""
    return "; ".join(msgs[:MAX_ERRORS]) + more


def _body_model(request: Request) -> type[BaseModel] | None:
    field = getattr(request.scope.get("route"), "body_field", None)
    info = getattr(field, "field_info", None)
    models = _models_in(getattr(info, "annotation", None) or getattr(field, "type_", None))
    return models[0] if models else None


def install_error_handlers(app: FastAPI) -> None:
    """Validation failures and unparseable bodies answer 400 with the error body; other HTTP errors
    (404, 405, ...) keep FastAPI's answers."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(describe_errors(exc.errors(), _body_model(request)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:  # Starlette names only the first route's methods; a path may have several
            allow = sorted({m for r in app.routes if (rx := getattr(r, "path_regex", None)) and rx.match(request.url.path)
                            for m in getattr(r, "methods", None) or ()})
            return JSONResponse({"detail": exc.detail}, status_code=405, headers={"Allow": ", ".join(allow)})
        if exc.status_code == 400:
            cause = exc.__cause__  # FastAPI's "error parsing the body" hides why (e.g. JSON nested too deep)
            if cause is not None:
                return error_response(f"the body could not be parsed: {type(cause).__name__}: {_short(str(cause), 120)}")
            return error_response(str(exc.detail))
        return await http_exception_handler(request, exc)


ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def document_bad_request(openapi: dict[str, Any]) -> None:
    """Rewrite FastAPI's documented 422 (HTTPValidationError) as the 400 the handlers answer; an operation
    that also answers 400 in another shape keeps that shape beside ErrorBody."""
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorBody"] = ErrorBody.model_json_schema()
    for ops in openapi.get("paths", {}).values():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            had_422 = responses.pop("422", None) is not None
            if not (had_422 or op.get("requestBody") or op.get("parameters")):
                continue  # nothing to validate: its own 400s (if any) stay as declared
            if "400" in responses:
                js = responses["400"].setdefault("content", {}).setdefault("application/json", {})
                other = js.get("schema")
                js["schema"] = {"anyOf": [ERROR_REF, other]} if other and other != ERROR_REF else ERROR_REF
            else:
                responses["400"] = {"description": "Invalid request: the message names the field",
                                    "content": {"application/json": {"schema": ERROR_REF}}}
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)


def customize_openapi(app: FastAPI, *steps: Callable[[dict[str, Any]], None]) -> None:
    """Run `steps` over the OpenAPI document once, when it is first built."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for step in steps:
                step(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = ["ErrorBody", "UNION_TAGS", "allowed_fields", "customize_openapi", "describe_errors", "document_bad_request",
           "error_response", "field_path", "install_error_handlers"]
