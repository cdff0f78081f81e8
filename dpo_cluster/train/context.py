"""What the per-worker training loop needs from its surroundings (`WorkerContext`: rank, world
size, device, data, a `report` callback, the checkpoint to resume from), so the same loop runs
under Ray Train (`dpo_cluster.train.run`) and in a plain process (`dpo_cluster.train.local`).

Every worker computes the same ordered stream of micro-batches and keeps micro-batch k when
k % world_size == rank; length grouping and token budgets re-cut the stream alike on every worker
first. A global step therefore holds the same pairs whatever the worker count and accumulation,
which makes those runs equivalent and resumption exact. From an `IndexedPairSource` the stream is of
row positions and lengths only, and a worker fetches just the rows of the micro-batches it keeps.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from dpo_cluster.batch.packing import INDEX_COLUMN, concat_batches, group_by_length, take_rows
from dpo_cluster.batch.token_budget import TokenBudget
from dpo_cluster.train.indexed_source import IndexedPairSource

Batch = dict[str, Any]
"""A micro-batch of pairs as columns: prompt_ids, chosen_ids, rejected_ids (and row_id, ...)."""


class PairSource(Protocol):
    """An ordered stream of tokenized pairs."""

    num_rows: int

    def iter_batches(self, batch_size: int, epoch: int) -> Iterator[Batch]:
        """Full batches of `batch_size` pairs, in an order fixed by (seed, epoch)."""
        ...


Report = Callable[[dict[str, Any], "Path | None", "str | None"], None]
"""report(metrics, checkpoint_dir, checkpoint_name): every worker calls it the same number of
times; checkpoint files written by several workers into their checkpoint_dir are merged."""


OpenCheckpoint = Callable[[], AbstractContextManager["Path | None"]]
"""open(): `with open() as directory:` a checkpoint's directory, readable inside the block only
(in place where the storage is a local or shared filesystem, else downloaded for the block)."""


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    train: PairSource
    eval: PairSource | None
    report: Report
    # Opens the checkpoint to continue from (the latest reported one after a failure, or
    # train.resume_from), None where there is none.
    resume_checkpoint: OpenCheckpoint = lambda: contextlib.nullcontext(None)
    # Opens the best reported checkpoint (for train.load_best_at_end), None where there is none.
    best_checkpoint: OpenCheckpoint = lambda: contextlib.nullcontext(None)
    # Local scratch directory for staging checkpoints before they are reported.
    scratch_dir: Path = Path("/tmp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_micro_batches(
        self,
        source: PairSource,
        micro_batch_size: int,
        epoch: int,
        *,
        length_group_window: int | None = None,
        seed: int = 0,
    ) -> Iterator[tuple[int, Batch]]:
        """(global micro-batch index, batch) for the micro-batches this worker owns.

        With `length_group_window`, the whole ordered stream is first re-cut by length in windows
        of that many micro-batches (`dpo_cluster.batch.packing.group_by_length`, seeded by
        (seed, epoch)); every worker computes the same re-cut stream, so ownership is unchanged.
        """
        stream = self._stream(source, micro_batch_size, epoch, length_group_window, seed)
        for index, batch in enumerate(stream):
            if index % self.world_size == self.rank:
                yield index, _fetch(source, batch)

    def my_steps(
        self,
        source: PairSource,
        micro_batch_size: int,
        accumulation: int,
        epoch: int,
        *,
        length_group_window: int | None = None,
        seed: int = 0,
        token_budget: TokenBudget | None = None,
        start_step: int = 0,
    ) -> Iterator[list[Batch]]:
        """This worker's micro-batches of each full optimizer step of the epoch, step by step, from
        step `start_step` of the epoch on (a resumed run: an indexed source reads no row before it).

        A step is `accumulation` x world_size consecutive micro-batches of the (grouped) stream.
        Without a token budget this worker's are those `my_micro_batches` gives it, `accumulation`
        of them. With one, the step's pairs are re-cut under the budget (`TokenBudget.cut`) and this
        worker gets its share: as many micro-batches as every other worker, of varying sizes.
        """
        per_step = accumulation * self.world_size
        stream = self._stream(
            source, micro_batch_size, epoch, length_group_window, seed, start=start_step * per_step
        )
        while len(chunk := list(itertools.islice(stream, per_step))) == per_step:
            if token_budget is None:
                yield [_fetch(source, batch) for batch in chunk[self.rank :: self.world_size]]
            else:
                pairs = concat_batches(chunk)
                mine = token_budget.cut(pairs, self.world_size)[self.rank]
                yield [_fetch(source, take_rows(pairs, rows)) for rows in mine]

    @staticmethod
    def _stream(
        source: PairSource,
        micro_batch_size: int,
        epoch: int,
        length_group_window: int | None,
        seed: int,
        start: int = 0,
    ) -> Iterator[Batch]:
        """Every worker's micro-batches in order (the same on every worker), grouped by length if
        asked, from micro-batch `start` on. An indexed source's are positions and lengths only, and
        it starts at the window holding `start` without computing the ones before."""

        def batches(first: int) -> Iterator[Batch]:
            if isinstance(source, IndexedPairSource):
                return source.index_batches(micro_batch_size, epoch, start=first)
            return itertools.islice(source.iter_batches(micro_batch_size, epoch), first, None)

        if length_group_window is None:
            return batches(start)
        first_window = start // length_group_window
        grouped = group_by_length(
            batches(first_window * length_group_window),
            length_group_window,
            seed=(seed, epoch),
            first_window=first_window,
        )
        return itertools.islice(grouped, start - first_window * length_group_window, None)


def _fetch(source: PairSource, batch: Batch) -> Batch:
    """A micro-batch of the stream as pairs: an indexed source's positions are read here, on the
    worker that owns them."""
    if INDEX_COLUMN in batch:
        assert isinstance(source, IndexedPairSource)
        return source.take(batch[INDEX_COLUMN])
    return batch
