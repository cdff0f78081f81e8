"""Error responses of the HTTP API: every error is JSON in OpenAI's shape, never a stack trace.

`{"error": {"message", "type", "param", "code"}}`: client mistakes are 4xx naming the field (400
bad body, 401 key, 404 unknown model, battle or route, 405 method, 409 second vote, 413 body too
large), 504 a generation over the time limit; anything else is a 500 whose body says only
"internal error" (the details go to the log). The gateway's own errors are mapped here, in one
place, so no route needs its own try/except around a gateway call.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dpo_cluster.serving.gateway import GenerationTimeout, UnknownModel
from dpo_cluster.serving.prompts import PromptError

logger = logging.getLogger(__name__)

_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\])$")


class ApiError(Exception):
    """An error response: status, OpenAI error type, message, and the field at fault."""

    def __init__(
        self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(api: FastAPI) -> None:
    """Turn every exception a route can raise into an OpenAI-shaped JSON error response."""

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.type, error.param)

    @api.exception_handler(UnknownModel)
    async def _unknown_model(request: Request, error: UnknownModel) -> JSONResponse:
        return error_response(404, str(error), "model_not_found", "model")

    @api.exception_handler(PromptError)
    async def _prompt(request: Request, error: PromptError) -> JSONResponse:
        return error_response(400, str(error), "invalid_request_error", error.field)

    @api.exception_handler(GenerationTimeout)
    async def _timeout(request: Request, error: GenerationTimeout) -> JSONResponse:
        return error_response(504, str(error), "timeout")

    @api.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(error.errors())
        return error_response(400, message, "invalid_request_error", param)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = "no such route" if error.status_code == 404 else str(error.detail)
        return error_response(error.status_code, message, "invalid_request_error")

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s %s", request.method, request.url.path)
        return error_response(500, "internal error", "server_error")


def describe_validation(errors: list[Any]) -> tuple[str, str | None]:
    """'field.path: what is wrong' for the first pydantic error, and the field path."""
    if not errors:
        return "invalid request", None

    def path(error: Any) -> list[str]:
        # A union's member types appear in the location ("prompt", "str"): keep the field path only.
        return [str(p) for p in error.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]

    # Of a union's errors, the deepest says most: ["\ud800"] as `str | list[str]` is "not a
    # string" at prompt, but the list member's complaint is at prompt.0, the item really wrong.
    first = max(errors, key=lambda error: len(path(error)))
    loc = path(first)
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param
