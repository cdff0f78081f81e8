"""The side-by-side routes: `POST /v1/compare` and the blind A/B arena (page, battles, turns,
votes, leaderboard, export).

Compare and a battle run the same thing, one prompt answered by both models with the same
sampling parameters; a battle also records the answers under blind labels for a vote, and a chat
battle may go on for more turns (`POST /v1/arena/battles/{id}/turns`), each side continuing its
own conversation with the battle's sampling parameters. With `"stream": true` a battle or a turn
answers with server-sent events, both sides generated at once (`data: <json>` each, in order):

    {"type": "battle", "battle_id", "turn"}                              first
    {"type": "delta", "side": "A" | "B", "text"}                         as each side's text is made
    {"type": "done", "side", "finish_reason", "completion_tokens"}       once per side
    {"type": "saved", "battle_id", "turn", "answers": {"A": ..., "B": ...}}  the turn is durable
    {"error": {"message", "type"}}                                       instead of "saved" on failure
    [DONE]

A streamed turn is stored when both sides have finished, so a vote or the next turn waits for
"saved"; a stream cut short stores nothing.
"""

# Not `from __future__ import annotations`: FastAPI reads a route's Annotated[..., Depends(...)]
# when the route is defined, and those dependencies are closures of the router builders.

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import asdict
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, StreamingResponse

from dpo_cluster.serving.api_errors import ApiError
from dpo_cluster.serving.api_inputs import json_body
from dpo_cluster.serving.arena_battles import (
    SIDES,
    check_can_continue,
    draw_pair,
    draw_sides,
    new_battle_id,
)
from dpo_cluster.serving.arena_store import AlreadyVoted, ArenaStore, Battle, BattleNotFound, TurnRefused
from dpo_cluster.serving.gateway import Answer, Gateway, GenerationTimeout
from dpo_cluster.serving.generation import GenerationRequest, StreamDelta
from dpo_cluster.serving.openai_routes import sse, usage
from dpo_cluster.serving.prompts import PromptError
from dpo_cluster.serving.schemas import BattleRequest, OnePrompt, Sampling, TurnRequest, VoteRequest

ARENA_PAGE = resources.files("dpo_cluster.serving").joinpath("arena.html")
EXPORT_FORMATS = ("dpo", "kto", "fastchat")


def build_compare_router(gateway: Gateway, *, max_body_bytes: int) -> APIRouter:
    """`POST /v1/compare`: every served model's answer to one prompt, named, with the parameters
    used (base and tuned, and the models of serve.models)."""
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
    """`POST /v1/arena/battles`, `POST /v1/arena/battles/{id}/turns`,
    `POST /v1/arena/battles/{id}/vote`, `GET /v1/arena/export`."""
    router = APIRouter()
    battle_body = json_body(BattleRequest, max_body_bytes)
    turn_body = json_body(TurnRequest, max_body_bytes)
    vote_body = json_body(VoteRequest, max_body_bytes)

    @router.post("/v1/arena/battles")
    async def create_battle(body: Annotated[BattleRequest, Depends(battle_body)]) -> Any:
        if body.stream:
            return await stream_first_turn(gateway, store, body)
        answers, params = await both_models(gateway, body, draw_pair(gateway.names()))
        battle = await asyncio.to_thread(
            store.create_battle,
            prompt=body.prompt,
            messages=body.message_dicts(),
            answers_by_model={a.model: a.text for a in answers},
            params=params,
        )
        return {"battle_id": battle.id, "answers": battle.answers}

    @router.post("/v1/arena/battles/{battle_id}/turns")
    async def add_turn(battle_id: str, body: Annotated[TurnRequest, Depends(turn_body)]) -> Any:
        with battle_errors(battle_id):
            battle = await asyncio.to_thread(store.get_battle, battle_id)
            check_can_continue(battle)  # refused before any generation is spent on it
        turn = battle.turn_count + 1
        requests = turn_requests(gateway, battle, body.content)

        def save(answers: dict[str, str]) -> Battle:
            return store.add_turn(battle_id, turn, body.content, answers)

        if body.stream:
            with followup_prompt_errors():
                streams = await open_sides(gateway, requests)
            return sse(turn_events(gateway, streams, battle_id=battle_id, turn=turn, save=save))
        with followup_prompt_errors():
            generated = await gateway.generate_all([requests[side] for side in SIDES])
        answers = {side: answer.text for side, answer in zip(SIDES, generated)}
        with battle_errors(battle_id):
            await asyncio.to_thread(save, answers)
        return {"battle_id": battle_id, "turn": turn, "answers": answers}

    @router.post("/v1/arena/battles/{battle_id}/vote")
    async def vote(battle_id: str, body: Annotated[VoteRequest, Depends(vote_body)]) -> dict[str, Any]:
        with battle_errors(battle_id):
            battle = await asyncio.to_thread(store.vote, battle_id, body.winner)
        # Only now are the names revealed: the store has committed the vote.
        return {"battle_id": battle.id, "winner": battle.winner, "models": battle.models}

    @router.get("/v1/arena/export")
    async def export(format: str = "dpo") -> StreamingResponse:
        if format not in EXPORT_FORMATS:
            raise ApiError(400, f"format: one of {', '.join(EXPORT_FORMATS)}, got {format!r}", param="format")
        exporters = {"dpo": store.export_dpo, "kto": store.export_kto, "fastchat": store.export_fastchat}
        rows = await asyncio.to_thread(lambda: list(exporters[format]()))
        lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        return StreamingResponse(
            lines,
            media_type="application/x-ndjson; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="arena-{format}.jsonl"'},
        )

    return router


@contextmanager
def battle_errors(battle_id: str) -> Iterator[None]:
    """The store's refusals as client errors: an unknown battle is a 404; a voted battle, a text
    battle asked for a turn, or a turn another request recorded first, a 409."""
    try:
        yield
    except BattleNotFound:
        raise ApiError(
            404, f"battle_id: no battle with id {battle_id!r}", param="battle_id", type_="not_found"
        ) from None
    except (AlreadyVoted, TurnRefused) as error:
        raise ApiError(409, str(error), param="battle_id", type_="conflict") from None


@contextmanager
def followup_prompt_errors() -> Iterator[None]:
    """A follow-up's conversation refused (too long, rejected by the chat template) as a 400 on
    `content`, the only field of the request: the messages it would name are the server's."""
    try:
        yield
    except PromptError as error:
        detail = str(error).split(": ", 1)[-1]
        raise ApiError(
            400, f"content: the conversation with this message is refused: {detail}", param="content"
        ) from None


async def stream_first_turn(gateway: Gateway, store: ArenaStore, body: BattleRequest) -> StreamingResponse:
    """A new battle streamed: sides and id fixed up front (the events name the side of each
    delta), both generations started, then the events; the battle is stored once both finish."""
    sides = draw_sides(draw_pair(gateway.names()))
    prompt = {"prompt": body.prompt, "messages": body.message_dicts()}
    requests = {side: gateway.build_request(sides[side], body, **prompt) for side in SIDES}
    params = params_of(requests["A"])
    battle_id = new_battle_id()
    streams = await open_sides(gateway, requests)

    def save(answers: dict[str, str]) -> Battle:
        return store.create_battle(
            prompt=body.prompt,
            messages=body.message_dicts(),
            answers_by_model={sides[side]: answers[side] for side in SIDES},
            params=params,
            battle_id=battle_id,
            sides=sides,
        )

    return sse(turn_events(gateway, streams, battle_id=battle_id, turn=1, save=save))


def turn_requests(gateway: Gateway, battle: Battle, content: str) -> dict[str, GenerationRequest]:
    """Each side's next generation: its own conversation plus the new user message, sampled
    with the battle's parameters. Raises ApiError 409 when a side's model is no longer served,
    and a 400 on `content` when a conversation is refused."""
    sampling = battle_sampling(battle.params, gateway.limits.max_new_tokens)
    requests = {}
    for side in SIDES:
        name = battle.models[side]
        if name not in gateway.models:
            raise ApiError(
                409,
                f"battle_id: this battle's model on side {side} is not served here any more",
                param="battle_id",
                type_="conflict",
            )
        messages = [*battle.conversation(side), {"role": "user", "content": content}]
        with followup_prompt_errors():
            requests[side] = gateway.build_request(name, sampling, messages=messages)
    return requests


def battle_sampling(params: dict[str, Any], max_new_tokens: int) -> Sampling:
    """The sampling fields a battle was started with, for its next turns. The token budget is
    capped at the server's current limit, which may have been lowered since."""
    return Sampling(
        max_new_tokens=min(int(params["max_new_tokens"]), max_new_tokens),
        temperature=params["temperature"],
        top_p=params["top_p"],
        seed=params["seed"],
        stop=list(params["stop"]) or None,
    )


async def open_sides(
    gateway: Gateway, requests: dict[str, GenerationRequest]
) -> dict[str, AsyncIterator[StreamDelta]]:
    """Start both sides' streams at once, so the model servers generate them side by side (a
    batching engine steps both in one batch); raises PromptError, before any response is sent,
    when a replica refuses either request."""
    opened = await asyncio.gather(
        *(gateway.open_stream(requests[side]) for side in SIDES), return_exceptions=True
    )
    streams: dict[str, AsyncIterator[StreamDelta]] = {}
    for side, result in zip(SIDES, opened):
        if isinstance(result, BaseException):
            raise result
        streams[side] = result
    return streams


async def interleave(
    streams: dict[str, AsyncIterator[StreamDelta]],
) -> AsyncIterator[tuple[str, StreamDelta]]:
    """(side, delta) from every stream as each delta arrives, until all of them end. One reader
    task per side, so a slow side never holds back the other's text."""
    queue: asyncio.Queue[tuple[str, StreamDelta | Exception | None]] = asyncio.Queue()

    async def pump(side: str, deltas: AsyncIterator[StreamDelta]) -> None:
        try:
            async for delta in deltas:
                queue.put_nowait((side, delta))
        except Exception as error:  # re-raised by the reader below
            queue.put_nowait((side, error))
            return
        queue.put_nowait((side, None))

    tasks = [asyncio.create_task(pump(side, deltas)) for side, deltas in streams.items()]
    try:
        running = len(tasks)
        while running:
            side, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield side, item
    finally:
        # A failed side or a client gone: stop reading the other side too.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def turn_events(
    gateway: Gateway,
    streams: dict[str, AsyncIterator[StreamDelta]],
    *,
    battle_id: str,
    turn: int,
    save: Callable[[dict[str, str]], Battle],
) -> AsyncIterator[dict[str, Any]]:
    """The events of one streamed turn (see the module docstring); `save` stores the finished
    answers {"A": text, "B": text} and runs in a thread. A timeout ends the stream with an error
    event (raised to `sse`), and so does a store refusal: a vote cast while the turn ran."""
    yield {"type": "battle", "battle_id": battle_id, "turn": turn}
    texts: dict[str, list[str]] = {side: [] for side in streams}
    async with aclosing(interleave(streams)) as deltas:
        async for side, delta in deltas:
            if delta.finish_reason == "timeout":
                raise GenerationTimeout(gateway.timeout_message())
            texts[side].append(delta.text)
            if delta.text:
                yield {"type": "delta", "side": side, "text": delta.text}
            if delta.finish_reason is not None:
                yield {
                    "type": "done",
                    "side": side,
                    "finish_reason": delta.finish_reason,
                    "completion_tokens": delta.completion_tokens,
                }
    answers = {side: "".join(parts) for side, parts in texts.items()}
    try:
        await asyncio.to_thread(save, answers)
    except (AlreadyVoted, TurnRefused, BattleNotFound) as error:
        yield {"error": {"message": str(error), "type": "conflict"}}
        return
    yield {"type": "saved", "battle_id": battle_id, "turn": turn, "answers": answers}


async def both_models(
    gateway: Gateway, body: OnePrompt, names: list[str] | None = None
) -> tuple[list[Answer], dict[str, Any]]:
    """The answers of `names` (default: every served model) to the body's prompt, submitted
    together, and the sampling parameters (the same on every side) as JSON-able values."""
    prompt = {"prompt": body.prompt, "messages": body.message_dicts()}
    requests = [gateway.build_request(name, body, **prompt) for name in names or gateway.names()]
    answers = await gateway.generate_all(requests)
    return answers, params_of(requests[0])


def params_of(request: GenerationRequest) -> dict[str, Any]:
    """A request's sampling parameters as JSON-able values (the same on both sides)."""
    params = asdict(request.params)
    return params | {"stop": list(params["stop"])}


def side(answer: Answer) -> dict[str, Any]:
    """One model's half of a comparison."""
    return {
        "text": answer.text,
        "finish_reason": answer.finish_reason,
        "usage": usage(answer),
        "latency_s": round(answer.latency_s, 4),
    } | {"model": answer.model}
