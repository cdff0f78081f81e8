"""`dpo-cluster bench train`: DPO training throughput and memory next to TRL's DPOTrainer, on this
machine, with the same model, pairs and hyperparameters.

Modes, each trained in a subprocess of its own so that memory is per mode (this process only
orchestrates: `train_stages` is what the subprocesses run, `train_data` the pairs, `train_report`
the figures and the table):

- `trl`: TRL's `DPOTrainer` as a user runs it: reference model in the loop, padded batches.
- `dpo-cluster`: `run_local` (the per-worker loop and DeepSpeed without ZeRO, as suits one process;
  no Ray) with the reference model in the loop (`reference.mode: model`) and padded micro-batches.
- `dpo-cluster-fast`: `reference.mode: precompute`, `train.packing: true` and
  `train.max_tokens_per_micro_batch` (`--fast-max-tokens`, default 2 x max_length). The reference
  log-probs come from the Ray Data stage, run before training in its own subprocess; its wall time
  and memory are reported on a line of their own: a one-off cost per (data, reference) that the
  cache makes reusable, also shown spread over the run's steps.

Every mode consumes the same steps x micro batch x accumulation generated pairs once (log-normal
prompt and answer lengths, `train_data.generate_length_pairs`). Measured per mode:
- tokens/s: non-pad tokens through the policy over the optimizer steps after the first (the first
  is warm-up), divided by those steps' wall time (step end to step end, the same rule for all);
- seconds/step: the median of those steps;
- peak memory: on CPU the largest of the process tree's summed PSS (sampled from /proc every
  0.2 s) and the largest single process's peak RSS (`os.wait4`); on GPU `max_memory_allocated`;
- padding: the share of pad entries in what the policy forward computed;
- first-step loss (ln 2 when policy == reference; a warning when not) and final loss;
- on GPU, model FLOPs utilization: 6 x parameters x tokens / time / the device's peak.
Ratios are against `trl`. A benchmark, not a test: nothing is asserted about speed.

    dpo-cluster bench train --steps 20 --output bench_train.json
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODES = ("trl", "dpo-cluster", "dpo-cluster-fast")
_SAMPLE_SECONDS = 0.2


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run; written as JSON for the subprocesses (`train_stages`)."""

    workdir: str
    model: str | None = None  # hub id or directory; None builds the Qwen2 of `model_shape`
    hidden_size: int = 512
    num_layers: int = 8
    steps: int = 20
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    dtype: str = "fp32"  # fp32 | bf16 (mixed precision over fp32 master weights)
    use_gpu: bool = False
    beta: float = 0.1
    learning_rate: float = 5e-6
    seed: int = 0
    prompt_median: int = 60  # tokens
    chosen_median: int = 50
    rejected_median: int = 40
    length_sigma: float = 0.6  # of the log-normal lengths
    gradient_checkpointing: bool = False
    # dpo-cluster-fast's train.max_tokens_per_micro_batch (each step's pairs cut into forwards of at
    # most this many tokens; the step keeps its pairs). None: 2 x max_length, the smallest budget
    # that holds every pair; 0: no budget (one forward per micro-batch).
    fast_max_tokens: int | None = None

    @property
    def fast_budget(self) -> int | None:
        if self.fast_max_tokens is None:
            return 2 * self.max_length
        return self.fast_max_tokens or None

    @property
    def pairs(self) -> int:
        return self.steps * self.micro_batch_size * self.gradient_accumulation_steps

    @property
    def model_dir(self) -> str:
        return self.model or str(Path(self.workdir) / "model")

    @property
    def data_file(self) -> Path:
        return Path(self.workdir) / "pairs.jsonl"

    @property
    def prepare_dir(self) -> Path:
        return Path(self.workdir) / "prepare"

    def run_dir(self, stage: str) -> Path:
        return Path(self.workdir) / "runs" / stage

    def model_shape(self) -> dict[str, int]:
        """Qwen2-like proportions: 64-dim heads, 4 query heads per kv head, MLP 2.75 x hidden."""
        heads = max(1, self.hidden_size // 64)
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": heads,
            "num_kv_heads": max(1, heads // 4),
            "intermediate_size": max(64, round(2.75 * self.hidden_size / 64) * 64),
        }

    def dpo_cluster_overrides(self, mode: str, output_dir: Path) -> list[str]:
        bf16 = self.dtype == "bf16"
        overrides = [
            f"output_dir={output_dir}",
            f"model.name_or_path={self.model_dir}",
            f"model.dtype={'bfloat16' if bf16 else 'float32'}",
            f"model.gradient_checkpointing={json.dumps(self.gradient_checkpointing)}",
            f"data.train={self.data_file}",
            f"data.max_length={self.max_length}",
            f"deepspeed.precision={self.dtype}",
            f"train.micro_batch_size={self.micro_batch_size}",
            f"train.gradient_accumulation_steps={self.gradient_accumulation_steps}",
            f"train.max_steps={self.steps}",
            "train.logging_steps=1",
            f"train.learning_rate={self.learning_rate}",
            f"train.beta={self.beta}",
            f"train.seed={self.seed}",
            "train.eval_strategy=no",
            "train.save_strategy=no",
            "scaling.num_workers=1",
            # One process: nothing to shard, so no ZeRO (its flat fp32 copies and buckets cost memory).
            "deepspeed.zero_stage=0",
            f"scaling.use_gpu={json.dumps(self.use_gpu)}",
        ]
        if mode == "dpo-cluster-fast":
            # One actor with as many threads as a training process has (one GPU on GPU).
            budget = self.fast_budget
            return overrides + [
                "reference.mode=precompute",
                "train.packing=true",
                *([f"train.max_tokens_per_micro_batch={budget}"] if budget else []),
                f"reference.num_cpus={os.cpu_count() or 1}",
                f"reference.num_gpus={1 if self.use_gpu else 0}",
            ]
        return overrides + ["reference.mode=model"]


@dataclass
class StageRun:
    """A finished subprocess: what it wrote, its wall time and its memory seen from outside."""

    result: dict[str, Any] | None
    seconds: float
    peak_tree_mb: float
    peak_process_mb: float
    log: Path
    error: str | None = None

    @property
    def peak_memory_mb(self) -> float:
        return max(self.peak_tree_mb, self.peak_process_mb)


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

    settings: `BenchSettings` fields (model, hidden_size, num_layers, steps, micro_batch_size, ...).
    dtype: auto (bf16 on a GPU, fp32 on CPU) | fp32 | bf16. device: auto | cpu | cuda.
    workdir: kept when given (model, pairs, prepared data, each stage's log and output); else a
    temporary directory, removed at the end.
    """
    from dpo_cluster.bench.train_report import format_table, summarize

    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes: {unknown or 'none'} given; choose from {', '.join(MODES)}")
    if settings.get("steps", BenchSettings.steps) < 2:
        raise ValueError("steps: at least 2 (the first step is warm-up and not timed)")
    use_gpu = device == "cuda" or (device == "auto" and _cuda_available())
    resolved_dtype = ("bf16" if use_gpu else "fp32") if dtype == "auto" else dtype
    temporary = workdir is None
    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="dpo-cluster-bench-train-"))
    root.mkdir(parents=True, exist_ok=True)
    s = BenchSettings(workdir=str(root.resolve()), dtype=resolved_dtype, use_gpu=use_gpu, **settings)
    try:
        (root / "settings.json").write_text(json.dumps(asdict(s), indent=2))
        setup = run_stage("setup", s)
        if setup.result is None:
            raise RuntimeError(f"bench train: the setup stage failed: {setup.error}")
        runs: dict[str, StageRun] = {}
        precompute: StageRun | None = None
        for mode in [m for m in MODES if m in modes]:  # trl first: the others' ratios need it
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
    """Run one stage of `train_stages` in a subprocess (its own session, log in the workdir)."""
    workdir = Path(s.workdir)
    log, result_path = workdir / "logs" / f"{stage}.log", workdir / "results" / f"{stage}.json"
    log.parent.mkdir(parents=True, exist_ok=True)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAY_DATA_USAGE_DISABLED="1")
    env.pop("RAY_ADDRESS", None)  # the Ray stages start a local instance: this machine is measured
    # Each stage is a single process of its own: torch.distributed variables of a caller that
    # trained in-process would send TRL (accelerate) and DeepSpeed to that caller's rendezvous.
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
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
            self.peak_kb = max(self.peak_kb, sum(_memory_kb(p) for p in descendants(self.pid)))
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


def _memory_kb(pid: int) -> int:
    for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1])
        except (OSError, ValueError):
            continue
    return 0
