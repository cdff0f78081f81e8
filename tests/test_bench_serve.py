"""`dpo-cluster bench serve`: the table's arithmetic on hand-made samples, the flags it refuses, and
one real run through the command line on the hf backend (a real local Ray and Serve, builtin:tiny
and a LoRA adapter built over it, a few requests) whose counts must add up.

No vLLM run here: the serving tests cover that engine, and a benchmark's speed is never asserted.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from dpo_cluster.bench.serve import BenchPlan, compute_ratios, parse_backends
from dpo_cluster.bench.serve_load import Sample, chunk_text, percentile, summarize
from dpo_cluster.bench.serve_report import PHASES, TTFT_NOTE, format_table, ratio
from dpo_cluster.cli import main
from dpo_cluster.config import ConfigError

REQUESTS = 6
MAX_NEW_TOKENS = 8

# ---------------------------------------------------------------------------------------------
# Arithmetic and flags, no Ray


def test_summarize_counts_rates_and_percentiles() -> None:
    """4 answered requests of 10 tokens in 4 s wall: 1 request/s, 10 tokens/s; the failed one
    counts as a request, not in the rates or percentiles. Nearest rank over [1, 2, 3, 4]:
    p50 = index round(0.5 * 3) = 2 -> 3.0, p95 = index round(0.95 * 3) = 3 -> 4.0."""
    samples = [Sample(float(s), 10, ttft_s=s / 10) for s in (1, 2, 3, 4)] + [Sample(0.5, error="HTTP 504")]
    stats = summarize(samples, 4.0)
    assert (stats["requests"], stats["answered"], stats["errors"]) == (5, 4, 1)
    assert stats["first_error"] == "HTTP 504"
    assert (
        stats["requests_per_s"] == 1.0
        and stats["output_tokens"] == 40
        and stats["output_tokens_per_s"] == 10.0
    )
    assert (stats["p50_s"], stats["p95_s"], stats["mean_s"]) == (3.0, 4.0, 2.5)
    assert (stats["ttft_p50_s"], stats["ttft_p95_s"]) == (0.3, 0.4)
    assert stats["per_request"]["output_tokens"] == [10, 10, 10, 10, 0]
    assert percentile([], 50) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None


def test_chunk_text_is_the_delta_content_only() -> None:
    assert chunk_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ""
    assert chunk_text({"choices": [{"delta": {"content": "Hi"}}]}) == "Hi"
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""


def fake_backend(engine: str, latency: float, wall: float) -> dict[str, Any]:
    samples = [Sample(latency, 10, ttft_s=latency / 4) for _ in range(4)]
    phases = {phase: summarize(samples, wall) for phase in PHASES}
    phases["compare"] = summarize([Sample(1.5 * latency, 20) for _ in range(4)], wall)
    return {
        "engine": engine,
        "deploy_s": 1.0,
        "phases": phases,
        "compare_over_one_p50": 1.5,
        "compare_over_one_p95": 1.5,
    }


def test_table_has_a_column_per_backend_and_ratio_columns() -> None:
    """vllm: half the latency and half the wall time of hf -> 2.00x the requests/s, 0.50x the
    latency."""
    backends = {"hf": fake_backend("hf", 2.0, 4.0), "vllm": fake_backend("vllm", 1.0, 2.0)}
    ratios = {"vllm/hf": compute_ratios(backends["vllm"], backends["hf"])}
    assert ratios["vllm/hf"]["one"]["requests_per_s"] == 2.0 and ratios["vllm/hf"]["one"]["p50_s"] == 0.5
    settings = {
        "base": "b", "tuned": None, "tuned_built": True, "requests": 4, "warmup": 1,
        "concurrency": 2, "max_new_tokens": 8, "sampling": "greedy (temperature 0)",
    }  # fmt: skip
    table = format_table({"settings": settings, "backends": backends, "ratios": ratios})
    lines = table.splitlines()
    assert lines[3].split() == ["hf", "vllm", "vllm/hf"]
    requests_rows = [line.split() for line in lines if line.strip().startswith("requests/s")]
    assert requests_rows == [["requests/s", "1.00", "2.00", "2.00x"]] * 3
    assert any(line.split() == ["p50", "latency", "s", "2.000", "1.000", "0.50x"] for line in lines)
    assert any(line.split() == ["compare", "p50", "/", "one", "p50", "1.50x", "1.50x"] for line in lines)
    assert any(line.split() == ["TTFT", "n/a", "n/a"] for line in lines)


@pytest.mark.parametrize("backends", ["hf,tgi", "hf,hf", ","])
def test_bad_backend_lists_are_refused(backends: str) -> None:
    with pytest.raises(ConfigError, match="--backend"):
        BenchPlan(backends=parse_backends(backends)).check()


def test_bad_backend_is_a_usage_error_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "serve", "--backend", "hf,tgi"]) == 2
    assert "--backend" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A real run on the hf backend


@pytest.fixture(scope="module")
def bench_run(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`dpo-cluster bench serve` on builtin:tiny with the adapter it builds itself."""
    output = tmp_path_factory.mktemp("bench_serve") / "bench_serve.json"
    argv = [
        "bench", "serve", "--backend", "hf", "--base", "builtin:tiny",
        "--requests", str(REQUESTS), "--concurrency", "2", "--max-new-tokens", str(MAX_NEW_TOKENS),
        "--warmup", "1", "--port", str(serve_port), "--output", str(output),
        "serve.num_cpus=0",
    ]  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return {"result": json.loads(Path(output).read_text()), "printed": printed.getvalue()}


@pytest.mark.slow
def test_every_phase_is_counted_and_adds_up(bench_run: dict[str, Any]) -> None:
    result = bench_run["result"]
    assert list(result["backends"]) == ["hf"] and result["ratios"] == {}
    hf = result["backends"]["hf"]
    assert hf["engine"] == "hf"
    assert list(hf["phases"]) == list(PHASES)
    for name, phase in hf["phases"].items():
        per_request = phase["per_request"]
        assert (phase["requests"], phase["answered"], phase["errors"]) == (REQUESTS, REQUESTS, 0), name
        assert all(len(values) == REQUESTS for values in per_request.values())
        assert phase["output_tokens"] == sum(per_request["output_tokens"])
        most = 2 * MAX_NEW_TOKENS if name == "compare" else MAX_NEW_TOKENS
        assert all(1 <= tokens <= most for tokens in per_request["output_tokens"]), name
        assert phase["requests_per_s"] == pytest.approx(REQUESTS / phase["wall_s"])
        assert phase["output_tokens_per_s"] == pytest.approx(phase["output_tokens"] / phase["wall_s"])
        assert 0 < phase["p50_s"] <= phase["p95_s"] <= max(per_request["latency_s"]) <= phase["wall_s"]
    assert hf["compare_over_one_p50"] == pytest.approx(
        hf["phases"]["compare"]["p50_s"] / hf["phases"]["one"]["p50_s"]
    )


@pytest.mark.slow
def test_streamed_usage_and_ttft_match_the_json_answers(bench_run: dict[str, Any]) -> None:
    """Greedy, same prompts in the same order: the streamed answers' usage equals the JSON ones'
    request by request, and every streamed request has a first token before its last byte."""
    phases = bench_run["result"]["backends"]["hf"]["phases"]
    one, streamed = phases["one"]["per_request"], phases["one_stream"]["per_request"]
    assert streamed["output_tokens"] == one["output_tokens"]
    assert all(0 < ttft <= latency for ttft, latency in zip(streamed["ttft_s"], streamed["latency_s"]))
    assert one["ttft_s"] == [None] * REQUESTS and phases["compare"]["ttft_p50_s"] is None


@pytest.mark.slow
def test_progress_and_table_are_printed(bench_run: dict[str, Any]) -> None:
    printed = bench_run["printed"]
    assert "building a LoRA adapter over builtin:tiny" in printed
    assert "[hf] deploying the app (serve.backend=hf)" in printed
    for title in PHASES.values():
        assert f"[hf] {title}: {REQUESTS} requests, 2 clients" in printed
        assert f"[hf] {title}: {REQUESTS} answered" in printed
    table = printed[printed.index("bench serve: base builtin:tiny") :]
    assert f"{REQUESTS} requests per phase after 1 warm-up, 2 concurrent clients" in table
    for label in ("requests/s", "output tokens/s", "p50 latency s", "p95 latency s", "TTFT p50 s"):
        assert label in table
    assert "compare p50 / one p50" in table and TTFT_NOTE.split()[0] in table
