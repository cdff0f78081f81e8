"""The figures, warnings and table of `dpo-cluster bench train`, from what each mode's subprocess
recorded per optimizer step and what was measured from outside it. Kept apart from running the
stages so that the report is checked on synthetic results, with no training.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from typing import Any

from dpo_cluster.bench.train_settings import BenchSettings, StageRun

LN2 = math.log(2)
# First-step loss tolerance: fp32 policy and reference agree to rounding; bf16 kernels of different
# batch shapes (padded vs packed, precompute vs training) do not agree bit for bit.
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}
# Dense bf16 tensor-core peaks in TFLOP/s by device name (first match wins); --peak-tflops overrides.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def summarize(
    s: BenchSettings,
    setup: dict[str, Any],
    runs: dict[str, StageRun],
    precompute: StageRun | None,
    peak_tflops: float | None,
) -> dict[str, Any]:
    """The benchmark's result: settings, device, model, data, per-mode figures with ratios against
    `trl`, the reference precompute's cost, and warnings (see `check_mode`)."""
    total_tokens = setup["tokens"]["dpo_cluster"]
    warnings: list[str] = []
    if setup["tokens"].get("trl") not in (None, total_tokens):
        warnings.append(
            f"token counts differ: TRL's tokenization gives {setup['tokens']['trl']} non-pad tokens, "
            f"dpo-cluster's {total_tokens}"
        )
    device = next((r.result["device"] for r in runs.values() if r.result), setup.get("device", "cpu"))
    peak = peak_tflops or (_peak_tflops(device) if s.use_gpu else None)
    modes: dict[str, Any] = {}
    for mode, run in runs.items():
        if run.result is None:
            modes[mode] = {"error": run.error}
            warnings.append(f"{mode}: failed, see {run.log}")
            continue
        modes[mode] = mode_figures(run, setup["parameters"], peak, s.use_gpu)
        warnings += check_mode(mode, modes[mode], total_tokens, LOSS_TOLERANCE[s.dtype])
    add_ratios(modes)
    return {
        "settings": asdict(s) | {"pairs": s.pairs, "model_shape": None if s.model else s.model_shape()},
        "device": device,
        "peak_tflops": peak,
        "model": {"name_or_path": s.model or "Qwen2 built locally", "parameters": setup["parameters"]},
        "data": {"pairs": s.pairs, "non_pad_tokens": total_tokens}
        | setup["data"]
        | {"tokens": setup["tokens"]},
        "modes": modes,
        "precompute": precompute_section(s, precompute, modes),
        "warnings": warnings,
    }


def check_mode(mode: str, figures: dict[str, Any], total_tokens: int, loss_tolerance: float) -> list[str]:
    """Warnings about one mode's figures: it did not see the data's `total_tokens` non-pad tokens,
    its first-step loss is not ln 2 (policy == reference at step 1) within `loss_tolerance`, or a
    loss is not finite."""
    warnings = []
    if figures["tokens_total"] != total_tokens:
        warnings.append(
            f"{mode}: {figures['tokens_total']} non-pad tokens over all steps, not the data's {total_tokens}"
        )
    first = figures["first_step_loss"]
    # Written so that a NaN loss fails the comparison and warns too.
    if not abs(first - LN2) <= loss_tolerance:
        warnings.append(
            f"{mode}: first-step loss {first:.6f} is not ln 2 = {LN2:.6f} "
            "(policy and reference should agree at step 1)"
        )
    if not math.isfinite(figures["final_loss"]):
        warnings.append(f"{mode}: final loss {figures['final_loss']} is not finite (training diverged)")
    return warnings


def add_ratios(modes: dict[str, dict[str, Any]]) -> None:
    """Set each mode's tokens_per_second_vs_trl and peak_memory_vs_trl; None without a `trl` result."""
    base = modes.get("trl", {})
    for figures in modes.values():
        ok = bool(base) and "error" not in base and "error" not in figures
        figures["tokens_per_second_vs_trl"] = (
            figures["tokens_per_second"] / base["tokens_per_second"] if ok else None
        )
        figures["peak_memory_vs_trl"] = figures["peak_memory_mb"] / base["peak_memory_mb"] if ok else None


def precompute_section(
    s: BenchSettings, precompute: StageRun | None, modes: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """The reference precompute's one-off cost, and dpo-cluster-fast's tokens/s with that cost
    spread over the timed steps in proportion to their share of the pairs; None when not run."""
    if precompute is None:
        return None
    if precompute.result is None:
        return {"error": precompute.error}
    pre_s = precompute.result["seconds"]
    section: dict[str, Any] = {
        "seconds": pre_s,
        "subprocess_seconds": precompute.seconds,
        "peak_memory_mb": precompute.peak_memory_mb,
        "rows_scored": precompute.result["report"]["rows_scored"],
        "actors": precompute.result["report"]["actors"],
    }
    fast, base = modes.get("dpo-cluster-fast", {}), modes.get("trl", {})
    if "tokens_per_second" in fast:
        share = (s.steps - 1) / s.steps
        amortized = fast["timed_tokens"] / (fast["timed_seconds"] + pre_s * share)
        section["amortized_tokens_per_second"] = amortized
        section["amortized_vs_trl"] = (
            amortized / base["tokens_per_second"] if "tokens_per_second" in base else None
        )
    return section


def mode_figures(run: StageRun, parameters: int, peak_tflops: float | None, use_gpu: bool) -> dict[str, Any]:
    """One mode's figures from its per-step records (seconds, tokens, entries, loss).

    tokens/s: the non-pad tokens of the steps after the first (warm-up) over those steps' wall
    time; seconds/step: their median; padding: the pad share of every entry the policy computed;
    peak memory: GPU max allocated on GPU, else the process tree's (`StageRun.peak_memory_mb`);
    MFU, where a peak is known: 6 x parameters x tokens/s over the peak.
    """
    record = run.result
    assert record is not None, "a failed stage has no figures"
    steps = record["steps"]
    timed = steps[1:]
    timed_seconds = sum(step["seconds"] for step in timed)
    timed_tokens = sum(step["tokens"] for step in timed)
    tokens_per_second = timed_tokens / timed_seconds
    all_tokens = sum(step["tokens"] for step in steps)
    all_entries = sum(step["entries"] for step in steps)
    gpu_mb = record.get("gpu_max_allocated_mb")
    figures: dict[str, Any] = {
        "steps": len(steps),
        "tokens_per_second": tokens_per_second,
        "seconds_per_step_median": statistics.median(step["seconds"] for step in timed),
        "timed_seconds": timed_seconds,
        "timed_tokens": timed_tokens,
        "tokens_total": all_tokens,
        "padding_fraction": 1.0 - all_tokens / all_entries,
        "first_step_loss": steps[0]["loss"],
        "final_loss": steps[-1]["loss"],
        "peak_memory_mb": gpu_mb if use_gpu and gpu_mb is not None else run.peak_memory_mb,
        "peak_memory_kind": "gpu max allocated" if use_gpu and gpu_mb is not None else "host process tree",
        "host_peak_memory_mb": run.peak_memory_mb,
        # Model loading, trainer or engine set-up, TRL's tokenization, dpo-cluster's final export.
        "outside_steps_seconds": record.get("outside_steps_seconds"),
        "subprocess_seconds": run.seconds,
        "notes": record.get("notes", []),
    }
    if peak_tflops:
        figures["mfu"] = 6 * parameters * tokens_per_second / (peak_tflops * 1e12)
    return figures


def _peak_tflops(device: str) -> float | None:
    return next((tflops for name, tflops in PEAK_BF16_TFLOPS if name in device), None)


def format_table(result: dict[str, Any]) -> str:
    s, data = result["settings"], result["data"]
    mfu = result["peak_tflops"] is not None
    lines = [
        f"\nDPO training: {s['steps']} steps x {s['micro_batch_size']} pairs x {s['gradient_accumulation_steps']} "
        f"accumulation = {data['pairs']} pairs, {data['non_pad_tokens']} non-pad tokens, max_length "
        f"{s['max_length']}, {s['dtype']} on {result['device']}",
        f"model: {result['model']['name_or_path']}, {result['model']['parameters'] / 1e6:.1f}M parameters; "
        f"tokens/s over steps 2..{s['steps']} (step 1 is warm-up)",
        f"{'mode':<18} {'s/step':>7} {'tokens/s':>9} {'vs TRL':>7} {'peak MB':>8} {'vs TRL':>7} "
        f"{'pad %':>6} {'loss@1':>7} {'final':>7}" + (f" {'MFU':>6}" if mfu else ""),
    ]
    for mode, f in result["modes"].items():
        if "error" in f:
            lines.append(f"{mode:<18} failed: {f['error'].splitlines()[0]}")
            continue
        lines.append(
            f"{mode:<18} {f['seconds_per_step_median']:>7.3f} {f['tokens_per_second']:>9.0f} "
            f"{_ratio(f['tokens_per_second_vs_trl']):>7} {f['peak_memory_mb']:>8.0f} "
            f"{_ratio(f['peak_memory_vs_trl']):>7} {100 * f['padding_fraction']:>6.1f} "
            f"{f['first_step_loss']:>7.4f} {f['final_loss']:>7.4f}"
            + (f" {100 * f['mfu']:>5.1f}%" if mfu and "mfu" in f else "")
        )
    pre = result["precompute"]
    if pre and "error" in pre:
        lines.append(f"reference precompute failed: {pre['error'].splitlines()[0]}")
    elif pre:
        lines.append(
            f"+ reference precompute for dpo-cluster-fast (Ray Data, one-off per data and reference, reused "
            f"from its cache): {pre['seconds']:.1f} s, peak {pre['peak_memory_mb']:.0f} MB (process tree "
            "with Ray)"
        )
        if "amortized_tokens_per_second" in pre:
            lines.append(
                f"  dpo-cluster-fast with it spread over this run: {pre['amortized_tokens_per_second']:.0f} "
                f"tokens/s ({_ratio(pre['amortized_vs_trl'])} TRL)"
            )
    lines.append(
        "peak MB: "
        + ("GPU max allocated" if s["use_gpu"] else "host memory of the mode's process tree (PSS / peak RSS)")
    )
    lines += [f"WARNING: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
