"""`dpo-cluster bench train`: the generated pairs follow the requested length distribution; the
report's figures, ratios and warnings on synthetic stage results, checked against numbers worked
out by hand; and one tiny real run of every stage (each in its own subprocess, a real local Ray for
the data and the reference precompute). No timing is asserted: speed is reported, not tested."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from dpo_cluster.bench.train import run_benchmark
from dpo_cluster.bench.train_data import generate_length_pairs
from dpo_cluster.bench.train_report import format_table, summarize
from dpo_cluster.bench.train_settings import MODES, BenchSettings, StageRun
from dpo_cluster.cli import main

LN2 = math.log(2)
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


# ----------------------------------------------------------------------------------------------
# The report on synthetic stage results: 3 steps of 2 pairs, 300 non-pad tokens in all.

SETTINGS = BenchSettings(workdir="/bench", steps=3, micro_batch_size=2)
SETUP = {
    "tokens": {"dpo_cluster": 300, "trl": 300},
    "parameters": 100_000_000,
    "device": "cpu (2 threads)",
    "data": {"prepared_with": "ray data"},
}


def stage(
    steps: list[tuple[float, int, int, float]], *, tree_mb: float, process_mb: float, log: str = "mode"
) -> StageRun:
    """A finished mode: (seconds, tokens, entries, loss) per optimizer step, memory seen from outside."""
    result = {
        "steps": [{"seconds": a, "tokens": t, "entries": e, "loss": loss} for a, t, e, loss in steps],
        "device": "cpu (2 threads)",
        "gpu_max_allocated_mb": None,
        "outside_steps_seconds": 4.0,
        "notes": [],
    }
    return StageRun(result, 30.0, tree_mb, process_mb, Path(f"/bench/logs/{log}.log"))


def failed(log: str) -> StageRun:
    return StageRun(None, 5.0, 100.0, 100.0, Path(f"/bench/logs/{log}.log"), error="exit status 1; boom")


def stage_runs(**changed: StageRun) -> dict[str, StageRun]:
    """trl: steps 2-3 take 4 s for 200 tokens -> 50 tokens/s; pad 1 - 300/450 = 1/3; peak 800 MB.
    dpo-cluster: 2 s -> 100 tokens/s (2.00x); pad 1 - 300/375 = 0.2; peak max(300, 400) = 400 MB (0.50x).
    dpo-cluster-fast: 0.5 s -> 400 tokens/s (8.00x); no padding; peak 200 MB (0.25x)."""
    runs = {
        "trl": stage([(9.0, 100, 200, LN2), (2.0, 100, 125, 0.6), (2.0, 100, 125, 0.5)], tree_mb=800, process_mb=600),
        "dpo-cluster": stage([(5.0, 100, 125, LN2), (1.0, 100, 125, 0.6), (1.0, 100, 125, 0.4)], tree_mb=300, process_mb=400),
        "dpo-cluster-fast": stage([(3.0, 100, 100, LN2), (0.25, 100, 100, 0.6), (0.25, 100, 100, 0.3)], tree_mb=200, process_mb=100),
    }  # fmt: skip
    return runs | changed


PRECOMPUTE = StageRun(
    {"seconds": 3.0, "report": {"rows_scored": 6, "actors": 1}}, 10.0, 500.0, 250.0, Path("p")
)


def report(
    runs: dict[str, StageRun] | None = None,
    *,
    setup: dict[str, Any] = SETUP,
    settings: BenchSettings = SETTINGS,
    precompute: StageRun | None = PRECOMPUTE,
) -> dict[str, Any]:
    return summarize(settings, setup, runs or stage_runs(), precompute, peak_tflops=1.0)


def test_figures_and_ratios_of_a_clean_run() -> None:
    result = report()
    assert result["warnings"] == []
    modes = result["modes"]
    expected = {  # mode: (tokens/s, vs trl, peak MB, vs trl, padding, median s/step)
        "trl": (50.0, 1.0, 800.0, 1.0, 1 / 3, 2.0),
        "dpo-cluster": (100.0, 2.0, 400.0, 0.5, 0.2, 1.0),
        "dpo-cluster-fast": (400.0, 8.0, 200.0, 0.25, 0.0, 0.25),
    }
    for mode, (tps, tps_ratio, peak, peak_ratio, padding, median) in expected.items():
        f = modes[mode]
        assert set(f) >= MODE_FIELDS, mode
        assert f["tokens_per_second"] == pytest.approx(tps), mode
        assert f["tokens_per_second_vs_trl"] == pytest.approx(tps_ratio), mode
        assert f["peak_memory_mb"] == peak and f["peak_memory_vs_trl"] == pytest.approx(peak_ratio), mode
        assert f["padding_fraction"] == pytest.approx(padding), mode
        assert f["seconds_per_step_median"] == pytest.approx(median), mode
        assert (f["steps"], f["tokens_total"], f["first_step_loss"]) == (3, 300, LN2), mode
    # MFU at a 1 TFLOP/s peak: 6 x 1e8 parameters x 50 tokens/s / 1e12 = 0.03.
    assert [modes[m]["mfu"] for m in MODES] == pytest.approx([0.03, 0.06, 0.24])
    assert modes["dpo-cluster"]["final_loss"] == 0.4
    # The 3 s precompute spread over the 2 timed steps' share (2/3) of the pairs:
    # 200 tokens / (0.5 s + 3 s x 2/3) = 80 tokens/s, 80 / 50 = 1.6x TRL.
    pre = result["precompute"]
    assert (pre["seconds"], pre["peak_memory_mb"], pre["rows_scored"]) == (3.0, 500.0, 6)
    assert pre["amortized_tokens_per_second"] == pytest.approx(80.0)
    assert pre["amortized_vs_trl"] == pytest.approx(1.6)
    assert result["data"]["pairs"] == 6 and result["data"]["non_pad_tokens"] == 300
    table = format_table(result)
    assert "2.00x" in table and "0.50x" in table and "8.00x" in table and "(1.60x TRL)" in table
    assert "WARNING" not in table


def test_a_failed_mode_is_reported_and_warned() -> None:
    result = report(stage_runs(**{"dpo-cluster": failed("dpo-cluster")}))
    assert result["warnings"] == ["dpo-cluster: failed, see /bench/logs/dpo-cluster.log"]
    assert result["modes"]["dpo-cluster"]["error"] == "exit status 1; boom"
    assert result["modes"]["dpo-cluster-fast"]["tokens_per_second_vs_trl"] == pytest.approx(8.0)
    assert "dpo-cluster        failed: exit status 1; boom" in format_table(result)


def test_without_trl_there_are_no_ratios() -> None:
    result = report(stage_runs(trl=failed("trl")))
    assert result["warnings"] == ["trl: failed, see /bench/logs/trl.log"]
    for mode in ("dpo-cluster", "dpo-cluster-fast"):
        assert result["modes"][mode]["tokens_per_second_vs_trl"] is None
        assert result["modes"][mode]["peak_memory_vs_trl"] is None
    assert result["precompute"]["amortized_vs_trl"] is None
    assert "       -" in format_table(result)


def test_a_failed_precompute_fails_the_fast_mode() -> None:
    broken = failed("precompute")
    result = report(stage_runs(**{"dpo-cluster-fast": broken}), precompute=broken)
    assert result["precompute"] == {"error": "exit status 1; boom"}
    assert result["warnings"] == ["dpo-cluster-fast: failed, see /bench/logs/precompute.log"]
    assert "reference precompute failed: exit status 1; boom" in format_table(result)


def test_token_totals_that_differ_are_warned() -> None:
    # dpo-cluster-fast saw 10 tokens fewer; TRL's own tokenization counts 310.
    short = stage(
        [(3.0, 100, 100, LN2), (0.25, 90, 100, 0.6), (0.25, 100, 100, 0.3)], tree_mb=1, process_mb=1
    )
    setup = SETUP | {"tokens": {"dpo_cluster": 300, "trl": 310}}
    result = report(stage_runs(**{"dpo-cluster-fast": short}), setup=setup)
    assert result["warnings"] == [
        "token counts differ: TRL's tokenization gives 310 non-pad tokens, dpo-cluster's 300",
        "dpo-cluster-fast: 290 non-pad tokens over all steps, not the data's 300",
    ]
    assert format_table(result).count("WARNING: ") == 2


@pytest.mark.parametrize(
    ("dtype", "first_loss", "warned"),
    [
        ("fp32", 0.6932, False),  # 5e-5 from ln 2 = 0.693147: fp32 allows 1e-4
        ("fp32", 0.6934, True),  # 2.5e-4
        ("bf16", 0.6934, False),  # bf16 allows 1e-2
        ("bf16", 0.71, True),
        ("fp32", math.nan, True),
    ],
)
def test_a_first_step_loss_that_is_not_ln2_is_warned(dtype: str, first_loss: float, warned: bool) -> None:
    off = stage(
        [(5.0, 100, 125, first_loss), (1.0, 100, 125, 0.6), (1.0, 100, 125, 0.4)], tree_mb=1, process_mb=1
    )
    settings = BenchSettings(workdir="/bench", steps=3, micro_batch_size=2, dtype=dtype)
    result = report(stage_runs(**{"dpo-cluster": off}), settings=settings)
    expected = [
        f"dpo-cluster: first-step loss {first_loss:.6f} is not ln 2 = 0.693147 "
        "(policy and reference should agree at step 1)"
    ]
    assert result["warnings"] == (expected if warned else [])


def test_a_diverged_run_is_warned() -> None:
    diverged = stage(
        [(5.0, 100, 125, LN2), (1.0, 100, 125, 9.0), (1.0, 100, 125, math.inf)], tree_mb=1, process_mb=1
    )
    result = report(stage_runs(**{"dpo-cluster": diverged}))
    assert result["warnings"] == ["dpo-cluster: final loss inf is not finite (training diverged)"]


# ----------------------------------------------------------------------------------------------
# One real run: every stage runs and agrees with the others.


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "bench_train.json"
    result = run_benchmark(
        hidden_size=64,
        num_layers=2,
        steps=2,
        micro_batch_size=2,
        max_length=128,
        fast_max_tokens=256,  # dpo-cluster-fast cuts its steps by tokens and still sees every pair
        device="cpu",
        output=output,
    )
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    assert set(result["modes"]) == set(MODES)
    for mode, figures in result["modes"].items():
        assert set(figures) >= MODE_FIELDS and figures["steps"] == 2, mode
    assert result["data"]["pairs"] == 4 and result["precompute"]["rows_scored"] == 4
    # No warning: every mode saw the same tokens, and each first-step loss was ln 2.
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
