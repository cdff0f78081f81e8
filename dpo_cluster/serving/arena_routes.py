"""The side-by-side routes: `POST /v1/compare` and the blind A/B arena (page, battles, votes,
leaderboard, export).

Compare and a battle run the same thing, one prompt answered by both models with the same
sampling parameters; a battle also records the answers under blind labels for a vote.
"""

# Not `from __future__ import annotations`: FastAPI reads a route's Annotated[..., Depends(...)]
# when the route is defined, and those dependencies are closures of the router builders.

import asyncio
import json
import uuid
from dataclasses import asdict
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, StreamingResponse

from dpo_cluster.serving.api_errors import ApiError
from dpo_cluster.serving.api_inputs import json_body
from dpo_cluster.serving.arena_store import AlreadyVoted, ArenaStore, BattleNotFound
from dpo_cluster.serving.gateway import Answer, Gateway
from dpo_cluster.serving.openai_routes import usage
from dpo_cluster.serving.schemas import OnePrompt, VoteRequest

ARENA_PAGE = resources.files("dpo_cluster.serving").joinpath("arena.html")
EXPORT_FORMATS = ("dpo", "fastchat")


def build_compare_router(gateway: Gateway, *, max_body_bytes: int) -> APIRouter:
    """`POST /v1/compare`: both models' answers to one prompt, named, with the parameters used."""
    router = APIRouter()
    prompt_body = json_body(OnePrompt, max_body_bytes)

    @router.post("/v1/compare")
    async def compare(body: Annotated[OnePrompt, Depends(prompt_body)]) -> dict[str, Any]:
        answers, params = await both_models(gateway, body)
        return {
            "id": f"cmp-{uuid.uuid4().hex}",
            "params": params,
            **{a.model: side(a) for a in answers},
        }

    return router


def build_arena_page_router(store: ArenaStore) -> APIRouter:
    """`GET /arena` (the page, which asks the voter for the key) and `GET /v1/arena/leaderboard`."""
    router = APIRouter()

    @router.get("/arena", response_class=HTMLResponse)
    async def arena_page() -> HTMLResponse:
        return HTMLResponse(ARENA_PAGE.read_text(encoding="utf-8"))

    @router.get("/v1/arena/leaderboard")
    async def leaderboard() -> dict[str, Any]:
        return await asyncio.to_thread(store.leaderboard)

    return router


def build_arena_router(gateway: Gateway, store: ArenaStore, *, max_body_bytes: int) -> APIRouter:
    """`POST /v1/arena/battles`, `POST /v1/arena/battles/{id}/vote`, `GET /v1/arena/export`."""
    router = APIRouter()
    prompt_body = json_body(OnePrompt, max_body_bytes)
    vote_body = json_body(VoteRequest, max_body_bytes)

    @router.post("/v1/arena/battles")
    async def create_battle(body: Annotated[OnePrompt, Depends(prompt_body)]) -> dict[str, Any]:
        answers, params = await both_models(gateway, body)
        battle = await asyncio.to_thread(
            store.create_battle,
            prompt=body.prompt,
            messages=body.message_dicts(),
            answers_by_model={a.model: a.text for a in answers},
            params=params,
        )
        return {"battle_id": battle.id, "answers": battle.answers}

    @router.post("/v1/arena/battles/{battle_id}/vote")
    async def vote(battle_id: str, body: Annotated[VoteRequest, Depends(vote_body)]) -> dict[str, Any]:
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

    @router.get("/v1/arena/export")
    async def export(format: str = "dpo") -> StreamingResponse:
        if format not in EXPORT_FORMATS:
            raise ApiError(400, f"format: one of {', '.join(EXPORT_FORMATS)}, got {format!r}", param="format")
        rows = await asyncio.to_thread(
            lambda: list(store.export_dpo() if format == "dpo" else store.export_fastchat())
        )
        lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        return StreamingResponse(
            lines,
            media_type="application/x-ndjson; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="arena-{format}.jsonl"'},
        )

    return router


async def both_models(gateway: Gateway, body: OnePrompt) -> tuple[list[Answer], dict[str, Any]]:
    """Every served model's answer to the body's prompt, and the sampling parameters (the same on
    both sides) as JSON-able values."""
    prompt = {"prompt": body.prompt, "messages": body.message_dicts()}
    requests = [gateway.build_request(name, body, **prompt) for name in gateway.names()]
    answers = await gateway.generate_all(requests)
    params = asdict(requests[0].params)
    return answers, params | {"stop": list(params["stop"])}


def side(answer: Answer) -> dict[str, Any]:
    """One model's half of a comparison."""
    return {
        "text": answer.text,
        "finish_reason": answer.finish_reason,
        "usage": usage(answer),
        "latency_s": round(answer.latency_s, 4),
    } | {"model": answer.model}
