"""Durable store of the blind A/B arena: battles and votes in one SQLite file, leaderboard, exports.

The file is shared by every web replica on a node, so each guarantee comes from SQLite itself:
- WAL journal, so readers (leaderboard, exports) never block a writer and vice versa;
- `synchronous=FULL`, so a committed vote is on disk before `vote()` returns;
- a busy timeout, so concurrent writers from several processes queue instead of failing;
- one short-lived connection per operation, so the store is safe to share between threads and
  processes and no connection outlives a call;
- "one vote per battle" is a UNIQUE constraint checked inside a `BEGIN IMMEDIATE` transaction, so
  of two processes racing to vote on the same battle exactly one succeeds.
WAL needs shared memory between the processes using the file: keep it on a local disk, not NFS.
"""

from __future__ import annotations

import json
import random
import secrets
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dpo_cluster.serving.arena_battles import (
    WINNERS,
    AlreadyVoted,
    Battle,
    BattleNotFound,
    build_dpo_row,
    build_fastchat_row,
    check_new_battle,
)
from dpo_cluster.serving.arena_leaderboard import compute_leaderboard

# The store's methods take, return and raise these; they are importable from here too.
__all__ = ["WINNERS", "AlreadyVoted", "ArenaStore", "Battle", "BattleNotFound"]

SCHEMA_VERSION = 1
# How long an operation waits for another process's write lock before failing with
# "database is locked". Writes are single small rows, so waiting this long means something is wrong.
BUSY_TIMEOUT_S = 30.0
# Exports read this many votes per connection, so no read transaction stays open while the
# caller consumes rows (an open reader would keep the WAL from being checkpointed).
EXPORT_PAGE = 100

_SCHEMA = """
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
    ) -> Battle:
        """Record a new battle and return it; committed before return.

        Exactly one of `prompt` / `messages` must be given, and `answers_by_model` must name exactly
        two models. Which model becomes "A" is drawn from `rng`, by default the OS's secure source
        (a voter must not be able to predict the order); pass a seeded `random.Random` in tests.
        Raises ValueError for malformed arguments.
        """
        params_json = check_new_battle(prompt, messages, answers_by_model, params)
        # Sorting first makes the order depend on the draw alone, not on the caller's dict order,
        # so a seeded rng reproduces the same assignment.
        first, second = sorted(answers_by_model)
        draw = (rng or secrets.SystemRandom()).random()
        model_a, model_b = (first, second) if draw < 0.5 else (second, first)
        clean_messages = None if messages is None else [dict(m) for m in messages]
        battle = Battle(
            id=uuid.uuid4().hex,
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
            row = conn.execute(
                f"SELECT {_BATTLE_COLUMNS} FROM battles b WHERE b.id = ?", (battle_id,)
            ).fetchone()
            if row is None:
                raise BattleNotFound(battle_id)
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
        return _battle_from_row((*row, winner, voted_at))

    # -----------------------------------------------------------------------------------------
    # Reads

    def get_battle(self, battle_id: str) -> Battle:
        """The battle with this id, with its vote if cast; BattleNotFound otherwise."""
        with self._connect() as conn:
            row = conn.execute(
                f"SELECT {_BATTLE_COLUMNS}, v.winner, v.voted_at FROM battles b "
                "LEFT JOIN votes v ON v.battle_id = b.id WHERE b.id = ?",
                (battle_id,),
            ).fetchone()
        if row is None:
            raise BattleNotFound(battle_id)
        return _battle_from_row(row)

    def counts(self) -> dict[str, int]:
        """{"battles": battles created, "votes": votes cast}."""
        with self._transaction("DEFERRED") as conn:
            return self._counts(conn)

    def leaderboard(self) -> dict[str, Any]:
        """Vote counts, win rate and ratings of the two models from all votes, read in one snapshot
        (see `arena_leaderboard.compute_leaderboard` for the keys). Raises RuntimeError when the
        battles involve more than two models."""
        with self._transaction("DEFERRED") as conn:
            totals = self._counts(conn)
            names = [
                r[0] for r in conn.execute("SELECT model_a FROM battles UNION SELECT model_b FROM battles")
            ]
            votes = conn.execute(
                "SELECT b.model_a, b.model_b, v.winner FROM votes v JOIN battles b ON b.id = v.battle_id "
                "ORDER BY v.seq"
            ).fetchall()
        return compute_leaderboard(totals, names, votes)

    def export_dpo(self) -> Iterator[dict[str, Any]]:
        """One preference pair per decisive vote (A or B), in vote order; ties and both_bad are
        skipped (rows as `arena_battles.build_dpo_row` makes them).

        The pipeline detects one format per file, so an arena that mixed chat and text battles
        should be exported into two files (split on the prompt's type).
        """
        for battle in self._voted_battles(decisive_only=True):
            yield build_dpo_row(battle)

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
            # Several replicas may start at once on a fresh file: the write lock serialises them and
            # the version is re-read under it, so the schema is created exactly once.
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    # One statement at a time: executescript() would COMMIT first and so run
                    # outside the write lock taken above.
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version != SCHEMA_VERSION:
                    raise RuntimeError(
                        f"{self.path}: arena store schema version {version}, this code reads version "
                        f"{SCHEMA_VERSION}; use a matching dpo-cluster version or a new store path"
                    )
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
            with self._connect() as conn:
                rows = conn.execute(
                    f"SELECT {_BATTLE_COLUMNS}, v.winner, v.voted_at, v.seq FROM votes v "
                    f"JOIN battles b ON b.id = v.battle_id WHERE v.seq > ? {condition} "
                    "ORDER BY v.seq LIMIT ?",
                    (last_seq, EXPORT_PAGE),
                ).fetchall()
            for row in rows:
                yield _battle_from_row(row[:-1])
            if len(rows) < EXPORT_PAGE:
                return
            last_seq = rows[-1][-1]


def _battle_from_row(row: tuple[Any, ...]) -> Battle:
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
    )
