"""The HTTP API of one front replica (FastAPI), assembled from the routers of each job.

Routes: `GET /healthz`, `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`
(`openai_routes`), `POST /v1/compare`, `GET /arena`, `POST /v1/arena/battles`,
`POST /v1/arena/battles/{id}/turns`, `POST /v1/arena/battles/{id}/vote`,
`GET /v1/arena/leaderboard`, `GET /v1/arena/export` (`arena_routes`), `POST /v1/arena/queue`,
`GET /v1/arena/queue/next`, `GET /v1/arena/battles/{id}` (`arena_queue`); errors as `api_errors` describes. The API key, when one is set, guards whole
routers (generation, compare, battles, votes, export), so a new route on a guarded router cannot
be left open by mistake; health, the model list, the arena page and the leaderboard stay public.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse

from dpo_cluster.serving.api_errors import error_response, install_error_handlers
from dpo_cluster.serving.api_inputs import build_key_check
from dpo_cluster.serving.arena_queue import build_arena_queue_router
from dpo_cluster.serving.arena_routes import build_arena_page_router, build_arena_router, build_compare_router
from dpo_cluster.serving.arena_store import ArenaStore
from dpo_cluster.serving.gateway import Gateway
from dpo_cluster.serving.openai_routes import build_models_router, build_openai_router

logger = logging.getLogger(__name__)


def build_api(gateway: Gateway, store: ArenaStore, *, api_key: str | None, max_body_bytes: int) -> FastAPI:
    """The FastAPI app of one front replica; `api_key` None leaves every route open."""
    api = FastAPI(title="dpo-cluster", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(api)
    guard = [Depends(build_key_check(api_key))] if api_key is not None else []

    api.include_router(build_health_router(gateway, store, api_key_required=api_key is not None))
    api.include_router(build_models_router(gateway))
    api.include_router(build_arena_page_router(store))
    api.include_router(build_openai_router(gateway, max_body_bytes=max_body_bytes), dependencies=guard)
    api.include_router(build_compare_router(gateway, max_body_bytes=max_body_bytes), dependencies=guard)
    api.include_router(build_arena_router(gateway, store, max_body_bytes=max_body_bytes), dependencies=guard)
    api.include_router(build_arena_queue_router(store, max_body_bytes=max_body_bytes), dependencies=guard)
    return api


def build_health_router(gateway: Gateway, store: ArenaStore, *, api_key_required: bool) -> APIRouter:
    """`GET /healthz`: every model deployment's description and the arena's counts, or a 503."""
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> JSONResponse:
        try:
            models = await gateway.ping()
        except Exception as error:  # a replica down or stuck: unhealthy, not a server bug
            logger.warning("health check: a model deployment did not answer: %r", error)
            return error_response(503, "a model deployment is not answering", "unavailable")
        body: dict[str, Any] = {
            "status": "ok",
            "models": models,
            "api_key_required": api_key_required,
            "arena": store.counts(),
        }
        return JSONResponse(body)

    return router
