"""A real Ray cluster of `ray start` processes on this machine, with token authentication on, for
tests that go through the same commands a user types (`ray start`, `ray job submit`, `serve run`).

Each cluster gets its own token file, temp dir and ports, so it never touches the test session's
own Ray (`ray_local`) or `~/.ray`. `ray stop` would stop every Ray on the machine; instead the
cluster's processes are found by the token path in their environment (every Ray process inherits
it, also workers that left the process group) and stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_ports() -> list[str]:
    """Ports every node opens; the defaults are fixed numbers, which two nodes on one machine (or
    the test session's own Ray) would share."""
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


@dataclass
class LocalRayCluster:
    """`ray start --head` plus optional worker nodes, each a `ray start --block` process."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rc", dir="/tmp")))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client of this cluster: token auth on, its token, no other Ray."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env |= {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "PYTHONUNBUFFERED": "1",
        }
        # As in an activated virtualenv: a job's `python ...` entrypoint is this Python, with Ray and
        # the dependencies, not whatever `python` comes first on the caller's PATH.
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        # Rendezvous settings that a one-process training run in this process left behind are not
        # the cluster's.
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(key, None)
        return env | extra

    def start_head(self, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        args = [
            "--head",
            f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            # Short: Ray's unix socket paths under it must stay under 108 characters.
            f"--temp-dir={self.root / 'ray'}",
        ]
        self._start("head", [*args, "--node-ip-address=127.0.0.1"], num_cpus, resources)
        self.wait_for_nodes(1)

    def add_node(
        self, name: str, num_cpus: int, resources: dict[str, float] | None = None, wait: bool = True
    ) -> None:
        """A worker node with its own loopback address (127.0.0.2, .3, ...): Ray Train ranks
        nodes by IP, so nodes sharing 127.0.0.1 would count as one machine. With `wait=False` the
        node starts while the next one is added (`ray start` is mostly Python start-up, which two
        nodes do side by side); the last `add_node` then waits for all of them."""
        # Its own temp dir, as on a machine of its own: nodes sharing one would share (and clean
        # up under each other) the unpacked working_dir of a job.
        ip = f"127.0.0.{len(self.nodes) + 1}"
        args = [f"--address={self.gcs_address}", f"--temp-dir={self.root / name}", f"--node-ip-address={ip}"]
        self._start(name, args, num_cpus, resources)
        if wait:
            self.wait_for_nodes(len(self.nodes))

    def _start(self, name: str, args: list[str], num_cpus: int, resources: dict[str, float] | None) -> None:
        command = [str(BIN / "ray"), "start", *args, f"--num-cpus={num_cpus}", "--num-gpus=0", *_agent_ports(),
                   "--block"]  # fmt: skip
        if resources:
            command.append(f"--resources={json.dumps(resources)}")
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the process keeps it
        self.nodes.append(
            subprocess.Popen(
                command, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        """Until `count` nodes are alive (asked through the dashboard, with the token)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for node in self.nodes:
                if node.poll() is not None:
                    raise RuntimeError(f"ray start exited with {node.returncode}:\n{self.logs()}")
            alive = self._alive_nodes()
            if alive is not None and len(alive) >= count:
                return
            time.sleep(1)
        raise TimeoutError(f"{count} Ray nodes not up after {timeout:.0f}s:\n{self.logs()}")

    def _alive_nodes(self) -> list[Any] | None:
        import urllib.request

        request = urllib.request.Request(
            f"{self.dashboard}/nodes?view=summary",
            headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                summary = json.load(response)["data"]["summary"]
        except (OSError, KeyError, ValueError):
            return None
        return [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]

    def run(
        self,
        *args: str,
        timeout: float = 120,
        check: bool = True,
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
    ) -> str:
        """A Ray CLI command (`ray ...`, `serve ...`) as a client of this cluster; its output."""
        done = subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            env=self.env(**(env or {})),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done.stdout + done.stderr

    def submit(self, *entrypoint: str, runtime_env: str = "runtime_env.yaml") -> str:
        """`ray job submit --working-dir .` from the repository root; the job id."""
        out = self.run("ray", "job", "submit", "--address", self.dashboard, "--working-dir", ".",
                       "--runtime-env", runtime_env, "--no-wait", "--", *entrypoint)  # fmt: skip
        match = re.search(r"raysubmit_\w+", out)
        if match is None:
            raise RuntimeError(f"no job id in:\n{out}")
        return match.group(0)

    def job_status(self, job_id: str) -> str:
        out = self.run("ray", "job", "status", "--address", self.dashboard, job_id)
        for status in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING"):
            if re.search(rf"\b{status}\b", out, re.IGNORECASE):
                return status
        raise RuntimeError(f"no job status in:\n{out}")

    def wait_for_job(self, job_id: str, timeout: float = 900) -> str:
        """The job's final status (SUCCEEDED, FAILED or STOPPED)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.job_status(job_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(3)
        raise TimeoutError(f"job {job_id} still running after {timeout:.0f}s")

    def job_logs(self, job_id: str) -> str:
        return self.run("ray", "job", "logs", "--address", self.dashboard, job_id)

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.root.glob("*.log")
        )

    def processes(self) -> list[int]:
        """Every process of this cluster: they all carry its token path in their environment."""
        marker = f"RAY_AUTH_TOKEN_PATH={self.token_path}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        # `ray start --block` outlives SIGTERM by far more than any grace worth waiting (over 30 s
        # here), so a longer wait only delays the SIGKILL below; nothing of the cluster is kept.
        deadline = time.time() + 1
        while time.time() < deadline and any(n.poll() is None for n in self.nodes):
            time.sleep(0.5)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for node in self.nodes:
            node.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)
