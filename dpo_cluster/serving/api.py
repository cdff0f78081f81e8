"""The HTTP routes of the serving app (FastAPI), built per front replica by `build_api`.

Routes (see ARCHITECTURE.md): `GET /healthz`, `GET /v1/models`, `POST /v1/chat/completions`,
`POST /v1/completions` (OpenAI shapes, `stream: true` as server-sent events), `POST /v1/compare`,
`GET /arena`, `POST /v1/arena/battles`, `POST /v1/arena/battles/{id}/vote`,
`GET /v1/arena/leaderboard`, `GET /v1/arena/export`.

Every error is JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: client
mistakes are 4xx naming the field (400 bad body, 401 key, 404 unknown battle or route, 409 second
vote, 413 body too large), 504 a generation over the time limit, 503 a model replica that does not
answer; anything else is a 500 whose body says only "internal error" (the details go to the log).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from importlib import resources
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dpo_cluster.serving.arena_store import AlreadyVoted, ArenaStore, BattleNotFound
from dpo_cluster.serving.gateway import Answer, Gateway, GenerationTimeout, UnknownModel
from dpo_cluster.serving.generation import GenerationRequest, StreamDelta
from dpo_cluster.serving.prompts import PromptError
from dpo_cluster.serving.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    OnePrompt,
    VoteRequest,
)

logger = logging.getLogger(__name__)

Body = TypeVar("Body", bound=BaseModel)
ARENA_PAGE = resources.files("dpo_cluster.serving").joinpath("arena.html")
EXPORT_FORMATS = ("dpo", "fastchat")
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


def build_api(gateway: Gateway, store: ArenaStore, *, api_key: str | None, max_body_bytes: int) -> FastAPI:
    """The FastAPI app of one front replica."""
    api = FastAPI(title="dpo-cluster", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())
    install_error_handlers(api)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401, "missing API key: send 'Authorization: Bearer <key>'", type_="authentication_error"
            )
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "wrong API key", type_="authentication_error")

    async def parse(request: Request, model: type[Body]) -> Body:
        return parse_body(await read_body(request, max_body_bytes), model)

    def served_name(name: str) -> str:
        try:
            return gateway.resolve(name)
        except UnknownModel as error:
            raise ApiError(404, str(error), param="model", type_="model_not_found") from None

    def build(name: str, body: Any, **prompt: Any) -> GenerationRequest:
        try:
            return gateway.build_request(name, body, **prompt)
        except PromptError as error:
            raise ApiError(400, str(error), param=error.field) from None

    async def answer(requests: list[GenerationRequest]) -> list[Answer]:
        try:
            return await gateway.generate_all(requests)
        except GenerationTimeout as error:
            raise ApiError(504, str(error), type_="timeout") from None
        except PromptError as error:
            raise ApiError(400, str(error), param=error.field) from None

    async def open_stream(gen: GenerationRequest) -> AsyncIterator[StreamDelta]:
        try:
            return await gateway.open_stream(gen)
        except PromptError as error:
            raise ApiError(400, str(error), param=error.field) from None

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        try:
            models = await gateway.ping()
        except Exception as error:  # a replica down or stuck: unhealthy, not a server bug
            logger.warning("health check: a model deployment did not answer: %r", error)
            return error_response(503, "a model deployment is not answering", "unavailable")
        return JSONResponse(
            {
                "status": "ok",
                "models": models,
                "api_key_required": api_key is not None,
                "arena": store.counts(),
            }
        )

    @api.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": started,
                "owned_by": "dpo-cluster",
                "source": m.source,
                "adapter_of": m.adapter_of,
                "deployment": m.deployment,
            }
            for m in gateway.models.values()
        ]
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request)
        body = await parse(request, ChatCompletionRequest)
        name = served_name(body.model)
        gen = build(name, body, messages=[m.model_dump() for m in body.messages])
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return sse(chat_chunks(await open_stream(gen), gen, body.model, include_usage))
        (result,) = await answer([gen])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": usage(result),
        }

    @api.post("/v1/completions")
    async def completions(request: Request) -> Any:
        authorize(request)
        body = await parse(request, CompletionRequest)
        name = served_name(body.model)
        gen = build(name, body, prompt=body.prompt_text())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return sse(completion_chunks(await open_stream(gen), gen, body.model, include_usage))
        (result,) = await answer([gen])
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [
                {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
            ],
            "usage": usage(result),
        }

    async def both_models(body: OnePrompt) -> tuple[list[Answer], dict[str, Any]]:
        prompt = {"prompt": body.prompt, "messages": body.message_dicts()}
        requests = [build(name, body, **prompt) for name in gateway.names()]
        answers = await answer(requests)
        params = asdict(requests[0].params)  # the same on both sides
        return answers, params | {"stop": list(params["stop"])}

    @api.post("/v1/compare")
    async def compare(request: Request) -> dict[str, Any]:
        authorize(request)
        body = await parse(request, OnePrompt)
        answers, params = await both_models(body)
        return {
            "id": f"cmp-{uuid.uuid4().hex}",
            "params": params,
            **{a.model: side(a) for a in answers},
        }

    @api.get("/arena", response_class=HTMLResponse)
    async def arena_page() -> HTMLResponse:
        return HTMLResponse(ARENA_PAGE.read_text(encoding="utf-8"))

    @api.post("/v1/arena/battles")
    async def create_battle(request: Request) -> dict[str, Any]:
        authorize(request)
        body = await parse(request, OnePrompt)
        answers, params = await both_models(body)
        battle = await asyncio.to_thread(
            store.create_battle,
            prompt=body.prompt,
            messages=body.message_dicts(),
            answers_by_model={a.model: a.text for a in answers},
            params=params,
        )
        return {"battle_id": battle.id, "answers": battle.answers}

    @api.post("/v1/arena/battles/{battle_id}/vote")
    async def vote(battle_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        body = await parse(request, VoteRequest)
        try:
            battle = await asyncio.to_thread(store.vote, battle_id, body.winner)
        except BattleNotFound:
            raise ApiError(
                404, f"battle_id: no battle with id {battle_id!r}", param="battle_id", type_="not_found"
            ) from None
        except AlreadyVoted as error:
            raise ApiError(409, str(error), param="battle_id", type_="conflict") from None
        # Only now are the names revealed: the store has committed the vote.
        return {"battle_id": battle.id, "winner": battle.winner, "models": battle.models}

    @api.get("/v1/arena/leaderboard")
    async def leaderboard() -> dict[str, Any]:
        return await asyncio.to_thread(store.leaderboard)

    @api.get("/v1/arena/export")
    async def export(request: Request, format: str = "dpo") -> StreamingResponse:
        authorize(request)
        if format not in EXPORT_FORMATS:
            raise ApiError(400, f"format: one of {', '.join(EXPORT_FORMATS)}, got {format!r}", param="format")
        rows = await asyncio.to_thread(
            lambda: list(store.export_dpo() if format == "dpo" else store.export_fastchat())
        )
        lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        filename = f"arena-{format}.jsonl"
        return StreamingResponse(
            lines,
            media_type="application/x-ndjson; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    return api


def install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.type, error.param)

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


def describe_validation(errors: list[Any]) -> tuple[str, str | None]:
    """'field.path: what is wrong' for the first pydantic error, and the field path."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    # A union's member types appear in the location ("prompt", "str"): keep the field path only.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def usage(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def side(answer: Answer) -> dict[str, Any]:
    """One model's half of a comparison."""
    return {
        "text": answer.text,
        "finish_reason": answer.finish_reason,
        "usage": usage(answer),
        "latency_s": round(answer.latency_s, 4),
    } | {"model": answer.model}


def sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events as OpenAI streams them: `data: {json}` per chunk, then `data: [DONE]`."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except GenerationTimeout as error:  # headers are sent: report it in the stream
            yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'timeout'}})}\n\n"
        except Exception:
            logger.exception("stream failed")
            yield f"data: {json.dumps({'error': {'message': 'internal error', 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def stream_deltas(
    deltas: AsyncIterator[StreamDelta], make_chunk: Callable[[str, str | None], dict[str, Any]]
) -> AsyncIterator[tuple[dict[str, Any], int]]:
    """(chunk, completion_tokens) for each delta; a timeout ends the stream with an error event."""
    async for delta in deltas:
        if delta.finish_reason == "timeout":
            raise GenerationTimeout("generation took longer than this server's time limit")
        if delta.text or delta.finish_reason:
            yield make_chunk(delta.text, delta.finish_reason), delta.completion_tokens


async def chat_chunks(
    deltas: AsyncIterator[StreamDelta], gen: GenerationRequest, model: str, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }

    yield chunk({"role": "assistant", "content": ""}, None)
    completion_tokens = 0
    async for event, tokens in stream_deltas(
        deltas, lambda text, reason: chunk({"content": text} if text else {}, reason)
    ):
        completion_tokens = tokens
        yield event
    if include_usage:
        yield {**chunk({}, None), "choices": [], "usage": stream_usage(gen, completion_tokens)}


async def completion_chunks(
    deltas: AsyncIterator[StreamDelta], gen: GenerationRequest, model: str, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    chunk_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
        return {
            "id": chunk_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
        }

    completion_tokens = 0
    async for event, tokens in stream_deltas(deltas, chunk):
        completion_tokens = tokens
        yield event
    if include_usage:
        yield {**chunk("", None), "choices": [], "usage": stream_usage(gen, completion_tokens)}


def stream_usage(gen: GenerationRequest, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = len(gen.prompt_ids)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
