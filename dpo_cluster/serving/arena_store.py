"""Durable store of the blind A/B arena: battles, their turns and votes in one SQLite file,
leaderboard, exports.

The file is shared by every web replica on a node, so each guarantee comes from SQLite itself:
- WAL journal, so readers (leaderboard, exports) never block a writer and vice versa;
- `synchronous=FULL`, so a committed vote is on disk before `vote()` returns;
- a busy timeout, so concurrent writers from several processes queue instead of failing;
- one short-lived connection per operation, so the store is safe to share between threads and
  processes and no connection outlives a call;
- "one vote per battle" is a UNIQUE constraint checked inside a `BEGIN IMMEDIATE` transaction, so
  of two processes racing to vote on the same battle exactly one succeeds; "each turn once, in
  order, and none after the vote" is checked under the same lock, with the (battle_id, turn)
  primary key of the turns table as the backstop;
- the schema is a numbered list of migrations applied under the write lock, so a file written by
  an older version is upgraded in place the first time a newer one opens it.
WAL needs shared memory between the processes using the file: keep it on a local disk, not NFS.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from dpo_cluster.serving.arena_battles import (
    QUEUED_PREFIX,
    WINNERS,
    AlreadyVoted,
    Battle,
    BattleNotFound,
    Turn,
    TurnRefused,
    build_dpo_row,
    build_fastchat_row,
    build_kto_rows,
    check_can_continue,
    check_followup,
    check_new_battle,
    check_sides,
    draw_sides,
    new_battle_id,
)
from dpo_cluster.serving.arena_leaderboard import compute_leaderboard

# The store's methods take, return and raise these; they are importable from here too.
__all__ = ["WINNERS", "AlreadyVoted", "ArenaStore", "Battle", "BattleNotFound", "Turn", "TurnRefused"]

# How long an operation waits for another process's write lock before failing with
# "database is locked". Writes are single small rows, so waiting this long means something is wrong.
BUSY_TIMEOUT_S = 30.0
# Exports read this many votes per connection, so no read transaction stays open while the
# caller consumes rows (an open reader would keep the WAL from being checkpointed).
EXPORT_PAGE = 100

# MIGRATIONS[i] takes a file from schema version i to i + 1 (PRAGMA user_version); a fresh file
# runs them all. Append, never edit: files in the field were written by the earlier entries.
_V1 = """
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
"""
# Version 2: follow-up turns of chat battles. The first turn stays in battles (so version-1
# battles read unchanged); turn 2, 3, ... live here, one row per turn with both sides' answers.
_V2 = """
CREATE TABLE turns (
    battle_id TEXT NOT NULL REFERENCES battles(id),
    turn INTEGER NOT NULL CHECK (turn >= 2),
    content TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (battle_id, turn)
);
"""
MIGRATIONS: tuple[str, ...] = (_V1, _V2)
SCHEMA_VERSION = len(MIGRATIONS)

_BATTLE_COLUMNS = (
    "b.id, b.created_at, b.prompt, b.messages, b.model_a, b.model_b, b.answer_a, b.answer_b, b.params"
)


class ArenaStore:
    """The arena's SQLite file. Every method opens, uses and closes its own connection."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init_schema()

    # -----------------------------------------------------------------------------------------
    # Writes

    def create_battle(
        self,
        *,
        prompt: str | None,
        messages: list[dict[str, str]] | None,
        answers_by_model: dict[str, str],
        params: dict[str, Any],
        rng: random.Random | None = None,
        battle_id: str | None = None,
        sides: dict[str, str] | None = None,
    ) -> Battle:
        """Record a new battle and return it; committed before return.

        Exactly one of `prompt` / `messages` must be given, and `answers_by_model` must name exactly
        two models. Which model becomes "A" is drawn from `rng` (see `arena_battles.draw_sides`)
        unless `sides` gives it: a battle streamed to the voter has its id and sides fixed before
        its answers exist, and passes both. Raises ValueError for malformed arguments.
        """
        params_json = check_new_battle(prompt, messages, answers_by_model, params)
        if sides is None:
            sides = draw_sides(answers_by_model, rng)
        check_sides(sides, answers_by_model)
        model_a, model_b = sides["A"], sides["B"]
        clean_messages = None if messages is None else [dict(m) for m in messages]
        battle = Battle(
            id=battle_id or new_battle_id(),
            created_at=time.time(),
            prompt=prompt,
            messages=clean_messages,
            answers={"A": answers_by_model[model_a], "B": answers_by_model[model_b]},
            models={"A": model_a, "B": model_b},
            params=json.loads(params_json),
        )
        with self._transaction("IMMEDIATE") as conn:
            conn.execute(
                "INSERT INTO battles (id, created_at, prompt, messages, model_a, model_b, answer_a, "
                "answer_b, params) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    battle.id,
                    battle.created_at,
                    prompt,
                    None if clean_messages is None else json.dumps(clean_messages, ensure_ascii=False),
                    model_a,
                    model_b,
                    battle.answers["A"],
                    battle.answers["B"],
                    params_json,
                ),
            )
        return battle

    def add_turn(self, battle_id: str, turn: int, content: str, answers: dict[str, str]) -> Battle:
        """Record follow-up `turn` (2 for the first follow-up) of a chat battle: the user's message
        and each side's answer, {"A": text, "B": text}. Returns the battle with the turn; durable
        on return.

        The answers were generated from the conversation as it stood before this turn, so the turn
        is recorded only if it is still the next one: TurnRefused when another request recorded
        turn `turn` first (or the battle began with a text prompt), AlreadyVoted once the battle
        has a vote, BattleNotFound for an unknown id; the checks and the insert run under the
        write lock BEGIN IMMEDIATE takes, so a vote and a turn cannot interleave. Raises
        ValueError for malformed arguments.
        """
        check_followup(content, answers)
        created_at = time.time()
        with self._transaction("IMMEDIATE") as conn:
            battle = self._read_battle(conn, battle_id)
            check_can_continue(battle)
            if turn != battle.turn_count + 1:
                raise TurnRefused(
                    battle_id, f"turn {turn} was asked for, the next turn is {battle.turn_count + 1}"
                )
            conn.execute(
                "INSERT INTO turns (battle_id, turn, content, answer_a, answer_b, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (battle_id, turn, content, answers["A"], answers["B"], created_at),
            )
        new_turn = Turn(
            content=content, answers={"A": answers["A"], "B": answers["B"]}, created_at=created_at
        )
        return replace(battle, followups=(*battle.followups, new_turn))

    def vote(self, battle_id: str, winner: str) -> Battle:
        """Record the vote on a battle and return the battle with `winner` set; durable on return.

        Raises ValueError for a winner not in WINNERS, BattleNotFound for an unknown id, and
        AlreadyVoted (naming the recorded winner) when the battle has a vote already, including one
        cast a moment earlier by another process: the UNIQUE battle_id of the votes table decides,
        under the write lock BEGIN IMMEDIATE takes, so two racing voters cannot both succeed.
        """
        if winner not in WINNERS:
            raise ValueError(f"winner: expected one of {', '.join(WINNERS)}, got {winner!r}")
        voted_at = time.time()
        with self._transaction("IMMEDIATE") as conn:
            battle = self._read_battle(conn, battle_id)
            try:
                conn.execute(
                    "INSERT INTO votes (battle_id, winner, voted_at) VALUES (?, ?, ?)",
                    (battle_id, winner, voted_at),
                )
            except sqlite3.IntegrityError as exc:
                recorded = conn.execute(
                    "SELECT winner FROM votes WHERE battle_id = ?", (battle_id,)
                ).fetchone()
                if recorded is None:  # some other constraint failed: not a double vote
                    raise
                raise AlreadyVoted(battle_id, recorded[0]) from exc
        return replace(battle, winner=winner, voted_at=voted_at)

    # -----------------------------------------------------------------------------------------
    # Reads

    def get_battle(self, battle_id: str) -> Battle:
        """The battle with this id, with its turns and its vote if cast; BattleNotFound otherwise."""
        with self._transaction("DEFERRED") as conn:
            return self._read_battle(conn, battle_id)

    def counts(self) -> dict[str, int]:
        """{"battles": battles created, "votes": votes cast}."""
        with self._transaction("DEFERRED") as conn:
            return self._counts(conn)

    def leaderboard(self) -> dict[str, Any]:
        """Vote counts, win rates and ratings of every model the battles used, from all votes, read
        in one snapshot (see `arena_leaderboard.compute_leaderboard` for the keys)."""
        with self._transaction("DEFERRED") as conn:
            totals = self._counts(conn)
            # Queued battles compare answers of one model (a round's candidates), not models.
            names = [
                r[0]
                for r in conn.execute(
                    "SELECT model_a FROM battles WHERE model_a NOT LIKE ?1 "
                    "UNION SELECT model_b FROM battles WHERE model_b NOT LIKE ?1",
                    (QUEUED_PREFIX + "%",),
                )
            ]
            votes = conn.execute(
                "SELECT b.model_a, b.model_b, v.winner FROM votes v JOIN battles b ON b.id = v.battle_id "
                "WHERE b.model_a NOT LIKE ? ORDER BY v.seq",
                (QUEUED_PREFIX + "%",),
            ).fetchall()
        return compute_leaderboard(totals, names, votes)

    def next_queued(self) -> Battle | None:
        """The oldest battle posted to the queue (`QUEUED_PREFIX` models) that has no vote yet."""
        with self._transaction("DEFERRED") as conn:
            row = conn.execute(
                "SELECT b.id FROM battles b LEFT JOIN votes v ON v.battle_id = b.id "
                "WHERE v.battle_id IS NULL AND b.model_a LIKE ? ORDER BY b.created_at, b.id LIMIT 1",
                (QUEUED_PREFIX + "%",),
            ).fetchone()
            return None if row is None else self._read_battle(conn, row[0])

    def export_dpo(self) -> Iterator[dict[str, Any]]:
        """One preference pair per decisive vote (A or B), in vote order (rows as
        `arena_battles.build_dpo_row` makes them). Ties and both_bad are skipped, and so is a vote
        for a side that said nothing: an empty chosen answer is a defect the data pipeline drops
        (and counts against data.max_bad_fraction). The fastchat export keeps every vote.

        The pipeline detects one format per file, so an arena that mixed chat and text battles
        should be exported into two files (split on the prompt's type).
        """
        for battle in self._voted_battles(decisive_only=True):
            if not battle.said_nothing(battle.winner):
                yield build_dpo_row(battle)

    def export_kto(self) -> Iterator[dict[str, Any]]:
        """Every vote's unpaired rows for KTO, in vote order (`arena_battles.build_kto_rows`: a
        decisive vote a desirable and an undesirable row, both_bad two undesirable ones, a tie
        none)."""
        for battle in self._voted_battles(decisive_only=False):
            yield from build_kto_rows(battle)

    def export_fastchat(self) -> Iterator[dict[str, Any]]:
        """Every vote as a row of FastChat's Chatbot Arena battle log, in vote order (rows as
        `arena_battles.build_fastchat_row` makes them)."""
        for battle in self._voted_battles(decisive_only=False):
            yield build_fastchat_row(battle)

    # -----------------------------------------------------------------------------------------
    # Internals

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: the sqlite3 module must not open transactions behind our back; every
        # transaction here is an explicit BEGIN so its lock mode is ours to choose. The timeout is
        # SQLite's busy timeout.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            # Per-connection settings (not stored in the file), so set on every connection.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _transaction(self, mode: str) -> Iterator[sqlite3.Connection]:
        """A connection inside BEGIN <mode>: committed on normal exit, rolled back on any exception.

        IMMEDIATE takes the write lock up front, so a read-then-write cannot be interleaved with
        another writer; DEFERRED gives readers one consistent snapshot across several SELECTs.
        """
        with self._connect() as conn:
            conn.execute(f"BEGIN {mode}")
            try:
                yield conn
            except BaseException:
                # SQLite may already have rolled back on some errors (e.g. disk full).
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @staticmethod
    def _read_battle(conn: sqlite3.Connection, battle_id: str) -> Battle:
        """One battle with its turns and vote, read on `conn` (inside the caller's transaction)."""
        row = conn.execute(
            f"SELECT {_BATTLE_COLUMNS}, v.winner, v.voted_at FROM battles b "
            "LEFT JOIN votes v ON v.battle_id = b.id WHERE b.id = ?",
            (battle_id,),
        ).fetchone()
        if row is None:
            raise BattleNotFound(battle_id)
        return _battle_from_row(row, _read_followups(conn, [battle_id]).get(battle_id, ()))

    def _init_schema(self) -> None:
        with self._connect() as conn:
            # The journal mode is stored in the file, so this is a no-op once any process set it.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(
                    f"{self.path}: SQLite refused WAL journal mode (got {mode!r}); "
                    "the arena store needs a local filesystem"
                )
            if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                return  # the common case: no write lock needed
            # Several replicas may start at once on a fresh or old file: the write lock serialises
            # them and the version is re-read under it, so each migration runs exactly once. DDL is
            # transactional in SQLite, so a failed upgrade leaves the file as it was.
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RuntimeError(
                        f"{self.path}: arena store schema version {version}, this code reads version "
                        f"{SCHEMA_VERSION}; use a matching dpo-cluster version or a new store path"
                    )
                for migration in MIGRATIONS[version:]:
                    # One statement at a time: executescript() would COMMIT first and so run
                    # outside the write lock taken above.
                    for statement in migration.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @staticmethod
    def _counts(conn: sqlite3.Connection) -> dict[str, int]:
        battles = conn.execute("SELECT COUNT(*) FROM battles").fetchone()[0]
        votes = conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
        return {"battles": battles, "votes": votes}

    def _voted_battles(self, *, decisive_only: bool) -> Iterator[Battle]:
        """Voted battles in vote order, read a page per connection (keyset pagination on seq)."""
        condition = "AND v.winner IN ('A', 'B')" if decisive_only else ""
        last_seq = 0
        while True:
            # One snapshot per page: a page's battles and their turns are read consistently.
            with self._transaction("DEFERRED") as conn:
                rows = conn.execute(
                    f"SELECT {_BATTLE_COLUMNS}, v.winner, v.voted_at, v.seq FROM votes v "
                    f"JOIN battles b ON b.id = v.battle_id WHERE v.seq > ? {condition} "
                    "ORDER BY v.seq LIMIT ?",
                    (last_seq, EXPORT_PAGE),
                ).fetchall()
                followups = _read_followups(conn, [row[0] for row in rows])
            for row in rows:
                yield _battle_from_row(row[:-1], followups.get(row[0], ()))
            if len(rows) < EXPORT_PAGE:
                return
            last_seq = rows[-1][-1]


def _read_followups(conn: sqlite3.Connection, battle_ids: Sequence[str]) -> dict[str, tuple[Turn, ...]]:
    """The follow-up turns of these battles, in turn order: {battle_id: turns}; battles without
    any are left out."""
    if not battle_ids:
        return {}
    marks = ", ".join("?" * len(battle_ids))
    rows = conn.execute(
        f"SELECT battle_id, content, answer_a, answer_b, created_at FROM turns "
        f"WHERE battle_id IN ({marks}) ORDER BY battle_id, turn",
        tuple(battle_ids),
    ).fetchall()
    found: dict[str, list[Turn]] = {}
    for battle_id, content, answer_a, answer_b, created_at in rows:
        turn = Turn(content=content, answers={"A": answer_a, "B": answer_b}, created_at=created_at)
        found.setdefault(battle_id, []).append(turn)
    return {battle_id: tuple(turns) for battle_id, turns in found.items()}


def _battle_from_row(row: tuple[Any, ...], followups: tuple[Turn, ...] = ()) -> Battle:
    (
        battle_id,
        created_at,
        prompt,
        messages,
        model_a,
        model_b,
        answer_a,
        answer_b,
        params,
        winner,
        voted_at,
    ) = row
    return Battle(
        id=battle_id,
        created_at=created_at,
        prompt=prompt,
        messages=None if messages is None else json.loads(messages),
        answers={"A": answer_a, "B": answer_b},
        models={"A": model_a, "B": model_b},
        params=json.loads(params),
        winner=winner,
        voted_at=voted_at,
        followups=followups,
    )
