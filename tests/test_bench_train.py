"""`dpo-cluster bench train`: the generated pairs follow the requested length distribution; the
report's pure pieces (stopwatch, model-state floor, headline ratio) and its figures, ratios and
warnings on synthetic stage results, checked against numbers worked out by hand; the named shape
against its published parameter count; and one tiny real run of every stage (each in its own
subprocess, a real local Ray for the data and the reference precompute). No timing is asserted:
speed is reported, not tested."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dpo_cluster.bench.train import run_benchmark
from dpo_cluster.bench.train_data import generate_length_pairs
from dpo_cluster.bench.train_report import (
    best_trl,
    compute_floor_mb,
    format_table,
    ratio,
    state_bytes_per_param,
    state_layout,
    step_seconds,
    summarize,
)
from dpo_cluster.bench.train_settings import MODES, BenchSettings, StageRun
from dpo_cluster.bench.train_stages import build_shape_config
from dpo_cluster.cli import main

LN2 = math.log(2)
MODE_FIELDS = {
    "tokens_per_second", "seconds_per_step_median", "peak_memory_mb", "padding_fraction", "first_step_loss",
    "final_loss", "tokens_total", "steps", "baseline_mb", "floor_mb", "above_floor_mb", "state", "vs",
    "vs_best_trl",
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
# The pure pieces of the report, against values worked out by hand.


def test_step_seconds_come_from_the_step_end_stamps() -> None:
    # Ends of steps 1..3 at 10.0, 12.5, 14.0 s: step 2 took 2.5 s, step 3 1.5 s; step 1 is not timed.
    assert step_seconds([10.0, 12.5, 14.0]) == [2.5, 1.5]
    with pytest.raises(ValueError, match="at least 2"):
        step_seconds([10.0])
    with pytest.raises(ValueError, match="do not increase"):
        step_seconds([10.0, 9.0])


@pytest.mark.parametrize(
    ("mode", "dtype", "expected"),
    [
        # weights + gradients + masters + 2 moments + reference, bytes per parameter
        ("trl", "fp32", 4 + 4 + 0 + 8 + 4),  # TRL's own fp32 copy of the policy as reference
        ("trl-precompute", "fp32", 4 + 4 + 0 + 8 + 0),
        ("dpo-cluster", "fp32", 4 + 4 + 0 + 8 + 4),
        ("dpo-cluster-fast", "fp32", 4 + 4 + 0 + 8 + 0),
        ("trl", "bf16", 4 + 4 + 0 + 8 + 2),  # fp32 weights are the masters; a bf16 reference
        ("trl-precompute", "bf16", 4 + 4 + 0 + 8 + 0),
        ("dpo-cluster", "bf16", 2 + 2 + 4 + 8 + 2),  # bf16 weights and grads, fp32 masters
        ("dpo-cluster-fast", "bf16", 2 + 2 + 4 + 8 + 0),
    ],
)
def test_model_state_bytes_per_parameter(mode: str, dtype: str, expected: int) -> None:
    assert state_bytes_per_param(state_layout(mode, dtype)) == expected


def test_both_sides_are_mixed_bf16_over_fp32_masters() -> None:
    trl, ours = state_layout("trl", "bf16"), state_layout("dpo-cluster", "bf16")
    assert (trl["weights"], trl["master_weights"], trl["adam_moments"]) == ("float32", None, "float32")
    assert (ours["weights"], ours["master_weights"], ours["adam_moments"]) == (
        "bfloat16",
        "float32",
        "float32",
    )
    assert trl["reference"] == ours["reference"] == "bfloat16"


def test_the_floor_is_the_baseline_plus_the_model_state() -> None:
    # 10,485,760 parameters x 18 bytes = 188,743,680 bytes = 180 MB; + the 500 MB baseline.
    assert compute_floor_mb(500.0, 10_485_760, 18) == pytest.approx(680.0)
    assert compute_floor_mb(0.0, 0, 18) == 0.0


def test_the_headline_ratio_is_against_the_faster_trl_mode() -> None:
    both = {"trl": {"tokens_per_second": 50.0}, "trl-precompute": {"tokens_per_second": 62.5}}
    assert best_trl(both) == "trl-precompute"
    assert best_trl(both | {"trl": {"tokens_per_second": 70.0}}) == "trl"
    assert best_trl(both | {"trl-precompute": {"error": "boom"}}) == "trl"
    assert (
        best_trl({"trl": {"tokens_per_second": 5.0}, "trl-precompute": {"tokens_per_second": 5.0}}) == "trl"
    )
    assert best_trl({"dpo-cluster": {"tokens_per_second": 100.0}}) is None
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 2.0) is None and ratio(1.0, 0.0) is None


# ----------------------------------------------------------------------------------------------
# The report on synthetic stage results: 3 steps of 2 pairs, 300 non-pad tokens in all, a model of
# 10,485,760 parameters (10 MB per byte of state per parameter), fp32.

SETTINGS = BenchSettings(workdir="/bench", steps=3, micro_batch_size=2)
PARAMETERS = 10 * 2**20
SETUP = {
    "tokens": {"dpo_cluster": 300, "trl": 300},
    "parameters": PARAMETERS,
    "device": "cpu (2 threads)",
    "data": {"prepared_with": "ray data"},
}


def stage(
    steps: list[tuple[float, int, int, float]],
    *,
    tree_mb: float,
    process_mb: float,
    baseline_mb: float = 100.0,
    log: str = "mode",
    **extra: Any,
) -> StageRun:
    """A finished mode: (seconds, tokens, entries, loss) per optimizer step, turned into step-end
    stamps from 1000.0 s on; memory seen from outside and the baseline after imports."""
    ends = [1000.0 + sum(step[0] for step in steps[: k + 1]) for k in range(len(steps))]
    result = {
        "steps": [
            {"end": e, "tokens": t, "entries": n, "loss": loss} for e, (_, t, n, loss) in zip(ends, steps)
        ],
        "started": ends[0] - 4.0,  # 4 s before the first step's end
        "finished": ends[-1] + 2.0,
        "baseline": {"host_mb": baseline_mb, "gpu_mb": None},
        "device": "cpu (2 threads)",
        "gpu_max_allocated_mb": None,
        "notes": [],
    }
    return StageRun(result | extra, 30.0, tree_mb, process_mb, Path(f"/bench/logs/{log}.log"))


def failed(log: str) -> StageRun:
    return StageRun(None, 5.0, 100.0, 100.0, Path(f"/bench/logs/{log}.log"), error="exit status 1; boom")


TRL_PRECOMPUTE = {"seconds": 1.2, "rows_scored": 6, "host_peak_mb": 500.0, "how": "in DPOTrainer.__init__"}


def stage_runs(**changed: StageRun) -> dict[str, StageRun]:
    """Steps 2-3 of each mode, its peak, baseline and floor (baseline + 10 MB x bytes/param):
    trl: 200 tokens in 4 s = 50 tokens/s; pad 1 - 300/450 = 1/3; peak 800; floor 400 + 200 = 600, 200 above.
    trl-precompute: 3.2 s -> 62.5 tokens/s, the faster TRL; pad 1 - 300/400 = 1/4; peak 640; floor
      400 + 160 = 560, 80 above. Its precompute 1.2 s -> 200 / (3.2 + 1.2 x 2/3) = 50 tokens/s.
    dpo-cluster: 2 s -> 100 tokens/s (1.6x trl-precompute, 2x trl); pad 0.2; peak max(300, 400) = 400
      (0.625x, 0.5x); floor 160 + 200 = 360, 40 above (0.5x, 0.2x).
    dpo-cluster-fast: 0.5 s -> 400 tokens/s (6.4x, 8x); no padding; peak 200 (0.3125x, 0.25x); floor
      20 + 160 = 180, 20 above (0.25x, 0.1x)."""
    runs = {
        "trl": stage([(9.0, 100, 200, LN2), (2.0, 100, 125, 0.6), (2.0, 100, 125, 0.5)], tree_mb=800, process_mb=600,
                     baseline_mb=400, dtypes={"weights": "float32", "reference": "float32", "moments": "float32"}),
        "trl-precompute": stage([(6.0, 100, 150, LN2), (1.6, 100, 125, 0.6), (1.6, 100, 125, 0.5)], tree_mb=640,
                                process_mb=500, baseline_mb=400, precompute=TRL_PRECOMPUTE),
        "dpo-cluster": stage([(5.0, 100, 125, LN2), (1.0, 100, 125, 0.6), (1.0, 100, 125, 0.4)], tree_mb=300,
                             process_mb=400, baseline_mb=160),
        "dpo-cluster-fast": stage([(3.0, 100, 100, LN2), (0.25, 100, 100, 0.6), (0.25, 100, 100, 0.3)], tree_mb=200,
                                  process_mb=100, baseline_mb=20),
    }  # fmt: skip
    return runs | changed


PRECOMPUTE = StageRun(
    {"seconds": 3.0, "report": {"rows_scored": 6, "actors": {"concurrency": 1}}},
    10.0,
    500.0,
    250.0,
    Path("p"),
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
    assert result["best_trl"] == "trl-precompute"
    modes = result["modes"]
    assert list(modes) == list(MODES)
    expected = {  # mode: (tokens/s, peak MB, floor MB, above floor MB, padding, median s/step)
        "trl": (50.0, 800.0, 600.0, 200.0, 1 / 3, 2.0),
        "trl-precompute": (62.5, 640.0, 560.0, 80.0, 0.25, 1.6),
        "dpo-cluster": (100.0, 400.0, 360.0, 40.0, 0.2, 1.0),
        "dpo-cluster-fast": (400.0, 200.0, 180.0, 20.0, 0.0, 0.25),
    }
    for mode, (tps, peak, floor, above, padding, median) in expected.items():
        f = modes[mode]
        assert set(f) >= MODE_FIELDS, mode
        assert f["tokens_per_second"] == pytest.approx(tps), mode
        assert f["peak_memory_mb"] == peak, mode
        assert f["floor_mb"] == pytest.approx(floor) and f["above_floor_mb"] == pytest.approx(above), mode
        assert f["padding_fraction"] == pytest.approx(padding), mode
        assert f["seconds_per_step_median"] == pytest.approx(median), mode
        assert (f["steps"], f["tokens_total"], f["first_step_loss"]) == (3, 300, LN2), mode
        # 4 s from the start to step 1's end and 2 s after step 3's: 6 s outside steps 2..3.
        assert f["outside_steps_seconds"] == pytest.approx(6.0), mode
    ratios = {  # mode: (tokens/s, peak, above floor) over trl-precompute, then over trl
        "trl": ((0.8, 1.25, 2.5), (1.0, 1.0, 1.0)),
        "trl-precompute": ((1.0, 1.0, 1.0), (1.25, 0.8, 0.4)),
        "dpo-cluster": ((1.6, 0.625, 0.5), (2.0, 0.5, 0.2)),
        "dpo-cluster-fast": ((6.4, 0.3125, 0.25), (8.0, 0.25, 0.1)),
    }
    for mode, (over_best, over_trl) in ratios.items():
        for base, values in (("trl-precompute", over_best), ("trl", over_trl)):
            got = modes[mode]["vs"][base]
            assert (got["tokens_per_second"], got["peak_memory"], got["above_floor"]) == pytest.approx(values)
        assert modes[mode]["vs_best_trl"] == modes[mode]["vs"]["trl-precompute"]
    # MFU at a 1 TFLOP/s peak: 6 x parameters x tokens/s / 1e12.
    assert [modes[m]["mfu"] for m in MODES] == pytest.approx(
        [6 * PARAMETERS * t / 1e12 for t in (50, 62.5, 100, 400)]
    )
    assert modes["dpo-cluster"]["final_loss"] == 0.4
    # dpo-cluster-fast's 3 s precompute spread over the 2 timed steps' share (2/3) of the pairs:
    # 200 tokens / (0.5 s + 3 s x 2/3) = 80 tokens/s, 80 / 62.5 = 1.28x trl-precompute, 1.6x trl.
    fast = result["precompute"]["dpo-cluster-fast"]
    assert (fast["seconds"], fast["peak_memory_mb"], fast["rows_scored"]) == (3.0, 500.0, 6)
    assert fast["amortized_tokens_per_second"] == pytest.approx(80.0)
    assert fast["amortized_vs"] == pytest.approx({"trl": 1.6, "trl-precompute": 1.28})
    assert fast["amortized_vs_best_trl"] == pytest.approx(1.28)
    trl = result["precompute"]["trl-precompute"]
    assert (trl["seconds"], trl["peak_memory_mb"], trl["rows_scored"]) == (1.2, 500.0, 6)
    assert trl["amortized_tokens_per_second"] == pytest.approx(50.0)
    assert trl["amortized_vs_best_trl"] == pytest.approx(0.8)
    assert result["data"]["pairs"] == 6 and result["data"]["non_pad_tokens"] == 300
    table = format_table(result)
    assert "vs TRL: over trl-precompute, the TRL mode with the higher tokens/s" in table
    for shown in (
        "1.60x",
        "0.62x",
        "0.50x",
        "6.40x",
        "0.31x",
        "(1.28x trl-precompute)",
        "(0.80x trl-precompute)",
    ):
        assert shown in table, shown
    assert "WARNING" not in table
    assert any(note.startswith("fp32:") for note in result["notes"])


def test_a_failed_mode_is_reported_and_warned() -> None:
    result = report(stage_runs(**{"dpo-cluster": failed("dpo-cluster")}))
    assert result["warnings"] == ["dpo-cluster: failed, see /bench/logs/dpo-cluster.log"]
    assert result["modes"]["dpo-cluster"]["error"] == "exit status 1; boom"
    assert result["modes"]["dpo-cluster-fast"]["vs_best_trl"]["tokens_per_second"] == pytest.approx(6.4)
    assert "dpo-cluster       failed: exit status 1; boom" in format_table(result)


def test_a_failed_trl_mode_leaves_the_other_as_the_headline() -> None:
    result = report(stage_runs(**{"trl-precompute": failed("trl-precompute")}))
    assert result["best_trl"] == "trl"
    assert set(result["modes"]["dpo-cluster"]["vs"]) == {"trl"}
    assert result["modes"]["dpo-cluster"]["vs_best_trl"]["tokens_per_second"] == pytest.approx(2.0)
    assert "trl-precompute" not in result["precompute"]
    assert "over trl, the TRL mode" in format_table(result)


def test_without_trl_there_are_no_ratios() -> None:
    result = report(stage_runs(trl=failed("trl"), **{"trl-precompute": failed("trl-precompute")}))
    assert result["best_trl"] is None
    for mode in ("dpo-cluster", "dpo-cluster-fast"):
        assert result["modes"][mode]["vs"] == {} and result["modes"][mode]["vs_best_trl"] is None
    assert result["precompute"]["dpo-cluster-fast"]["amortized_vs_best_trl"] is None
    table = format_table(result)
    assert "no TRL mode ran" in table and "       -" in table


def test_a_failed_precompute_fails_the_fast_mode() -> None:
    broken = failed("precompute")
    result = report(stage_runs(**{"dpo-cluster-fast": broken}), precompute=broken)
    assert result["precompute"]["dpo-cluster-fast"] == {"error": "exit status 1; boom"}
    assert result["warnings"] == ["dpo-cluster-fast: failed, see /bench/logs/precompute.log"]
    assert "dpo-cluster-fast  failed: exit status 1; boom" in format_table(result)


def test_the_bf16_floor_and_a_dtype_that_is_not_the_layouts_are_warned() -> None:
    # bf16: trl holds 18 bytes per parameter (fp32 weights, grads, moments; bf16 reference): floor
    # 400 + 180 = 580 MB. Its stage reports fp32 reference weights: the floor would be wrong, warned.
    settings = BenchSettings(workdir="/bench", steps=3, micro_batch_size=2, dtype="bf16")
    result = report(settings=settings)
    trl = result["modes"]["trl"]
    assert trl["state"]["bytes_per_param"] == 18 and trl["floor_mb"] == pytest.approx(580.0)
    assert result["modes"]["dpo-cluster"]["state"]["layout"]["master_weights"] == "float32"
    assert result["warnings"] == [
        "trl: trained with reference in float32, not in bfloat16 as its floor assumes"
    ]
    assert any("mixed bf16 with fp32 masters on both sides" in note for note in result["notes"])


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
    # trl's dtypes are left out: bf16 would warn about its fp32 reference (tested above).
    runs = stage_runs(**{"dpo-cluster": off}) | {"trl": stage_runs()["trl-precompute"]}
    result = report(runs, settings=settings)
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
# Settings: shapes, built-in names, flags that conflict.


def test_the_qwen_shape_is_the_published_config(tiny_tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    s = BenchSettings(workdir="/bench", shape="qwen2.5-0.5b")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = build_shape_config(s, tokenizer)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (896, 24, 4864)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (14, 2, 151_936)
    assert config.tie_word_embeddings and config.rms_norm_eps == 1e-6
    assert config.rope_parameters["rope_theta"] == 1_000_000.0
    assert config.vocab_size > len(tokenizer)  # the head is the real one; the ids are the small tokenizer's
    with torch.device("meta"):
        parameters = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    # Qwen2.5-0.5B's published count: embedding 151,936 x 896 = 136,134,656; per layer q/k/v with
    # biases 803,712 + 2 x 114,816, o 802,816, MLP 3 x 896 x 4864 = 13,074,432, norms 1,792
    # = 14,912,384, x 24 = 357,897,216; final norm 896: 494,032,768.
    assert parameters == 494_032_768
    assert build_shape_config(replace(s, num_layers=1), tokenizer).num_hidden_layers == 1


def test_default_shape_follows_hidden_size_and_layers() -> None:
    assert BenchSettings(workdir="/b").model_shape() == {
        "hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 2, "intermediate_size": 1408,
    }  # fmt: skip
    small = BenchSettings(workdir="/b", hidden_size=128, num_layers=2).model_shape()
    assert small == {
        "hidden_size": 128,
        "num_layers": 2,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 384,
    }


def test_a_builtin_model_is_resolved_to_its_directory(base_dir: Path) -> None:
    s = BenchSettings(workdir="/bench", model="builtin:tiny")
    assert Path(s.model_dir) == base_dir and (base_dir / "config.json").is_file()
    assert f"model.name_or_path={base_dir}" in s.dpo_cluster_overrides("dpo-cluster", Path("/out"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shape", "qwen2.5-0.5b", "--hidden-size", "128"], "hidden_size: fixed by shape"),
        (["--model", "builtin:tiny", "--layers", "2"], "a given model has its own shape"),
        (["--layers", "0"], "num_layers: at least 1"),
        (["--steps", "1"], "steps: at least 2"),
        (["--modes", "trl,nope"], "modes: ['nope'] given"),
    ],
)
def test_conflicting_flags_exit_2_before_anything_runs(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "train", "--device", "cpu", *flags]) == 2
    assert message in capsys.readouterr().err


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
    assert list(result["modes"]) == list(MODES)
    for mode, figures in result["modes"].items():
        assert set(figures) >= MODE_FIELDS and figures["steps"] == 2, mode
        # The floor holds the process after its imports and the model state; the peak is above it.
        assert 0 < figures["baseline_mb"] < figures["floor_mb"] < figures["peak_memory_mb"], mode
        assert figures["vs_best_trl"] == figures["vs"][result["best_trl"]], mode
    assert result["best_trl"] in ("trl", "trl-precompute")
    assert result["data"]["pairs"] == 4
    for mode in ("trl-precompute", "dpo-cluster-fast"):
        pre = result["precompute"][mode]
        assert pre["rows_scored"] == 4 and pre["seconds"] > 0 and pre["amortized_tokens_per_second"] > 0, mode
    # TRL trained with the dtypes its floor assumes, else a warning would say so; every mode saw
    # the same tokens and started at ln 2.
    assert result["modes"]["trl-precompute"]["dtypes"] == {"weights": "float32", "reference": None,
                                                            "moments": "float32"}  # fmt: skip
    assert result["warnings"] == []
    out = capsys.readouterr().out
    assert "vs TRL: over " in out and "reference precompute" in out and ">floor MB" in out


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
        "--shape",
        "--layers",
        "--num-layers",
        "--hidden-size",
    ):
        assert flag in out
