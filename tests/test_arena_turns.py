"""The arena's streamed battles and follow-up turns over real HTTP on 127.0.0.1: a real local Ray,
real Serve, the tiny base model and a LoRA adapter over it (one deployment), API key on.

Covers the server-sent events of a streamed battle and turn (both sides generated at once, deltas
that add up to what is stored), multi-turn battles in which each side continues its own
conversation, every client mistake on the turns route, and multi-turn exports read by the data
pipeline as training data for the next round.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dpo_cluster.config import load_config
from dpo_cluster.serving.launch import start_serving, stop_serving
from tests.serve_helpers import Client, build_lora_final, sse_events

pytestmark = pytest.mark.slow

API_KEY = "turns-key-0123456789"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, serve_port: int) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("turns")
    final = build_lora_final(root / "run" / "final")
    key_file = root / "api-key"
    key_file.write_text(API_KEY)
    overrides = [
        "serve.base=builtin:tiny",
        f"serve.tuned={final}",
        f"serve.port={serve_port}",
        f"serve.arena_db={root / 'arena' / 'votes.sqlite'}",
        f"serve.api_key_file={key_file}",
        "serve.num_cpus=0",
        "serve.max_new_tokens=32",
        "serve.default_max_new_tokens=8",
        # Room for a few turns of a conversation, and a limit a long follow-up can pass.
        "serve.max_prompt_tokens=256",
        "serve.max_body_bytes=8192",
    ]
    config = load_config(None, overrides, serving=True)
    urls = start_serving(config)
    yield {"url": urls.base, "root": root}
    stop_serving()


@pytest.fixture(scope="module")
def client(served: dict[str, Any]) -> Client:
    return Client(served["url"], key=API_KEY)


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def streamed(client: Client, path: str, body: dict[str, Any]) -> list[Any]:
    """The events of a streamed battle or turn, checked to be an event stream ending in [DONE]."""
    response = client.post(path, body | {"stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]", events
    return events[:-1]


def side_texts(events: list[Any]) -> dict[str, str]:
    """Each side's deltas concatenated, in the order they came."""
    texts = {"A": "", "B": ""}
    for event in events:
        if event.get("type") == "delta":
            texts[event["side"]] += event["text"]
    return texts


def check_turn_events(events: list[Any], turn: int) -> dict[str, Any]:
    """The shape every streamed turn has: "battle" first, then deltas and one "done" per side
    (nothing of a side after its "done"), then "saved" whose answers are the deltas added up.
    Returns the "saved" event."""
    first, *middle, saved = events
    assert first["type"] == "battle" and first["turn"] == turn, first
    assert re.fullmatch(r"[0-9a-f]{32}", first["battle_id"])
    assert {e["type"] for e in middle} <= {"delta", "done"}, middle
    done = [e for e in middle if e["type"] == "done"]
    assert sorted(e["side"] for e in done) == ["A", "B"]
    for end in done:
        assert end["finish_reason"] in ("stop", "length") and end["completion_tokens"] >= 1
        after = middle[middle.index(end) + 1 :]
        assert not any(e["side"] == end["side"] for e in after), "a side went on after its done"
    assert saved == {
        "type": "saved",
        "battle_id": first["battle_id"],
        "turn": turn,
        "answers": side_texts(middle),
    }
    return saved


def vote(client: Client, battle_id: str, winner: str) -> dict[str, str]:
    response = client.post(f"/v1/arena/battles/{battle_id}/vote", {"winner": winner})
    assert response.status_code == 200, response.text
    return response.json()["models"]


def export(client: Client, fmt: str) -> list[dict[str, Any]]:
    response = client.get("/v1/arena/export", params={"format": fmt})
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def fastchat_entry(client: Client, battle_id: str) -> dict[str, Any]:
    return next(e for e in export(client, "fastchat") if e["question_id"] == battle_id)


# ---------------------------------------------------------------------------------------------
# Streaming


def test_streamed_battle_runs_both_sides_at_once_and_stores_what_it_sent(client: Client) -> None:
    prompt = [user("Tell me something about bread")]
    body = {"messages": prompt, "max_new_tokens": 24, "temperature": 1.0, "seed": 5}
    events = streamed(client, "/v1/arena/battles", body)
    saved = check_turn_events(events, turn=1)
    battle_id, answers = saved["battle_id"], saved["answers"]
    assert answers["A"] and answers["B"]

    # Side by side: each side's text starts arriving before the other side is finished. Answers
    # generated one after the other would show every event of one side before the other's first.
    order = [(e["type"], e["side"]) for e in events[1:-1]]
    for side, other in (("A", "B"), ("B", "A")):
        assert order.index(("delta", side)) < order.index(("done", other)), order
    assert sum(kind == "delta" for kind, _ in order) > 2  # text came in pieces, not once per side

    # What the stream showed is what the store holds, under the same blind labels.
    models = vote(client, battle_id, "B")
    assert sorted(models.values()) == ["base", "tuned"]
    entry = fastchat_entry(client, battle_id)
    assert entry["conversation_a"] == [*prompt, assistant(answers["A"])]
    assert entry["conversation_b"] == [*prompt, assistant(answers["B"])]
    assert (entry["model_a"], entry["model_b"], entry["winner"]) == (models["A"], models["B"], "model_b")

    # The streamed battle sampled exactly as the JSON one does: same seed, same text per model.
    plain = client.post("/v1/arena/battles", body)
    assert plain.status_code == 200, plain.text
    assert set(plain.json()) == {"battle_id", "answers"}
    plain_models = vote(client, plain.json()["battle_id"], "tie")
    by_model = {models[side]: answers[side] for side in "AB"}
    assert {plain_models[side]: plain.json()["answers"][side] for side in "AB"} == by_model


def test_streamed_text_battle(client: Client) -> None:
    events = streamed(client, "/v1/arena/battles", {"prompt": "Once upon a time", "max_new_tokens": 6})
    saved = check_turn_events(events, turn=1)
    vote(client, saved["battle_id"], "tie")
    entry = fastchat_entry(client, saved["battle_id"])
    assert entry["conversation_a"] == [user("Once upon a time"), assistant(saved["answers"]["A"])]


# ---------------------------------------------------------------------------------------------
# Multi-turn


# Greedy, so every battle below plays out the same texts; only the sides are drawn. Greedy, the
# tiny base model answers most chats with the same run of newlines whatever came before, while
# the tuned model's answers follow the conversation: the tuned side is where a mix-up shows.
GREEDY = {"temperature": 0, "max_new_tokens": 8}
QUESTIONS = ("Name a kind of bread", "Why that one?", "Say it in one word")


def reference_reply(client: Client, model: str, messages: list[dict[str, str]]) -> str:
    """What `model` says to `messages` through the plain chat route, sampled as the battle is."""
    response = client.post("/v1/chat/completions", {"model": model, "messages": messages, **GREEDY})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def play_three_turns(client: Client) -> tuple[str, dict[str, str], dict[str, list[dict[str, str]]]]:
    """A battle of three turns (JSON, JSON, streamed), voted "A"; (battle id, the models by side,
    each side's whole conversation as the turns returned it)."""
    first, second, third = QUESTIONS
    created = client.post("/v1/arena/battles", {"messages": [user(first)], **GREEDY})
    assert created.status_code == 200, created.text
    battle_id, answers_1 = created.json()["battle_id"], created.json()["answers"]

    turn_2 = client.post(f"/v1/arena/battles/{battle_id}/turns", {"content": second})
    assert turn_2.status_code == 200, turn_2.text
    assert set(turn_2.json()) == {"battle_id", "turn", "answers"}  # still nothing names a model
    assert (turn_2.json()["battle_id"], turn_2.json()["turn"]) == (battle_id, 2)
    answers_2 = turn_2.json()["answers"]

    saved = check_turn_events(streamed(client, f"/v1/arena/battles/{battle_id}/turns", {"content": third}), 3)
    assert saved["battle_id"] == battle_id
    answers_3 = saved["answers"]

    models = vote(client, battle_id, "A")
    conversations = {
        side: [
            user(first),
            assistant(answers_1[side]),
            user(second),
            assistant(answers_2[side]),
            user(third),
            assistant(answers_3[side]),
        ]
        for side in "AB"
    }
    return battle_id, models, conversations


def test_each_side_continues_its_own_conversation(client: Client) -> None:
    """Each side's later answers are exactly what its model says, with the battle's sampling
    parameters, to that side's own conversation: the shared user messages and its own earlier
    answers, not the other side's. Battles are played until the tuned model has sat on both
    sides, so a mix-up of either side's conversation is caught."""
    tuned_sides: set[str] = set()
    played = []
    # Each battle puts tuned on A with probability 1/2: 16 battles miss a side with p = 2^-15.
    for _ in range(16):
        battle_id, models, conversations = play_three_turns(client)
        played.append((battle_id, models, conversations))
        tuned = next(side for side in "AB" if models[side] == "tuned")
        other = "B" if tuned == "A" else "A"
        for side in "AB":
            for end in (3, 5):  # the answers of turns 2 and 3, after that side's own turns
                history = conversations[side][:end]
                assert conversations[side][end]["content"] == reference_reply(client, models[side], history)
        # The check bites: given the other side's conversation, the tuned model says something else.
        mixed = [*conversations[other][:2], conversations[tuned][2]]
        assert reference_reply(client, "tuned", mixed) != conversations[tuned][3]["content"]
        tuned_sides.add(tuned)
        if tuned_sides == {"A", "B"}:
            break
    assert tuned_sides == {"A", "B"}

    # The whole conversation is what was judged, and what is exported: every vote in the battle
    # log, and as a pair unless the winner (A) said nothing in all three turns (the untrained tiny
    # base can stop at once; tuned answers, so the battles with tuned on A give pairs).
    rows = {r["battle_id"]: r for r in export(client, "dpo")}
    pairs = 0
    for battle_id, models, conversations in played:
        entry = fastchat_entry(client, battle_id)
        assert entry["turn"] == 3
        assert (entry["conversation_a"], entry["conversation_b"]) == (conversations["A"], conversations["B"])
        if not any(m["content"].strip() for m in conversations["A"] if m["role"] == "assistant"):
            assert battle_id not in rows
            continue
        row = rows[battle_id]
        assert row["prompt"] == [user(QUESTIONS[0])]
        assert row["chosen"] == conversations["A"][1:] and row["rejected"] == conversations["B"][1:]
        assert (row["chosen_model"], row["rejected_model"]) == (models["A"], models["B"])
        pairs += 1
    assert pairs >= 1


def test_turn_client_mistakes_are_4xx_json(client: Client) -> None:
    created = client.post("/v1/arena/battles", {"messages": [user("hi")], "max_new_tokens": 4})
    assert created.status_code == 200, created.text
    battle_id = created.json()["battle_id"]
    turns = f"/v1/arena/battles/{battle_id}/turns"

    def refused(path: str, body: Any, status: int, param: str | None, *, key: str | None = API_KEY) -> str:
        response = client.post(path, body, key=key)
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert error["message"] and "Traceback" not in response.text
        assert error["param"] == param, error
        return error["message"]

    assert "'nope'" in refused("/v1/arena/battles/nope/turns", {"content": "x"}, 404, "battle_id")
    for body in ({"content": ""}, {"content": " \n "}, {}, {"content": 5}, {"content": "\ud800"}):
        assert refused(turns, body, 400, "content").startswith("content: ")
    assert "max_tokens" in refused(turns, {"content": "x", "max_tokens": 3}, 400, "max_tokens")
    for stream in (False, True):  # a streamed turn is refused before any event is sent
        message = refused(turns, {"content": "word " * 400, "stream": stream}, 400, "content")
        assert "conversation" in message and "256" in message
    refused(turns, {"content": "x"}, 401, None, key=None)
    assert client.get(turns).status_code == 405

    # A text prompt has no conversation to go on with.
    text = streamed(client, "/v1/arena/battles", {"prompt": "Once", "max_new_tokens": 2})[-1]["battle_id"]
    assert "text prompt" in refused(f"/v1/arena/battles/{text}/turns", {"content": "x"}, 409, "battle_id")

    # None of the refused requests added a turn; a vote ends the battle, streamed or not.
    vote(client, battle_id, "A")
    for stream in (False, True):
        message = refused(turns, {"content": "more", "stream": stream}, 409, "battle_id")
        assert "voted" in message and battle_id in message
    assert fastchat_entry(client, battle_id)["turn"] == 1


def test_a_vote_cast_while_a_turn_streams_wins(client: Client) -> None:
    """The turn is stored only when both sides finish; a vote that lands first ends the battle,
    and the stream then says so instead of "saved". The vote is sent as soon as the stream's first
    event arrives, while 32 tokens per side are still to come; tried a few times, since a fast
    stream may still finish first (then the turn is stored and the vote judges it)."""
    import requests

    for _ in range(5):
        body = {"messages": [user("Tell me a long story")], "temperature": 0, "max_new_tokens": 32}
        battle_id = client.post("/v1/arena/battles", body).json()["battle_id"]
        with requests.post(
            f"{client.base_url}/v1/arena/battles/{battle_id}/turns",
            json={"content": "Go on", "stream": True},
            headers=client.headers(API_KEY),
            stream=True,
            timeout=120,
        ) as response:
            assert response.status_code == 200, response.text
            lines = (line for line in response.iter_lines(decode_unicode=True) if line.startswith("data: "))
            assert json.loads(next(lines)[len("data: ") :])["type"] == "battle"
            vote(client, battle_id, "B")
            rest = [line[len("data: ") :] for line in lines]
        assert rest[-1] == "[DONE]"
        last = json.loads(rest[-2])
        entry = fastchat_entry(client, battle_id)
        if last.get("type") == "saved":
            assert entry["turn"] == 2  # finished first: stored, then voted on
            continue
        assert last["error"]["type"] == "conflict" and "voted" in last["error"]["message"], last
        assert entry["turn"] == 1 and entry["winner"] == "model_b"  # nothing of the turn stored
        return
    pytest.fail("every streamed turn finished before the vote sent after its first event")


def test_multiturn_export_is_training_data_for_the_next_round(client: Client, served: dict[str, Any]) -> None:
    """Three battles of two and three turns, streamed and not, seeded (so every answer is the same
    on every run whichever side its model draws), voted, exported over HTTP and prepared by the
    data pipeline: every row is read and kept as a conversational pair."""
    from dpo_cluster.data.pipeline import prepare

    ids = []
    followups = [["follow-up 0"], ["follow-up 1", "and then?"], ["follow-up 2", "why?"]]
    for i, winner in enumerate(["A", "B", "A"]):
        body = {"messages": [user(f"round trip question {i}")], "max_new_tokens": 6, "seed": 11}
        battle_id = check_turn_events(streamed(client, "/v1/arena/battles", body), 1)["battle_id"]
        for turn, content in enumerate(followups[i], start=2):
            if turn % 2:  # turn 3 streamed, turn 2 as JSON
                path = f"/v1/arena/battles/{battle_id}/turns"
                check_turn_events(streamed(client, path, {"content": content}), turn)
            else:
                response = client.post(f"/v1/arena/battles/{battle_id}/turns", {"content": content})
                assert response.status_code == 200 and response.json()["turn"] == turn, response.text
        vote(client, battle_id, winner)
        ids.append(battle_id)

    ours = [json.loads(line) for line in client.get("/v1/arena/export").text.splitlines()]
    ours = [row for row in ours if row["battle_id"] in ids]
    assert [row["battle_id"] for row in ours] == ids  # in vote order
    for row, asked in zip(ours, followups):
        roles = [m["role"] for m in row["chosen"]]
        assert roles == ["assistant", "user"] * len(asked) + ["assistant"]
        assert [m["content"] for m in row["chosen"] if m["role"] == "user"] == asked
        assert [m["role"] for m in row["rejected"]] == roles
        # The pair carries a preference: the conversations differ and the chosen one says something.
        assert row["chosen"] != row["rejected"]
        assert any(m["content"].strip() for m in row["chosen"] if m["role"] == "assistant")

    train_file = Path(served["root"]) / "next_round.jsonl"
    train_file.write_text("".join(json.dumps(row) + "\n" for row in ours))
    config = load_config(
        None,
        [
            f"output_dir={Path(served['root']) / 'next_round'}",
            "model.name_or_path=builtin:tiny",
            f"data.train={train_file}",
            "data.max_length=512",
        ],
    )
    prepared = prepare(config)
    report = prepared.report["splits"]["train"]
    assert (report["rows_in"], report["rows_kept"], sum(report["dropped"].values())) == (3, 3, 0), report
