"""Accounting for every row the pipeline read: data_report.json and quarantine.jsonl.

Counts are read back from the Parquet the pipeline wrote (partitioned by split, source and
status), not tallied on the way, so rows_in == rows_kept + sum(dropped) holds by construction; it
is also asserted. Rows are read in Ray tasks, one per written file, which hand the driver small
summaries (token-length sums, sorted quarantine files), so the driver's memory does not grow with
the split.
"""

from __future__ import annotations

import functools
import heapq
import json
import operator
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dpo_cluster.data.process import COPIES, KEPT, SPLITS
from dpo_cluster.data.records import DEFECT_REASONS, NOTES, DataError

REPORT_FILE = "data_report.json"
QUARANTINE_FILE = "quarantine.jsonl"
_EXAMPLES_PER_REASON = 5
# Rows of this reason are counted and given examples but not written to quarantine.jsonl: they
# are well-formed rows a weight left out, as many as the source has, nothing to inspect.
_UNQUARANTINED = "not_sampled"
# Sorted quarantine runs merged at once (open files); more are merged in rounds of Ray tasks.
_MERGE_FANIN = 64
_TOKEN_FIELDS = ("prompt", "chosen", "rejected")

Partitions = dict[tuple[str, str, str], list[Path]]
"""(split, source, status) -> the Parquet files written there, in name order."""


def partitions(staging: Path) -> Partitions:
    """The files the pipeline wrote under `staging` (split=*/source=*/status=*)."""
    parts: Partitions = {}
    for status_dir in sorted(staging.glob("split=*/source=*/status=*")):
        key = tuple(
            d.name.split("=", 1)[1] for d in (status_dir.parent.parent, status_dir.parent, status_dir)
        )
        parts[key] = sorted(status_dir.glob("*.parquet"))  # type: ignore[index]
    return parts


def build_report(staging: Path, output_dir: Path, *, with_copies: bool = False) -> dict[str, Any]:
    """Count rows per split and status from the Parquet written under `staging`; write
    output_dir/quarantine.jsonl (every dropped row but not_sampled ones, its reason and its raw
    text, ordered by split, reason and row id). `with_copies` adds each split's count of copies
    made by source weights (rows_in and rows_kept include them: they are rows of the split)."""
    parts = partitions(staging)
    examples = _write_quarantine(parts, output_dir / QUARANTINE_FILE, staging / ".quarantine")
    splits: dict[str, Any] = {}
    for split in SPLITS:
        dropped: Counter[str] = Counter()
        kept = copies = 0
        for (part_split, source, status), files in parts.items():
            if part_split != split:
                continue
            count = _num_rows(files)
            if status == KEPT:
                kept += count
                copies += count if source.endswith(COPIES) else 0
            else:
                dropped[status] += count
        stats: dict[str, Any] = {
            "rows_in": kept + sum(dropped.values()),
            "rows_kept": kept,
            "dropped": dict(sorted(dropped.items())),
        }
        if with_copies:
            stats["copies"] = copies
        kept_files = [
            f for (s, _, status), files in parts.items() if s == split and status == KEPT for f in files
        ]
        stats.update(_kept_stats(kept_files))
        stats["examples"] = examples.get(split, {})
        assert stats["rows_in"] == stats["rows_kept"] + sum(stats["dropped"].values())
        splits[split] = stats
    return {"splits": splits}


def count_sources(staging: Path) -> dict[str, dict[str, Any]]:
    """Per source label ("train-0"): rows_in (rows read from it), rows_kept (of those), dropped
    ({reason: count}) and copies (extra kept rows its weight made), over all splits, from the
    files' metadata. rows_in == rows_kept + sum(dropped) for each."""
    out: dict[str, dict[str, Any]] = {}
    for (_, source, status), files in sorted(partitions(staging).items()):
        label = source.removesuffix(COPIES)
        counts = out.setdefault(label, {"rows_in": 0, "rows_kept": 0, "dropped": {}, "copies": 0})
        n = _num_rows(files)
        if status != KEPT:
            counts["dropped"][status] = counts["dropped"].get(status, 0) + n
            counts["rows_in"] += n
        elif source.endswith(COPIES):
            counts["copies"] += n
        else:
            counts["rows_kept"] += n
            counts["rows_in"] += n
    for counts in out.values():
        counts["dropped"] = dict(sorted(counts["dropped"].items()))
        assert counts["rows_in"] == counts["rows_kept"] + sum(counts["dropped"].values())
    return out


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


def _num_rows(files: list[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


@functools.cache
def _remote(fn: Callable[..., Any]) -> Any:
    import ray

    return ray.remote(fn)


def _submit(fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
    """Start fn(*args) as one Ray task per args; their object refs."""
    task = _remote(fn)
    return [task.remote(*args) for args in calls]


def _get(refs: list[Any]) -> list[Any]:
    import ray

    return ray.get(refs) if refs else []


def _run(fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
    """fn(*args) for each args, one Ray task each; the (small) results in order."""
    return _get(_submit(fn, calls)) if calls else []


# ---------------------------------------------------------------------------------------------
# quarantine.jsonl: each dropped file sorted in a task, then one streaming merge in the driver.


def _write_quarantine(parts: Partitions, path: Path, scratch: Path) -> dict[str, dict[str, list[str]]]:
    """Write `path` in (split, reason, natural row id) order; return the first few row ids of each
    reason per split, in that order."""
    groups: dict[tuple[str, str], list[Path]] = {}
    for (split, _, status), files in parts.items():
        if status != KEPT and split in SPLITS:
            groups.setdefault((split, status), []).extend(files)
    scratch.mkdir(parents=True, exist_ok=True)
    # Every file's task is started at once; the driver then merges one group at a time.
    pending = {}
    for (split, reason), files in groups.items():
        if reason == _UNQUARANTINED:
            pending[split, reason] = _submit(_first_ids, [(f,) for f in files])
        else:
            outputs = [scratch / f"{split}-{reason}-{i}.q" for i in range(len(files))]
            pending[split, reason] = _submit(
                _sort_dropped, [(f, split, reason, o) for f, o in zip(files, outputs)]
            )
    examples: dict[str, dict[str, list[str]]] = {}
    with open(path, "w", encoding="utf-8") as out:
        for (split, reason), refs in sorted(pending.items()):
            results = _get(refs)
            if reason == _UNQUARANTINED:
                firsts = (row_id for ids in results for row_id in ids)
                examples.setdefault(split, {})[reason] = heapq.nsmallest(
                    _EXAMPLES_PER_REASON, firsts, key=_natural_key
                )
                continue
            runs = _merge_down([Path(r) for r in results if r], scratch / f"{split}-{reason}")
            first: list[str] = []
            for row_id, line in _merged(runs):
                if len(first) < _EXAMPLES_PER_REASON:
                    first.append(row_id)
                out.write(line)
            if first:
                examples.setdefault(split, {})[reason] = first
    return examples


def _sort_dropped(parquet: Path, split: str, reason: str, output: Path) -> str | None:
    """Ray task: the dropped rows of one file as quarantine lines sorted by natural row id, each
    prefixed with its JSON-quoted row id and a tab (JSON text never holds a raw tab), into
    `output`; its path, or None for an empty file."""
    import pyarrow.parquet as pq

    table = pq.read_table(parquet, columns=["row_id", "detail", "raw"])
    if table.num_rows == 0:
        return None
    lines = []
    for row in table.to_pylist():
        q = {
            "row_id": row["row_id"],
            "split": split,
            "reason": reason,
            "detail": row["detail"],
            "raw": row["raw"].decode("utf-8", errors="backslashreplace"),
        }
        lines.append(
            (
                _natural_key(row["row_id"]),
                json.dumps(row["row_id"]) + "\t" + json.dumps(q, ensure_ascii=False) + "\n",
            )
        )
    del table
    lines.sort(key=operator.itemgetter(0))
    with open(output, "w", encoding="utf-8") as f:
        f.writelines(line for _, line in lines)
    return str(output)


def _first_ids(parquet: Path) -> list[str]:
    """Ray task: the first few row ids of one file, in natural order."""
    import pyarrow.parquet as pq

    ids = pq.read_table(parquet, columns=["row_id"]).column("row_id").to_pylist()
    return heapq.nsmallest(_EXAMPLES_PER_REASON, ids, key=_natural_key)


def _merge_down(runs: list[Path], stem: Path) -> list[Path]:
    """Merge sorted runs in Ray tasks, _MERGE_FANIN at a time, until one merge can take them all."""
    level = 0
    while len(runs) > _MERGE_FANIN:
        chunks = [runs[i : i + _MERGE_FANIN] for i in range(0, len(runs), _MERGE_FANIN)]
        outputs = [Path(f"{stem}-m{level}-{i}.q") for i in range(len(chunks))]
        runs = [Path(p) for p in _run(_merge_runs, list(zip(chunks, outputs)))]
        level += 1
    return runs


def _merge_runs(runs: list[Path], output: Path) -> str:
    """Ray task: merge sorted runs into one, in the same prefixed form."""
    with open(output, "w", encoding="utf-8") as f:
        for row_id, line in _merged(runs):
            f.write(json.dumps(row_id) + "\t" + line)
    for run in runs:
        os.remove(run)
    return str(output)


def _merged(runs: list[Path]) -> Iterator[tuple[str, str]]:
    """(row id, quarantine line) of sorted runs, merged by natural row id; stable across runs."""

    def read(run: Path) -> Iterator[tuple[tuple[Any, ...], str, str]]:
        with open(run, encoding="utf-8") as f:
            for record in f:
                head, _, line = record.partition("\t")
                row_id = json.loads(head)
                yield _natural_key(row_id), row_id, line

    for _, row_id, line in heapq.merge(*(read(r) for r in runs), key=operator.itemgetter(0)):
        yield row_id, line


# ---------------------------------------------------------------------------------------------
# Kept rows: per-file summaries in tasks, combined here.


def _kept_stats(files: list[Path]) -> dict[str, Any]:
    """Note counts and token-length statistics of kept rows."""
    notes = dict.fromkeys(NOTES, 0)
    tokens: dict[str, Any] = {}
    summaries = [s for s in _run(_summarize_kept, [(f,) for f in files]) if s["rows"]]
    if not summaries:
        return {"notes": notes, "tokens": tokens}
    for s in summaries:
        for note, count in s["notes"].items():
            notes[note] = notes.get(note, 0) + count
    for name in _TOKEN_FIELDS:
        count = sum(s["rows"] for s in summaries)
        total = sum(s["tokens"][name]["total"] for s in summaries)
        tokens[name] = {
            "mean": round(total / count, 2),
            "max": max(s["tokens"][name]["max"] for s in summaries),
            "total": total,
        }
    return {"notes": notes, "tokens": tokens}


def _summarize_kept(parquet: Path) -> dict[str, Any]:
    """Ray task: rows, note counts and per field token-length total and max of one kept file."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(parquet, columns=[f"{n}_ids" for n in _TOKEN_FIELDS] + ["notes"])
    summary: dict[str, Any] = {"rows": table.num_rows, "notes": {}, "tokens": {}}
    if table.num_rows == 0:
        return summary
    counts = pc.value_counts(pc.list_flatten(table.column("notes"))).to_pylist()
    summary["notes"] = {c["values"]: c["counts"] for c in counts}
    for name in _TOKEN_FIELDS:
        lengths = pc.list_value_length(table.column(f"{name}_ids"))
        summary["tokens"][name] = {"total": pc.sum(lengths).as_py(), "max": pc.max(lengths).as_py()}
    return summary


def _natural_key(row_id: str) -> tuple[Any, ...]:
    # "a.jsonl:10" sorts after "a.jsonl:9"
    head, _, tail = row_id.rpartition(":") if ":" in row_id else row_id.rpartition("#")
    return (head, int(tail)) if tail.isdigit() else (row_id, 0)
