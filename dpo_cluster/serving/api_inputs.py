"""What the HTTP API takes in, as FastAPI dependencies: the API key and size-limited JSON bodies.

Bodies are read and validated here rather than by FastAPI's own body parameters, so an oversize
body is refused (413) before it is read whole and every validation error names its field the
same way (`api_errors.describe_validation`). Router-level dependencies run before a route's own,
so a request without the key is refused before its body is read.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from dpo_cluster.serving.api_errors import ApiError, describe_validation

Body = TypeVar("Body", bound=BaseModel)


def build_key_check(api_key: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency that refuses (401) a request without `Authorization: Bearer <api_key>`."""

    async def check_key(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401, "missing API key: send 'Authorization: Bearer <key>'", type_="authentication_error"
            )
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "wrong API key", type_="authentication_error")

    return check_key


def json_body(model: type[Body], max_body_bytes: int) -> Callable[[Request], Awaitable[Body]]:
    """A dependency giving the request's body validated as `model`; 413 or 400 otherwise."""

    async def parse(request: Request) -> Body:
        return parse_body(await read_body(request, max_body_bytes), model)

    return parse


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The request body, refusing (413) one over max_body_bytes before reading all of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise ApiError(413, f"request body is {declared} bytes, over the limit of {max_body_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise ApiError(413, f"request body is over the limit of {max_body_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(raw: bytes, model: type[Body]) -> Body:
    """Validate a JSON body; a 400 naming the first bad field otherwise."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        message, param = describe_validation(error.errors())
        raise ApiError(400, message, param=param) from None
