"""Sources: cut a `SourceConfig` into read units, and read a unit as raw rows `{row_id, raw}`.

Every source kind ends in the same two columns, so parsing, validation and accounting happen in
one place (the pipeline's process stage), and a row that cannot even be parsed is still a row
with an id that names where it came from. Every kind is cut into read units (byte ranges, row
groups, row ranges) read inside Ray tasks, so one big file or dataset is read and tokenized by
many tasks in parallel and none of its rows passes through the driver.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from dpo_cluster.config import SourceConfig
from dpo_cluster.data.records import DataError

# Row ids: local JSONL `path:LINE` (1-based; a file is cut into line-aligned byte ranges, whose
# first line numbers come from a newline count); local JSON (one array), Parquet and CSV
# `path#INDEX` (0-based; Parquet split by row groups, JSON and CSV one task each);
# `datasets.save_to_disk` directories and hub datasets `name#INDEX`; inline rows `rows[INDEX]`.
# Typed rows (Parquet, CSV, Arrow) are carried as JSON text in `raw`, the same as JSONL lines, so
# the quarantine file shows every dropped row exactly as it was read.
RAW_SCHEMA = pa.schema([("row_id", pa.string()), ("raw", pa.binary())])

LOCAL_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")
_READ_BLOCK = 1 << 20
_ROWS_PER_BATCH = 1024
# Read units are cut to about total_bytes / target_units, within these bounds.
MIN_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class ReadUnit:
    """One task's share of a source: a byte range of a JSONL file, a set of Parquet row groups, a
    whole JSON/CSV file, or a row range of a `datasets` dataset (hf) or of inline rows."""

    path: str
    kind: str  # jsonl | json | parquet | csv | hf | inline
    start: int = 0  # jsonl: byte offset (at a line start); parquet: first row group; hf/inline: first row
    stop: int = -1  # jsonl: byte offset (exclusive); parquet: row group (exclusive); hf/inline: row
    # (exclusive); -1 = to the end
    first_index: int = 0  # jsonl: line number of `start` (1-based); parquet: index of its first row


def is_local(source: SourceConfig) -> bool:
    path = source.path
    return path is not None and (os.path.exists(path) or glob.has_magic(path))


def list_local_files(source: SourceConfig) -> list[tuple[str, str]]:
    """(path, kind) of every data file a local path names, sorted for determinism."""
    assert source.path is not None
    path = source.path
    if os.path.isdir(path):
        candidates = sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
    elif glob.has_magic(path):
        candidates = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    else:
        candidates = [path]
    files = [
        (p, LOCAL_SUFFIXES[Path(p).suffix.lower()])
        for p in candidates
        if Path(p).suffix.lower() in LOCAL_SUFFIXES
    ]
    if not files:
        raise DataError(
            f"{path}: no data files found (looked for {', '.join(sorted(LOCAL_SUFFIXES))})"
            if os.path.isdir(path) or glob.has_magic(path)
            else f"{path}: unsupported file type {Path(path).suffix!r}; use one of {', '.join(sorted(LOCAL_SUFFIXES))}"
        )
    return files


def is_saved_dataset(path: str) -> bool:
    """True for a directory written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())


def plan_local_reads(files: list[tuple[str, str]], target_units: int) -> list[ReadUnit]:
    """Cut local files into read units so that about `target_units` tasks can run at once."""
    total = sum(os.path.getsize(p) for p, _ in files) or 1
    chunk_bytes = int(min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, math.ceil(total / max(1, target_units)))))
    units: list[ReadUnit] = []
    for path, kind in files:
        _check_encoding(path)
        if kind == "jsonl":
            units.extend(_jsonl_units(path, chunk_bytes))
        elif kind == "parquet":
            units.extend(_parquet_units(path, chunk_bytes))
        else:
            units.append(ReadUnit(path, kind))
    return units


def _check_encoding(path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_UTF16_32_BOMS):
        raise DataError(
            f"{path}: line 1: the file is UTF-16/UTF-32 encoded (byte-order mark); convert it to UTF-8"
        )


def _jsonl_units(path: str, chunk_bytes: int) -> list[ReadUnit]:
    """Line-aligned byte ranges of about chunk_bytes each, with the line number each starts at."""
    size = os.path.getsize(path)
    units: list[ReadUnit] = []
    start, line = 0, 1
    with open(path, "rb") as f:
        while start < size:
            stop = min(size, start + chunk_bytes)
            if stop < size:
                f.seek(stop)
                rest = f.readline()  # move the cut to the end of the line it falls in
                stop += len(rest)
            f.seek(start)
            lines = 0
            remaining = stop - start
            while remaining > 0:
                block = f.read(min(_READ_BLOCK, remaining))
                lines += block.count(b"\n")
                remaining -= len(block)
            units.append(ReadUnit(path, "jsonl", start, stop, line))
            start, line = stop, line + lines
    return units


def _parquet_units(path: str, chunk_bytes: int) -> list[ReadUnit]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    units: list[ReadUnit] = []
    first_group, first_row, acc_bytes, row = 0, 0, 0, 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        acc_bytes += group.total_byte_size
        row += group.num_rows
        if acc_bytes >= chunk_bytes or g == meta.num_row_groups - 1:
            units.append(ReadUnit(path, "parquet", first_group, g + 1, first_row))
            first_group, first_row, acc_bytes = g + 1, row, 0
    return units or [ReadUnit(path, "parquet", 0, 0, 0)]


def plan_row_ranges(path: str, kind: str, rows: int, total_bytes: int, target_units: int) -> list[ReadUnit]:
    """Row ranges of a `datasets` dataset (hf) or of inline rows, cut as local files are: about
    total_bytes / target_units each, within MIN/MAX_CHUNK_BYTES."""
    if rows == 0:
        return [ReadUnit(path, kind, 0, 0, 0)]
    chunk_bytes = min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, math.ceil(total_bytes / max(1, target_units))))
    step = max(1, min(rows, math.ceil(rows * chunk_bytes / max(1, total_bytes))))
    return [ReadUnit(path, kind, start, min(rows, start + step), start) for start in range(0, rows, step)]


def read_unit(
    unit: ReadUnit, source: SourceConfig | None = None, batch_rows: int = _ROWS_PER_BATCH
) -> Iterator[dict[str, list[Any]]]:
    """Yield raw-row batches {row_id: [...], raw: [...]} of up to `batch_rows` rows for one read
    unit. hf and inline units need the `source` they were planned from."""
    if unit.kind in ("hf", "inline"):
        assert source is not None, f"a {unit.kind} read unit is read with its source"
        if unit.kind == "hf":
            yield from _read_hf_range(unit, source, batch_rows)
        else:
            yield from _read_inline_range(unit, source, batch_rows)
    elif unit.kind == "jsonl":
        yield from _read_jsonl(unit, batch_rows)
    elif unit.kind == "parquet":
        yield from _read_parquet(unit, batch_rows)
    elif unit.kind == "csv":
        yield from _read_csv(unit, batch_rows)
    else:
        yield from _read_json_array(unit, batch_rows)


def _read_jsonl(unit: ReadUnit, batch_rows: int) -> Iterator[dict[str, list[Any]]]:
    ids: list[str] = []
    raws: list[bytes] = []
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        position, line = unit.start, unit.first_index
        while position < unit.stop:
            data = f.readline()
            if not data:
                break
            position += len(data)
            if line == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]  # a UTF-8 byte-order mark is not part of the first row
            if data.strip():  # blank lines are not rows
                ids.append(f"{unit.path}:{line}")
                raws.append(data.rstrip(b"\r\n"))
                if len(ids) == batch_rows:
                    yield {"row_id": ids, "raw": raws}
                    ids, raws = [], []
            line += 1
    if ids:
        yield {"row_id": ids, "raw": raws}


def _read_parquet(unit: ReadUnit, batch_rows: int) -> Iterator[dict[str, list[Any]]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit.path)
    index = unit.first_index
    groups = list(range(unit.start, unit.stop))
    if not groups:
        return
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups):
        rows = batch.to_pylist()
        yield {
            "row_id": [f"{unit.path}#{index + i}" for i in range(len(rows))],
            "raw": [encode_row(r) for r in rows],
        }
        index += len(rows)


def _read_csv(unit: ReadUnit, batch_rows: int) -> Iterator[dict[str, list[Any]]]:
    import pyarrow.csv as pcsv

    index = 0
    try:
        # Every column as text: a CSV cell has no type, and "001" must stay "001".
        names = pcsv.open_csv(unit.path).schema.names
        reader = pcsv.open_csv(
            unit.path,
            convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names}),
        )
        for batch in reader:
            for begin in range(0, batch.num_rows, batch_rows):
                rows = batch.slice(begin, batch_rows).to_pylist()
                yield {
                    "row_id": [f"{unit.path}#{index + i}" for i in range(len(rows))],
                    "raw": [encode_row(r) for r in rows],
                }
                index += len(rows)
    except pa.ArrowInvalid as e:
        raise DataError(f"{unit.path}: CSV parse error after data row {index}: {e}") from e


def _read_json_array(unit: ReadUnit, batch_rows: int) -> Iterator[dict[str, list[Any]]]:
    try:
        with open(unit.path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{unit.path}: not valid UTF-8 at byte {e.start}") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{unit.path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]  # {"data": [...]} wrappers are common
    if not isinstance(data, list):
        raise DataError(
            f"{unit.path}: expected a JSON array of rows (or JSON Lines), got {type(data).__name__}"
        )
    for begin in range(0, len(data), batch_rows):
        part = data[begin : begin + batch_rows]
        yield {
            "row_id": [f"{unit.path}#{begin + i}" for i in range(len(part))],
            "raw": [encode_row(r) for r in part],
        }


def _read_hf_range(unit: ReadUnit, source: SourceConfig, batch_rows: int) -> Iterator[dict[str, list[Any]]]:
    """Rows [start, stop) of a save_to_disk or hub dataset, opened in this worker from its config
    (memory-mapped Arrow files; nothing of it is shipped from the driver), ids `name#INDEX`."""
    dataset = _open_hf_dataset(source.path, source.split, source.subset, source.data_dir, source.revision)
    if len(dataset) < unit.stop:
        raise DataError(
            f"{source.describe()}: has {len(dataset)} rows here but {unit.stop} or more when the read was "
            "planned (did it change during the run?)"
        )
    part = dataset.select(range(unit.start, unit.stop)).with_format("arrow")
    index = unit.first_index
    name = source.describe()
    for begin in range(0, len(part), batch_rows):
        rows = part[begin : begin + batch_rows].to_pylist()
        yield {
            "row_id": [f"{name}#{index + i}" for i in range(len(rows))],
            "raw": [encode_row(r) for r in rows],
        }
        index += len(rows)


@functools.lru_cache(maxsize=4)
def _open_hf_dataset(
    path: str | None, split: str, subset: str | None, data_dir: str | None, revision: str | None
) -> Any:
    # Ray reuses worker processes across tasks: each opens a dataset once (a hub dataset from this
    # node's datasets cache, downloading it there if this node has not got it).
    source = SourceConfig(path=path, split=split, subset=subset, data_dir=data_dir, revision=revision)
    return load_hf_dataset(source)


def _read_inline_range(
    unit: ReadUnit, source: SourceConfig, batch_rows: int
) -> Iterator[dict[str, list[Any]]]:
    assert source.rows is not None
    for begin in range(unit.start, unit.stop, batch_rows):
        batch = inline_batches(source.rows[begin : min(unit.stop, begin + batch_rows)])
        batch["row_id"] = [f"rows[{begin + i}]" for i in range(len(batch["raw"]))]
        yield batch


def encode_row(row: Any) -> bytes:
    """A typed row as JSON text; values JSON cannot hold (bytes, timestamps) become strings."""
    return json.dumps(row, ensure_ascii=False, default=str).encode("utf-8")


def inline_batches(rows: list[Any]) -> dict[str, list[Any]]:
    return {"row_id": [f"rows[{i}]" for i in range(len(rows))], "raw": [encode_row(r) for r in rows]}


def load_hf_dataset(source: SourceConfig) -> Any:
    """A `datasets.Dataset` from a save_to_disk directory or the hub (the real loading code; needs
    network access for hub ids)."""
    import datasets

    assert source.path is not None
    if is_saved_dataset(source.path):
        loaded = datasets.load_from_disk(source.path)
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise DataError(f"{source.path}: no split {source.split!r}; it has {sorted(loaded)}")
            loaded = loaded[source.split]
        return loaded
    try:
        return datasets.load_dataset(
            source.path,
            name=source.subset,
            data_dir=source.data_dir,
            split=source.split,
            revision=source.revision,
        )
    except Exception as e:  # the hub client raises many types; the message is what matters
        raise DataError(
            f"{source.path}: could not load it as a local path or a Hugging Face hub dataset "
            f"(split={source.split!r}, subset={source.subset!r}, data_dir={source.data_dir!r}): {e}"
        ) from e


def fingerprint(
    source: SourceConfig, *, hf_dataset: Any = None, files: list[tuple[str, str]] | None = None
) -> dict[str, Any]:
    """What identifies a source's content for the prepared-data cache key. Local sources pass the
    `files` already listed for reading, so the fingerprint covers exactly what is read."""
    if source.rows is not None:
        digest = hashlib.sha256(json.dumps(source.rows, sort_keys=True, default=str).encode()).hexdigest()
        return {"rows": digest}
    if hf_dataset is not None:
        return {
            "dataset": source.path,
            "split": source.split,
            "subset": source.subset,
            "data_dir": source.data_dir,
            "revision": source.revision,
            "fingerprint": getattr(hf_dataset, "_fingerprint", None),
        }
    # Local files: size and modification time, as build tools do; rewriting a file changes mtime.
    assert files is not None, "a local source is fingerprinted from the files listed for reading"
    return {"files": [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p, _ in files]}
