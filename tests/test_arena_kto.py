"""The arena's KTO export (`GET /v1/arena/export?format=kto`): a decisive vote is a desirable and an
undesirable row, both_bad two undesirable rows, a tie none; the rows are what the data pipeline
reads as unpaired data. The route is checked on its own router in a plain FastAPI app."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpo_cluster.data.formats import FormatSpec, detect_format, normalize_row
from dpo_cluster.serving.arena_store import ArenaStore
from tests.test_arena_store import CHAT, _battle, _vote_for


def _without_time(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "voted_at"}


def test_export_kto(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite")
    text = _battle(store, seed=0, prompt="2+2=", tuned="4", base="5")
    chat = _battle(store, seed=1, prompt=None, messages=CHAT, tuned="7", base="4")
    tie = _battle(store, seed=2)
    both_bad = _battle(store, seed=3, tuned="no", base="")
    silent_winner = _battle(store, seed=4, tuned=" ", base="6")
    _battle(store)  # never voted
    _vote_for(store, text, "tuned")
    _vote_for(store, tie, "tie")
    _vote_for(store, chat, "base")
    _vote_for(store, both_bad, "both_bad")
    _vote_for(store, silent_winner, "tuned")

    rows = list(store.export_kto())
    assert [(r["battle_id"], r["model"], r["label"]) for r in rows] == [
        *sorted([(text.id, "tuned", True), (text.id, "base", False)], key=lambda r: text.models["A"] != r[1]),
        *sorted([(chat.id, "base", True), (chat.id, "tuned", False)], key=lambda r: chat.models["A"] != r[1]),
        *sorted([(both_bad.id, "tuned", False), (both_bad.id, "base", False)], key=lambda r: both_bad.models["A"] != r[1]),
        (silent_winner.id, "base", False),  # the silent winner gives no desirable row
    ]  # fmt: skip
    by_key = {(r["battle_id"], r["model"]): r for r in rows}
    assert _without_time(by_key[text.id, "tuned"]) == {
        "prompt": "2+2=",
        "completion": "4",
        "label": True,
        "battle_id": text.id,
        "model": "tuned",
    }
    assert by_key[chat.id, "tuned"]["prompt"] == CHAT
    assert by_key[chat.id, "tuned"]["completion"] == [{"role": "assistant", "content": "7"}]
    assert by_key[both_bad.id, "base"]["completion"] == ""

    # The rows are unpaired data to the pipeline, once written out as JSON lines.
    spec = FormatSpec()
    for key, fmt in (((text.id, "base"), "unpaired"), ((chat.id, "base"), "unpaired_conversational")):
        row = json.loads(json.dumps(by_key[key]))
        assert detect_format([row], spec, "arena") == fmt
        pair = normalize_row(row, fmt, spec)
        assert (pair.prompt, pair.chosen, pair.label) == (row["prompt"], row["completion"], row["label"])


def test_export_route_takes_kto(tmp_path: Path) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from dpo_cluster.serving.arena_routes import build_arena_router

    store = ArenaStore(tmp_path / "arena.sqlite")
    battle = _battle(store, seed=0, prompt="2+2=", tuned="4", base="5")
    _vote_for(store, battle, "tuned")
    app = FastAPI()
    app.include_router(build_arena_router(None, store, max_body_bytes=1 << 16))  # type: ignore[arg-type]
    response = TestClient(app).get("/v1/arena/export", params={"format": "kto"})
    assert response.status_code == 200
    assert 'filename="arena-kto.jsonl"' in response.headers["content-disposition"]
    rows = [json.loads(line) for line in response.text.splitlines()]
    assert sorted((r["model"], r["label"]) for r in rows) == [("base", False), ("tuned", True)]
