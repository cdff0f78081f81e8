"""The printed side of `dpo-cluster bench serve`: one column per backend, ratio columns against
the first backend, and the notes that say how each number was taken.

Kept apart from the measuring code so the table's layout can change without touching a stopwatch.
"""

from __future__ import annotations

import textwrap
from typing import Any

PHASES = {
    "one": "one model (tuned), JSON",
    "one_stream": "one model (tuned), streamed",
    "compare": "compare (base + tuned), JSON",
}
# (row label, key in a phase's numbers, format); the TTFT rows only where TTFT is measured.
METRICS = (
    ("requests/s", "requests_per_s", "{:.2f}"),
    ("output tokens/s", "output_tokens_per_s", "{:.1f}"),
    ("p50 latency s", "p50_s", "{:.3f}"),
    ("p95 latency s", "p95_s", "{:.3f}"),
)
TTFT_METRICS = (
    ("TTFT p50 s", "ttft_p50_s", "{:.3f}"),
    ("TTFT p95 s", "ttft_p95_s", "{:.3f}"),
)
RATIO_KEYS = tuple(key for _, key, _ in METRICS + TTFT_METRICS)
TTFT_NOTE = (
    "TTFT (time to first token): seconds from sending a streamed /v1/chat/completions request "
    "(stream: true) to the first server-sent chunk whose delta.content is not empty. /v1/compare "
    "answers in one JSON body and has no streaming form, so it has no TTFT (n/a); its latency is "
    "the time to both answers."
)
LABEL_WIDTH = 30
COLUMN_WIDTH = 11


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def cell(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def row(label: str, cells: list[str]) -> str:
    return label.ljust(LABEL_WIDTH) + "".join(c.rjust(COLUMN_WIDTH) for c in cells)


def format_table(result: dict[str, Any]) -> str:
    """The side-by-side table of a `run_serve_benchmark` result."""
    backends: dict[str, Any] = result["backends"]
    ratios: dict[str, Any] = result["ratios"]
    lines = header_lines(result["settings"])
    lines.append(row("", list(backends) + list(ratios)))
    lines.append(row("engine (from /healthz)", [b["engine"] for b in backends.values()]))
    lines.append(row("deploy s", [cell(b["deploy_s"], "{:.1f}") for b in backends.values()]))
    for phase, title in PHASES.items():
        lines.append(title)
        lines += phase_lines(phase, backends, ratios)
    for q in ("p50", "p95"):
        values = [cell(b[f"compare_over_one_{q}"], "{:.2f}x") for b in backends.values()]
        lines.append(row(f"compare {q} / one {q}", values))
    errors = [str(sum(p["errors"] for p in b["phases"].values())) for b in backends.values()]
    lines.append(row("errors (all phases)", errors))
    lines.append("")
    lines += textwrap.wrap(TTFT_NOTE, 100)
    for name in ratios:
        lines += textwrap.wrap(
            f"{name}: the first over the second (throughput: above 1x is faster; latency and "
            "TTFT: below 1x is faster).",
            100,
        )
    return "\n".join(lines)


def header_lines(settings: dict[str, Any]) -> list[str]:
    tuned = "a LoRA adapter built over it" if settings["tuned_built"] else settings["tuned"]
    return [
        f"bench serve: base {settings['base']}, tuned {tuned}",
        f"{settings['requests']} requests per phase after {settings['warmup']} warm-up, "
        f"{settings['concurrency']} concurrent clients, max_new_tokens {settings['max_new_tokens']}, "
        f"{settings['sampling']}",
        "",
    ]


def phase_lines(phase: str, backends: dict[str, Any], ratios: dict[str, Any]) -> list[str]:
    metrics = METRICS + (TTFT_METRICS if phase == "one_stream" else ())
    lines = []
    for label, key, spec in metrics:
        cells = [cell(b["phases"][phase][key], spec) for b in backends.values()]
        cells += [cell(r[phase][key], "{:.2f}x") for r in ratios.values()]
        lines.append(row("  " + label, cells))
    if phase == "compare":
        lines.append(row("  TTFT", ["n/a"] * len(backends)))
    return lines
