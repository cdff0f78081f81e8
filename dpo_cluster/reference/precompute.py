"""The reference stage: score the pairs a run will read that the cache lacks, before training or
beside it, in the order training reads them.

    driver:  scoring_order (eval first, then train step by step, only what the run reads)
             - the positions already in the cache -> work items (split, positions)
             -> a driver thread runs them through the actor pool (Ray Data, order kept) and
                writes the scored positions as fragments (`values.write_fragment`)
    workers: `ReferenceValues` reads the fragments by position; beside training it waits for
             positions not scored yet, and the stage's status file says when none will come

What passes through the driver: positions to score (8 bytes a pair, once) and the scored values
(16 bytes a pair, streamed into fragments of at most FLUSH_ROWS): never token ids. The stage stops
when training ends (`ReferenceStage.stop`); what it scored stays in the cache.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpo_cluster.batch.collate import REF_COLUMNS
from dpo_cluster.config import Config
from dpo_cluster.data.pipeline import PreparedData
from dpo_cluster.reference.cache import CachePlan, open_cache, plan_cache, write_report
from dpo_cluster.reference.scorer import (
    POSITION_COLUMN,
    POSITIONS_COLUMN,
    SPLIT_COLUMN,
    build_reference_spec,
    preserve_order,
    score_items,
)
from dpo_cluster.reference.values import ReferenceValues, scored_positions, write_fragment, write_status

logger = logging.getLogger(__name__)

# Work items: at least this many forwards' worth of pairs each (one actor call), at most
# MAX_ITEM_ROWS pairs, and otherwise about ITEMS_PER_ACTOR items per actor, so every actor stays
# busy and a run of millions of pairs is thousands of items, not millions.
MIN_ITEM_FORWARDS = 16
MAX_ITEM_ROWS = 4096
ITEMS_PER_ACTOR = 64
# A fragment is written once it holds this many scored pairs, or its oldest is this old.
FLUSH_ROWS = 65536
FLUSH_SECONDS = 2.0


@dataclass
class ReferenceStage:
    """The stage for one run: `start` it, then `wait` for it (score first) or let the workers read
    beside it, and `stop` it when training ends. `close` removes a scratch directory (cache off)."""

    config: Config
    plan: CachePlan
    todo: dict[str, np.ndarray]  # split -> positions to score, in order
    needed: dict[str, int]  # split -> pairs the run reads
    split_dirs: dict[str, str]  # split -> its prepared directory, which the actors read by position
    overlapped: bool = False  # scoring beside training (for the report)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    error: BaseException | None = None
    report: dict[str, Any] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def rows_to_score(self) -> int:
        return sum(len(positions) for positions in self.todo.values())

    @property
    def status_file(self) -> Path:
        return self.plan.status_file(self.run_id)

    def values(self, split: str) -> ReferenceValues:
        """A split's values as scored so far, read by position (no waiting: see `status_file`)."""
        return ReferenceValues(self.plan.split_dir(split), self.plan.counts[split])

    def start(self) -> ReferenceStage:
        write_status(self.status_file, "running")
        self._thread = threading.Thread(target=self._run, name="reference-stage", daemon=True)
        self._thread.start()
        return self

    def wait(self) -> None:
        """Wait for the stage to end; raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"reference stage failed: {self.error}") from self.error

    def stop(self) -> None:
        """Stop scoring at the next scored item (training has ended) and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        """Stop; with reference.cache off, remove the scratch directory of values."""
        self.stop()
        self.status_file.unlink(missing_ok=True)
        if not self.plan.cached:
            shutil.rmtree(self.plan.directory, ignore_errors=True)

    # -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        started = time.perf_counter()
        scored = {split: 0 for split in self.todo}
        state = "done"
        try:
            if self.rows_to_score:
                with preserve_order():
                    items = _work_items(self.todo, self._item_rows())
                    spec = build_reference_spec(self.config, self.split_dirs)
                    results = score_items(self.config, items, spec)
                    state = self._consume(results, scored)
            self.report = self._write_report(state, scored, time.perf_counter() - started)
            write_status(self.status_file, state)
        except BaseException as error:  # workers must not wait for positions that will not come
            self.error = error
            write_status(self.status_file, "failed", repr(error))

    def _item_rows(self) -> int:
        reference = self.config.reference
        per_actor = math.ceil(self.rows_to_score / (reference.concurrency * ITEMS_PER_ACTOR))
        return max(reference.batch_size * MIN_ITEM_FORWARDS, min(per_actor, MAX_ITEM_ROWS))

    def _consume(self, results: Any, scored: dict[str, int]) -> str:
        """Write the pool's output as fragments as it comes -> "done", or "stopped" when asked."""
        buffers = {split: _Buffer() for split in self.todo}
        total, logged, sequence = self.rows_to_score, 0.0, 0
        for table in results.iter_batches(batch_format="pyarrow", batch_size=None):
            if self._stop.is_set():
                break
            for split in self.todo:
                part = table.filter(pc.equal(table[SPLIT_COLUMN], split))
                if part.num_rows:
                    buffers[split].add(part)
                    scored[split] += part.num_rows
            for split, buffer in buffers.items():
                if buffer.due():
                    sequence = buffer.flush(self.plan.split_dir(split), sequence)
            done = sum(scored.values()) / total
            if done - logged >= 0.1 or done == 1:
                logged = done
                logger.info("reference log-probs: %d / %d pairs scored", sum(scored.values()), total)
        for split, buffer in buffers.items():
            sequence = buffer.flush(self.plan.split_dir(split), sequence)
        if self._stop.is_set() and sum(scored.values()) < total:
            return "stopped"
        if scored != {split: len(p) for split, p in self.todo.items()}:
            raise RuntimeError(
                f"the actor pool returned {scored} pairs per split for the {self.todo} it was given"
            )
        return "done"

    def _write_report(self, state: str, scored: dict[str, int], seconds: float) -> dict[str, Any]:
        return write_report(
            self.config,
            self.plan,
            state=state,
            rows_needed=self.needed,
            rows_reused={split: self.needed[split] - len(self.todo[split]) for split in self.todo},
            rows_scored=sum(scored.values()),
            reused=self.rows_to_score == 0,
            overlapped=self.overlapped,
            seconds=round(seconds, 3),
        )


@dataclass
class _Buffer:
    """Scored positions of one split waiting to be written as a fragment."""

    tables: list[pa.Table] = field(default_factory=list)
    rows: int = 0
    since: float = 0.0

    def add(self, table: pa.Table) -> None:
        if not self.tables:
            self.since = time.monotonic()
        self.tables.append(table)
        self.rows += table.num_rows

    def due(self) -> bool:
        return self.rows >= FLUSH_ROWS or (self.rows > 0 and time.monotonic() - self.since >= FLUSH_SECONDS)

    def flush(self, directory: Path, sequence: int) -> int:
        if not self.rows:
            return sequence
        table = pa.concat_tables(self.tables)
        write_fragment(
            directory,
            sequence,
            table.column(POSITION_COLUMN).to_numpy(),
            table.column(REF_COLUMNS[0]).to_numpy(),
            table.column(REF_COLUMNS[1]).to_numpy(),
        )
        self.tables, self.rows = [], 0
        return sequence + 1


def _work_items(todo: dict[str, np.ndarray], item_rows: int) -> Any:
    """A Ray Dataset of one-row blocks (split, positions), `item_rows` positions each, in order."""
    import ray.data

    tables = []
    for split, positions in todo.items():
        for start in range(0, len(positions), item_rows):
            chunk = positions[start : start + item_rows]
            tables.append(
                pa.table(
                    {
                        SPLIT_COLUMN: pa.array([split], pa.string()),
                        POSITIONS_COLUMN: pa.array([chunk], pa.list_(pa.int64())),
                    }
                )
            )
    return ray.data.from_arrow(tables)


def build_reference_stage(
    config: Config, prepared: PreparedData, order: dict[str, np.ndarray] | None = None
) -> ReferenceStage:
    """The stage for `order` ({split: positions in the order the run reads them}; None: every
    pair, eval first): its cache opened, what it already holds subtracted. Not started."""
    plan = plan_cache(config, prepared)
    if order is None:
        order = {split: np.arange(plan.counts[split]) for split in ("eval", "train") if split in plan.counts}
    open_cache(plan)
    todo = {}
    for split, positions in order.items():
        covered = scored_positions(plan.split_dir(split), plan.counts[split])
        todo[split] = positions[~covered[positions]]
    split_dirs = {split: str(prepared.split_dir(split)) for split in plan.counts}
    return ReferenceStage(config, plan, todo, {split: len(p) for split, p in order.items()}, split_dirs)


@dataclass
class ReferenceLogps:
    """A finished stage's values: `values(split)` reads them by position; `report` is
    reference_report.json; `close()` removes them when reference.cache is false."""

    stage: ReferenceStage

    @property
    def report(self) -> dict[str, Any]:
        return self.stage.report

    @property
    def directory(self) -> Path:
        return self.stage.plan.directory

    def values(self, split: str) -> ReferenceValues:
        return self.stage.values(split)

    def close(self) -> None:
        self.stage.close()


def compute_reference_logps(
    config: Config, prepared: PreparedData, order: dict[str, np.ndarray] | None = None
) -> ReferenceLogps:
    """Score the pairs of `order` (None: every prepared pair) the cache lacks, now; write
    output_dir/reference_report.json. Needs Ray (`prepare` has joined or started it)."""
    stage = build_reference_stage(config, prepared, order)
    logger.info(
        "reference log-probs: %d pairs to score, %d in the cache %s",
        stage.rows_to_score,
        sum(stage.needed.values()) - stage.rows_to_score,
        stage.plan.directory,
    )
    stage.start().wait()
    stage.status_file.unlink(missing_ok=True)  # nobody waits on it
    return ReferenceLogps(stage)


def overlap_problem(config: Config, rows_to_score: int) -> str | None:
    """Why the stage cannot overlap training in this run (a short reason), or None when it can."""
    import ray

    reference, scaling = config.reference, config.scaling
    if not reference.overlap:
        return "reference.overlap is false"
    if rows_to_score == 0:
        return "the cache holds every pair the run reads"
    per_worker = scaling.resources_per_worker or {"CPU": 1.0, **({"GPU": 1.0} if scaling.use_gpu else {})}
    need = {name: amount * scaling.num_workers for name, amount in per_worker.items()}
    for name, amount in (("CPU", reference.num_cpus), ("GPU", reference.num_gpus)):
        need[name] = need.get(name, 0.0) + amount * reference.concurrency
    # The cluster's totals, not what is free this instant: tasks that just ran (the data
    # preparation) may still hold CPUs, which they give back; what must fit is actors + workers.
    total = ray.cluster_resources()
    short = [
        f"{name} {amount:g} needed, {total.get(name, 0.0):g} in the cluster"
        for name, amount in need.items()
        if amount > total.get(name, 0.0) + 1e-9
    ]
    if short:
        return (
            f"the cluster cannot hold {reference.concurrency} reference actor(s) beside "
            f"{scaling.num_workers} training workers ({'; '.join(short)}); lower reference.num_cpus "
            "(0 shares the workers' CPUs) or reference.concurrency to overlap"
        )
    return None
