"""Training pairs read by position: every worker shuffles row positions, reads only its own rows.

`IndexedPairSource` opens a prepared split's row layout (`dpo_cluster.data.layout.LayoutRows`:
memory-mapped Arrow files and their token lengths). An epoch's order is one seeded permutation of
all positions (`epoch_order`), the same on every worker; `index_batches` gives micro-batches of
positions and lengths only, which is all that length grouping and token budgets need, and `take`
reads the rows a worker owns. So a worker reads about 1/world_size of the split each epoch, and a
resumed run starts at its position without reading the rows before it. Reference log-probs, where
they were precomputed, come by position from `ReferenceValues` (waiting for them while the
reference stage still scores beside training).

Per worker at 10M pairs: the lengths (12 bytes a pair), one epoch's permutation (8 bytes a pair)
and, with precomputed references, their values (9 bytes a pair), about 300 MB; the token ids stay
on disk until fetched.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpo_cluster.batch.packing import INDEX_COLUMN, LENGTH_COLUMNS
from dpo_cluster.data.layout import LayoutRows, epoch_order
from dpo_cluster.reference.values import ReferenceValues

Batch = dict[str, Any]


@dataclass
class IndexedPairSource:
    """The pairs of one prepared split (`split_dir` = prepared/{split}) in a seeded global order.

    Rows are numbered as files in name order, rows in file order. With `reference_dir` (the
    split's directory of reference fragments), each fetched row carries its reference log-probs
    too; with `reference_status` (the stage's status file, while it scores beside training) a
    fetch waits for values not scored yet.
    """

    split_dir: Path
    seed: int
    shuffle: bool = True
    reference_dir: Path | None = None
    reference_status: Path | None = None
    rows: LayoutRows = field(init=False)
    reference: ReferenceValues | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.rows = LayoutRows(Path(self.split_dir))
        if self.reference_dir is not None:
            self.reference = ReferenceValues(Path(self.reference_dir), self.num_rows, self.reference_status)

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    # -----------------------------------------------------------------------------------------
    # What the training loop calls

    def order(self, epoch: int) -> np.ndarray:
        """Every row position in the epoch's order: a permutation seeded by (seed, epoch)."""
        return epoch_order(self.num_rows, self.seed, epoch, self.shuffle)

    def index_batches(self, batch_size: int, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Full micro-batches of positions and token lengths (no token ids), from micro-batch
        number `start` of the epoch on; nothing before it is computed or read."""
        order = self.order(epoch)
        for begin in range(start * batch_size, self.num_rows - batch_size + 1, batch_size):
            positions = order[begin : begin + batch_size]
            lengths = self.rows.lengths[positions]
            yield {INDEX_COLUMN: positions, **{name: lengths[:, i] for i, name in enumerate(LENGTH_COLUMNS)}}

    def take(self, positions: np.ndarray) -> Batch:
        """The rows at `positions`, in that order: every column of the layout as lists (token ids,
        row ids, ...), the reference log-probs as float arrays where there are some."""
        positions = np.asarray(positions, dtype=np.int64)
        table = self.rows.take(positions)
        batch: Batch = {name: table.column(name).to_pylist() for name in table.column_names}
        if self.reference is not None:
            batch |= self.reference.lookup(positions)
        return batch

    def iter_batches(self, batch_size: int, epoch: int) -> Iterator[Batch]:
        """Full batches of `batch_size` pairs in the epoch's order (a `PairSource`)."""
        for batch in self.index_batches(batch_size, epoch):
            yield self.take(batch[INDEX_COLUMN])
