"""The `dpo-cluster` command as a user runs it: real subprocesses, real exit codes and output."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_cluster.cli import format_report
from dpo_cluster.data.samples import SAMPLE_FILE, generate_title_pairs, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, cache: Path, timeout: int = 300, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DPO_CLUSTER_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "dpo_cluster.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_prepare_the_bundled_sample_with_the_builtin_tokenizer(tmp_path: Path) -> None:
    result = run_cli(
        "prepare", "--config", "configs/sample_prepare.yaml", f"output_dir={tmp_path / 'out'}", cache=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "train " in result.stdout and "eval " in result.stdout
    assert "(format: conversational)" in result.stdout
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert sum(s["rows_in"] for s in report["splits"].values()) == 400
    assert (tmp_path / "tiny-0.1.0" / "tokenizer.json").exists()  # built on first use, offline

    again = run_cli(
        "prepare", "--config", "configs/sample_prepare.yaml", f"output_dir={tmp_path / 'out'}", cache=tmp_path
    )
    assert "reused (cache key matches)" in again.stdout


@pytest.mark.slow
def test_bad_row_with_fail_policy_is_one_clear_message(tmp_path: Path) -> None:
    rows: list = generate_title_pairs(10, seed=0)
    rows[4]["chosen"] = 7
    data = write_jsonl(rows, tmp_path / "bad.jsonl")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'out'}\nmodel: {{name_or_path: 'builtin:tiny'}}\n"
        f"data: {{train: {data}, on_bad_row: fail}}\n"
    )
    result = run_cli("prepare", "--config", str(config), cache=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"dpo-cluster prepare: error: {data}:5: wrong_type: field 'chosen': expected a string or a list of "
        "messages, got int (data.on_bad_row is 'fail'; set it to 'skip' to drop and count such rows instead)"
    )
    assert "Traceback" not in result.stderr


def test_config_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    result = run_cli(
        "prepare", "--config", "configs/sample_prepare.yaml", "data.max_lenght=5", cache=tmp_path
    )
    assert result.returncode == 2
    assert "unknown config key data.max_lenght (did you mean data.max_length?)" in result.stderr
    assert "Traceback" not in result.stderr
    missing = run_cli("prepare", "--config", "no/such.yaml", cache=tmp_path)
    assert missing.returncode == 2 and "config file not found: no/such.yaml" in missing.stderr


def test_a_dead_ray_address_is_one_line_within_seconds(tmp_path: Path) -> None:
    """RAY_ADDRESS naming a cluster nothing answers at: exit 2 with the address and the fix,
    before Ray's own minutes of retries."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    env = {**os.environ, "DPO_CLUSTER_CACHE": str(tmp_path), "RAY_ADDRESS": f"127.0.0.1:{port}"}
    result = subprocess.run(
        [sys.executable, "-m", "dpo_cluster.cli", "prepare", "--config", "configs/sample_prepare.yaml",
         f"output_dir={tmp_path / 'out'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"dpo-cluster prepare: error: Ray cluster at 127.0.0.1:{port} (from RAY_ADDRESS) does not answer; "
        "start it, or unset RAY_ADDRESS to start a local Ray here"
    )
    assert "Traceback" not in result.stderr


def test_demo_help_lists_its_options(tmp_path: Path) -> None:
    result = run_cli("demo", "--help", cache=tmp_path)
    assert result.returncode == 0
    for option in ("--output-dir", "--pairs", "--no-serve"):
        assert option in result.stdout


def test_help_lists_every_command(tmp_path: Path) -> None:
    result = run_cli("--help", cache=tmp_path)
    assert result.returncode == 0
    for command in ("prepare", "train", "eval", "serve", "demo", "bench"):
        assert command in result.stdout


@pytest.mark.slow
def test_train_command_end_to_end(tmp_path: Path, base_dir: Path) -> None:
    """Relative output_dir and data paths, as in the README: they resolve against the directory
    the command runs in, although Ray Train workers run in a working directory of their own. The
    model is a hub id, found in the Hugging Face cache by the driver's download, the reference
    actors and the workers (the hub itself is offline)."""
    from tests.test_modeling import hub_cache_of

    (tmp_path / "data").mkdir()
    shutil.copy(SAMPLE_FILE, tmp_path / "data" / "pairs.jsonl")
    hub_cache_of(base_dir, tmp_path / "hub", "dpo-cluster/tiny-hub")
    out = tmp_path / "out"
    result = run_cli(
        "train", "--config", str(REPO / "configs" / "sample_train.yaml"), "output_dir=out",
        "model.name_or_path=dpo-cluster/tiny-hub",
        "data.train=data/pairs.jsonl", "train.max_steps=4", "train.eval_steps=2", "train.save_steps=2",
        # The fast path, as a user turns it on: reference scored by the Ray Data stage, packed rows.
        "reference.mode=precompute", "train.packing=true",
        cache=tmp_path, timeout=900, cwd=tmp_path, env={"HF_HUB_CACHE": str(tmp_path / "hub")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"model: {out.resolve() / 'final'}" in result.stdout
    # Before training where the actors do not fit beside the 2 workers (a 2-CPU machine), else beside.
    assert re.search(
        r"reference log-probs: scored \d+ pairs in [\d.]+s (before|beside) training", result.stdout
    )
    assert "reference_report.json" in result.stdout
    assert (out / "final" / "model.safetensors").exists()
    assert f"curves: {out.resolve() / 'training_curves.png'}" in result.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4


def test_job_entrypoint_runs_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "DPO_CLUSTER_CACHE": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "jobs/train.py", "--config", "configs/sample_train.yaml", "train.betta=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown config key train.betta (did you mean train.beta?)" in result.stderr


def test_the_printed_report_has_each_mixed_source_s_share() -> None:
    report = {
        "splits": {
            "train": {"rows_in": 30, "rows_kept": 27, "dropped": {"empty_chosen": 2, "not_sampled": 1}}
        },
        "sources": {
            "train": {
                "source": "a.jsonl, b.jsonl",
                "format": "standard",
                "mix": [
                    {
                        "key": "data.train[0]",
                        "source": "a.jsonl",
                        "format": "standard",
                        "weight": 1.5,
                        "rows_in": 20,
                        "rows_kept": 19,
                        "dropped": {"empty_chosen": 1},
                        "copies": 5,
                    },
                    {
                        "key": "data.train[1]",
                        "source": "b.jsonl",
                        "format": "standard",
                        "weight": 0.5,
                        "rows_in": 10,
                        "rows_kept": 8,
                        "dropped": {"empty_chosen": 1, "not_sampled": 1},
                        "copies": 0,
                    },
                ],  # fmt: skip
            }
        },
    }
    lines = format_report(report).splitlines()
    first, second = (
        next(line for line in lines if key in line) for key in ("data.train[0]", "data.train[1]")
    )
    assert "weight 1.5" in first and "rows_in       20" in first and "kept       19 (copies 5)" in first
    assert "a.jsonl (standard)" in first and first.endswith("empty_chosen=1")
    assert "weight 0.5" in second and second.endswith("empty_chosen=1, not_sampled=1")
