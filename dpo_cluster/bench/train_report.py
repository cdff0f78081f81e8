"""The figures, warnings and table of `dpo-cluster bench train`, from what each mode's subprocess
recorded per optimizer step and what was measured from outside it. Kept apart from running the
stages so that the report is checked on synthetic results, with no training.

Every mode is timed by one stopwatch: its step ends stamped on `time.monotonic()` at the same point
of the step (`step_seconds`). Every mode's memory is set against its model-state floor
(`state_layout`, `compute_floor_mb`): what it must hold whatever the framework, so that
`above_floor_mb` is what the framework itself costs on top.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from typing import Any

from dpo_cluster.bench.train_settings import (
    DEFAULT_SHAPE,
    MODES,
    PRECOMPUTE_MODES,
    TRL_MODES,
    BenchSettings,
    StageRun,
)

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
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
MB = 1 << 20


def step_seconds(stamps: list[float]) -> list[float]:
    """Seconds of steps 2..N from the `time.monotonic()` stamps at the ends of steps 1..N: step 1
    (warm-up: lazy initialization, first kernels, allocator growth) has no start stamp and is not
    timed. E.g. ends [10.0, 12.5, 14.0] -> [2.5, 1.5]. Raises ValueError for fewer than 2 stamps
    or stamps that do not increase."""
    if len(stamps) < 2:
        raise ValueError(f"{len(stamps)} step stamps: at least 2 are needed to time a step")
    seconds = [end - start for start, end in zip(stamps, stamps[1:])]
    if any(d <= 0 for d in seconds):
        raise ValueError(f"step stamps do not increase: {stamps}")
    return seconds


def state_layout(mode: str, dtype: str) -> dict[str, str | None]:
    """The dtype of each part of the model state `mode` holds while it trains in `dtype`: weights,
    gradients, master_weights (an fp32 copy beside lower-precision weights; None where the weights
    are fp32 themselves), adam_moments (AdamW's exp_avg and exp_avg_sq, two tensors), reference (a
    second copy of the model for in-loop reference log-probs; None where they are precomputed).

    fp32: everything fp32 in every mode. bf16, which is "mixed bf16 with fp32 masters" on both
    sides (matmuls in bf16, updates applied to fp32 weights by an fp32 AdamW):
    - TRL (Trainer with bf16=True): fp32 weights, which are the masters, and fp32 gradients;
      torch.autocast runs the matmuls in bf16. The `trl` mode is given a bf16 reference model
      (TRL would copy the policy in fp32); under autocast it computes the same bf16 matmuls.
    - dpo-cluster (DeepSpeed bf16 without ZeRO: its FP16_UnfusedOptimizer in bf16): bf16 weights
      and gradients, fp32 masters in the optimizer; the in-loop reference loads in bf16.
    Both come to 16 bytes per parameter of trained state, plus 2 for a reference (see
    `state_bytes_per_param`).
    """
    reference = None if mode in PRECOMPUTE_MODES else ("float32" if dtype == "fp32" else "bfloat16")
    if dtype == "fp32" or mode in TRL_MODES:
        weights, masters = "float32", None
    else:
        weights, masters = "bfloat16", "float32"
    return {
        "weights": weights,
        "gradients": weights,
        "master_weights": masters,
        "adam_moments": "float32",
        "reference": reference,
    }


def state_bytes_per_param(layout: dict[str, str | None]) -> int:
    """Bytes per parameter of a `state_layout`: adam_moments count twice, absent parts nothing.
    E.g. dpo-cluster in bf16: 2 (weights) + 2 (gradients) + 4 (masters) + 2 x 4 (moments) + 2
    (reference) = 18; TRL in bf16: 4 + 4 + 0 + 8 + 2 = 18."""
    total = 0
    for part, dtype in layout.items():
        if dtype is not None:
            total += DTYPE_BYTES[dtype] * (2 if part == "adam_moments" else 1)
    return total


def compute_floor_mb(baseline_mb: float, parameters: int, bytes_per_param: int) -> float:
    """The model-state floor in MB: the process's memory after its imports, before any model
    (`baseline_mb`), plus `parameters` x `bytes_per_param` of model state (MB = 2**20 bytes).
    E.g. 500 MB + 10,485,760 parameters x 18 bytes = 500 + 180 = 680 MB."""
    return baseline_mb + parameters * bytes_per_param / MB


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base; None when either is missing or base is not positive."""
    if value is None or base is None or base <= 0:
        return None
    return value / base


def best_trl(modes: dict[str, dict[str, Any]]) -> str | None:
    """The TRL mode with the higher tokens/s among those that ran (`TRL_MODES` order breaks a tie);
    None when none did."""
    ran = [m for m in TRL_MODES if "tokens_per_second" in modes.get(m, {})]
    return max(ran, key=lambda m: modes[m]["tokens_per_second"], default=None)


def summarize(
    s: BenchSettings,
    setup: dict[str, Any],
    runs: dict[str, StageRun],
    precompute: StageRun | None,
    peak_tflops: float | None,
) -> dict[str, Any]:
    """The benchmark's result: settings, device, model, data, per-mode figures with ratios against
    each TRL mode and the faster one (`best_trl`), the reference precomputes' one-off cost,
    notes and warnings (see `check_mode`). `precompute`: dpo-cluster-fast's Ray Data stage;
    trl-precompute's runs inside its own mode and is in its result."""
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
    for mode in [m for m in MODES if m in runs]:
        run = runs[mode]
        if run.result is None:
            modes[mode] = {"error": run.error}
            warnings.append(f"{mode}: failed, see {run.log}")
            continue
        modes[mode] = mode_figures(mode, run, setup["parameters"], peak, s)
        warnings += check_mode(mode, modes[mode], total_tokens, LOSS_TOLERANCE[s.dtype])
    best = add_ratios(modes)
    return {
        "settings": asdict(s) | {"pairs": s.pairs, "model_shape": None if s.model else s.model_shape()},
        "device": device,
        "peak_tflops": peak,
        "model": {
            "name_or_path": s.model or f"Qwen2 built locally, shape {s.shape}",
            "parameters": setup["parameters"],
            "config": setup.get("model_config"),
            "tokenizer_vocabulary": setup.get("tokenizer_vocabulary"),
        },
        "data": {"pairs": s.pairs, "non_pad_tokens": total_tokens}
        | setup["data"]
        | {"tokens": setup["tokens"]},
        "best_trl": best,
        "modes": modes,
        "precompute": precompute_sections(s, precompute, runs, modes, best),
        "notes": build_notes(s, setup),
        "warnings": warnings,
    }


def check_mode(mode: str, figures: dict[str, Any], total_tokens: int, loss_tolerance: float) -> list[str]:
    """Warnings about one mode's figures: it did not see the data's `total_tokens` non-pad tokens,
    its first-step loss is not ln 2 (policy == reference at step 1) within `loss_tolerance`, a
    loss is not finite, or the dtypes it reports training with are not its `state_layout`'s."""
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
    layout = figures["state"]["layout"]
    for part, seen in (figures.get("dtypes") or {}).items():
        expected = layout.get("adam_moments" if part == "moments" else part)
        if seen != expected:
            warnings.append(f"{mode}: trained with {part} in {seen}, not in {expected} as its floor assumes")
    return warnings


def add_ratios(modes: dict[str, dict[str, Any]]) -> str | None:
    """Set each mode's `vs` ({TRL mode: ratios}) and `vs_best_trl` (the ratios against `best_trl`,
    None without one): tokens_per_second, peak_memory and above_floor, each this mode's over the
    TRL mode's. Returns the best TRL mode."""
    best = best_trl(modes)
    for figures in modes.values():
        if "error" in figures:
            continue
        figures["vs"] = {
            base: {
                "tokens_per_second": ratio(figures["tokens_per_second"], modes[base]["tokens_per_second"]),
                "peak_memory": ratio(figures["peak_memory_mb"], modes[base]["peak_memory_mb"]),
                "above_floor": ratio(figures["above_floor_mb"], modes[base]["above_floor_mb"]),
            }
            for base in TRL_MODES
            if "tokens_per_second" in modes.get(base, {})
        }
        figures["vs_best_trl"] = figures["vs"].get(best) if best else None
    return best


def precompute_sections(
    s: BenchSettings,
    precompute: StageRun | None,
    runs: dict[str, StageRun],
    modes: dict[str, dict[str, Any]],
    best: str | None,
) -> dict[str, Any]:
    """Per precomputing mode that ran, its reference precompute's one-off cost (seconds, peak
    memory, pairs scored) and the mode's tokens/s with that cost spread over the timed steps in
    proportion to their share of the pairs, with its ratios against the TRL modes."""
    sections: dict[str, Any] = {}
    if precompute is not None:
        if precompute.result is None:
            sections["dpo-cluster-fast"] = {"error": precompute.error}
        else:
            pre = precompute.result
            sections["dpo-cluster-fast"] = {
                "seconds": pre["seconds"],
                "subprocess_seconds": precompute.seconds,
                "peak_memory_mb": precompute.peak_memory_mb,
                "peak_memory_kind": "host process tree with Ray",
                "rows_scored": pre["report"]["rows_scored"],
                "how": pre.get("how"),
            }
    trl_run = runs.get("trl-precompute")
    if trl_run is not None and trl_run.result is not None and "precompute" in trl_run.result:
        pre = trl_run.result["precompute"]
        gpu = s.use_gpu and pre.get("gpu_max_allocated_mb") is not None
        sections["trl-precompute"] = {
            "seconds": pre["seconds"],
            "peak_memory_mb": pre["gpu_max_allocated_mb"] if gpu else pre.get("host_peak_mb"),
            "peak_memory_kind": "gpu max allocated" if gpu else "host peak RSS of the process until then",
            "rows_scored": pre["rows_scored"],
            "how": pre.get("how"),
        }
    for mode, section in sections.items():
        figures = modes.get(mode, {})
        if "error" in section or "tokens_per_second" not in figures:
            continue
        share = (s.steps - 1) / s.steps
        amortized = figures["timed_tokens"] / (figures["timed_seconds"] + section["seconds"] * share)
        section["amortized_tokens_per_second"] = amortized
        section["amortized_vs"] = {
            base: ratio(amortized, modes[base]["tokens_per_second"])
            for base in TRL_MODES
            if "tokens_per_second" in modes.get(base, {})
        }
        section["amortized_vs_best_trl"] = section["amortized_vs"].get(best) if best else None
    return sections


def mode_figures(
    mode: str, run: StageRun, parameters: int, peak_tflops: float | None, s: BenchSettings
) -> dict[str, Any]:
    """One mode's figures from its per-step records (end stamp, tokens, entries, loss).

    tokens/s: the non-pad tokens of steps 2..N over those steps' seconds (`step_seconds`);
    seconds/step: their median; padding: the pad share of every entry the policy computed; peak
    memory: GPU max allocated on GPU, else the process tree's (`StageRun.peak_memory_mb`); floor:
    the same kind of baseline plus the model state (`state_layout`), above_floor = peak - floor;
    MFU, where a peak is known: 6 x parameters x tokens/s over the peak.
    """
    record = run.result
    assert record is not None, "a failed stage has no figures"
    steps = record["steps"]
    stamps = [step["end"] for step in steps]
    timed = step_seconds(stamps)
    timed_seconds = sum(timed)
    timed_tokens = sum(step["tokens"] for step in steps[1:])
    tokens_per_second = timed_tokens / timed_seconds
    all_tokens = sum(step["tokens"] for step in steps)
    all_entries = sum(step["entries"] for step in steps)
    gpu_mb = record.get("gpu_max_allocated_mb")
    on_gpu = s.use_gpu and gpu_mb is not None
    peak_mb = gpu_mb if on_gpu else run.peak_memory_mb
    baseline = record.get("baseline") or {}
    baseline_mb = baseline.get("gpu_mb" if on_gpu else "host_mb")
    layout = state_layout(mode, s.dtype)
    bytes_per_param = state_bytes_per_param(layout)
    floor_mb = None if baseline_mb is None else compute_floor_mb(baseline_mb, parameters, bytes_per_param)
    figures: dict[str, Any] = {
        "steps": len(steps),
        "tokens_per_second": tokens_per_second,
        "seconds_per_step_median": statistics.median(timed),
        "timed_seconds": timed_seconds,
        "timed_tokens": timed_tokens,
        "tokens_total": all_tokens,
        "padding_fraction": 1.0 - all_tokens / all_entries,
        "first_step_loss": steps[0]["loss"],
        "final_loss": steps[-1]["loss"],
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": "gpu max allocated" if on_gpu else "host process tree",
        "host_peak_memory_mb": run.peak_memory_mb,
        "baseline_mb": baseline_mb,
        "state": {
            "layout": layout,
            "bytes_per_param": bytes_per_param,
            "mb": parameters * bytes_per_param / MB,
        },
        "floor_mb": floor_mb,
        "above_floor_mb": None if floor_mb is None else peak_mb - floor_mb,
        "dtypes": record.get("dtypes"),
        # Everything in the subprocess but steps 2..N: imports, model loading, trainer or engine
        # set-up, TRL's tokenization, a precompute, the warm-up step, dpo-cluster's final export.
        "outside_steps_seconds": record["finished"] - record["started"] - (stamps[-1] - stamps[0])
        if "started" in record
        else None,
        "subprocess_seconds": run.seconds,
        "notes": record.get("notes", []),
    }
    if peak_tflops:
        figures["mfu"] = 6 * parameters * tokens_per_second / (peak_tflops * 1e12)
    return figures


def build_notes(s: BenchSettings, setup: dict[str, Any]) -> list[str]:
    """What a reader needs to trust the table: precision on each side, the model's vocabulary
    against the tokenizer's, and what `above floor` holds."""
    notes = []
    if s.dtype == "bf16":
        notes.append(
            "bf16 = mixed bf16 with fp32 masters on both sides: TRL keeps fp32 weights (the masters) and "
            "fp32 gradients under torch.autocast (bf16 matmuls); dpo-cluster's DeepSpeed bf16 keeps bf16 "
            "weights and gradients with fp32 masters in its optimizer; 16 B/param of trained state "
            "each, + 2 B/param for a bf16 reference (trl is given one; TRL would copy the policy in fp32)"
        )
    else:
        notes.append("fp32: weights, gradients, AdamW moments and any reference in fp32 on both sides")
    vocabulary, tokenizer = (
        (setup.get("model_config") or {}).get("vocab_size"),
        setup.get("tokenizer_vocabulary"),
    )
    if s.model is None and s.shape != DEFAULT_SHAPE and vocabulary and tokenizer and vocabulary > tokenizer:
        notes.append(
            f"shape {s.shape}: its published config with random weights and a vocabulary of {vocabulary:,} "
            f"(the embedding and head cost what they cost); token ids come from a {tokenizer:,}-token "
            "tokenizer, which changes neither speed nor memory"
        )
    notes.append(
        "floor = the mode's process after its imports (before any model) + parameters x model-state "
        "bytes; above floor = activations, logits, temporary copies (autocast's bf16 weight casts, "
        "DeepSpeed's fp32 gradients at the step), allocator caches, data"
    )
    return notes


def _peak_tflops(device: str) -> float | None:
    return next((tflops for name, tflops in PEAK_BF16_TFLOPS if name in device), None)


def format_table(result: dict[str, Any]) -> str:
    s, data, best = result["settings"], result["data"], result["best_trl"]
    mfu = result["peak_tflops"] is not None
    model = result["model"]
    vocabulary = (model.get("config") or {}).get("vocab_size")
    headline = (
        f"vs TRL: over {best}, the TRL mode with the higher tokens/s; over each TRL mode below the table"
        if best
        else "vs TRL: no TRL mode ran, no ratios"
    )
    lines = [
        f"\nDPO training: {s['steps']} steps x {s['micro_batch_size']} pairs x {s['gradient_accumulation_steps']} "
        f"accumulation = {data['pairs']} pairs, {data['non_pad_tokens']} non-pad tokens, max_length "
        f"{s['max_length']}, {s['dtype']} on {result['device']}",
        f"model: {model['name_or_path']}, {model['parameters'] / 1e6:.1f}M parameters"
        + (f", vocabulary {vocabulary:,}" if vocabulary else "")
        + f"; tokens/s over steps 2..{s['steps']} (step 1 is warm-up), from step ends stamped on one clock",
        headline,
        f"{'mode':<17} {'s/step':>7} {'tokens/s':>9} {'vs TRL':>7} {'peak MB':>8} {'vs TRL':>7} "
        f"{'floor MB':>9} {'>floor MB':>9} {'vs TRL':>7} {'B/param':>7} {'pad %':>6} {'loss@1':>7} {'final':>7}"
        + (f" {'MFU':>6}" if mfu else ""),
    ]
    for mode, f in result["modes"].items():
        if "error" in f:
            lines.append(f"{mode:<17} failed: {f['error'].splitlines()[0]}")
            continue
        vs = f["vs_best_trl"] or {}
        lines.append(
            f"{mode:<17} {f['seconds_per_step_median']:>7.3f} {f['tokens_per_second']:>9.0f} "
            f"{_ratio(vs.get('tokens_per_second')):>7} {f['peak_memory_mb']:>8.0f} "
            f"{_ratio(vs.get('peak_memory')):>7} {_mb(f['floor_mb']):>9} {_mb(f['above_floor_mb']):>9} "
            f"{_ratio(vs.get('above_floor')):>7} {f['state']['bytes_per_param']:>7} "
            f"{100 * f['padding_fraction']:>6.1f} {f['first_step_loss']:>7.4f} {f['final_loss']:>7.4f}"
            + (f" {100 * f['mfu']:>5.1f}%" if mfu and "mfu" in f else "")
        )
    if best is not None:
        lines += _ratio_lines(result["modes"])
    lines += _precompute_lines(result["precompute"], best)
    lines.append(
        "peak MB: "
        + ("GPU max allocated" if s["use_gpu"] else "host memory of the mode's process tree (PSS / peak RSS)")
        + "; B/param: model-state bytes per parameter in the floor"
    )
    lines += [f"note: {n}" for n in result["notes"]]
    lines += [f"WARNING: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def _ratio_lines(modes: dict[str, dict[str, Any]]) -> list[str]:
    """Each mode's tokens/s, peak memory and above-floor memory over each TRL mode's."""
    bases = [m for m in TRL_MODES if "tokens_per_second" in modes.get(m, {})]
    widths = [max(7, len(b)) for b in bases]
    group = sum(widths) + 2 * (len(bases) - 1)
    names = (("tokens/s", "tokens_per_second"), ("peak MB", "peak_memory"), (">floor MB", "above_floor"))
    lines = [
        f"  {'over each TRL':<17}" + "".join(f"   {title:^{group}}" for title, _ in names).rstrip(),
        f"  {'':<17}" + "".join("   " + "  ".join(f"{b:>{w}}" for b, w in zip(bases, widths)) for _ in names),
    ]
    for mode, f in modes.items():
        if "error" in f:
            continue
        cells = [
            "  ".join(f"{_ratio(f['vs'][b][key]):>{w}}" for b, w in zip(bases, widths)) for _, key in names
        ]
        lines.append(f"  {mode:<17}" + "".join(f"   {c}" for c in cells))
    return lines


def _precompute_lines(sections: dict[str, Any], best: str | None) -> list[str]:
    if not sections:
        return []
    lines = ["+ reference precompute, one-off per data and reference, not in the step times:"]
    for mode, pre in sections.items():
        if "error" in pre:
            lines.append(f"  {mode:<17} failed: {pre['error'].splitlines()[0]}")
            continue
        line = (
            f"  {mode:<17} {pre['seconds']:.1f} s for {pre['rows_scored']} pairs, peak {_mb(pre['peak_memory_mb'])} "
            f"MB ({pre['peak_memory_kind']})"
        )
        if "amortized_tokens_per_second" in pre:
            line += (
                f"; spread over this run: {pre['amortized_tokens_per_second']:.0f} tokens/s "
                f"({_ratio(pre['amortized_vs_best_trl'])} {best or 'TRL'})"
            )
        lines.append(line)
        if pre.get("how"):
            lines.append(f"  {'':<17} {pre['how']}")
    return lines


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
