"""Accounting for every row the pipeline read: data_report.json and quarantine.jsonl.

Counts are read back from the Parquet the pipeline wrote (partitioned by split and status), not
tallied on the way, so rows_in == rows_kept + sum(dropped) holds by construction; it is also
asserted.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpo_cluster.data.process import KEPT, SPLITS
from dpo_cluster.data.records import DEFECT_REASONS, NOTES, DataError

REPORT_FILE = "data_report.json"
QUARANTINE_FILE = "quarantine.jsonl"
_EXAMPLES_PER_REASON = 5


def build_report(staging: Path, output_dir: Path) -> dict[str, Any]:
    """Count rows per split and status from the Parquet written under `staging`; write
    output_dir/quarantine.jsonl (every dropped row, its reason and its raw text)."""
    parts = _partitions(staging)
    quarantine = sorted(
        _quarantine_rows(parts), key=lambda q: (q["split"], q["reason"], _natural_key(q["row_id"]))
    )
    splits: dict[str, Any] = {}
    for split in SPLITS:
        dropped: Counter[str] = Counter()
        kept = 0
        for (part_split, status), files in parts.items():
            if part_split != split:
                continue
            count = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
            if status == KEPT:
                kept = count
            else:
                dropped[status] += count
        stats = {
            "rows_in": kept + sum(dropped.values()),
            "rows_kept": kept,
            "dropped": dict(sorted(dropped.items())),
            **_kept_stats(parts.get((split, KEPT), [])),
            "examples": _examples(quarantine, split),
        }
        assert stats["rows_in"] == stats["rows_kept"] + sum(stats["dropped"].values())
        splits[split] = stats
    with open(output_dir / QUARANTINE_FILE, "w", encoding="utf-8") as f:
        for q in quarantine:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    return {"splits": splits}


def write_report(output_dir: Path, report: dict[str, Any]) -> None:
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def check_bad_fraction(report: dict[str, Any], max_bad_fraction: float, output_dir: Path) -> None:
    """Fail if any split has more defective rows than data.max_bad_fraction allows."""
    for split, stats in report["splits"].items():
        defects = {r: n for r, n in stats["dropped"].items() if r in DEFECT_REASONS}
        bad = sum(defects.values())
        if stats["rows_in"] == 0 or bad / stats["rows_in"] <= max_bad_fraction:
            continue
        worst = sorted(defects.items(), key=lambda kv: -kv[1])[:3]
        reasons = "; ".join(
            f"{reason} x{count} (e.g. {', '.join(stats['examples'].get(reason, [])[:3])})"
            for reason, count in worst
        )
        raise DataError(
            f"{split}: {bad} of {stats['rows_in']} rows ({bad / stats['rows_in']:.1%}) are defective, more than "
            f"data.max_bad_fraction={max_bad_fraction}. Worst: {reasons}. Every dropped row is in "
            f"{output_dir / QUARANTINE_FILE}; counts are in {output_dir / REPORT_FILE}."
        )


def _partitions(staging: Path) -> dict[tuple[str, str], list[Path]]:
    parts: dict[tuple[str, str], list[Path]] = {}
    for status_dir in staging.glob("split=*/status=*"):
        split = status_dir.parent.name.split("=", 1)[1]
        status = status_dir.name.split("=", 1)[1]
        parts[(split, status)] = sorted(status_dir.glob("*.parquet"))
    return parts


def _quarantine_rows(parts: dict[tuple[str, str], list[Path]]) -> list[dict[str, Any]]:
    rows = []
    for (split, status), files in parts.items():
        if status == KEPT or split not in SPLITS:
            continue
        for f in files:
            for row in pq.read_table(f, columns=["row_id", "detail", "raw"]).to_pylist():
                rows.append(
                    {
                        "row_id": row["row_id"],
                        "split": split,
                        "reason": status,
                        "detail": row["detail"],
                        "raw": row["raw"].decode("utf-8", errors="backslashreplace"),
                    }
                )
    return rows


def _examples(quarantine: list[dict[str, Any]], split: str) -> dict[str, list[str]]:
    """The first few row ids of each drop reason in `split` (quarantine order)."""
    examples: dict[str, list[str]] = {}
    for q in quarantine:
        if q["split"] == split and len(examples.setdefault(q["reason"], [])) < _EXAMPLES_PER_REASON:
            examples[q["reason"]].append(q["row_id"])
    return examples


def _kept_stats(files: list[Path]) -> dict[str, Any]:
    """Note counts and token-length statistics of kept rows."""
    notes = dict.fromkeys(NOTES, 0)
    tokens: dict[str, Any] = {}
    if not files:
        return {"notes": notes, "tokens": tokens}
    table = pa.concat_tables(
        [pq.read_table(f, columns=["prompt_ids", "chosen_ids", "rejected_ids", "notes"]) for f in files]
    )
    for note, count in Counter(pc.list_flatten(table.column("notes")).to_pylist()).items():
        notes[note] = count
    for name in ("prompt", "chosen", "rejected"):
        lengths = pc.list_value_length(table.column(f"{name}_ids"))
        tokens[name] = {
            "mean": round(pc.mean(lengths).as_py(), 2),
            "max": pc.max(lengths).as_py(),
            "total": pc.sum(lengths).as_py(),
        }
    return {"notes": notes, "tokens": tokens}


def _natural_key(row_id: str) -> tuple[Any, ...]:
    # "a.jsonl:10" sorts after "a.jsonl:9"
    head, _, tail = row_id.rpartition(":") if ":" in row_id else row_id.rpartition("#")
    return (head, int(tail)) if tail.isdigit() else (row_id, 0)
