"""`dpo-cluster bench data`: this Ray Data pipeline vs TRL's DPOTrainer preparation
(`datasets.map`) on the same rows, tokenizer and machine, in one run. The token ids of both sides
are compared row by row, so the rows/s figures are for provably the same work.

    dpo-cluster bench data --rows 20000

`--scale` (`bench/data_scale.py`) runs both at a million rows in processes of their own, for peak
memory, and measures the training reader.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from dpo_cluster.config import load_config
from dpo_cluster.data.samples import generate_title_pairs, write_jsonl


def _time_trl(path: Path, tokenizer: Any, num_proc: int | None) -> tuple[float, Any]:
    import datasets

    from dpo_cluster.data.trl_reference import trl_tokenize

    started = time.perf_counter()
    rows = datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
    out = trl_tokenize(rows, tokenizer, num_proc=num_proc, max_length=None)
    return time.perf_counter() - started, out


def _time_ours(path: Path, tokenizer_dir: str, output_dir: Path) -> tuple[float, Any]:
    from dpo_cluster.data.pipeline import prepare

    config = load_config(
        None,
        [
            f"output_dir={output_dir}",
            f"model.name_or_path={tokenizer_dir}",
            f"data.train={path}",
            "data.max_length=4096",
            "data.cache=false",
        ],
    )
    started = time.perf_counter()
    prepared = prepare(config)
    return time.perf_counter() - started, prepared


def _same_ids(trl_out: Any, prepared: Any, path: Path) -> bool:
    """Row i of TRL's output is line i+1 of the file (no blank lines); compare every row."""
    import pyarrow.parquet as pq

    ours: dict[str, tuple[list[int], list[int], list[int]]] = {}
    for f in sorted(prepared.split_dir("train").glob("*.parquet")):
        for r in pq.read_table(f, columns=["row_id", "prompt_ids", "chosen_ids", "rejected_ids"]).to_pylist():
            ours[r["row_id"]] = (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])
    if len(ours) != len(trl_out):
        return False
    for i, r in enumerate(trl_out.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])):
        if ours.get(f"{path}:{i + 1}") != (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]):
            return False
    return True


def run_data_benchmark(rows: int = 20_000, num_proc: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Run both sides on `rows` generated pairs per format; print a table; return the figures.

    TRL: `datasets.load_dataset("json")` then DPOTrainer's `_prepare_dataset`, with TRL's default
    one process and with one per CPU, the `datasets` cache off. dpo-cluster: `prepare()` with its
    cache off (read, validate, split, tokenize, write Parquet, account for every row), on a Ray
    started before timing as it is long-lived in real use; the first (cold workers) and a second
    prepare (warm workers) are both reported.
    """
    import datasets
    import ray

    from dpo_cluster.modeling import load_tokenizer, resolve_name_or_path
    from dpo_cluster.ray_session import ensure_ray

    datasets.disable_caching()
    datasets.disable_progress_bars()
    cpus = os.cpu_count() or 1
    num_proc = num_proc or cpus
    tokenizer_dir = resolve_name_or_path("builtin:tiny")
    tokenizer = load_tokenizer(tokenizer_dir)
    ensure_ray()
    ray_cpus = int(ray.cluster_resources().get("CPU", 1))

    results: dict[str, Any] = {"rows": rows, "cpus": cpus, "ray_cpus": ray_cpus, "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, conversational in (("conversational", True), ("standard", False)):
            path = write_jsonl(
                generate_title_pairs(rows, seed=seed, conversational=conversational),
                Path(tmp) / f"{fmt}.jsonl",
            )
            trl_1_s, _ = _time_trl(path, tokenizer, None)
            trl_n_s, trl_out = _time_trl(path, tokenizer, num_proc)
            # The first prepare of a Ray job starts its worker processes, which import
            # transformers and load the tokenizer; the second runs on warm workers. Both count.
            cold_s, _ = _time_ours(path, tokenizer_dir, Path(tmp) / f"cold-{fmt}")
            warm_s, prepared = _time_ours(path, tokenizer_dir, Path(tmp) / f"warm-{fmt}")
            timings = {
                "trl_num_proc_1": trl_1_s,
                f"trl_num_proc_{num_proc}": trl_n_s,
                "dpo_cluster_cold_workers": cold_s,
                "dpo_cluster_warm_workers": warm_s,
            }
            results["formats"][fmt] = {
                "seconds": timings,
                "rows_per_second": {k: rows / v for k, v in timings.items()},
                "ratio_vs_trl_num_proc_1": {k: trl_1_s / v for k, v in timings.items()},
                f"ratio_vs_trl_num_proc_{num_proc}": {k: trl_n_s / v for k, v in timings.items()},
                "identical_token_ids": _same_ids(trl_out, prepared, path),
            }
            _print_table(
                fmt, rows, num_proc, ray_cpus, timings, results["formats"][fmt]["identical_token_ids"]
            )
    return results


def _print_table(
    fmt: str, rows: int, num_proc: int, ray_cpus: int, timings: dict[str, float], same: bool
) -> None:
    names = {
        "trl_num_proc_1": "TRL DPOTrainer prep (datasets.map, num_proc=1)",
        f"trl_num_proc_{num_proc}": f"TRL DPOTrainer prep (datasets.map, num_proc={num_proc})",
        "dpo_cluster_cold_workers": f"dpo-cluster prepare (Ray Data, {ray_cpus} CPUs, cold workers)",
        "dpo_cluster_warm_workers": f"dpo-cluster prepare (Ray Data, {ray_cpus} CPUs, warm workers)",
    }
    base, base_n = timings["trl_num_proc_1"], timings[f"trl_num_proc_{num_proc}"]
    print(f"\n{fmt} pairs: {rows} rows, same JSONL file in, token ids out (tiny byte-level BPE tokenizer)")
    print(f"{'pipeline':<58} {'seconds':>8} {'rows/s':>9} {'vs TRL 1':>9} {f'vs TRL {num_proc}':>9}")
    for key, seconds in timings.items():
        print(
            f"{names[key]:<58} {seconds:>8.2f} {rows / seconds:>9.0f} {base / seconds:>8.2f}x {base_n / seconds:>8.2f}x"
        )
    print(f"token ids identical to TRL's for every row: {same}")
