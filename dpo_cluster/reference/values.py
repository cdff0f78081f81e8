"""Reference log-probs by row position: the fragments the reference stage writes, and their reader.

A split's values live in one directory as fragments, `<seq>-<id>.parquet`, each holding
`position` (int64, the row's place in the prepared split: files in name order, rows in file order)
and the two float32 reference columns. A fragment is written under a temporary name and renamed,
so one that exists is whole; the union of a directory's fragments is what is scored. Training
workers hold every value of their split (`ReferenceValues`, 9 bytes a pair: 90 MB at 10M pairs)
and read token ids only for their own rows; while the stage still scores beside training, a
worker waits for the positions it needs, and the stage's status file tells it if none will come.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_cluster.batch.collate import REF_COLUMNS

POSITION = "position"
FRAGMENT_GLOB = "*.parquet"
# How often a waiting worker looks for new fragments.
POLL_SECONDS = 0.2


def write_fragment(
    directory: Path, seq: int, positions: np.ndarray, chosen: np.ndarray, rejected: np.ndarray
) -> Path:
    """Write one fragment of scored positions into `directory` (created if missing); -> its path."""
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            POSITION: pa.array(np.asarray(positions, np.int64)),
            REF_COLUMNS[0]: pa.array(np.asarray(chosen, np.float32)),
            REF_COLUMNS[1]: pa.array(np.asarray(rejected, np.float32)),
        }
    )
    name = f"{seq:08d}-{uuid.uuid4().hex[:8]}"
    partial = directory / f".{name}.tmp"
    pq.write_table(table, partial)
    final = directory / f"{name}.parquet"
    partial.rename(final)
    return final


def scored_positions(directory: Path, num_rows: int) -> np.ndarray:
    """(num_rows,) bool: which positions the fragments in `directory` hold (none if it is missing)."""
    covered = np.zeros(num_rows, dtype=bool)
    for path in sorted(Path(directory).glob(FRAGMENT_GLOB)) if Path(directory).is_dir() else []:
        positions = pq.read_table(path, columns=[POSITION]).column(0).to_numpy()
        _check_range(positions, num_rows, path)
        covered[positions] = True
    return covered


def write_status(path: Path, state: str, message: str = "") -> None:
    """The reference stage's state for waiting workers: running | done | stopped | failed."""
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(json.dumps({"state": state, "message": message}) + "\n")
    partial.rename(path)


def read_status(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"state": "running", "message": ""}  # not written yet, or being replaced


class ReferenceValues:
    """Every scored value of one split, by position; `lookup` gives a batch's.

    directory: the split's fragment directory.
    num_rows: the prepared split's rows.
    status: the stage's status file while it scores beside training: `lookup` then waits for
        positions not scored yet, and raises when the stage failed or ended without them. None:
        every value must be there already.
    """

    def __init__(self, directory: Path, num_rows: int, status: Path | None = None) -> None:
        self.directory = Path(directory)
        self.num_rows = num_rows
        self.status = status
        self.chosen = np.zeros(num_rows, dtype=np.float32)
        self.rejected = np.zeros(num_rows, dtype=np.float32)
        self.known = np.zeros(num_rows, dtype=bool)
        self.loaded: set[str] = set()
        self.waited_seconds = 0.0
        self.refresh()

    def refresh(self) -> int:
        """Read fragments not read yet; -> how many."""
        if not self.directory.is_dir():
            return 0
        new = sorted(p for p in self.directory.glob(FRAGMENT_GLOB) if p.name not in self.loaded)
        for path in new:
            table = pq.read_table(path)
            positions = table.column(POSITION).to_numpy()
            _check_range(positions, self.num_rows, path)
            self.chosen[positions] = table.column(REF_COLUMNS[0]).to_numpy()
            self.rejected[positions] = table.column(REF_COLUMNS[1]).to_numpy()
            self.known[positions] = True
            self.loaded.add(path.name)
        return len(new)

    def lookup(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """{ref_chosen_logps, ref_rejected_logps}: (B,) float32 each, for the rows at `positions`."""
        positions = np.asarray(positions, dtype=np.int64)
        started = time.perf_counter()
        while not self.known[positions].all():
            if self.refresh():
                continue
            missing = int((~self.known[positions]).sum())
            state = read_status(self.status) if self.status is not None else {"state": "done", "message": ""}
            if state["state"] == "failed":
                raise RuntimeError(f"reference stage failed: {state['message']}")
            if state["state"] != "running" and not self.refresh():
                raise ValueError(
                    f"{self.directory}: no reference log-probs for {missing} of {len(positions)} rows of "
                    f"this batch (e.g. position {int(positions[~self.known[positions]][0])}); "
                    f"{int(self.known.sum())} of {self.num_rows} rows are scored"
                )
            time.sleep(POLL_SECONDS)
        self.waited_seconds += time.perf_counter() - started
        return {REF_COLUMNS[0]: self.chosen[positions], REF_COLUMNS[1]: self.rejected[positions]}


def _check_range(positions: np.ndarray, num_rows: int, path: Path) -> None:
    if len(positions) and (positions.min() < 0 or positions.max() >= num_rows):
        raise ValueError(f"{path}: positions outside the split's {num_rows} rows: not this split's values")
