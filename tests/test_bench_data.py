"""The data benchmarks run end to end: both sides produce the same token ids, and the scale mode
reports every figure with each training reader reading its half (no timing asserted: speed is
reported by `dpo-cluster bench data`, not tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_cluster.bench.data import run_data_benchmark
from dpo_cluster.bench.data_scale import run_scale_benchmark


@pytest.mark.slow
def test_data_benchmark_compares_like_with_like(ray_local: None, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_data_benchmark(rows=150, num_proc=2)
    assert set(result["formats"]) == {"conversational", "standard"}
    for figures in result["formats"].values():
        assert figures["identical_token_ids"] is True
        assert set(figures["seconds"]) == {
            "trl_num_proc_1", "trl_num_proc_2", "dpo_cluster_cold_workers", "dpo_cluster_warm_workers",
        }  # fmt: skip
    out = capsys.readouterr().out
    assert "token ids identical to TRL's for every row: True" in out
    assert "vs TRL 1" in out


@pytest.mark.slow
def test_scale_benchmark_reports_memory_and_each_readers_share(
    ray_local: None, tiny_tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_scale_benchmark(rows=2_000, tokenizer_dir=str(tiny_tokenizer_dir))
    json.dumps(result)  # what --output writes
    ours, trl = result["dpo_cluster"], result["trl"]
    assert result["rows_agree"] is True
    assert trl["rows_out"] == ours["rows_in"] == ours["rows_kept"] == 2_000
    for figures, key in (
        (ours, "rows_per_second"), (trl, "rows_per_second"), (result["ratio"], "rows_per_second"),
        (ours, "driver_peak_rss_bytes"), (trl, "peak_rss_bytes"), (ours, "worker_peak_rss_bytes"),
        (ours, "object_store_capacity_bytes"),
    ):  # fmt: skip
        assert figures[key] > 0, key
    assert ours["object_store_peak_bytes"] >= 0 and ours["worker_processes_seen"] >= 1

    # Two workers, each reading about half the split; together every full step's rows, once.
    reader = result["reader"]
    workers = reader["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    num_rows, step_rows = workers[0]["num_rows"], reader["micro_batch_size"] * reader["world_size"]
    assert num_rows == ours["rows_kept"]
    assert num_rows - step_rows < sum(w["rows_read"] for w in workers) <= num_rows
    for w in workers:
        assert abs(w["rows_read"] - num_rows / 2) <= reader["micro_batch_size"]
        assert 0.4 < w["bytes_read"] / w["total_bytes"] < 0.6
        assert w["open_seconds"] >= 0 and w["peak_rss_bytes"] > 0

    out = capsys.readouterr().out
    assert "ours / TRL" in out and "object store peak" in out and "reader bytes per worker" in out
