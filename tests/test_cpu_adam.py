"""`dpo_cluster.train.cpu_adam`: DeepSpeed's real JIT build of the cpu_adam op, made to fail in seconds.

A subprocess gets an empty torch extensions cache (TORCH_EXTENSIONS_DIR) and a CXX that answers
torch's version probes through the real c++ but fails every compile, so DeepSpeed really runs ninja
and the build really fails, without the minutes of a real compile. The error must name the op, the
JIT build and every fix. With the op already built for this venv, the load is checked to succeed
and to be the module DeepSpeedCPUAdam then uses; it is skipped rather than compiled otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpo_cluster.train.cpu_adam import extensions_dir, load_cpu_adam

REPO = Path(__file__).resolve().parents[1]

FAILING_CXX = """#!/bin/sh
# torch probes the compiler (-v, --version, -dumpversion): answer with the real one.
# Compiles (-c) fail, like a compiler missing a header.
for arg in "$@"; do
  if [ "$arg" = "-c" ]; then
    echo "fake-cxx: fatal error: simulated compile failure" >&2
    exit 1
  fi
done
exec c++ "$@"
"""

# Writes {"cause": the chained exception's type, "message": the RuntimeError's} to argv[1]
# (DeepSpeed logs to stdout, so not there).
CHECK_ERROR = """
import json, sys
from dpo_cluster.train.cpu_adam import load_cpu_adam
try:
    load_cpu_adam()
except RuntimeError as error:
    result = {"cause": type(error.__cause__).__name__, "message": str(error)}
else:
    result = {"cause": None, "message": "loaded"}
with open(sys.argv[1], "w") as out:
    json.dump(result, out)
"""


def failing_build_env(tmp_path: Path, compiler: str = "failing") -> dict[str, str]:
    """This environment with an empty extensions cache and a compiler that cannot compile
    ("failing") or is not there ("missing")."""
    cxx = tmp_path / "fake-cxx"
    if compiler == "failing":
        cxx.write_text(FAILING_CXX)
        cxx.chmod(0o755)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"), CXX=str(cxx))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def assert_names_the_fixes(message: str, cache: Path) -> None:
    for needed in (
        "cpu_adam",
        "just in time (JIT)",
        "make cpu-adam",
        "DS_BUILD_CPU_ADAM=1",
        "deepspeed.offload_optimizer: cpu",
        "deepspeed.offload_optimizer: none",
        str(cache / "cpu_adam"),
    ):
        assert needed in message, f"{needed!r} missing from:\n{message}"


@pytest.mark.parametrize(
    ("compiler", "compiler_line"),
    [
        ("failing", "compiler: fake-cxx: fatal error: simulated compile failure"),
        ("missing", "fake-cxx: not found"),
    ],
    ids=["failing", "missing"],
)
def test_failed_build_raises_runtime_error_naming_the_fixes(
    tmp_path: Path, compiler: str, compiler_line: str
) -> None:
    env = failing_build_env(tmp_path, compiler)
    result_file = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, "-c", CHECK_ERROR, str(result_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(result_file.read_text())
    cause, message = result["cause"], result["message"]
    # Raised from the original error.
    assert cause is not None and cause != "NoneType", message
    assert_names_the_fixes(message, tmp_path / "torch_extensions")
    assert "cause: " in message
    if shutil.which("c++") and shutil.which("ninja"):
        assert cause == "RuntimeError", message
        assert "cause: RuntimeError: ninja: build stopped" in message
        assert "compiler: " in message and compiler_line in message
    # A few lines, not a compiler log.
    assert len(message.strip().splitlines()) <= 6, message


def test_prebuild_command_fails_with_the_message_and_no_traceback(tmp_path: Path) -> None:
    env = failing_build_env(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "dpo_cluster.train.cpu_adam"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert_names_the_fixes(done.stderr, tmp_path / "torch_extensions")


def built_for_this_venv() -> bool:
    """True when loading will not compile: the op is installed prebuilt, or the default cache holds
    a build from this DeepSpeed's sources that ninja finds up to date. The cache is shared by every
    venv of this Python and accelerator, and another venv's build would be rebuilt here (minutes)."""
    import deepspeed
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("cpu_adam", False):
        return True
    build = Path(extensions_dir())
    ninja_file = build / "build.ninja"
    ninja = shutil.which("ninja")
    if ninja is None or not (build / "cpu_adam.so").exists() or not ninja_file.exists():
        return False
    if str(Path(deepspeed.__file__).parent / "ops" / "csrc") not in ninja_file.read_text():
        return False
    dry_run = subprocess.run([ninja, "-C", str(build), "-n"], capture_output=True, text=True)
    return dry_run.returncode == 0 and "no work to do" in dry_run.stdout


def test_warm_cache_load_is_what_deepspeed_cpu_adam_uses() -> None:
    if "TORCH_EXTENSIONS_DIR" in os.environ or not built_for_this_venv():
        pytest.skip("cpu_adam is not built for this venv in the default cache (make cpu-adam builds it)")
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.ops.op_builder import CPUAdamBuilder

    start = time.perf_counter()
    load_cpu_adam()
    seconds = time.perf_counter() - start
    assert seconds < 60, f"a warm load took {seconds:.1f} s: it rebuilt"
    op = CPUAdamBuilder().load()
    assert Path(op.__file__).name.startswith("cpu_adam")

    weight = torch.nn.Parameter(torch.ones(8))
    optimizer = DeepSpeedCPUAdam([weight], lr=0.1)
    assert optimizer.ds_opt_adam is op
    weight.grad = torch.ones(8)
    optimizer.step()
    assert torch.all(weight < 1)
