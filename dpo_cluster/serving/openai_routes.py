"""The OpenAI-compatible routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`.

Responses and `stream: true` server-sent events follow OpenAI's shapes closely enough that the
official `openai` client works unchanged against this server.
"""

# Not `from __future__ import annotations`: FastAPI reads a route's Annotated[..., Depends(...)]
# when the route is defined, and those dependencies are closures of the router builders.

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from dpo_cluster.serving.api_inputs import json_body
from dpo_cluster.serving.gateway import Answer, Gateway, GenerationTimeout
from dpo_cluster.serving.generation import GenerationRequest, StreamDelta
from dpo_cluster.serving.schemas import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)


def build_models_router(gateway: Gateway) -> APIRouter:
    """`GET /v1/models`: the served names, where each was loaded from and which deployment hosts it."""
    router = APIRouter()
    started = int(time.time())

    @router.get("/v1/models")
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

    return router


def build_openai_router(gateway: Gateway, *, max_body_bytes: int) -> APIRouter:
    """`POST /v1/chat/completions` and `POST /v1/completions`, streamed or not."""
    router = APIRouter()
    chat_body = json_body(ChatCompletionRequest, max_body_bytes)
    completion_body = json_body(CompletionRequest, max_body_bytes)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: Annotated[ChatCompletionRequest, Depends(chat_body)]) -> Any:
        name = gateway.resolve(body.model)
        gen = gateway.build_request(name, body, messages=[m.model_dump() for m in body.messages])
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return sse(chat_chunks(await gateway.open_stream(gen), gen, body.model, include_usage))
        (result,) = await gateway.generate_all([gen])
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

    @router.post("/v1/completions")
    async def completions(body: Annotated[CompletionRequest, Depends(completion_body)]) -> Any:
        name = gateway.resolve(body.model)
        gen = gateway.build_request(name, body, prompt=body.prompt_text())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return sse(completion_chunks(await gateway.open_stream(gen), gen, body.model, include_usage))
        (result,) = await gateway.generate_all([gen])
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

    return router


def usage(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


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
