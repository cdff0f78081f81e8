"""The reference stage beside training (`reference.overlap`): workers train while the pool scores.

    driver:   prepared rows (read first, while CPUs are free) -> actor pool of the reference in a
              driver thread -> each scored block: ray.put, appended to its split's `PairLog`, and
              written in order to the cache's staging file, sealed and installed once complete
    workers:  `LogPairSource` reads block 0, 1, 2, ... of its split, waiting for blocks not scored
              yet; every worker reads every block, in the same order, every epoch

Why a log of blocks and not a dataset per worker: the training loop needs every row on every
worker in one fixed order, and the reference must run once, not once per worker and epoch. It
overlaps only where the cluster holds the actors beside the workers (`overlap_problem`). An error
in the stage is put in the log, so waiting workers raise it instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_cluster.config import Config
from dpo_cluster.data.pipeline import PreparedData
from dpo_cluster.reference.cache import (
    CACHE_FILE,
    CachePlan,
    new_staging_dir,
    plan_cache,
    prepared_row_ids,
    seal_cache,
    write_report,
)
from dpo_cluster.reference.scorer import (
    build_reference_spec,
    preserve_order,
    score_rows,
    scoring_input,
    select_split,
)

logger = logging.getLogger(__name__)

# Rows a `LogPairSource` shuffles together (the in-loop path's Ray local shuffle buffer size).
SHUFFLE_WINDOW = 4096


class PairLog:
    """Per split, an append-only list of references to scored blocks, in order (a Ray actor).

    `get(split, index)` waits until block `index` exists and returns it as [ObjectRef] (wrapped,
    so Ray hands over the reference, not the block), or None past the last block of a finished
    split. After `fail(message)` every call raises RuntimeError(message).
    """

    def __init__(self, splits: list[str]) -> None:
        self.blocks: dict[str, list[Any]] = {split: [] for split in splits}
        self.finished: set[str] = set()
        self.error: str | None = None
        self.changed = asyncio.Condition()

    async def append(self, split: str, block: list[Any]) -> None:
        async with self.changed:
            self.blocks[split].extend(block)
            self.changed.notify_all()

    async def finish(self, split: str) -> None:
        async with self.changed:
            self.finished.add(split)
            self.changed.notify_all()

    async def fail(self, message: str) -> None:
        async with self.changed:
            self.error = message
            self.changed.notify_all()

    async def get(self, split: str, index: int) -> list[Any] | None:
        async with self.changed:
            await self.changed.wait_for(
                lambda: self.error is not None or index < len(self.blocks[split]) or split in self.finished
            )
            if self.error is not None:
                raise RuntimeError(self.error)
            return [self.blocks[split][index]] if index < len(self.blocks[split]) else None


def start_pair_log(splits: list[str]) -> Any:
    import ray

    return ray.remote(num_cpus=0)(PairLog).remote(splits)


@dataclass
class LogPairSource:
    """Pairs of one split of a `PairLog`, in the log's order (shuffled in windows of
    `shuffle_window` rows, seeded by (seed, epoch)); a `PairSource` for the training loop."""

    log: Any  # ray.actor.ActorHandle of PairLog
    split: str
    num_rows: int
    seed: int
    shuffle: bool = True
    shuffle_window: int = SHUFFLE_WINDOW

    def iter_batches(self, batch_size: int, epoch: int) -> Iterator[dict[str, Any]]:
        rng = np.random.default_rng([self.seed, epoch])
        carry: pa.Table | None = None
        for window in _windows(self._tables(), self.shuffle_window if self.shuffle else 1):
            if self.shuffle:
                window = window.take(rng.permutation(window.num_rows))
            table = window if carry is None else pa.concat_tables([carry, window])
            full = table.num_rows - table.num_rows % batch_size
            for start in range(0, full, batch_size):
                rows = table.slice(start, batch_size)
                yield {name: rows.column(name).to_pylist() for name in rows.column_names}
            carry = table.slice(full)

    def _tables(self) -> Iterator[pa.Table]:
        import ray

        for index in range(1 << 62):
            block = ray.get(self.log.get.remote(self.split, index))
            if block is None:
                return
            yield ray.get(block[0])


def _windows(tables: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Consecutive tables merged into tables of at least `rows` rows (the last one may be short)."""
    pending: list[pa.Table] = []
    count = 0
    for table in tables:
        pending.append(table)
        count += table.num_rows
        if count >= rows:
            yield pa.concat_tables(pending)
            pending, count = [], 0
    if pending:
        yield pa.concat_tables(pending)


def overlap_problem(config: Config, plan: CachePlan) -> str | None:
    """Why the stage cannot overlap training in this run (a short reason), or None when it can."""
    import ray

    reference, scaling = config.reference, config.scaling
    if not reference.overlap:
        return "reference.overlap is false"
    if plan.reusable:
        return f"the cache {plan.final} holds the values"
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


@dataclass
class StreamedReference:
    """The stage running in a driver thread, feeding `log`; `start_streamed_reference` makes it."""

    config: Config
    prepared: PreparedData
    plan: CachePlan
    log: Any
    blocks: list[Any] = field(default_factory=list)  # the driver owns every block it put
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def close(self, timeout: float | None = None) -> None:
        """Wait for the stage to end; raise its error, if any."""
        assert self.thread is not None
        self.thread.join(timeout)
        if self.error is not None:
            raise RuntimeError(f"reference stage failed: {self.error}") from self.error

    def abort(self) -> None:
        """Training ended without the stage: stop it at its next block and wait."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def _run(self, rows: Any) -> None:
        import ray

        started = time.perf_counter()
        staging = new_staging_dir(self.plan) if self.config.reference.cache else None
        writers: dict[str, pq.ParquetWriter] = {}
        try:
            expected = {split: prepared_row_ids(self.prepared, split) for split in self.plan.counts}
            seen = dict.fromkeys(self.plan.counts, 0)
            with preserve_order():
                scored = score_rows(self.config, rows, build_reference_spec(self.config))
                for table in scored.iter_batches(batch_format="pyarrow", batch_size=None):
                    if self.stop.is_set():
                        return
                    for split in self.plan.counts:
                        part = select_split(table, split)
                        if part.num_rows == 0:
                            continue
                        _check_order(part, expected[split], seen[split], split)
                        seen[split] += part.num_rows
                        self._publish(split, part)
                        if seen[split] == self.plan.counts[split]:
                            ray.get(self.log.finish.remote(split))
                        if staging is not None:
                            writers.setdefault(split, _writer(staging / split, part.schema)).write_table(part)
            if seen != self.plan.counts:
                raise RuntimeError(f"scored {seen} rows per split for the {self.plan.counts} given")
            for writer in writers.values():
                writer.close()
            writers.clear()
            if staging is not None:
                seal_cache(staging, self.plan)
            seconds = time.perf_counter() - started
            write_report(self.config, self.plan, seconds=seconds, overlapped=True)
            logger.info(
                "reference log-probs: scored %d pairs in %.1fs beside training", sum(seen.values()), seconds
            )
        except BaseException as error:  # the workers must not wait for blocks that will not come
            self.error = error
            with contextlib.suppress(Exception):  # the log is gone only if the job is
                ray.get(self.log.fail.remote(f"reference stage failed: {error!r}"))
        finally:
            for writer in writers.values():
                writer.close()
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def _publish(self, split: str, part: pa.Table) -> None:
        import ray

        ref = ray.put(part)
        self.blocks.append(ref)
        ray.get(self.log.append.remote(split, [ref]))


def start_streamed_reference(config: Config, prepared: PreparedData) -> tuple[StreamedReference | None, str]:
    """Start the stage beside training when it can overlap: (stage, "") or (None, why not)."""
    plan = plan_cache(config, prepared)
    why = overlap_problem(config, plan)
    if why is not None:
        return None, why
    with preserve_order():
        rows = scoring_input(config, prepared)  # read now, before the workers take the CPUs
    stage = StreamedReference(config, prepared, plan, start_pair_log(list(plan.counts)))
    stage.thread = threading.Thread(target=stage._run, args=(rows,), name="reference-stage", daemon=True)
    stage.thread.start()
    logger.info(
        "reference log-probs: scoring %d pairs beside training (%s)", sum(plan.counts.values()), plan.problem
    )
    return stage, ""


def _check_order(part: pa.Table, expected: list[Any], offset: int, split: str) -> None:
    got = part.column("row_id").to_pylist()
    if got != expected[offset : offset + len(got)]:
        raise RuntimeError(
            f"the {split} split came out of the reference stage out of the prepared order at row "
            f"{offset}; training needs the prepared order (set reference.overlap: false)"
        )


def _writer(directory: Path, schema: pa.Schema) -> pq.ParquetWriter:
    directory.mkdir(parents=True, exist_ok=True)
    return pq.ParquetWriter(directory / CACHE_FILE, schema)
