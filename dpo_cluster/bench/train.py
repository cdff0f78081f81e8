"""`dpo-cluster bench train`: DPO training throughput and memory next to TRL's DPOTrainer, on this
machine, with the same model, pairs, hyperparameters and precision; nothing asserted.

Modes: `trl` (DPOTrainer, reference model in the loop, padded), `trl-precompute` (DPOTrainer with
`precompute_ref_log_probs=True`: no reference model while training), `dpo-cluster` (`run_local`,
DeepSpeed without ZeRO, reference in the loop, padded) and `dpo-cluster-fast` (precomputed
reference, packed, `--fast-max-tokens` per forward). Both precomputes are one-off costs reported
on their own, not in the step times. Ratios are against each TRL mode and, as the headline,
against the faster one. Each stage runs in a subprocess of its own (`train_stages`) so that peak
memory is per mode; this module orchestrates them and samples their memory, `train_report`
computes the figures.

    dpo-cluster bench train --steps 20 --output bench_train.json
    dpo-cluster bench train --shape qwen2.5-0.5b --layers 4 --max-length 512
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from dpo_cluster.bench.proc_memory import single_process_env
from dpo_cluster.bench.train_report import format_table, summarize
from dpo_cluster.bench.train_settings import (
    MODES,
    BenchSettings,
    BenchSettingsError,
    StageRun,
    memory_kb,
)

_SAMPLE_SECONDS = 0.2


def run_benchmark(
    *,
    modes: tuple[str, ...] | list[str] = MODES,
    dtype: str = "auto",
    device: str = "auto",
    output: str | Path | None = None,
    workdir: str | Path | None = None,
    peak_tflops: float | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Run the modes on one set of pairs; print the table; return (and write to `output`) the figures.

    settings: `BenchSettings` fields (model, shape, hidden_size, num_layers, steps, ...); a bad
    value raises BenchSettingsError (a ValueError) before anything runs.
    dtype: auto (bf16 on a GPU, fp32 on CPU) | fp32 | bf16. device: auto | cpu | cuda.
    workdir: kept when given (model, pairs, prepared data, each stage's log and output); else a
    temporary directory, removed at the end.
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise BenchSettingsError(f"modes: {unknown or 'none'} given; choose from {', '.join(MODES)}")
    if settings.get("steps", BenchSettings.steps) < 2:
        raise BenchSettingsError("steps: at least 2 (the first step is warm-up and not timed)")
    use_gpu = device == "cuda" or (device == "auto" and _cuda_available())
    resolved_dtype = ("bf16" if use_gpu else "fp32") if dtype == "auto" else dtype
    s = BenchSettings(workdir="", dtype=resolved_dtype, use_gpu=use_gpu, **settings)  # checked first
    temporary = workdir is None
    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="dpo-cluster-bench-train-"))
    root.mkdir(parents=True, exist_ok=True)
    s = replace(s, workdir=str(root.resolve()))
    try:
        (root / "settings.json").write_text(json.dumps(asdict(s), indent=2))
        setup = run_stage("setup", s)
        if setup.result is None:
            raise RuntimeError(f"bench train: the setup stage failed: {setup.error}")
        runs: dict[str, StageRun] = {}
        precompute: StageRun | None = None
        for mode in [m for m in MODES if m in modes]:  # the TRL modes first: the others' ratios need them
            if mode == "dpo-cluster-fast":
                precompute = run_stage("precompute", s)
                if precompute.result is None:
                    runs[mode] = precompute
                    continue
            runs[mode] = run_stage(mode, s)
        result = summarize(s, setup.result, runs, precompute, peak_tflops)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    print(format_table(result))
    if output:
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------
# Subprocesses and their memory.


def run_stage(stage: str, s: BenchSettings) -> StageRun:
    """Run one stage of `train_stages` in a subprocess (its own session, log in the workdir).

    Its memory is measured from outside: the process tree's summed PSS, sampled every 0.2 s
    (`TreeMemoryMonitor`), and the largest single process's peak RSS (`os.wait4`).
    """
    workdir = Path(s.workdir)
    log, result_path = workdir / "logs" / f"{stage}.log", workdir / "results" / f"{stage}.json"
    log.parent.mkdir(parents=True, exist_ok=True)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    env = single_process_env(dict(os.environ, TOKENIZERS_PARALLELISM="false", RAY_DATA_USAGE_DISABLED="1"))
    env.pop("RAY_ADDRESS", None)  # the Ray stages start a local instance: this machine is measured
    command = [sys.executable, "-m", "dpo_cluster.bench.train_stages", stage]
    command += [str(workdir / "settings.json"), str(result_path)]
    print(f"[bench train] {stage}: running (log: {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        monitor = TreeMemoryMonitor(process.pid)
        monitor.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            raise
        finally:
            monitor.stop()
        process.returncode = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)  # anything the stage left running in its session
    seconds = time.perf_counter() - started
    # ru_maxrss: kilobytes on Linux, bytes on macOS.
    process_mb = usage.ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)
    error = None
    if process.returncode != 0 or not result_path.exists():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        error = f"exit status {process.returncode}; last lines of {log}:\n{tail}"
        print(f"[bench train] {stage}: FAILED ({error})", flush=True)
    result = json.loads(result_path.read_text()) if error is None else None
    print(f"[bench train] {stage}: done in {seconds:.1f} s", flush=True)
    return StageRun(result, seconds, monitor.peak_kb / 1024, process_mb, log, error)


class TreeMemoryMonitor(threading.Thread):
    """Samples the summed memory of a process and all its descendants until stopped.

    Per process it reads PSS (/proc/PID/smaps_rollup: shared pages divided among their users, so
    the sum over a tree of processes sharing libraries or Ray's object store counts them once),
    falling back to VmRSS. Without /proc the peak stays 0 and `os.wait4`'s figure is used alone.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kb = 0
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            self.peak_kb = max(self.peak_kb, sum(memory_kb(p) for p in descendants(self.pid)))
            self._stopped.wait(_SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def descendants(root: int) -> list[int]:
    """`root` and every process below it, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found
