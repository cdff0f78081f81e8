"""Training pairs read by position: every worker shuffles row positions, reads only its own rows.

`IndexedPairSource` opens a prepared split's row layout (`dpo_cluster.data.layout`: memory-mapped
Arrow files and their token lengths). An epoch's order is one seeded permutation of all positions,
the same on every worker; `index_batches` gives micro-batches of positions and lengths only, which
is all that length grouping and token budgets need, and `take` reads the rows a worker owns. So a
worker reads about 1/world_size of the split each epoch, and a resumed run starts at its position
without reading the rows before it. A split directory without a layout (written by hand, or by an
older version) is read into memory whole and served the same way.

Per worker at 10M pairs: the lengths (12 bytes a pair) and one epoch's permutation (8 bytes a pair),
about 200 MB; the token ids stay on disk until fetched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_cluster.batch.collate import REF_COLUMNS
from dpo_cluster.batch.packing import INDEX_COLUMN, LENGTH_COLUMNS
from dpo_cluster.data.layout import LENGTHS_SUFFIX, ROWS_SUFFIX, has_layout, rows_dir, token_lengths

Batch = dict[str, Any]


@dataclass
class IndexedPairSource:
    """The pairs of one prepared split (`split_dir` = prepared/{split}) in a seeded global order.

    Rows are numbered as files in name order, rows in file order. With `reference_dir` (a cached
    reference split in that same order), each fetched row carries its reference log-probs too.
    """

    split_dir: Path
    seed: int
    shuffle: bool = True
    reference_dir: Path | None = None
    num_rows: int = field(init=False)
    open_seconds: float = field(init=False)
    total_bytes: int = field(init=False)
    bytes_read: int = field(init=False, default=0)
    rows_read: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        started = time.perf_counter()
        self.split_dir = Path(self.split_dir)
        self._tables, lengths = self._open()
        self._lengths = np.concatenate(lengths) if lengths else np.zeros((0, 3), np.int32)
        self._starts = np.cumsum([0] + [t.num_rows for t in self._tables])
        self.num_rows = int(self._starts[-1])
        self.total_bytes = sum(t.nbytes for t in self._tables)
        self._reference = self._open_reference()
        self.open_seconds = time.perf_counter() - started

    # -----------------------------------------------------------------------------------------
    # What the training loop calls

    def order(self, epoch: int) -> np.ndarray:
        """Every row position in the epoch's order: a permutation seeded by (seed, epoch)."""
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def index_batches(self, batch_size: int, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Full micro-batches of positions and token lengths (no token ids), from micro-batch
        number `start` of the epoch on; nothing before it is computed or read."""
        order = self.order(epoch)
        for begin in range(start * batch_size, self.num_rows - batch_size + 1, batch_size):
            positions = order[begin : begin + batch_size]
            lengths = self._lengths[positions]
            yield {INDEX_COLUMN: positions, **{name: lengths[:, i] for i, name in enumerate(LENGTH_COLUMNS)}}

    def take(self, positions: np.ndarray) -> Batch:
        """The rows at `positions`, in that order: every column of the layout as lists (token ids,
        row ids, ...), the reference log-probs as float arrays where there are some."""
        positions = np.asarray(positions, dtype=np.int64)
        files = np.searchsorted(self._starts, positions, side="right") - 1
        pieces, where = [], []
        for f in np.unique(files):
            mine = np.flatnonzero(files == f)
            taken = self._tables[f].take(pa.array(positions[mine] - self._starts[f]))
            self.bytes_read += taken.nbytes
            pieces.append(taken)
            where.append(mine)
        table = pa.concat_tables(pieces).take(pa.array(np.argsort(np.concatenate(where), kind="stable")))
        self.rows_read += len(positions)
        batch: Batch = {name: table.column(name).to_pylist() for name in table.column_names}
        if self._reference is not None:
            for name, values in self._reference.items():
                batch[name] = values[positions]
        return batch

    def iter_batches(self, batch_size: int, epoch: int) -> Iterator[Batch]:
        """Full batches of `batch_size` pairs in the epoch's order (a `PairSource`)."""
        for batch in self.index_batches(batch_size, epoch):
            yield self.take(batch[INDEX_COLUMN])

    # -----------------------------------------------------------------------------------------

    def _open(self) -> tuple[list[pa.Table], list[np.ndarray]]:
        parquet = sorted(self.split_dir.glob("*.parquet"))
        layout = rows_dir(self.split_dir.parent, self.split_dir.name)
        if not parquet or not has_layout(self.split_dir.parent, self.split_dir.name):
            table = (
                pa.concat_tables([pq.read_table(f) for f in parquet]).combine_chunks() if parquet else None
            )
            return ([table], [token_lengths(table)]) if table is not None and table.num_rows else ([], [])
        tables, lengths = [], []
        for part in parquet:
            # Zero-copy: the table's buffers are the mapped file, paged in as rows are taken.
            tables.append(
                pa.ipc.open_file(pa.memory_map(str(layout / f"{part.stem}{ROWS_SUFFIX}"))).read_all()
            )
            lengths.append(np.load(layout / f"{part.stem}{LENGTHS_SUFFIX}"))
        return tables, lengths

    def _open_reference(self) -> dict[str, np.ndarray] | None:
        if self.reference_dir is None:
            return None
        files = sorted(Path(self.reference_dir).glob("*.parquet"))
        table = pa.concat_tables([pq.read_table(f, columns=["row_id", *REF_COLUMNS]) for f in files])
        if table.num_rows != self.num_rows:
            raise ValueError(
                f"{self.reference_dir}: {table.num_rows} reference rows for the {self.num_rows} of {self.split_dir}"
            )
        ours = [self._tables[0].column("row_id")[0].as_py(), self._tables[-1].column("row_id")[-1].as_py()]
        theirs = [table.column("row_id")[i].as_py() for i in (0, table.num_rows - 1)]
        if self.num_rows and ours != theirs:
            raise ValueError(f"{self.reference_dir}: reference rows are not in the order of {self.split_dir}")
        return {name: table.column(name).to_numpy() for name in REF_COLUMNS}
