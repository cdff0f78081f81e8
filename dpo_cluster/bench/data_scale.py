"""`dpo-cluster bench data --scale`: the data path at a million rows, where memory counts as much as
speed. `prepare` and TRL's preparation each run in a child process of their own, so each peak RSS is
that process's own; Ray's worker processes and object store are sampled while prepare runs; then the
training reader opens the prepared split on 2 Ray tasks and reports what each one read.

    dpo-cluster bench data --scale --rows 1000000 --output bench_data_scale.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dpo_cluster.bench.proc_memory import RayMemorySampler, peak_rss_bytes, single_process_env
from dpo_cluster.data.samples import generate_title_pairs

SCALE_ROWS = 1_000_000
READER_WORKERS = 2
MICRO_BATCH_SIZE = 8
# Rows generated (and held) at a time while writing the input file.
_CHUNK_ROWS = 10_000
_MODULE = "dpo_cluster.bench.data_scale"
_MiB = 2**20


def write_pairs(rows: int, path: Path, seed: int = 0) -> Path:
    """`rows` conversational title pairs as JSONL, generated _CHUNK_ROWS at a time (chunk i seeded
    by seed * 1_000_003 + i), so neither the bench nor the file's writer holds every row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for chunk, start in enumerate(range(0, rows, _CHUNK_ROWS)):
            pairs = generate_title_pairs(min(_CHUNK_ROWS, rows - start), seed=seed * 1_000_003 + chunk)
            f.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)
    return path


def run_scale_benchmark(
    rows: int = SCALE_ROWS, seed: int = 0, tokenizer_dir: str | None = None
) -> dict[str, Any]:
    """Generate `rows` pairs, run both preparations and the reader; print a table; return the figures.

    dpo-cluster: `prepare()` cold (cache off, fresh output dir, a new Ray job whose workers start
    with it) in a child process joined to the Ray cluster this bench starts or joins (ensure_ray;
    the child inherits RAY_ADDRESS, and RAY_AUTH_MODE=token with ~/.ray/auth_token where ray.init
    turned token authentication on). TRL: `datasets.load_dataset("json")` and DPOTrainer's
    `_prepare_dataset`, one process (num_proc=None, its default), in another child. Reader: 2 Ray
    tasks, each opening `IndexedPairSource` on the train split and consuming epoch 0 through
    `WorkerContext.my_steps`, as a training worker of 2 does. Worker and object-store figures are
    for this machine's raylet, so run it on a one-node cluster.
    """
    import ray

    from dpo_cluster.modeling import resolve_name_or_path
    from dpo_cluster.ray_session import ensure_ray

    tokenizer_dir = str(tokenizer_dir or resolve_name_or_path("builtin:tiny"))
    ensure_ray()
    ray_cpus = int(ray.cluster_resources().get("CPU", 1))
    child_env = single_process_env(dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address))
    result: dict[str, Any] = {
        "mode": "scale",
        "rows": rows,
        "format": "conversational",
        "cpus": os.cpu_count() or 1,
        "ray_cpus": ray_cpus,
    }
    with tempfile.TemporaryDirectory(prefix="bench-data-scale-") as tmp:
        work = Path(tmp)
        print(f"writing {rows} generated pairs ...", flush=True)
        data = write_pairs(rows, work / "pairs.jsonl", seed)
        result["input_bytes"] = data.stat().st_size

        print(f"dpo-cluster prepare (child process, Ray Data on {ray_cpus} CPUs) ...", flush=True)
        with RayMemorySampler() as sampler:
            ours = _run_child("ours", data, tokenizer_dir, work, child_env)
        train_dir = ours.pop("train_dir")  # inside `work`, gone when the bench returns
        result["dpo_cluster"] = {**ours, "rows_per_second": rows / ours["seconds"], **sampler.summary()}

        print("TRL DPOTrainer preparation (child process, datasets.map, num_proc=None) ...", flush=True)
        trl = _run_child("trl", data, tokenizer_dir, work, child_env)
        result["trl"] = {**trl, "rows_per_second": rows / trl["seconds"]}
        result["rows_agree"] = trl["rows_out"] == ours["rows_in"] == rows

        print(f"training reader on {READER_WORKERS} Ray tasks ...", flush=True)
        result["reader"] = _run_reader(train_dir, READER_WORKERS)
    result["ratio"] = {
        "rows_per_second": result["dpo_cluster"]["rows_per_second"] / result["trl"]["rows_per_second"],
        "peak_rss": result["dpo_cluster"]["driver_peak_rss_bytes"] / result["trl"]["peak_rss_bytes"],
    }
    _print_table(result)
    return result


# ---------------------------------------------------------------------------------------------
# Child processes: one side each, the figures written as JSON for the bench to read


def _run_child(side: str, data: Path, tokenizer_dir: str, work: Path, env: dict[str, str]) -> dict[str, Any]:
    out, log = work / f"{side}.json", work / f"{side}.log"
    command = [sys.executable, "-m", _MODULE, side, str(data), tokenizer_dir, str(work / side), str(out)]
    with open(log, "w") as log_file:
        done = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"bench data --scale: the {side} child exited with {done.returncode}:\n{tail}")
    return json.loads(out.read_text())


def _child_ours(data: Path, tokenizer_dir: str, output_dir: Path) -> dict[str, Any]:
    from dpo_cluster.bench.data import _time_ours
    from dpo_cluster.ray_session import ensure_ray

    ensure_ray()  # join before the clock starts: a real cluster is up before prepare runs
    seconds, prepared = _time_ours(data, tokenizer_dir, output_dir)
    splits = prepared.report["splits"]
    return {
        "seconds": seconds,
        "rows_in": sum(s["rows_in"] for s in splits.values()),
        "rows_kept": sum(s["rows_kept"] for s in splits.values()),
        "train_dir": str(prepared.split_dir("train")),
        "driver_peak_rss_bytes": peak_rss_bytes(),
    }


def _child_trl(data: Path, tokenizer_dir: str) -> dict[str, Any]:
    import datasets

    from dpo_cluster.bench.data import _time_trl
    from dpo_cluster.modeling import load_tokenizer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    seconds, out = _time_trl(data, load_tokenizer(tokenizer_dir), None)
    return {"seconds": seconds, "rows_out": len(out), "peak_rss_bytes": peak_rss_bytes()}


def _child_main(argv: list[str]) -> None:
    side, data, tokenizer_dir, output_dir, out = argv
    if side == "ours":
        figures = _child_ours(Path(data), tokenizer_dir, Path(output_dir))
    else:
        figures = _child_trl(Path(data), tokenizer_dir)
    Path(out).write_text(json.dumps(figures))


# ---------------------------------------------------------------------------------------------
# The training reader: what each of 2 workers opens and reads in one epoch


def _read_epoch(split_dir: str, rank: int, world_size: int) -> dict[str, Any]:
    """One training worker's epoch 0, consumed as the training loop consumes it."""
    import torch

    from dpo_cluster.train.context import WorkerContext
    from dpo_cluster.train.indexed_source import IndexedPairSource

    source = IndexedPairSource(Path(split_dir), seed=0)
    ctx = WorkerContext(
        rank=rank,
        world_size=world_size,
        local_rank=0,
        device=torch.device("cpu"),
        train=source,
        eval=None,
        report=lambda *a: None,
    )
    started = time.perf_counter()
    for _ in ctx.my_steps(source, micro_batch_size=MICRO_BATCH_SIZE, accumulation=1, epoch=0):
        pass
    return {
        "rank": rank,
        "num_rows": source.num_rows,
        "open_seconds": source.rows.open_seconds,
        "epoch_seconds": time.perf_counter() - started,
        "rows_read": source.rows.rows_read,
        "bytes_read": source.rows.bytes_read,
        "total_bytes": source.rows.total_bytes,
        "fraction_read": source.rows.bytes_read / source.rows.total_bytes if source.rows.total_bytes else 0.0,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _run_reader(split_dir: str, world_size: int) -> dict[str, Any]:
    import ray

    # A fresh process per task (max_calls=1), so each peak RSS is that one worker's.
    read_epoch = ray.remote(num_cpus=1, max_calls=1)(_read_epoch)
    workers = ray.get([read_epoch.remote(split_dir, rank, world_size) for rank in range(world_size)])
    return {
        "world_size": world_size,
        "micro_batch_size": MICRO_BATCH_SIZE,
        "workers": workers,
        "rows_read_total": sum(w["rows_read"] for w in workers),
        # Before the indexed reader every worker streamed the whole split and kept its share.
        "previous_fraction_per_worker": 1.0,
    }


# ---------------------------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / _MiB:,.1f} MiB" if n >= _MiB or n == 0 else f"{n / 1024:,.1f} KiB"


def _print_table(r: dict[str, Any]) -> None:
    ours, trl, ratio, reader = r["dpo_cluster"], r["trl"], r["ratio"], r["reader"]
    print(
        f"\nscale: {r['rows']:,} conversational pairs ({r['input_bytes'] / _MiB:,.0f} MiB JSONL), tiny "
        f"byte-level BPE tokenizer, {r['cpus']} CPUs, Ray {r['ray_cpus']} CPUs"
    )
    head = ("", "TRL (datasets.map, 1 proc)", "dpo-cluster prepare (cold)", "ours / TRL")
    print(f"{head[0]:<22} {head[1]:>28} {head[2]:>28} {head[3]:>11}")
    print(
        f"{'rows/s':<22} {trl['rows_per_second']:>28,.0f} {ours['rows_per_second']:>28,.0f} "
        f"{ratio['rows_per_second']:>10.2f}x"
    )
    print(
        f"{'peak RSS (process)':<22} {_mib(trl['peak_rss_bytes']):>28} "
        f"{_mib(ours['driver_peak_rss_bytes']):>28} {ratio['peak_rss']:>10.2f}x"
    )
    print(
        f"rows: TRL {trl['rows_out']:,}, ours {ours['rows_in']:,} in / {ours['rows_kept']:,} kept; agree: {r['rows_agree']}"
    )
    print(f"driver peak RSS (prepare's process): {_mib(ours['driver_peak_rss_bytes'])}")
    print(
        f"Ray worker peak RSS: {_mib(ours['worker_peak_rss_bytes'])} "
        f"(max of {ours['worker_processes_seen']} worker processes; {ours['worker_peak_process']})"
    )
    print(
        f"object store peak: {_mib(ours['object_store_peak_bytes'])} of {_mib(ours['object_store_capacity_bytes'])}"
        f", spilled {_mib(ours['object_store_spilled_bytes'])} ({ours['samples']} samples, every "
        f"{ours['interval_s']} s)"
    )
    for w in reader["workers"]:
        print(
            f"reader rank {w['rank']}/{reader['world_size']}: start-up {w['open_seconds']:.2f} s, epoch "
            f"{w['epoch_seconds']:.1f} s, read {w['rows_read']:,} of {w['num_rows']:,} rows, "
            f"{_mib(w['bytes_read'])} of {_mib(w['total_bytes'])} ({w['fraction_read']:.2f} of the split), "
            f"peak RSS {_mib(w['peak_rss_bytes'])}"
        )
    fractions = " + ".join(f"{w['fraction_read']:.2f}" for w in reader["workers"])
    print(
        f"reader bytes per worker: {fractions} of the split (previous design, every worker read every row: "
        f"{reader['previous_fraction_per_worker']:.2f} each)"
    )


if __name__ == "__main__":
    _child_main(sys.argv[1:])
