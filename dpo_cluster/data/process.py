"""The per-batch work of the data pipeline, run inside Ray Data tasks: raw rows -> output rows.

Each raw row is parsed, normalized, assigned a split, drawn by its source's weight and tokenized,
and leaves as one output row, kept or carrying its drop reason, plus the copies its weight asks
for (in a partition of their own), so the counts read back from what is written always add up to
the rows read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from dpo_cluster.config import SourceConfig
from dpo_cluster.config.specs import FormatSpec, TokenizeSpec
from dpo_cluster.data import sources
from dpo_cluster.data.formats import normalize_row, prompt_key
from dpo_cluster.data.records import DEFECT_REASONS, DataError, DropRow, Pair, TokenizedPair
from dpo_cluster.data.tokenize import PairTokenizer

KEPT = "kept"
SPLITS = ("train", "eval")
# The `source` partition of the copies a weight > 1 makes: "train-0" + COPIES.
COPIES = "-copies"
# Copy j >= 1 of a row has the id ROW_ID~j.
COPY_MARK = "~"

OUTPUT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),  # source_label(role, position), + COPIES for copies
        ("status", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.binary()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
        ("notes", pa.list_(pa.string())),
    ]
)


@dataclass(frozen=True)
class TokenizerRef:
    """How to load the tokenizer, in the driver and in every Ray Data worker."""

    name_or_path: str
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ProcessSpec:
    """Everything `process_batch` needs; picklable and hashable."""

    role: str  # which configured split the rows come from: train | eval
    fmt: str  # the format detected (or configured) for this source
    format_spec: FormatSpec
    tokenize_spec: TokenizeSpec
    tokenizer: TokenizerRef
    eval_fraction: float
    split_seed: int
    on_bad_row: str
    position: int = 0  # the source's index in data.{role} (0 for a single source)
    weight: float = 1.0  # the source's mixing weight

    @property
    def label(self) -> str:
        return source_label(self.role, self.position)


def source_label(role: str, position: int) -> str:
    """The `source` partition value of the rows of data.{role}[position]: "train-0"."""
    return f"{role}-{position}"


def draw_copies(weight: float, seed: int, role: str, position: int, row_id: str) -> int:
    """How many times a row of a source with `weight` is kept: floor(weight), plus one with
    probability frac(weight), drawn from a stable hash of (seed, role, position, row id), so the
    draw depends on nothing else (worker count, blocks, row order, other rows)."""
    whole = math.floor(weight)
    fraction = weight - whole
    if fraction == 0:
        return whole
    key = f"{role}\0{position}\0{row_id}".encode()
    digest = hashlib.blake2b(key, digest_size=8, person=seed.to_bytes(8, "little", signed=True)).digest()
    return whole + (int.from_bytes(digest, "little") / 2**64 < fraction)


def assign_split(key: bytes, eval_fraction: float, seed: int) -> str:
    """Deterministic train/eval assignment from a stable hash of `key` (the prompt), independent
    of worker count, block boundaries and row order."""
    if eval_fraction <= 0:
        return "train"
    digest = hashlib.blake2b(key, digest_size=8, person=seed.to_bytes(8, "little", signed=True)).digest()
    return "eval" if int.from_bytes(digest, "little") / 2**64 < eval_fraction else "train"


@functools.lru_cache(maxsize=4)
def _pair_tokenizer(ref: TokenizerRef, spec: TokenizeSpec) -> PairTokenizer:
    # Ray reuses worker processes across tasks, so each process loads the tokenizer once.
    return PairTokenizer(load_tokenizer(ref), spec)


def load_tokenizer(ref: TokenizerRef) -> Any:
    from dpo_cluster.modeling import load_tokenizer as load

    try:
        return load(ref.name_or_path, revision=ref.revision, trust_remote_code=ref.trust_remote_code)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "cannot load this"
        raise DataError(f"cannot load the tokenizer from {ref.name_or_path!r}: {e}") from e


def parse_raw(raw: bytes) -> Any:
    """Raw bytes of one row -> the decoded JSON value. Raises DropRow."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DropRow("undecodable_text", f"invalid UTF-8 at byte {e.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DropRow("invalid_json", f"column {e.colno}: {e.msg}") from None


def process_batch(batch: pa.Table, spec: ProcessSpec) -> pa.Table:
    """Raw rows (row_id, raw) -> output rows (OUTPUT_SCHEMA), one per input row, in order."""
    row_ids: list[str] = batch.column("row_id").to_pylist()
    raws: list[bytes] = batch.column("raw").to_pylist()
    splits: list[str] = []
    drops: list[DropRow | None] = []
    pairs: list[Pair] = []
    pair_rows: list[int] = []
    for i, raw in enumerate(raws):
        try:
            pair = normalize_row(parse_raw(raw), spec.fmt, spec.format_spec)
        except DropRow as drop:
            drops.append(drop)
            key = raw  # no prompt known: the raw bytes still give a stable split
        else:
            drops.append(None)
            pairs.append(pair)
            pair_rows.append(i)
            key = prompt_key(pair).encode("utf-8")
        splits.append(
            "eval" if spec.role == "eval" else assign_split(key, spec.eval_fraction, spec.split_seed)
        )

    copies = [1] * len(raws)
    if spec.weight != 1.0:
        # Drawn before tokenizing, so a down-weighted source is not tokenized in full; defects
        # found by parsing keep their reason whatever the draw.
        drawn_pairs, drawn_rows = [], []
        for pair, i in zip(pairs, pair_rows):
            copies[i] = draw_copies(spec.weight, spec.split_seed, spec.role, spec.position, row_ids[i])
            if copies[i] == 0:
                drops[i] = DropRow(
                    "not_sampled", f"weight {spec.weight:g}: not drawn (data.split_seed {spec.split_seed})"
                )
            else:
                drawn_pairs.append(pair)
                drawn_rows.append(i)
        pairs, pair_rows = drawn_pairs, drawn_rows

    tokenized: list[TokenizedPair | None] = [None] * len(raws)
    if pairs:
        results = _pair_tokenizer(spec.tokenizer, spec.tokenize_spec).tokenize(pairs)
        for i, result in zip(pair_rows, results):
            if isinstance(result, DropRow):
                drops[i] = result
            else:
                tokenized[i] = result

    if spec.on_bad_row == "fail":
        for row_id, drop in zip(row_ids, drops):
            if drop is not None and drop.reason in DEFECT_REASONS:
                raise DataError(
                    f"{row_id}: {drop.reason}: {drop.detail} (data.on_bad_row is 'fail'; set it to 'skip' "
                    "to drop and count such rows instead)"
                )
    return _output_table(row_ids, splits, raws, drops, tokenized, copies, spec.label)


def _output_table(
    row_ids: list[str],
    splits: list[str],
    raws: list[bytes],
    drops: list[DropRow | None],
    tokenized: list[TokenizedPair | None],
    copies: list[int],
    label: str,
) -> pa.Table:
    """One OUTPUT_SCHEMA row per input row (the ids of a kept row, the raw bytes of a dropped
    one), then the extra copies of kept rows, after them and under the copies' source label."""
    columns: dict[str, list[Any]] = {name: [] for name in OUTPUT_SCHEMA.names}

    def kept(row_id: str, split: str, t: TokenizedPair, source: str) -> None:
        columns["row_id"].append(row_id)
        columns["split"].append(split)
        columns["source"].append(source)
        columns["status"].append(KEPT)
        columns["detail"].append("")
        columns["raw"].append(b"")
        columns["prompt_ids"].append(t.prompt_ids)
        columns["chosen_ids"].append(t.chosen_ids)
        columns["rejected_ids"].append(t.rejected_ids)
        columns["notes"].append(sorted(t.notes))

    for i, drop in enumerate(drops):
        t = tokenized[i]
        if drop is not None:
            columns["row_id"].append(row_ids[i])
            columns["split"].append(splits[i])
            columns["source"].append(label)
            columns["status"].append(drop.reason)
            columns["detail"].append(drop.detail)
            # A row not drawn is fine as it is and stays out of quarantine: no need to carry it.
            columns["raw"].append(b"" if drop.reason == "not_sampled" else raws[i])
            for name in ("prompt_ids", "chosen_ids", "rejected_ids", "notes"):
                columns[name].append([])
        else:
            assert t is not None  # a row not dropped was tokenized
            kept(row_ids[i], splits[i], t, label)
    for i, t in enumerate(tokenized):
        if t is not None:
            for j in range(1, copies[i]):
                kept(f"{row_ids[i]}{COPY_MARK}{j}", splits[i], t, label + COPIES)
    return pa.table(columns, schema=OUTPUT_SCHEMA)


def read_and_process(
    units: pa.Table,
    specs: tuple[ProcessSpec, ...],
    sources_by_index: tuple[SourceConfig, ...],
    batch_size: int,
) -> Iterator[pa.Table]:
    """Read units (one per row, `source_index` naming their source in `specs` and
    `sources_by_index`) -> output rows, `batch_size` rows at a time.

    Reading and processing are one stage on purpose: were they two `map_batches`, Ray Data would
    fuse them and bundle read units up to the processing batch size, so a handful of large
    units would all run in one task instead of one task per unit."""
    for unit in units.to_pylist():
        index = unit.pop("source_index")
        spec, source = specs[index], sources_by_index[index]
        for raw in sources.read_unit(sources.ReadUnit(**unit), source):
            table = pa.table(raw, schema=sources.RAW_SCHEMA)
            for offset in range(0, table.num_rows, batch_size):
                yield process_batch(table.slice(offset, batch_size), spec)
