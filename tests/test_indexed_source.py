"""The position-indexed training reader on a real prepared split (Ray Data prepare, row layout
written by Ray tasks): a real global shuffle, each worker reading only its own rows, worker-count
independent steps, and a resume that starts at its position without reading the rows before it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dpo_cluster.batch.packing import INDEX_COLUMN
from dpo_cluster.batch.token_budget import TokenBudget
from dpo_cluster.data.layout import rows_dir
from dpo_cluster.data.pipeline import PreparedData, prepare
from dpo_cluster.data.samples import SAMPLE_FILE
from dpo_cluster.train.context import WorkerContext
from dpo_cluster.train.indexed_source import IndexedPairSource
from tests.test_train_local import train_config

MICRO = 4


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> PreparedData:
    # The sample pairs as three files: several Parquet files per split, so positions span files.
    root = tmp_path_factory.mktemp("indexed")
    lines = SAMPLE_FILE.read_text().splitlines(keepends=True)
    (root / "data").mkdir()
    for i in range(3):
        (root / "data" / f"part{i}.jsonl").write_text("".join(lines[i::3]))
    return prepare(train_config(root / "out", f"data.train={root / 'data'}"))


def _context(source: IndexedPairSource, rank: int, world: int) -> WorkerContext:
    return WorkerContext(
        rank=rank,
        world_size=world,
        local_rank=0,
        device=torch.device("cpu"),
        train=source,
        eval=None,
        report=lambda *a: None,
    )


def _source(prepared: PreparedData, seed: int = 3) -> IndexedPairSource:
    return IndexedPairSource(prepared.split_dir("train"), seed=seed)


def _epoch_row_ids(
    prepared: PreparedData, world: int, accumulation: int, epoch: int = 0, **kwargs: Any
) -> tuple[list[list[str]], list[IndexedPairSource]]:
    """Row ids of every global step of an epoch, gathered over `world` workers, and their sources."""
    sources = [_source(prepared) for _ in range(world)]
    per_worker = [
        list(_context(s, rank, world).my_steps(s, MICRO, accumulation, epoch, **kwargs))
        for rank, s in enumerate(sources)
    ]
    steps = [
        sorted(r for rank in range(world) for b in per_worker[rank][i] for r in b["row_id"])
        for i in range(len(per_worker[0]))
    ]
    return steps, sources


def test_the_layout_holds_every_kept_row_in_the_prepared_order(prepared: PreparedData) -> None:
    split_dir = prepared.split_dir("train")
    parquet = sorted(split_dir.glob("*.parquet"))
    assert len(parquet) > 1
    assert sorted(p.name for p in rows_dir(prepared.prepared_dir, "train").iterdir()) == sorted(
        f"{p.stem}{suffix}" for p in parquet for suffix in (".arrow", ".lengths.npy")
    )
    expected = pa.concat_tables([pq.read_table(f) for f in parquet])
    source = IndexedPairSource(split_dir, seed=0, shuffle=False)
    assert source.num_rows == expected.num_rows == prepared.report["splits"]["train"]["rows_kept"]
    everything = source.take(np.arange(source.num_rows))
    assert everything["row_id"] == expected.column("row_id").to_pylist()
    assert everything["chosen_ids"] == expected.column("chosen_ids").to_pylist()
    # The lengths the stream is cut by are those of the rows.
    (batch,) = list(source.index_batches(source.num_rows, 0))
    assert batch["prompt_length"].tolist() == [len(p) for p in everything["prompt_ids"]]
    assert batch["rejected_length"].tolist() == [len(r) for r in everything["rejected_ids"]]


def test_a_split_without_layout_reads_the_same_pairs(prepared: PreparedData, tmp_path: Path) -> None:
    plain = tmp_path / "train"
    plain.mkdir()
    for f in prepared.split_dir("train").glob("*.parquet"):
        (plain / f.name).write_bytes(f.read_bytes())
    ours, theirs = _source(prepared), IndexedPairSource(plain, seed=3)
    for a, b in zip(ours.iter_batches(MICRO, 1), theirs.iter_batches(MICRO, 1), strict=True):
        assert a == b


def test_an_epoch_is_a_seeded_global_permutation(prepared: PreparedData) -> None:
    source = _source(prepared)
    n = source.num_rows
    first, again, second = source.order(0), _source(prepared).order(0), source.order(1)
    assert sorted(first.tolist()) == list(range(n))
    assert (first == again).all() and not (first == second).all()
    # Global, not a buffer over file order: rows from the last file come up early in the epoch.
    last_file_start = (
        n - pq.ParquetFile(sorted(prepared.split_dir("train").glob("*.parquet"))[-1]).metadata.num_rows
    )
    assert (first[: n // 4] >= last_file_start).any()


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"length_group_window": 3, "seed": 5}, {"token_budget": TokenBudget(max_tokens=600)}],
    ids=["plain", "grouped", "token_budget"],
)
def test_each_worker_reads_its_share_and_steps_do_not_depend_on_the_worker_count(
    prepared: PreparedData, kwargs: dict[str, Any]
) -> None:
    one, (alone,) = _epoch_row_ids(prepared, world=1, accumulation=4, **kwargs)
    two, pair = _epoch_row_ids(prepared, world=2, accumulation=2, **kwargs)
    four, quad = _epoch_row_ids(prepared, world=4, accumulation=1, **kwargs)
    assert one == two == four and len(one) > 3
    used = sum(len(step) for step in one)
    assert alone.rows.rows_read == used
    # Each worker read its own rows only: shares add up to the rows used, none read twice.
    assert sum(s.rows.rows_read for s in pair) == used and sum(s.rows.rows_read for s in quad) == used
    if "token_budget" not in kwargs:  # a budget deals uneven micro-batches; fixed ones split evenly
        assert [s.rows.rows_read for s in quad] == [used // 4] * 4
    for sources in (pair, quad):
        share = [s.rows.bytes_read / s.rows.total_bytes for s in sources]
        assert sum(share) == pytest.approx(alone.rows.bytes_read / alone.rows.total_bytes, rel=0.05)
        assert max(share) < 1.6 / len(sources)


@pytest.mark.parametrize("kwargs", [{}, {"length_group_window": 3, "seed": 5}], ids=["plain", "grouped"])
def test_a_resume_mid_epoch_starts_at_its_position_and_reads_nothing_before(
    prepared: PreparedData, kwargs: dict[str, Any]
) -> None:
    whole, _ = _epoch_row_ids(prepared, world=2, accumulation=2, epoch=1, **kwargs)
    start = 2
    sources = [_source(prepared) for _ in range(2)]
    resumed = [
        list(_context(s, rank, 2).my_steps(s, MICRO, 2, 1, start_step=start, **kwargs))
        for rank, s in enumerate(sources)
    ]
    steps = [
        sorted(r for rank in range(2) for b in resumed[rank][i] for r in b["row_id"])
        for i in range(len(resumed[0]))
    ]
    assert steps == whole[start:]
    # Nothing of the first steps was fetched: the rows read are exactly the later steps' rows.
    assert sum(s.rows.rows_read for s in sources) == sum(len(step) for step in whole[start:])


def test_index_batches_carry_no_token_ids(prepared: PreparedData) -> None:
    source = _source(prepared)
    batch = next(source.index_batches(MICRO, 0))
    assert set(batch) == {INDEX_COLUMN, "prompt_length", "chosen_length", "rejected_length"}
    assert source.rows.rows_read == 0 and source.rows.bytes_read == 0
