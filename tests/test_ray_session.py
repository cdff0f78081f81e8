"""`ensure_ray` on a dead cluster address: a stale `ray start` record is skipped, RAY_ADDRESS fails fast.

Real Ray, no mocks. Whatever starts or fails to join Ray runs in a subprocess with its own Ray temp
dir (RAY_TMPDIR), so the address file it reads and any local Ray it starts never touch /tmp/ray,
the test session's own Ray, or a cluster other tests started.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpo_cluster.ray_session import FROM_ENV, gcs_answers, requested_address

REPO = Path(__file__).resolve().parents[1]

# Run in the subprocess: ensure_ray, then what it joined; a RuntimeError is printed, not raised.
SCRIPT = """
import ray
from dpo_cluster.ray_session import ensure_ray
try:
    ensure_ray()
except RuntimeError as e:
    print("ERROR", type(e).__name__, e)
print("INITIALIZED", ray.is_initialized())
if ray.is_initialized():
    print("GCS", ray.get_runtime_context().gcs_address)
    ray.shutdown()
"""


def dead_address() -> str:
    """127.0.0.1:PORT with nothing listening: a port the OS just handed out and took back."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """A Ray temp dir of this test's own; short, since Ray puts Unix sockets under it."""
    root = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def record(ray_tmpdir: Path, address: str) -> Path:
    """Write the address file as `ray start` does (RAY_TMPDIR/ray/ray_current_cluster)."""
    path = ray_tmpdir / "ray" / "ray_current_cluster"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(address)
    return path


def run_ensure_ray(ray_tmpdir: Path, ray_address: str | None, timeout: float) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in (FROM_ENV, "RAY_TMPDIR")}
    env["RAY_TMPDIR"] = str(ray_tmpdir)
    if ray_address is not None:
        env[FROM_ENV] = ray_address
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr, elapsed


def test_stale_recorded_address_starts_local_ray(ray_tmpdir: Path) -> None:
    stale = dead_address()
    address_file = record(ray_tmpdir, stale)
    out, elapsed = run_ensure_ray(ray_tmpdir, None, timeout=120)
    assert "INITIALIZED True" in out, out[-3000:]
    # A local Ray of its own, not the stale one (which ray.init would retry for minutes).
    gcs = next(line.split()[1] for line in out.splitlines() if line.startswith("GCS "))
    assert gcs != stale
    warning = [line for line in out.splitlines() if stale in line and "does not answer" in line]
    assert len(warning) == 1, out[-3000:]
    assert str(address_file) in warning[0] and "ray stop" in warning[0]
    assert elapsed < 120


def test_dead_ray_address_raises_at_once(ray_tmpdir: Path) -> None:
    dead = dead_address()
    out, elapsed = run_ensure_ray(ray_tmpdir, dead, timeout=60)
    errors = [line for line in out.splitlines() if line.startswith("ERROR ")]
    assert errors == [
        f"ERROR RayUnreachableError Ray cluster at {dead} (from RAY_ADDRESS) does not answer; "
        "start it, or unset RAY_ADDRESS to start a local Ray here"
    ], out[-3000:]
    assert "INITIALIZED False" in out  # ray.init was never called
    assert elapsed < 30  # the import of ray and one refused connect, not minutes of retries


def test_auto_means_the_recorded_address_asked_for(ray_tmpdir: Path) -> None:
    dead = dead_address()
    address_file = record(ray_tmpdir, dead)
    out, _ = run_ensure_ray(ray_tmpdir, "auto", timeout=60)
    assert f"Ray cluster at {dead} (from RAY_ADDRESS=auto, recorded in {address_file})" in out
    assert "INITIALIZED False" in out


def test_address_resolution_order(ray_tmpdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    monkeypatch.delenv(FROM_ENV, raising=False)
    assert requested_address() == (None, "")
    address_file = record(ray_tmpdir, "10.0.0.7:6379\n")
    assert requested_address() == ("10.0.0.7:6379", str(address_file))
    monkeypatch.setenv(FROM_ENV, "10.0.0.5:6379")  # RAY_ADDRESS beats the file
    assert requested_address() == ("10.0.0.5:6379", FROM_ENV)
    monkeypatch.setenv(FROM_ENV, "")  # empty is unset, as for ray.init
    assert requested_address() == ("10.0.0.7:6379", str(address_file))
    monkeypatch.setenv(FROM_ENV, "auto")
    assert requested_address() == ("10.0.0.7:6379", f"RAY_ADDRESS=auto, recorded in {address_file}")
    for left_to_ray_init in ("local", "ray://10.0.0.5:10001"):
        monkeypatch.setenv(FROM_ENV, left_to_ray_init)
        assert requested_address() == (None, FROM_ENV)


def test_gcs_probe() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        assert gcs_answers(address, timeout=2)
    assert not gcs_answers(address, timeout=2)  # the same port, closed
    assert not gcs_answers("127.0.0.1", timeout=2)  # no port at all
