"""jobs/: thin `ray job submit` entrypoints. Each has a main(), stays short, and its docstring gives
a submit command whose script, runtime env and config exist; runtime_env.yaml is a valid Ray
runtime env. (tests/test_ray_job_e2e.py submits jobs/train.py to a real cluster.)"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p.name for p in (REPO / "jobs").glob("*.py"))
SUBMIT = re.compile(
    r"ray job submit --working-dir \. --runtime-env (\S+) -- \\\n\s+python (jobs/\S+\.py)(?: (\S+))?(?: --config (\S+))?"
)


def test_the_four_entrypoints_exist() -> None:
    assert set(JOBS) >= {"train.py", "prepare.py", "evaluate.py", "benchmark.py"}


@pytest.mark.parametrize("name", JOBS)
def test_entrypoint_is_thin_and_documents_its_submit_command(name: str) -> None:
    path = REPO / "jobs" / name
    source = path.read_text()
    assert len(source.splitlines()) < 100
    tree = ast.parse(source)
    assert any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)
    doc = ast.get_docstring(tree) or ""
    match = SUBMIT.search(doc)
    assert match, (
        f"{name}: no `ray job submit --working-dir . --runtime-env ... -- python jobs/...` in its docstring"
    )
    runtime_env, script, _, config = match.groups()
    assert script == f"jobs/{name}"
    assert (REPO / runtime_env).is_file()
    if config is not None:
        assert (REPO / config).is_file(), config


@pytest.mark.parametrize("name", JOBS)
def test_entrypoint_runs(name: str) -> None:
    done = subprocess.run(
        [sys.executable, f"jobs/{name}", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_runtime_env_yaml_is_a_valid_ray_runtime_env() -> None:
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((REPO / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**spec)
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert "working_dir" not in spec, "the submit command's --working-dir . names it"


def test_rayignore_keeps_the_upload_small() -> None:
    ignored = {line.strip() for line in (REPO / ".rayignore").read_text().splitlines()}
    assert {".venv/", ".git/", "outputs/"} <= ignored
