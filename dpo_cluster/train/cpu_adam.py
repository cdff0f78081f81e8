"""DeepSpeed's cpu_adam op, loaded up front with an error that says what went wrong.

`deepspeed.offload_optimizer: cpu` steps the optimizer with DeepSpeedCPUAdam, whose C++ op DeepSpeed
compiles just in time on first use (minutes) into the torch extensions cache. When that build fails
the user sees only a compiler log deep inside `deepspeed.initialize`; `load_cpu_adam` does the same
load first and turns a failure into a RuntimeError naming the op, the cache and the fixes.
`python -m dpo_cluster.train.cpu_adam` (`make cpu-adam`) prebuilds it.
"""

from __future__ import annotations

import os
import sys
import time
from types import ModuleType

OP_NAME = "cpu_adam"
# DeepSpeed's build flag for this op (CPUAdamBuilder.BUILD_VAR): set to 1 at install, the op is
# compiled into the wheel and never JIT-built.
BUILD_VAR = "DS_BUILD_CPU_ADAM"


def extensions_dir() -> str:
    """Where torch's JIT loader builds the op: $TORCH_EXTENSIONS_DIR/cpu_adam, else
    <user cache>/torch_extensions/py<XY>_<cpu|cuXY|rocmXY>/cpu_adam (as torch.utils.cpp_extension does)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        import torch
        from torch.utils.cpp_extension import get_default_build_root

        if torch.version.hip is not None:
            accelerator = "rocm" + torch.version.hip.replace(".", "")
        elif torch.version.cuda is not None:
            accelerator = "cu" + torch.version.cuda.replace(".", "")
        else:
            accelerator = "cpu"
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{python}_{accelerator}")
    return os.path.join(root, OP_NAME)


def _summary(error: BaseException) -> list[str]:
    """The error's type and last line, plus the compiler's first `error:` line when there is one.

    torch's build error holds ninja's whole log and ends on its uninformative "ninja: build stopped";
    without an `error:` line (a compiler that is not there: "/bin/sh: 1: c++: not found") the last
    line of output before it is shown instead.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    found = [f"cause: {type(error).__name__}: {last[:300]}"]
    detail = next((line for line in lines if "error:" in line.lower()), None)
    if detail is None and last.startswith("ninja:"):
        # ninja's log: "[i/n] <command>", "FAILED: <target>", the command again, then its output.
        commands = {line.split("] ", 1)[-1] for line in lines if line.startswith("[")}
        output = [
            line for line in lines[:-1] if not line.startswith(("[", "FAILED:")) and line not in commands
        ]
        detail = output[-1] if output else None
    if detail is not None and detail != last:
        found.append(f"compiler: {detail[:300]}")
    return found


def _failure_message(error: BaseException) -> str:
    return "\n".join(
        [
            f"`deepspeed.offload_optimizer: cpu` needs DeepSpeed's {OP_NAME} op (DeepSpeedCPUAdam), "
            "which failed to build or load.",
            "DeepSpeed compiles it just in time (JIT) on first use, with ninja and a C++ compiler "
            "($CXX, else c++, with OpenMP; no CUDA toolkit: it is a CPU op), into the torch extensions "
            f"cache {extensions_dir()} (TORCH_EXTENSIONS_DIR moves it).",
            *_summary(error),
            "fix: prebuild it once per machine with `make cpu-adam` (python -m dpo_cluster.train.cpu_adam), "
            f"or install DeepSpeed with it compiled in: {BUILD_VAR}=1 pip install --no-build-isolation "
            "--no-cache-dir deepspeed, or set `deepspeed.offload_optimizer: none`.",
        ]
    )


def _load(verbose: bool = False) -> ModuleType:
    """The op module, loaded exactly as DeepSpeedCPUAdam loads it (same builder, same cache; a later
    load in the same process returns this module at once). RuntimeError with the fixes on failure."""
    try:
        # What deepspeed.ops.adam.cpu_adam imports: on every accelerator (CUDA too) this resolves
        # to the CPU builder, and `load()` imports a prebuilt op or else JIT-builds it.
        from deepspeed.ops.op_builder import CPUAdamBuilder

        return CPUAdamBuilder().load(verbose=verbose)
    except Exception as error:
        raise RuntimeError(_failure_message(error)) from error


def load_cpu_adam() -> None:
    """Build (first time on this machine, minutes) or load (cached, about 2 s) DeepSpeed's cpu_adam op.

    Raises RuntimeError, from the original error, naming the JIT build, its cache and the fixes.
    """
    _load()


def main() -> None:
    """Prebuild the op, with the compiler's output shown, and say where it is and how long it took."""
    print(f"Building or loading DeepSpeed's {OP_NAME} op (a first build takes minutes) ...", flush=True)
    start = time.perf_counter()
    try:
        module = _load(verbose=True)
    except RuntimeError as error:
        raise SystemExit(str(error)) from None
    seconds = time.perf_counter() - start
    print(f"{OP_NAME} op ready in {seconds:.1f} s: {module.__file__}")


if __name__ == "__main__":
    main()
