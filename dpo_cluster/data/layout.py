"""The row layout training reads from: prepared/rows/{split}/<part>.arrow + <part>.lengths.npy.

Each kept Parquet file of a split gets an uncompressed Arrow IPC file of one record batch (memory-
mapped by readers, so fetching a row reads that row's pages and nothing else) and an int32 array
of its pairs' (prompt, chosen, rejected) token lengths. A training worker holds the lengths of
every row (12 bytes a pair) to shuffle, group and cut batches, and reads only the rows it owns.
The files are written by one Ray task per Parquet file, so no split passes through the driver.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROWS_DIR = "rows"
ROWS_SUFFIX = ".arrow"
LENGTHS_SUFFIX = ".lengths.npy"
LENGTH_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


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
