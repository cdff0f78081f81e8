"""The data benchmark runs end to end and both sides produce the same token ids (no timing asserted:
speed is reported by `dpo-cluster bench data`, not tested)."""

from __future__ import annotations

import pytest

from dpo_cluster.bench.data import run_data_benchmark


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
