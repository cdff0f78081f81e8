"""Tests of the arena's store (`dpo_cluster.serving.arena_store`), leaderboard and export rows on
real SQLite files, with real child processes for durability and concurrency: battles, their
follow-up turns, the in-place upgrade of a file written by the first schema, and multi-turn
export rows read and tokenized by the data pipeline.

Seeded assignments used below (models sorted: "base" < "tuned"; a draw < 0.5 makes "base" A):
random.Random(0).random() = 0.844 -> A = tuned, B = base;
random.Random(1).random() = 0.134 -> A = base, B = tuned.
"""

from __future__ import annotations

import json
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dpo_cluster import stats
from dpo_cluster.config.specs import TokenizeSpec
from dpo_cluster.data.formats import FormatSpec, detect_format, normalize_row
from dpo_cluster.data.records import TokenizedPair
from dpo_cluster.data.tokenize import PairTokenizer
from dpo_cluster.serving.arena_leaderboard import RATING_METHOD, RATING_METHOD_MULTI
from dpo_cluster.serving.arena_store import (
    EXPORT_PAGE,
    SCHEMA_VERSION,
    WINNERS,
    AlreadyVoted,
    ArenaStore,
    Battle,
    BattleNotFound,
    TurnRefused,
)

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
PARAMS = {"max_new_tokens": 32, "temperature": 0.7, "top_p": 1.0, "seed": None, "stop": []}
CHILD_TIMEOUT_S = 60


def _battle(
    store: ArenaStore,
    seed: int | None = None,
    *,
    prompt: str | None = "2+2=",
    messages: list[dict[str, str]] | None = None,
    tuned: str = "tuned answer",
    base: str = "base answer",
) -> Battle:
    return store.create_battle(
        prompt=prompt,
        messages=messages,
        answers_by_model={"tuned": tuned, "base": base},
        params=PARAMS,
        rng=None if seed is None else random.Random(seed),
    )


def _vote_for(store: ArenaStore, battle: Battle, outcome: str) -> Battle:
    """Vote by model name ("tuned" / "base") or verdict ("tie" / "both_bad"), whatever side it sits on."""
    if outcome in ("tie", "both_bad"):
        return store.vote(battle.id, outcome)
    letter = "A" if battle.models["A"] == outcome else "B"
    assert battle.models[letter] == outcome
    return store.vote(battle.id, letter)


def test_create_get_round_trip(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "nested" / "dir" / "arena.sqlite")
    assert store.path.exists()  # parent directories created
    created = _battle(store, seed=0, prompt=None, messages=CHAT, tuned="7", base="4 ü")
    assert len(created.id) == 32 and int(created.id, 16) >= 0  # uuid4 hex
    assert created.models == {"A": "tuned", "B": "base"}
    assert created.answers == {"A": "7", "B": "4 ü"}
    assert created.prompt is None and created.messages == CHAT
    assert created.winner is None and created.voted_at is None

    # A fresh store object on the same file sees the same battle: nothing is cached in memory.
    fetched = ArenaStore(store.path).get_battle(created.id)
    assert fetched == created
    assert fetched.params == PARAMS

    text = _battle(store, seed=1, prompt="Q: 2+2?\nA:")
    assert store.get_battle(text.id).prompt == "Q: 2+2?\nA:"
    assert store.get_battle(text.id).messages is None
    assert text.models == {"A": "base", "B": "tuned"}
    assert store.counts() == {"battles": 2, "votes": 0}


def test_create_battle_validation(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite")
    with pytest.raises(ValueError, match="exactly one of prompt"):
        _battle(store, prompt="x", messages=CHAT)
    with pytest.raises(ValueError, match="exactly one of prompt"):
        _battle(store, prompt=None, messages=None)
    with pytest.raises(ValueError, match="exactly two models"):
        store.create_battle(
            prompt="x", messages=None, answers_by_model={"a": "1", "b": "2", "c": "3"}, params={}
        )
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        multimodal: list[dict[str, Any]] = [{"role": "user", "content": ["image"]}]
        _battle(store, prompt=None, messages=multimodal)
    with pytest.raises(ValueError, match="params"):
        store.create_battle(
            prompt="x", messages=None, answers_by_model={"a": "1", "b": "2"}, params={"t": {1, 2}}
        )
    for sides in ({"A": "a", "B": "a"}, {"A": "a", "B": "c"}, {"A": "a"}, {"X": "a", "Y": "b"}):
        with pytest.raises(ValueError, match="sides"):
            store.create_battle(
                prompt="x", messages=None, answers_by_model={"a": "1", "b": "2"}, params={}, sides=sides
            )
    assert store.counts() == {"battles": 0, "votes": 0}


def test_create_battle_with_given_id_and_sides(tmp_path: Path) -> None:
    """A streamed battle fixes its id and sides before its answers exist: the store keeps both."""
    store = ArenaStore(tmp_path / "arena.sqlite")
    for sides in ({"A": "base", "B": "tuned"}, {"A": "tuned", "B": "base"}):
        battle_id = "f" * 31 + sides["A"][0]
        created = store.create_battle(
            prompt="p",
            messages=None,
            answers_by_model={"tuned": "t", "base": "b"},
            params={},
            battle_id=battle_id,
            sides=sides,
        )
        assert created.id == battle_id and created.models == sides
        fetched = store.get_battle(battle_id)
        assert fetched.models == sides
        assert fetched.answers == {side: sides[side][0] for side in "AB"}  # "t" / "b" where each sits


def test_assignment_random_and_seedable(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite")
    # Secure default source: with 40 battles, one order never showing up has probability 2^-39.
    tuned_first = [_battle(store).models["A"] == "tuned" for _ in range(40)]
    assert any(tuned_first) and not all(tuned_first)

    def seeded_orders(seed: int, answers: dict[str, str]) -> list[str]:
        rng = random.Random(seed)
        return [
            store.create_battle(
                prompt="p", messages=None, answers_by_model=answers, params={}, rng=rng
            ).models["A"]
            for _ in range(12)
        ]

    # Same seed -> same assignments, whatever order the caller's dict lists the models in.
    first = seeded_orders(7, {"tuned": "t", "base": "b"})
    assert first == seeded_orders(7, {"base": "b", "tuned": "t"})
    draws = random.Random(7)
    assert first == ["base" if draws.random() < 0.5 else "tuned" for _ in range(12)]
    assert set(first) == {"base", "tuned"}


def test_vote_once(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite")
    battle = _battle(store, seed=0)
    voted = store.vote(battle.id, "B")
    assert voted.winner == "B" and voted.voted_at is not None
    assert voted.models == battle.models and voted.answers == battle.answers

    with pytest.raises(AlreadyVoted, match=f"{battle.id}.*'B'") as excinfo:
        store.vote(battle.id, "A")
    assert excinfo.value.winner == "B"
    # Errors cross process boundaries (Ray pickles them) intact.
    copy = pickle.loads(pickle.dumps(excinfo.value))
    assert (copy.battle_id, copy.winner, str(copy)) == (battle.id, "B", str(excinfo.value))
    after = store.get_battle(battle.id)
    assert after.winner == "B" and after.voted_at == voted.voted_at
    assert store.counts() == {"battles": 1, "votes": 1}


def test_vote_errors(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite")
    battle = _battle(store)
    with pytest.raises(BattleNotFound, match="nope") as excinfo:
        store.vote("nope", "A")
    assert isinstance(excinfo.value, KeyError)
    assert str(pickle.loads(pickle.dumps(excinfo.value))) == "no arena battle with id 'nope'"
    with pytest.raises(BattleNotFound, match="missing"):
        store.get_battle("missing")
    with pytest.raises(ValueError, match="winner"):
        store.vote(battle.id, "C")
    with pytest.raises(ValueError, match="winner"):
        store.vote(battle.id, "a")
    # The failed votes left nothing behind: the battle can still be voted on.
    assert store.vote(battle.id, "tie").winner == "tie"


def test_wal_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "arena.sqlite"
    ArenaStore(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        conn.execute("PRAGMA user_version = 99")
    finally:
        conn.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        ArenaStore(path)


def _run_child(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
    )


_VOTE_THEN_DIE = """
import os, signal, sys
from dpo_cluster.serving.arena_store import ArenaStore
ArenaStore(sys.argv[1]).vote(sys.argv[2], sys.argv[3])
os.kill(os.getpid(), signal.SIGKILL)  # no clean shutdown of any kind after vote() returns
"""


def test_vote_survives_sigkill(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite")
    battle = _battle(store)
    child = _run_child(_VOTE_THEN_DIE, str(store.path), battle.id, "both_bad")
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert store.get_battle(battle.id).winner == "both_bad"
    assert store.counts() == {"battles": 1, "votes": 1}


# Each child reports "ready" once imported, waits for "go" on stdin so that all of them start
# together, then acts and reports its result on stdout.
_RACE_VOTE = """
import sys
from dpo_cluster.serving.arena_store import AlreadyVoted, ArenaStore
store = ArenaStore(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
try:
    print("won", store.vote(sys.argv[2], sys.argv[3]).winner, flush=True)
except AlreadyVoted as exc:
    print("lost", exc.winner, flush=True)
"""

_RACE_CREATE = """
import sys
print("ready", flush=True)
sys.stdin.readline()
from dpo_cluster.serving.arena_store import ArenaStore
store = ArenaStore(sys.argv[1])
print(store.create_battle(prompt="p", messages=None, answers_by_model={"x": "1", "y": "2"}, params={}).id)
"""


def _race(script: str, argv_per_child: list[list[str]]) -> list[str]:
    """Start one child per argv, release them together, return each child's last output line."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argv_per_child
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            out, err = child.communicate(timeout=CHILD_TIMEOUT_S)
            assert child.returncode == 0, err
            results.append(out.strip().splitlines()[-1])
        return results
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def test_racing_votes_exactly_one_wins(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite")
    battle = _battle(store)
    results = _race(_RACE_VOTE, [[str(store.path), battle.id, WINNERS[i % 4]] for i in range(8)])
    won = [r for r in results if r.startswith("won ")]
    assert len(won) == 1, results
    winner = won[0].split()[1]
    # Every loser was told the one recorded winner.
    assert sorted(results) == sorted([f"won {winner}"] + [f"lost {winner}"] * 7)
    assert store.get_battle(battle.id).winner == winner
    assert store.counts() == {"battles": 1, "votes": 1}


def test_replicas_initialise_fresh_file_together(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "arena.sqlite"
    ids = _race(_RACE_CREATE, [[str(path)] for _ in range(8)])
    store = ArenaStore(path)
    assert store.counts() == {"battles": 8, "votes": 0}
    assert {store.get_battle(battle_id).id for battle_id in ids} == set(ids)


def test_leaderboard_planted_votes(tmp_path: Path) -> None:
    """12 battles, 10 votes: tuned 6, base 2, tie 1, both_bad 1.

    tuned_win_rate: Wilson on 6 of 8 decisive votes -> (0.409275, 0.928521) (see test_stats).
    ties half: (6 + 0.5 * (1 + 1)) / 10 = 7 / 10 = 0.7.
    Bradley-Terry on 6 wins, 2 losses, 2 ties (both_bad counted as a tie): p = 7.5 / 11,
    diff = 132.397, diff interval (-75.398, 340.192) (see test_stats), so
    tuned 1066.199 in [1000 - 37.699, 1000 + 170.096] = [962.301, 1170.096],
    base 933.801 in [1000 - 170.096, 1000 + 37.699] = [829.904, 1037.699].
    """
    store = ArenaStore(tmp_path / "arena.sqlite")
    sequence = ["tuned", "tuned", "base", "tie", "tuned", "both_bad", "tuned", "base", "tuned", "tuned"]
    battles = [_battle(store, seed=i) for i in range(12)]
    # Voted newest first, so vote order and creation order disagree; the last two stay unvoted.
    for battle, outcome in zip(reversed(battles[2:]), sequence):
        _vote_for(store, battle, outcome)

    board = store.leaderboard()
    assert board["battles"] == 12 and board["votes"] == 10
    assert board["subject"] == "tuned" and board["opponent"] == "base"
    assert board["counts"] == {"tuned": 6, "base": 2, "tie": 1, "both_bad": 1}
    rate = board["tuned_win_rate"]
    assert (rate["successes"], rate["n"], rate["rate"], rate["method"]) == (6, 8, 0.75, "wilson")
    assert rate["ci_low"] == pytest.approx(0.409275, abs=1e-5)
    assert rate["ci_high"] == pytest.approx(0.928521, abs=1e-5)
    assert board["tuned_win_rate_ties_half"] == pytest.approx(0.7, abs=1e-12)

    tuned, base = board["ratings"]
    assert tuned["model"] == "tuned" and base["model"] == "base"
    assert (tuned["wins"], tuned["losses"], tuned["ties"]) == (6, 2, 2)
    assert (base["wins"], base["losses"], base["ties"]) == (2, 6, 2)
    assert tuned["rating"] == pytest.approx(1066.199, abs=1e-3)
    assert (tuned["ci_low"], tuned["ci_high"]) == pytest.approx((962.301, 1170.096), abs=1e-3)
    assert base["rating"] == pytest.approx(933.801, abs=1e-3)
    assert (base["ci_low"], base["ci_high"]) == pytest.approx((829.904, 1037.699), abs=1e-3)
    assert board["rating_method"] == RATING_METHOD

    # Online Elo is order dependent: it must follow the votes in the order they were cast. The
    # update is symmetric in the A/B sides, so writing every game as (tuned, base) is equivalent.
    score = {"tuned": 1.0, "base": 0.0, "tie": 0.5, "both_bad": 0.5}
    expected = stats.online_elo([("tuned", "base", score[o]) for o in sequence], k=4)
    assert board["online_elo"] == pytest.approx(expected, abs=1e-9)
    assert list(board["online_elo"]) == ["tuned", "base"]
    json.dumps(board, allow_nan=False)  # JSON-able as served


def test_leaderboard_online_elo_by_hand(tmp_path: Path) -> None:
    """Tuned wins, then base wins: tuned 1000 -> 1002 -> 999.976975, base 1000 -> 998 ->
    1000.023025 (the worked example of test_stats.test_online_elo_two_games). Bradley-Terry:
    1 win each, p = (1 + 0.5) / 3 = 1/2, so both rate 1000."""
    store = ArenaStore(tmp_path / "arena.sqlite")
    _vote_for(store, _battle(store, seed=1), "tuned")
    _vote_for(store, _battle(store, seed=0), "base")
    board = store.leaderboard()
    assert board["online_elo"]["tuned"] == pytest.approx(999.976975, abs=1e-6)
    assert board["online_elo"]["base"] == pytest.approx(1000.023025, abs=1e-6)
    assert [r["rating"] for r in board["ratings"]] == pytest.approx([1000.0, 1000.0], abs=1e-9)


def test_leaderboard_without_votes(tmp_path: Path) -> None:
    """No votes: rates are None, ratings 1000 with the prior-only interval 1000 +- 495.299 / 2 =
    1000 +- 247.650 (see test_stats.test_bradley_terry_no_games), online Elo 1000."""
    store = ArenaStore(tmp_path / "arena.sqlite")
    empty = store.leaderboard()
    assert (empty["battles"], empty["votes"], empty["subject"]) == (0, 0, "tuned")
    _battle(store)
    board = store.leaderboard()
    assert board["battles"] == 1 and board["votes"] == 0
    assert board["counts"] == {"tuned": 0, "base": 0, "tie": 0, "both_bad": 0}
    assert board["tuned_win_rate"]["rate"] is None
    assert (board["tuned_win_rate"]["ci_low"], board["tuned_win_rate"]["ci_high"]) == (0.0, 1.0)
    assert board["tuned_win_rate_ties_half"] is None
    assert [r["model"] for r in board["ratings"]] == ["tuned", "base"]
    for entry in board["ratings"]:
        assert entry["rating"] == 1000.0
        assert (entry["ci_low"], entry["ci_high"]) == pytest.approx((752.350, 1247.650), abs=1e-3)
    assert board["online_elo"] == {"tuned": 1000.0, "base": 1000.0}
    assert {k: v for k, v in board.items() if k != "battles"} == {
        k: v for k, v in empty.items() if k != "battles"
    }


def test_leaderboard_other_model_names(tmp_path: Path) -> None:
    """Names other than base/tuned: the alphabetically first model is the subject. "llama" wins
    its only vote: Wilson 1 of 1 -> low = 1 / (1 + z^2) = 1 / 4.841459 = 0.206549."""
    store = ArenaStore(tmp_path / "arena.sqlite")
    answers = {"llama-dpo": "x", "llama": "y"}
    battle = store.create_battle(prompt="p", messages=None, answers_by_model=answers, params={})
    _vote_for(store, battle, "llama")
    board = store.leaderboard()
    assert (board["subject"], board["opponent"]) == ("llama", "llama-dpo")
    assert board["counts"] == {"llama": 1, "llama-dpo": 0, "tie": 0, "both_bad": 0}
    assert board["llama_win_rate"]["ci_low"] == pytest.approx(0.206549, abs=1e-6)
    assert board["llama_win_rate_ties_half"] == 1.0

    # A third model: no subject/opponent pair (neither "tuned" nor "base"), every model rated.
    store.create_battle(prompt="p", messages=None, answers_by_model={"llama": "x", "other": "y"}, params={})
    board = store.leaderboard()
    assert board["models"] == ["llama", "llama-dpo", "other"]
    assert (board["subject"], board["opponent"]) == (None, None)
    assert "llama_win_rate" not in board and board["vs_base"] == {}
    # Two models have votes, so their fit is the two-model one; "other" (no vote) sits at 1000.
    assert [r["model"] for r in board["ratings"]] == ["llama", "other", "llama-dpo"]
    assert board["ratings"][0]["rating"] == pytest.approx(stats.bradley_terry_two(1, 0, 0)[0], abs=1e-6)
    assert board["ratings"][1] == {
        "model": "other",
        "rating": 1000.0,
        "ci_low": None,
        "ci_high": None,
        "wins": 0,
        "losses": 0,
        "ties": 0,
        "battles": 0,
    }
    json.dumps(board, allow_nan=False)


def test_leaderboard_three_models(tmp_path: Path) -> None:
    """Battles among tuned, sft and base (sides drawn from seeded rngs), and one unvoted battle of
    a fourth model, idle. Votes, interleaved:
        tuned vs base: tuned, tuned, base, tie, tuned   -> tuned 3, base 1, tie 1 (5 votes)
        sft vs base:   sft, base, both_bad, sft          -> sft 2, base 1, both_bad 1 (4 votes)
        tuned vs sft:  tuned, sft, tuned                 -> tuned 2, sft 1 (3 votes)
    counts: tuned 5, sft 3, base 2, tie 1, both_bad 1.
    records (wins, losses, ties, battles): tuned (5, 2, 1, 8), sft (3, 3, 1, 7), base (2, 5, 2, 9),
    idle (0, 0, 0, 0).
    tuned_win_rate is head to head with base: Wilson on 3 of 4; ties half (3 + 0.5) / 5 = 0.7.
    vs_base: tuned 3 of 4 (0.7), sft 2 of 3, ties half (2 + 0.5) / 4 = 0.625, idle no votes.
    Ratings are `stats.bradley_terry` of the same games; idle, never voted on, rates 1000 with no
    interval."""
    store = ArenaStore(tmp_path / "arena.sqlite")
    plan = [
        ("tuned", "base", "tuned"),
        ("sft", "base", "sft"),
        ("tuned", "sft", "tuned"),
        ("tuned", "base", "tuned"),
        ("sft", "base", "base"),
        ("tuned", "base", "base"),
        ("tuned", "sft", "sft"),
        ("sft", "base", "both_bad"),
        ("tuned", "base", "tie"),
        ("tuned", "sft", "tuned"),
        ("sft", "base", "sft"),
        ("tuned", "base", "tuned"),
    ]
    for seed, (x, y, outcome) in enumerate(plan):
        battle = store.create_battle(
            prompt=f"q{seed}",
            messages=None,
            answers_by_model={x: f"{x} {seed}", y: f"{y} {seed}"},
            params={},
            rng=random.Random(seed),
        )
        _vote_for(store, battle, outcome)
    store.create_battle(prompt="q", messages=None, answers_by_model={"idle": "i", "base": "b"}, params={})

    board = store.leaderboard()
    assert (board["battles"], board["votes"]) == (13, 12)
    assert board["models"] == ["idle", "sft", "tuned", "base"]
    assert (board["subject"], board["opponent"]) == ("tuned", "base")
    assert board["counts"] == {"idle": 0, "sft": 3, "tuned": 5, "base": 2, "tie": 1, "both_bad": 1}
    assert board["tuned_win_rate"] == stats.rate_with_ci(3, 4)
    assert board["tuned_win_rate_ties_half"] == pytest.approx(0.7, abs=1e-12)
    assert board["pairwise"] == [
        {"models": ["sft", "tuned"], "wins": {"sft": 1, "tuned": 2}, "tie": 0, "both_bad": 0, "votes": 3},
        {"models": ["sft", "base"], "wins": {"sft": 2, "base": 1}, "tie": 0, "both_bad": 1, "votes": 4},
        {"models": ["tuned", "base"], "wins": {"tuned": 3, "base": 1}, "tie": 1, "both_bad": 0, "votes": 5},
    ]
    assert board["vs_base"] == {
        "idle": {**stats.rate_with_ci(0, 0), "votes": 0, "win_rate_ties_half": None},
        "sft": {**stats.rate_with_ci(2, 3), "votes": 4, "win_rate_ties_half": 0.625},
        "tuned": {**stats.rate_with_ci(3, 4), "votes": 5, "win_rate_ties_half": 0.7},
    }

    score = {"tie": 0.5, "both_bad": 0.5}
    outcomes = [(x, y, score.get(o, 1.0 if o == x else 0.0)) for x, y, o in plan]
    expected = stats.bradley_terry(outcomes, models=["idle", "sft", "tuned", "base"])
    records = {"tuned": (5, 2, 1, 8), "sft": (3, 3, 1, 7), "base": (2, 5, 2, 9), "idle": (0, 0, 0, 0)}
    assert [r["model"] for r in board["ratings"]] == [r["model"] for r in expected]
    assert board["ratings"][0]["model"] == "tuned" and board["ratings"][-1]["model"] == "base"
    for row, fit in zip(board["ratings"], expected):
        assert (row["rating"], row["ci_low"], row["ci_high"]) == (
            fit["rating"],
            fit["ci_low"],
            fit["ci_high"],
        )
        assert (row["wins"], row["losses"], row["ties"], row["battles"]) == records[row["model"]]
    idle = next(r for r in board["ratings"] if r["model"] == "idle")
    assert (idle["rating"], idle["ci_low"], idle["ci_high"]) == (1000.0, None, None)
    fitted = [r["rating"] for r in board["ratings"] if r["model"] != "idle"]
    assert sum(fitted) / 3 == pytest.approx(1000.0, abs=1e-9)  # the mean anchor
    assert board["rating_method"] == RATING_METHOD_MULTI

    # Online Elo follows the votes in order, for every model (idle never moves).
    assert board["online_elo"] == pytest.approx({"idle": 1000.0, **stats.online_elo(outcomes, k=4)}, abs=1e-9)
    assert list(board["online_elo"]) == ["idle", "sft", "tuned", "base"]
    json.dumps(board, allow_nan=False)


def test_export_dpo(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite")
    chat = _battle(store, seed=1, prompt=None, messages=CHAT, tuned="7", base="4")  # A base, B tuned
    text = _battle(store, seed=0, prompt="2+2=", tuned="5", base="4")  # A tuned, B base
    tie = _battle(store, seed=2)
    both_bad = _battle(store, seed=3)
    _battle(store)  # never voted
    # Vote order differs from creation order: exports follow the votes.
    store.vote(text.id, "B")  # base preferred
    store.vote(tie.id, "tie")
    store.vote(chat.id, "B")  # tuned preferred, tuned sat on side B
    store.vote(both_bad.id, "both_bad")

    rows = list(store.export_dpo())
    assert [r["battle_id"] for r in rows] == [text.id, chat.id]
    text_row, chat_row = rows
    assert {k: v for k, v in text_row.items() if k != "voted_at"} == {
        "prompt": "2+2=",
        "chosen": "4",
        "rejected": "5",
        "battle_id": text.id,
        "chosen_model": "base",
        "rejected_model": "tuned",
    }
    assert {k: v for k, v in chat_row.items() if k != "voted_at"} == {
        "prompt": CHAT,
        "chosen": [{"role": "assistant", "content": "7"}],
        "rejected": [{"role": "assistant", "content": "4"}],
        "battle_id": chat.id,
        "chosen_model": "tuned",
        "rejected_model": "base",
    }
    assert chat_row["voted_at"] == store.get_battle(chat.id).voted_at

    # The rows are what the data pipeline reads, once written out as JSON lines.
    spec = FormatSpec()
    for row, fmt in ((text_row, "standard"), (chat_row, "conversational")):
        parsed = json.loads(json.dumps(row))
        assert detect_format([parsed], spec, "arena") == fmt
        pair = normalize_row(parsed, fmt, spec)
        assert (pair.prompt, pair.chosen, pair.rejected) == (row["prompt"], row["chosen"], row["rejected"])


def test_export_dpo_skips_a_vote_for_a_side_that_said_nothing(tmp_path: Path) -> None:
    """A vote for an empty answer stays a vote (leaderboard, fastchat log) but is not a training
    pair: the pipeline would drop it as empty_chosen and count it against data.max_bad_fraction.
    An empty loser is kept (recipes with empty rejected answers train on exactly that)."""
    store = ArenaStore(tmp_path / "arena.sqlite")
    silent = _battle(store, seed=0, tuned="  \n", base="4")
    silent_chat = _battle(store, seed=1, prompt=None, messages=CHAT, tuned="", base="4")
    empty_loser = _battle(store, seed=2, tuned="4", base="")
    for battle in (silent, silent_chat):
        _vote_for(store, battle, "tuned")
    _vote_for(store, empty_loser, "tuned")

    assert [r["battle_id"] for r in store.export_dpo()] == [empty_loser.id]
    assert [r["question_id"] for r in store.export_fastchat()] == [silent.id, silent_chat.id, empty_loser.id]
    assert store.leaderboard()["counts"]["tuned"] == 3


def test_exports_across_pages(tmp_path: Path) -> None:
    """Exports read EXPORT_PAGE votes per connection. EXPORT_PAGE + 1 votes, one of them a tie in
    the middle: export_dpo has exactly EXPORT_PAGE rows (a full page, then an empty one must end
    it), export_fastchat EXPORT_PAGE + 1 (a full page and one more); no row lost or repeated."""
    store = ArenaStore(tmp_path / "arena.sqlite")
    battles = [_battle(store, seed=i) for i in range(EXPORT_PAGE + 1)]
    tie_at = EXPORT_PAGE // 2
    for i, battle in enumerate(battles):
        store.vote(battle.id, "tie" if i == tie_at else "AB"[i % 2])
    dpo_ids = [r["battle_id"] for r in store.export_dpo()]
    assert dpo_ids == [b.id for i, b in enumerate(battles) if i != tie_at]
    assert len(dpo_ids) == EXPORT_PAGE
    assert [r["question_id"] for r in store.export_fastchat()] == [b.id for b in battles]


def test_export_fastchat(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite")
    battles = [_battle(store, seed=0, prompt="hi", tuned=f"t{i}", base=f"b{i}") for i in range(4)]
    for battle, winner in zip(battles, WINNERS):
        store.vote(battle.id, winner)
    chat = _battle(store, seed=1, prompt=None, messages=CHAT, tuned="7", base="4")
    store.vote(chat.id, "A")

    rows = list(store.export_fastchat())
    assert [r["winner"] for r in rows] == ["model_a", "model_b", "tie", "tie (bothbad)", "model_a"]
    first = rows[0]
    assert first == {
        "question_id": battles[0].id,
        "model_a": "tuned",
        "model_b": "base",
        "winner": "model_a",
        "judge": "arena",
        "turn": 1,
        "anony": True,
        "tstamp": store.get_battle(battles[0].id).voted_at,
        "conversation_a": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "t0"}],
        "conversation_b": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b0"}],
    }
    last = rows[-1]
    assert (last["model_a"], last["model_b"], last["turn"]) == ("base", "tuned", 1)
    assert last["conversation_a"] == [*CHAT, {"role": "assistant", "content": "4"}]
    assert last["conversation_b"] == [*CHAT, {"role": "assistant", "content": "7"}]


# ---------------------------------------------------------------------------------------------
# Follow-up turns

FOLLOW_UP = "And another one?"
THIRD = "Which of them is the smallest?"


def _chat_with_turns(store: ArenaStore, seed: int = 1) -> Battle:
    """A chat battle (seed 1: A base, B tuned) with two follow-ups: three turns in all."""
    battle = _battle(store, seed=seed, prompt=None, messages=CHAT, tuned="7", base="4")
    store.add_turn(battle.id, 2, FOLLOW_UP, {"A": "base 2", "B": "tuned 2"})
    return store.add_turn(battle.id, 3, THIRD, {"A": "base 3", "B": "tuned 3"})


def test_turns_round_trip(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite")
    battle = _battle(store, seed=1, prompt=None, messages=CHAT, tuned="7", base="4")
    assert battle.turn_count == 1 and battle.followups == ()
    second = store.add_turn(battle.id, 2, FOLLOW_UP, {"A": "base 2", "B": "tuned 2"})
    assert second.turn_count == 2
    assert (second.followups[0].content, second.followups[0].answers) == (
        FOLLOW_UP,
        {"A": "base 2", "B": "tuned 2"},
    )
    third = store.add_turn(battle.id, 3, THIRD, {"A": "base 3", "B": "tuned 3"})
    # A fresh store object reads the same turns back from the file, in order.
    fetched = ArenaStore(store.path).get_battle(battle.id)
    assert fetched == third and fetched.turn_count == 3
    # Each side continues its own conversation: the shared user messages, its own answers.
    assert fetched.conversation("A") == [
        *CHAT,
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": FOLLOW_UP},
        {"role": "assistant", "content": "base 2"},
        {"role": "user", "content": THIRD},
        {"role": "assistant", "content": "base 3"},
    ]
    assert [m["content"] for m in fetched.continuation("B")] == ["7", FOLLOW_UP, "tuned 2", THIRD, "tuned 3"]
    # Turns are not battles: the counts and the vote are unchanged by them.
    assert store.counts() == {"battles": 1, "votes": 0}
    assert store.vote(battle.id, "B").followups == fetched.followups


def test_add_turn_refusals_leave_nothing_behind(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite")
    chat = _battle(store, prompt=None, messages=CHAT)
    text = _battle(store, prompt="2+2=")
    answers = {"A": "a", "B": "b"}
    with pytest.raises(BattleNotFound):
        store.add_turn("nope", 2, FOLLOW_UP, answers)
    with pytest.raises(TurnRefused, match="text prompt") as excinfo:
        store.add_turn(text.id, 2, FOLLOW_UP, answers)
    copy = pickle.loads(pickle.dumps(excinfo.value))  # Ray ships errors by pickling them
    assert (copy.battle_id, copy.reason, str(copy)) == (text.id, excinfo.value.reason, str(excinfo.value))
    for turn in (1, 3, 7):  # only the next turn (2) is accepted
        with pytest.raises(TurnRefused, match=f"turn {turn} was asked for, the next turn is 2"):
            store.add_turn(chat.id, turn, FOLLOW_UP, answers)
    for content in ("", "  \n"):
        with pytest.raises(ValueError, match="content"):
            store.add_turn(chat.id, 2, content, answers)
    for bad in ({"A": "a"}, {"A": "a", "B": 3}, {"a": "x", "b": "y"}):
        with pytest.raises(ValueError, match="answers"):
            store.add_turn(chat.id, 2, FOLLOW_UP, bad)
    assert store.get_battle(chat.id).followups == ()

    store.add_turn(chat.id, 2, FOLLOW_UP, answers)
    # The same turn again is stale: its answers were generated before turn 2 existed.
    with pytest.raises(TurnRefused, match="turn 2 was asked for, the next turn is 3"):
        store.add_turn(chat.id, 2, "other", {"A": "x", "B": "y"})
    store.vote(chat.id, "tie")
    with pytest.raises(AlreadyVoted, match="'tie'"):
        store.add_turn(chat.id, 3, THIRD, answers)
    assert [t.content for t in store.get_battle(chat.id).followups] == [FOLLOW_UP]


_TURN_THEN_DIE = """
import os, signal, sys
from dpo_cluster.serving.arena_store import ArenaStore
ArenaStore(sys.argv[1]).add_turn(sys.argv[2], 2, "follow-up", {"A": "a2", "B": "b2"})
os.kill(os.getpid(), signal.SIGKILL)  # no clean shutdown of any kind after add_turn() returns
"""


def test_turn_survives_sigkill(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite")
    battle = _battle(store, prompt=None, messages=CHAT)
    child = _run_child(_TURN_THEN_DIE, str(store.path), battle.id)
    assert child.returncode == -signal.SIGKILL, child.stderr
    (turn,) = store.get_battle(battle.id).followups
    assert (turn.content, turn.answers) == ("follow-up", {"A": "a2", "B": "b2"})


_RACE_TURN = """
import sys
from dpo_cluster.serving.arena_store import ArenaStore, TurnRefused
store = ArenaStore(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
try:
    store.add_turn(sys.argv[2], 2, "from " + sys.argv[3], {"A": sys.argv[3], "B": sys.argv[3]})
    print("won", sys.argv[3], flush=True)
except TurnRefused:
    print("lost", sys.argv[3], flush=True)
"""


def test_racing_turns_exactly_one_wins(tmp_path: Path) -> None:
    """Eight processes record turn 2 of one battle at once: one is stored, seven are refused."""
    store = ArenaStore(tmp_path / "arena.sqlite")
    battle = _battle(store, prompt=None, messages=CHAT)
    results = _race(_RACE_TURN, [[str(store.path), battle.id, f"child{i}"] for i in range(8)])
    won = [r.split()[1] for r in results if r.startswith("won ")]
    assert len(won) == 1 and sum(r.startswith("lost ") for r in results) == 7, results
    (turn,) = store.get_battle(battle.id).followups
    assert turn.content == f"from {won[0]}" and turn.answers == {"A": won[0], "B": won[0]}


def test_multiturn_exports(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite")
    battle = _chat_with_turns(store)  # A base, B tuned
    single = _battle(store, seed=0, prompt=None, messages=CHAT, tuned="t", base="b")
    store.vote(battle.id, "B")
    store.vote(single.id, "A")

    multi_row, single_row = store.export_dpo()
    # TRL's conversational format: the prompt is what came before the first answer, chosen and
    # rejected the winner's and the loser's whole continuations.
    assert multi_row["prompt"] == CHAT
    assert multi_row["chosen"] == [
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": FOLLOW_UP},
        {"role": "assistant", "content": "tuned 2"},
        {"role": "user", "content": THIRD},
        {"role": "assistant", "content": "tuned 3"},
    ]
    assert [m["content"] for m in multi_row["rejected"]] == ["4", FOLLOW_UP, "base 2", THIRD, "base 3"]
    assert (multi_row["chosen_model"], multi_row["rejected_model"]) == ("tuned", "base")
    assert single_row["chosen"] == [{"role": "assistant", "content": "t"}]  # one turn: unchanged

    fastchat = next(store.export_fastchat())
    assert fastchat["turn"] == 3
    assert fastchat["conversation_a"] == store.get_battle(battle.id).conversation("A")
    assert [m["content"] for m in fastchat["conversation_b"]][2:] == [
        "7",
        FOLLOW_UP,
        "tuned 2",
        THIRD,
        "tuned 3",
    ]
    assert fastchat["conversation_a"][:2] == CHAT  # the system message is not a turn


def test_multiturn_dpo_row_goes_through_the_data_pipeline(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    """The exported row, written and read back as JSON, is detected as conversational, normalised
    unchanged, and tokenized the way TRL does: prompt = chat template of the prompt messages with
    the generation prompt, chosen = the rest of the template of prompt + the whole continuation."""
    from transformers import AutoTokenizer

    store = ArenaStore(tmp_path / "arena.sqlite")
    battle = _chat_with_turns(store)
    store.vote(battle.id, "A")  # base (side A) chosen
    (row,) = (json.loads(json.dumps(r)) for r in store.export_dpo())

    spec = FormatSpec()
    assert detect_format([row], spec, "arena") == "conversational"
    pair = normalize_row(row, "conversational", spec)
    assert pair.conversational and pair.prompt == CHAT
    assert pair.chosen == battle.continuation("A") and pair.rejected == battle.continuation("B")

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    (tokenized,) = PairTokenizer(tokenizer, TokenizeSpec(max_length=4096)).tokenize([pair])
    assert isinstance(tokenized, TokenizedPair), tokenized

    def ids(messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert tokenized.prompt_ids == ids(CHAT, True)
    assert tokenized.prompt_ids + tokenized.chosen_ids == ids(battle.conversation("A"), False)
    assert tokenized.prompt_ids + tokenized.rejected_ids == ids(battle.conversation("B"), False)
    # The follow-ups and the last answers are in what the policy is trained on.
    chosen_text = tokenizer.decode(tokenized.chosen_ids)
    assert (
        FOLLOW_UP in chosen_text
        and THIRD in chosen_text
        and chosen_text.rstrip().endswith("base 3<|im_end|>")
    )


# ---------------------------------------------------------------------------------------------
# Upgrading a file written by the first schema

# The first schema exactly as it shipped (PRAGMA user_version 1), written here by hand so that the
# test keeps meaning "a file from the old code" whatever the store's own migrations become.
_SCHEMA_V1 = """
CREATE TABLE battles (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    prompt TEXT,
    messages TEXT,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    params TEXT NOT NULL,
    CHECK ((prompt IS NULL) <> (messages IS NULL)),
    CHECK (model_a <> model_b)
);
CREATE TABLE votes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    battle_id TEXT NOT NULL UNIQUE REFERENCES battles(id),
    winner TEXT NOT NULL CHECK (winner IN ('A', 'B', 'tie', 'both_bad')),
    voted_at REAL NOT NULL
);
PRAGMA user_version = 1;
"""

V1_CHAT = [{"role": "user", "content": "Name a prime."}]


def _write_v1_file(path: Path) -> None:
    """A version-1 file as the old store left it: WAL, a voted chat battle (A tuned won), a voted
    text battle (tie) and an unvoted chat battle."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA_V1)
        battles = [
            ("c" * 32, 1.0, None, json.dumps(V1_CHAT), "tuned", "base", "7", "4", json.dumps(PARAMS)),
            ("d" * 32, 2.0, "2+2=", None, "base", "tuned", "4", "5", "{}"),
            ("e" * 32, 3.0, None, json.dumps(V1_CHAT), "base", "tuned", "2", "3", "{}"),
        ]
        conn.executemany("INSERT INTO battles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", battles)
        conn.executemany(
            "INSERT INTO votes (battle_id, winner, voted_at) VALUES (?, ?, ?)",
            [("c" * 32, "A", 10.0), ("d" * 32, "tie", 11.0)],
        )
        conn.commit()
    finally:
        conn.close()


def _user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_version_1_file_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "arena.sqlite"
    _write_v1_file(path)
    assert _user_version(path) == 1
    store = ArenaStore(path)
    assert _user_version(path) == SCHEMA_VERSION
    # The old battles and votes read and export as they did.
    assert store.counts() == {"battles": 3, "votes": 2}
    old = store.get_battle("c" * 32)
    assert (old.messages, old.answers, old.models, old.winner) == (
        V1_CHAT,
        {"A": "7", "B": "4"},
        {"A": "tuned", "B": "base"},
        "A",
    )
    assert old.params == PARAMS and old.followups == ()
    (dpo,) = store.export_dpo()
    assert dpo == {
        "prompt": V1_CHAT,
        "chosen": [{"role": "assistant", "content": "7"}],
        "rejected": [{"role": "assistant", "content": "4"}],
        "battle_id": "c" * 32,
        "chosen_model": "tuned",
        "rejected_model": "base",
        "voted_at": 10.0,
    }
    fastchat = list(store.export_fastchat())
    assert [(r["question_id"], r["winner"], r["turn"]) for r in fastchat] == [
        ("c" * 32, "model_a", 1),
        ("d" * 32, "tie", 1),
    ]
    assert fastchat[1]["conversation_b"] == [
        {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": "5"},
    ]
    assert store.leaderboard()["counts"] == {"tuned": 1, "base": 0, "tie": 1, "both_bad": 0}
    # The unvoted old chat battle goes on under the new schema, and opening again changes nothing.
    store.add_turn("e" * 32, 2, FOLLOW_UP, {"A": "a2", "B": "b2"})
    again = ArenaStore(path)
    assert [t.content for t in again.get_battle("e" * 32).followups] == [FOLLOW_UP]
    assert again.counts() == {"battles": 3, "votes": 2}


def test_replicas_migrate_an_old_file_together(tmp_path: Path) -> None:
    """Eight processes open the same version-1 file at once: the upgrade runs once, under the
    write lock, and every process then writes to the new schema."""
    path = tmp_path / "arena.sqlite"
    _write_v1_file(path)
    ids = _race(_RACE_CREATE, [[str(path)] for _ in range(8)])
    store = ArenaStore(path)
    assert _user_version(path) == SCHEMA_VERSION
    assert store.counts() == {"battles": 3 + 8, "votes": 2}
    assert {store.get_battle(battle_id).id for battle_id in ids} == set(ids)
