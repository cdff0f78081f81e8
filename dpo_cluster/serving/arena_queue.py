"""The arena's queue of posted pairs: answers written elsewhere (a preference round's candidates)
put before voters as blind battles, so people's votes can judge a round.

    POST /v1/arena/queue             {prompt | messages, answers: {label: text, label: text}}
                                     -> {"battle_id"}
    GET  /v1/arena/queue/next        the oldest queued battle without a vote, as a voter sees it
                                     (prompt, answers A and B), or {"battle_id": null}
    GET  /v1/arena/battles/{id}      a battle's state: voted or not, and once voted the winner
                                     and which model each side was ("queued:" + label for a
                                     queued pair, as the vote's answer and the export say)

Votes go through the arena's own `POST /v1/arena/battles/{id}/vote`; queued battles are exported
with the rest and left out of the leaderboard (`arena_battles.QUEUED_PREFIX`).
"""

# Not `from __future__ import annotations`: FastAPI reads the routes' Annotated dependencies.

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from dpo_cluster.serving.api_errors import ApiError
from dpo_cluster.serving.api_inputs import json_body
from dpo_cluster.serving.arena_battles import QUEUED_PREFIX, Battle
from dpo_cluster.serving.arena_routes import battle_errors
from dpo_cluster.serving.arena_store import ArenaStore
from dpo_cluster.serving.schemas import QueuedPairRequest


def build_arena_queue_router(store: ArenaStore, *, max_body_bytes: int) -> APIRouter:
    router = APIRouter()
    pair_body = json_body(QueuedPairRequest, max_body_bytes)

    @router.post("/v1/arena/queue")
    async def queue_pair(body: Annotated[QueuedPairRequest, Depends(pair_body)]) -> dict[str, Any]:
        try:
            battle = await asyncio.to_thread(
                store.create_battle,
                prompt=body.prompt,
                messages=body.message_dicts(),
                answers_by_model={QUEUED_PREFIX + label: text for label, text in body.answers.items()},
                params={"queued": True},
            )
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        return {"battle_id": battle.id}

    @router.get("/v1/arena/queue/next")
    async def next_queued() -> dict[str, Any]:
        battle = await asyncio.to_thread(store.next_queued)
        if battle is None:
            return {"battle_id": None}
        return {"battle_id": battle.id, **_shown(battle)}

    @router.get("/v1/arena/battles/{battle_id}")
    async def battle_state(battle_id: str) -> dict[str, Any]:
        with battle_errors(battle_id):
            battle = await asyncio.to_thread(store.get_battle, battle_id)
        state: dict[str, Any] = {"battle_id": battle.id, "voted": battle.winner is not None, **_shown(battle)}
        if battle.winner is not None:  # names stay hidden until the vote is in
            state |= {"winner": battle.winner, "models": battle.models}
        return state

    return router


def _shown(battle: Battle) -> dict[str, Any]:
    return {"prompt": battle.prompt, "messages": battle.messages, "answers": battle.answers}
