"""The prepare driver at scale: the rows of a split never pass through the driver, and
save_to_disk / hub datasets are read in parallel tasks with the row ids they always had.

The memory check runs `prepare` in a fresh process joined to the session's Ray, so pyarrow's
peak allocation (`max_memory`, which cannot be reset) starts from zero there, and tracemalloc,
started after a small warm-up run (imports, tokenizer), counts what the big run allocates.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from dpo_cluster.config import load_config
from dpo_cluster.data import sources
from dpo_cluster.data.pipeline import QUARANTINE_FILE, prepare

_WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "by",
    "an",
    "old",
    "river",
    "where",
    "every",
    "student",
    "met",
    "one",
    "engineer",
]

# Runs in the fresh process: a small warm-up run (imports, the Ray connection, the tokenizer),
# then the big one measured: the Python memory it allocates and pyarrow's peak.
_MEASURE = """
import json, sys, tracemalloc
import pyarrow as pa
from dpo_cluster.config import load_config
from dpo_cluster.data.pipeline import prepare

warm_up, big = json.loads(sys.argv[1])
prepare(load_config(None, warm_up))
pool = pa.default_memory_pool()
tracemalloc.start()
prepared = prepare(load_config(None, big))
_, python_peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
print("MEASURED " + json.dumps({"arrow_peak": pool.max_memory(), "python_peak": python_peak,
                                "report": prepared.report}))
"""


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _write_big_split(path: Path, kept: int, broken: int) -> None:
    """`kept` pairs with long answers (about 1,300 tokens each, cheap to tokenize: the prompt is
    short), then `broken` long lines that are not JSON (dropped with their raw text)."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(kept):
            row = {"prompt": f"{i} " + _text(rng, 20), "chosen": _text(rng, 600), "rejected": _text(rng, 600)}
            f.write(json.dumps(row) + "\n")
        for _ in range(broken):
            f.write("{not json " + _text(rng, 500) + "\n")


def test_driver_memory_stays_far_below_the_split(
    tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path
) -> None:
    """About 33 MB of kept token ids and 11 MB of quarantined rows; the driver's Arrow and Python
    peaks stay under a tenth of that (token stats and the quarantine are built in Ray tasks)."""
    import ray

    data = tmp_path / "big.jsonl"
    _write_big_split(data, kept=4500, broken=4500)
    small = tmp_path / "small.jsonl"
    _write_big_split(small, kept=20, broken=2)
    common = [f"model.name_or_path={tiny_tokenizer_dir}", "data.max_length=4096", "data.max_bad_fraction=1.0"]
    warm_up = [f"output_dir={tmp_path / 'warm'}", f"data.train={small}", *common]
    big = [f"output_dir={tmp_path / 'out'}", f"data.train={data}", *common]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps([warm_up, big])],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEASURED ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    measured = json.loads(lines[-1].removeprefix("MEASURED "))

    prepared = tmp_path / "out" / "prepared" / "train"
    token_bytes = sum(
        pq.read_table(f, columns=["prompt_ids", "chosen_ids", "rejected_ids"]).nbytes
        for f in prepared.glob("*.parquet")
    )
    quarantine_bytes = (tmp_path / "out" / QUARANTINE_FILE).stat().st_size
    stats = measured["report"]["splits"]["train"]
    assert stats["rows_kept"] == 4500 and stats["dropped"] == {"invalid_json": 4500}
    split_bytes = token_bytes + quarantine_bytes
    assert token_bytes >= 30e6 and quarantine_bytes >= 10e6  # the split is big ...
    # ... and the driver held a small part of it: no column concatenated, no row list sorted.
    assert measured["arrow_peak"] < split_bytes / 10, measured
    assert measured["python_peak"] < split_bytes / 10, measured


def _hub_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    rng = random.Random(3)
    for i in range(300):
        rows.append({"prompt": f"q{i} " + _text(rng, 8), "chosen": _text(rng, 6), "rejected": _text(rng, 5)})
    rows[7]["chosen"] = rows[7]["rejected"]  # chosen_equals_rejected
    rows[120]["prompt"] = ""  # empty_prompt
    rows[299]["chosen"] = None  # missing_field
    return rows


def test_saved_dataset_reads_in_parallel_with_the_same_ids_and_report(
    tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save_to_disk dataset, cut into several read units, gives `name#INDEX` ids and the same
    report as the same rows read from a JSONL file."""
    import datasets

    rows = _hub_rows()
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(path: Path, name: str) -> Any:
        config = load_config(
            None,
            [
                f"output_dir={tmp_path / name}",
                f"model.name_or_path={tiny_tokenizer_dir}",
                f"data.train={path}",
                "data.eval_fraction=0.2",
                "data.num_cpus=2",
            ],
        )
        return prepare(config)

    monkeypatch.setattr(sources, "MIN_CHUNK_BYTES", 1)  # several read units even for 300 rows
    from_hub = run(saved, "hub")
    from_file = run(jsonl, "file")

    def ids(prepared: Any) -> dict[str, set[int]]:
        out = {}
        for split in ("train", "eval"):
            path = prepared.split_dir(split)
            out[split] = {
                int(row_id.rpartition("#")[2]) if "#" in row_id else int(row_id.rpartition(":")[2]) - 1
                for f in sorted(path.glob("*.parquet"))
                for row_id in pq.read_table(f, columns=["row_id"]).column("row_id").to_pylist()
            }
        return out

    assert ids(from_hub) == ids(from_file)
    assert all(
        row_id.startswith(f"{saved}#")
        for f in from_hub.split_dir("train").glob("*.parquet")  # type: ignore[union-attr]
        for row_id in pq.read_table(f, columns=["row_id"]).column("row_id").to_pylist()
    )

    def hub_id(row_id: str) -> str:  # "same.jsonl:LINE" -> "saved#INDEX"
        return f"{saved}#{int(row_id.rpartition(':')[2]) - 1}" if row_id.startswith(str(jsonl)) else row_id

    def quarantine(prepared: Any) -> list[dict[str, Any]]:
        lines = (prepared.output_dir / QUARANTINE_FILE).read_text().splitlines()
        return [{**q, "row_id": hub_id(q["row_id"])} for q in map(json.loads, lines)]

    assert sorted(q["row_id"] for q in quarantine(from_hub)) == [f"{saved}#{i}" for i in (120, 299, 7)]
    assert quarantine(from_hub) == quarantine(from_file)

    def comparable(report: dict[str, Any]) -> dict[str, Any]:
        splits = json.loads(json.dumps(report["splits"]))
        for stats in splits.values():
            stats["examples"] = {r: [hub_id(i) for i in v] for r, v in stats["examples"].items()}
        return splits

    assert comparable(from_hub.report) == comparable(from_file.report)
    assert from_hub.report["sources"]["train"] == {"source": str(saved), "format": "standard"}
