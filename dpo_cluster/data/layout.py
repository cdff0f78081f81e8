"""The row layout training reads from: prepared/rows/{split}/<part>.arrow + <part>.lengths.npy.

Each kept Parquet file of a split gets an uncompressed Arrow IPC file of one record batch (memory-
mapped by readers, so fetching a row reads that row's pages and nothing else) and an int32 array
of its pairs' (prompt, chosen, rejected) token lengths. A training worker holds the lengths of
every row (12 bytes a pair) to shuffle, group and cut batches, and reads only the rows it owns
(`LayoutRows`); the reference actors read the rows they score the same way. Rows are numbered
files in name order, rows in file order, and an epoch visits them in `epoch_order`. The files are
written by one Ray task per Parquet file, so no split passes through the driver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROWS_DIR = "rows"
ROWS_SUFFIX = ".arrow"
LENGTHS_SUFFIX = ".lengths.npy"
LENGTH_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """(num_rows,) int64: every row position in an epoch's order, a permutation seeded by
    (seed, epoch), the same in every process; positions in order when not shuffled."""
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


@dataclass
class LayoutRows:
    """The rows of one prepared split (`split_dir` = prepared/{split}), numbered as files in name
    order, rows in file order, read by position. With a row layout the tables are the memory-mapped
    Arrow files (nothing read until rows are taken); without one (written by hand, or by an older
    version) the Parquet files are read into memory whole."""

    split_dir: Path
    lengths: np.ndarray = field(init=False)  # (num_rows, 3) int32 prompt/chosen/rejected tokens
    num_rows: int = field(init=False)
    total_bytes: int = field(init=False)
    open_seconds: float = field(init=False)
    bytes_read: int = field(init=False, default=0)
    rows_read: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        started = time.perf_counter()
        self.split_dir = Path(self.split_dir)
        self._tables, lengths = self._open()
        self.lengths = np.concatenate(lengths) if lengths else np.zeros((0, 3), np.int32)
        self._starts = np.cumsum([0] + [t.num_rows for t in self._tables])
        self.num_rows = int(self._starts[-1])
        self.total_bytes = sum(t.nbytes for t in self._tables)
        self.open_seconds = time.perf_counter() - started

    def take(self, positions: np.ndarray) -> pa.Table:
        """The rows at `positions` (any order, repeats allowed), in that order; only their pages
        are read."""
        positions = np.asarray(positions, dtype=np.int64)
        files = np.searchsorted(self._starts, positions, side="right") - 1
        pieces, where = [], []
        for f in np.unique(files):
            mine = np.flatnonzero(files == f)
            taken = self._tables[f].take(pa.array(positions[mine] - self._starts[f]))
            self.bytes_read += taken.nbytes
            pieces.append(taken)
            where.append(mine)
        self.rows_read += len(positions)
        if not pieces:
            return self._tables[0].slice(0, 0) if self._tables else pa.table({})
        return pa.concat_tables(pieces).take(pa.array(np.argsort(np.concatenate(where), kind="stable")))

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


def rows_dir(prepared_dir: Path, split: str) -> Path:
    """Where the row layout of `split` lives under a prepared directory."""
    return Path(prepared_dir) / ROWS_DIR / split


def write_layout(prepared_dir: Path, splits: list[str]) -> None:
    """Write the row layout of every Parquet file of prepared_dir/{split}/ (Ray must be running)."""
    import ray

    convert = ray.remote(num_cpus=1)(_convert)
    pending = []
    for split in splits:
        for parquet in sorted((Path(prepared_dir) / split).glob("*.parquet")):
            target = rows_dir(prepared_dir, split)
            target.mkdir(parents=True, exist_ok=True)
            pending.append(convert.remote(str(parquet), str(target / parquet.stem)))
    ray.get(pending)


def has_layout(prepared_dir: Path, split: str) -> bool:
    """Whether every Parquet file of the split has its row layout (an older run's may not)."""
    parts = sorted((Path(prepared_dir) / split).glob("*.parquet"))
    target = rows_dir(prepared_dir, split)
    return all(
        (target / f"{p.stem}{ROWS_SUFFIX}").is_file() and (target / f"{p.stem}{LENGTHS_SUFFIX}").is_file()
        for p in parts
    )


def token_lengths(table: pa.Table) -> np.ndarray:
    """(rows, 3) int32: the prompt, chosen and rejected token counts of each pair."""
    columns = [
        pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False) for name in LENGTH_FIELDS
    ]
    return np.stack(columns, axis=1).astype(np.int32) if table.num_rows else np.zeros((0, 3), np.int32)


def _convert(parquet: str, stem: str) -> int:
    """One Parquet file -> stem.arrow (one record batch) and stem.lengths.npy; returns its rows.
    Written under temporary names and renamed, so a file that exists is complete."""
    table = pq.read_table(parquet).combine_chunks()
    rows_tmp, lengths_tmp = f"{stem}{ROWS_SUFFIX}.tmp", f"{stem}.lengths.tmp.npy"
    with pa.OSFile(rows_tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(1, table.num_rows))
    np.save(lengths_tmp, token_lengths(table))
    Path(rows_tmp).rename(f"{stem}{ROWS_SUFFIX}")
    Path(lengths_tmp).rename(f"{stem}{LENGTHS_SUFFIX}")
    return table.num_rows
