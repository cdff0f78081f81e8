"""The cluster workflow of the README, end to end, with the commands a user types: `ray start
--head` (token auth on), `ray job submit --working-dir .` of the smoke training recipe, then
`serve run --working-dir .` of the serve config against the same cluster and a comparison over
HTTP, `ray job stop`, and a client without the cluster's token refused."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ray_cluster import REPO, LocalRayCluster, free_port
from tests.test_train_local import metrics_rows

pytestmark = pytest.mark.slow

SMOKE = "configs/qwen2.5-0.5b-youtube-titles_smoke.yaml"
# The smoke recipe keeps the real recipe's learning rate (1e-6); the tiny random model needs
# larger steps to show learning in 4 steps. A dotted override, as a user would pass one.
LEARN = "train.learning_rate=5e-4"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    cluster = LocalRayCluster()
    try:
        cluster.start_head(num_cpus=4)
        yield cluster
    finally:
        cluster.stop()


def http(url: str, body: dict[str, Any] | None = None, key: str | None = None) -> tuple[int, Any]:
    """(status, JSON body or text) of a GET, or of a POST when `body` is given."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def test_a_client_without_the_token_is_refused(cluster: LocalRayCluster, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    refused = cluster.run("ray", "job", "list", "--address", cluster.dashboard, check=False,
                          env={"RAY_AUTH_TOKEN_PATH": str(wrong)})  # fmt: skip
    assert "Invalid authentication token" in refused
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"{cluster.dashboard}/api/jobs/", timeout=10)
    assert error.value.code == 401
    cluster.run("ray", "job", "list", "--address", cluster.dashboard)  # with the token: accepted


def test_ray_job_stop_stops_a_running_job(cluster: LocalRayCluster) -> None:
    job_id = cluster.submit("python", "-c", "import time; time.sleep(600)")
    deadline = time.time() + 120
    while cluster.job_status(job_id) != "RUNNING":
        assert time.time() < deadline, "the job never started"
        time.sleep(1)
    cluster.run("ray", "job", "stop", "--address", cluster.dashboard, job_id)
    assert cluster.wait_for_job(job_id, timeout=120) == "STOPPED"


def test_submitted_training_job_then_serve_on_the_same_cluster(
    cluster: LocalRayCluster, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    job_id = cluster.submit("python", "jobs/train.py", "--config", SMOKE, f"output_dir={run_dir}", LEARN)
    status = cluster.wait_for_job(job_id)
    logs = cluster.job_logs(job_id)
    assert status == "SUCCEEDED", logs[-5000:]
    assert f"model: {run_dir / 'final'}" in logs and "final metrics: loss=" in logs
    assert "Logging error" not in logs  # runtime_env.yaml's env_vars reached the job

    # The model trained: final/ loads, the first step is ln 2 (policy == reference), and the
    # metrics moved the right way on the training and the held-out pairs.
    AutoModelForCausalLM.from_pretrained(run_dir / "final")
    rows = metrics_rows(run_dir)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[-1]["loss"] < train[0]["loss"] - 0.05 and train[-1]["rewards/accuracies"] > 0.5
    final_eval = [r for r in rows if "eval_loss" in r][-1]
    assert final_eval["eval_loss"] < math.log(2) and final_eval["eval_rewards/accuracies"] > 0.5
    workers = json.loads((run_dir / "workers.json").read_text())
    assert sorted(w["world_rank"] for w in workers) == [0, 1]

    # Serve the result on the same cluster. Run from elsewhere: `serve.app` is imported from the
    # uploaded working_dir, not from this process's directory.
    key_file = tmp_path / "api_key"
    key_file.write_text("e2e-key\n")
    port = free_port()
    serve_config = yaml.safe_load((REPO / "serve/config.yaml").read_text())
    serve_config["http_options"]["port"] = port
    serve_config["applications"][0]["args"] = {
        "config": SMOKE,
        "tuned": str(run_dir / "final"),
        "api_key_file": str(key_file),
    }
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(serve_config))
    cluster.run("serve", "run", "--address", cluster.gcs_address, "--working-dir", str(REPO), "--non-blocking",
                str(config_path), cwd=tmp_path, timeout=300)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            try:
                if http(f"{url}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, cluster.run("serve", "status", "--address", cluster.dashboard)
            time.sleep(2)
        prompt = {"messages": [{"role": "user", "content": "A title for a video on Ray"}], "max_tokens": 8}
        assert http(f"{url}/v1/compare", prompt)[0] == 401
        status, comparison = http(f"{url}/v1/compare", prompt | {"temperature": 0}, key="e2e-key")
        assert status == 200, comparison
        for side in ("base", "tuned"):
            assert comparison[side]["usage"]["completion_tokens"] > 0
            assert comparison[side]["finish_reason"] in ("length", "stop")
        state = cluster.run("serve", "status", "--address", cluster.dashboard)
        assert "status: RUNNING" in state and "TunedModel" in state
    finally:
        cluster.run("serve", "shutdown", "-y", "--address", cluster.dashboard, check=False)
