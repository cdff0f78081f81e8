"""Peak memory for the benchmarks: a process's own high-water RSS, a sampler thread that follows
Ray's worker processes and object store on this machine while something runs, and the environment
of a child measured as one process of its own.

The peak is VmHWM from /proc, not `getrusage().ru_maxrss`: Linux carries ru_maxrss over fork and
exec, so a child started from a large parent reports at least the parent's peak, whereas VmHWM
belongs to the address space that exec gives the child. Linux only; elsewhere the figures are None.
"""

from __future__ import annotations

import threading
from typing import Any

# Processes Ray titles "ray::..." that are not workers (they run no tasks).
_RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """The high-water resident set size of process `pid` (VmHWM), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def find_raylet(socket_name: str) -> int | None:
    """The pid of the raylet serving `socket_name` (a node's "RayletSocketName" in `ray.nodes()`),
    so other Ray clusters on the same machine are left out; None if it is not on this machine."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        if f"--raylet_socket_name={socket_name}" in (proc.info["cmdline"] or []):
            return proc.info["pid"]
    return None


def ray_worker_processes(raylet_pid: int) -> dict[int, str]:
    """pid -> title of each worker process of the raylet `raylet_pid` ("ray::IDLE",
    "ray::MapBatches(...)", an actor's "ray::Name.method"): Ray titles a worker with what it runs."""
    import psutil

    workers = {}
    try:
        children = psutil.Process(raylet_pid).children()
    except psutil.Error:
        return {}
    for proc in children:
        try:
            title = " ".join(proc.cmdline()).strip()
        except psutil.Error:  # exited since
            continue
        if title.startswith("ray::") and not title.startswith(_RAY_AGENTS):
            workers[proc.pid] = title
    return workers


class RayMemorySampler:
    """`with RayMemorySampler():` samples every `interval_s`, from a thread of this (connected) driver:
    the VmHWM of each worker process of this machine's raylet, and the object store's bytes in use.

    The store figure is the raylet's own count (`FormatGlobalMemoryInfo`, the call behind
    `ray memory --stats-only`, without the per-object table), summed over the cluster's nodes;
    a sample costs about 5 ms. A peak shorter than the interval can be missed; worker peaks cannot,
    as long as the process is seen once after it (VmHWM only rises).
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        # pid -> (VmHWM bytes, what it last ran: its latest title other than "ray::IDLE")
        self.worker_peaks: dict[int, tuple[int, str]] = {}
        self.store_peak_bytes = 0
        self.store_capacity_bytes = 0
        self.spilled_bytes = 0
        self.samples = 0
        self._spilled_at_start: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-memory-sampler", daemon=True)
        self._raylet: tuple[str, int] | None = None
        self._raylet_pid: int | None = None

    def __enter__(self) -> RayMemorySampler:
        import ray

        here = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == here)
        self._raylet = (node["NodeManagerAddress"], node["NodeManagerPort"])
        self._raylet_pid = find_raylet(node["RayletSocketName"])
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def summary(self) -> dict[str, Any]:
        peak_pid = max(self.worker_peaks, key=lambda p: self.worker_peaks[p][0], default=None)
        return {
            "worker_peak_rss_bytes": self.worker_peaks[peak_pid][0] if peak_pid is not None else None,
            "worker_peak_process": self.worker_peaks[peak_pid][1] if peak_pid is not None else None,
            "worker_processes_seen": len(self.worker_peaks),
            "object_store_peak_bytes": self.store_peak_bytes,
            "object_store_capacity_bytes": self.store_capacity_bytes,
            "object_store_spilled_bytes": self.spilled_bytes,
            "samples": self.samples,
            "interval_s": self.interval_s,
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        workers = ray_worker_processes(self._raylet_pid) if self._raylet_pid is not None else {}
        for pid, title in workers.items():
            peak = peak_rss_bytes(pid)
            if peak is not None:
                seen = self.worker_peaks.get(pid, (0, title))[1]
                self.worker_peaks[pid] = (peak, seen if title == "ray::IDLE" else title)
        stats = self._store_stats()
        if stats is not None:
            self.store_peak_bytes = max(self.store_peak_bytes, stats.object_store_bytes_used)
            self.store_capacity_bytes = stats.object_store_bytes_used + stats.object_store_bytes_avail
            if self._spilled_at_start is None:
                self._spilled_at_start = stats.spilled_bytes_total
            self.spilled_bytes = stats.spilled_bytes_total - self._spilled_at_start
        self.samples += 1

    def _store_stats(self) -> Any:
        from ray._private.internal_api import get_memory_info_reply
        from ray._private.state import state

        assert self._raylet is not None
        try:
            return get_memory_info_reply(state, *self._raylet, timeout_seconds=5).store_stats
        except Exception:  # a busy or restarting raylet: skip this sample, keep the run going
            return None


# torch.distributed's rendezvous variables. A caller that trained in-process (`run_local` sets them)
# would send a child's TRL (accelerate) and DeepSpeed to that caller's rendezvous.
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def single_process_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child measured as one process of its own: without `DISTRIBUTED_ENV`."""
    return {name: value for name, value in env.items() if name not in DISTRIBUTED_ENV}
