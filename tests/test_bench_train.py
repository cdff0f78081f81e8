"""`dpo-cluster bench train`: the generated pairs follow the requested length distribution, and a
tiny end-to-end run of every mode (each in its own subprocess, a real local Ray for the data and the
reference precompute) yields every figure, ratios against TRL, and a first-step loss of ln 2 in
each mode. No timing is asserted: speed is reported by the benchmark, not tested."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from dpo_cluster.bench.train import MODES, run_benchmark
from dpo_cluster.bench.train_data import generate_length_pairs
from dpo_cluster.cli import main

MODE_FIELDS = {
    "tokens_per_second", "seconds_per_step_median", "peak_memory_mb", "padding_fraction", "first_step_loss",
    "final_loss", "tokens_total", "tokens_per_second_vs_trl", "peak_memory_vs_trl", "steps",
}  # fmt: skip


def test_generated_lengths_follow_the_requested_distribution(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    shape = {"prompt_median": 60, "chosen_median": 50, "rejected_median": 40, "sigma": 0.6, "max_length": 512}
    rows = generate_length_pairs(400, tokenizer, seed=3, **shape)
    assert rows == generate_length_pairs(400, tokenizer, seed=3, **shape)  # deterministic by seed
    assert rows != generate_length_pairs(400, tokenizer, seed=4, **shape)

    def token_lengths(field: str) -> list[int]:
        return [len(tokenizer(row[field], add_special_tokens=False)["input_ids"]) for row in rows]

    # The prompt's closing newline is one token more than drawn; edges re-tokenize within a token.
    for field, median in (("prompt", 61), ("chosen", 50), ("rejected", 40)):
        lengths = token_lengths(field)
        assert statistics.median(lengths) == pytest.approx(median, rel=0.1), field
    prompts = token_lengths("prompt")
    assert max(prompts) <= 256 + 2  # the tail is clipped at max_length // 2
    assert statistics.quantiles(prompts, n=20)[-1] > 1.8 * 61  # and heavy: the 95th percentile
    assert all(row["prompt"].endswith("\n") and row["chosen"] != row["rejected"] for row in rows)


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "bench_train.json"
    result = run_benchmark(
        hidden_size=64,
        num_layers=2,
        steps=3,
        micro_batch_size=2,
        max_length=128,
        fast_max_tokens=256,  # dpo-cluster-fast cuts its steps by tokens and still sees every pair
        device="cpu",
        output=output,
    )
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    assert set(result["modes"]) == set(MODES)
    data = result["data"]
    assert (
        data["pairs"] == 6
        and data["tokens"]["trl"] == data["tokens"]["dpo_cluster"] == data["non_pad_tokens"]
    )
    trl = result["modes"]["trl"]
    for mode, figures in result["modes"].items():
        assert set(figures) >= MODE_FIELDS, mode
        assert figures["steps"] == 3
        # Every mode consumed the same pairs once: the same non-pad tokens in all.
        assert figures["tokens_total"] == data["non_pad_tokens"], mode
        assert figures["first_step_loss"] == pytest.approx(math.log(2), abs=1e-4), mode
        assert 0.0 <= figures["padding_fraction"] < 1.0
        assert figures["peak_memory_mb"] > 0
        assert figures["tokens_per_second_vs_trl"] == pytest.approx(
            figures["tokens_per_second"] / trl["tokens_per_second"]
        )
        assert figures["peak_memory_vs_trl"] == pytest.approx(
            figures["peak_memory_mb"] / trl["peak_memory_mb"]
        )
    assert trl["tokens_per_second_vs_trl"] == 1.0
    precompute = result["precompute"]
    assert precompute["rows_scored"] == 6 and precompute["seconds"] > 0 and precompute["peak_memory_mb"] > 0
    assert result["warnings"] == []
    out = capsys.readouterr().out
    assert "vs TRL" in out and "reference precompute" in out


def test_cli_parses_bench_train(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--model",
        "--dtype",
        "--steps",
        "--micro-batch-size",
        "--max-length",
        "--output",
        "--modes",
        "--fast-max-tokens",
    ):
        assert flag in out
