"""The other ways the serving app is laid out and launched: two full models (one deployment each)
built through `serve.app:app_builder`, the import path Serve configs and RayService use; and
`dpo-cluster serve` as a user runs it, in its own process with its own Ray, stopped by Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from dpo_cluster.modeling import resolve_name_or_path
from tests.serve_helpers import API_KEY, Client, build_lora_final

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def full_models(
    tmp_path_factory: pytest.TempPathFactory, serve_port: int, smollm2_dir: Path
) -> Iterator[dict[str, Any]]:
    """Two full models of different architectures and vocabularies, each with its own tokenizer
    and chat template: the tiny model as base, the real SmolLM2-135M-Instruct as tuned."""
    from ray import serve

    import serve.app as serve_app  # the module Serve configs import: serve.app:app_builder
    from dpo_cluster.serving.app import APP_NAME

    root = tmp_path_factory.mktemp("full")
    tuned = smollm2_dir
    app = serve_app.app_builder(
        {
            "base": "builtin:tiny",
            "tuned": str(tuned),
            "port": serve_port,
            "arena_db": str(root / "votes.sqlite"),
            "num_cpus": 0,
            "api_key_env": "DPO_CLUSTER_TEST_NO_SUCH_VARIABLE",
            # Over the tiny model's 1024 positions, so the replica's own context check is reached.
            "max_prompt_tokens": 4096,
            "max_batch_size": 4,
        }
    )
    serve.run(app, name=APP_NAME, route_prefix="/")
    yield {"url": f"http://127.0.0.1:{serve_port}", "tuned": tuned}
    serve.delete(APP_NAME)


def greedy_text(model_dir: str, content: str, max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_two_full_models_get_a_deployment_each(full_models: dict[str, Any]) -> None:
    from ray import serve

    client = Client(full_models["url"], key=None)
    deployments = serve.status().applications["dpo-cluster"].deployments
    assert set(deployments) == {"Frontend", "BaseModel", "TunedModel"}
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["base"]["deployment"] == "BaseModel" and models["tuned"]["deployment"] == "TunedModel"
    assert models["tuned"]["adapter_of"] is None

    health = client.get("/healthz").json()
    assert health["api_key_required"] is False  # no key configured: the routes are open
    assert health["models"]["tuned"]["parameters"] > 100 * health["models"]["base"]["parameters"]

    prompt = "Write a YouTube title for my video about sourdough bread."
    compared = client.post(
        "/v1/compare",
        {"messages": [{"role": "user", "content": prompt}], "max_new_tokens": 12, "temperature": 0},
    )
    assert compared.status_code == 200, compared.text
    result = compared.json()
    # Greedy through the app equals transformers' greedy, each model with its own chat template.
    assert result["base"]["text"] == greedy_text(resolve_name_or_path("builtin:tiny"), prompt, 12)
    real = greedy_text(str(full_models["tuned"]), prompt, 12)
    assert result["tuned"]["text"] == real and "sourdough" in real.lower(), real
    assert result["base"]["text"] != result["tuned"]["text"]


def test_prompt_over_the_model_context_fails_alone_with_a_400(full_models: dict[str, Any]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = Client(full_models["url"], key=None)
    too_long = {"model": "base", "prompt": "word " * 500, "max_tokens": 4}
    fine = {"model": "base", "prompt": "word", "max_tokens": 4, "temperature": 0}
    with ThreadPoolExecutor(4) as pool:  # sent together, so they can share a batch
        responses = list(pool.map(lambda b: client.post("/v1/completions", b), [too_long, fine] * 2))
    for response in responses[0::2]:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "prompt" and "context" in error["message"]
    for response in responses[1::2]:
        assert response.status_code == 200, response.text
    streamed = client.post("/v1/completions", too_long | {"stream": True})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt"


def test_app_builder_rejects_bad_args() -> None:
    import serve.app as serve_app
    from dpo_cluster.config import ConfigError

    with pytest.raises(ConfigError, match="did you mean serve.tuned"):
        serve_app.app_builder({"base": "builtin:tiny", "tunde": "/x"})
    with pytest.raises(ConfigError, match="serve.tuned: no such model directory"):
        serve_app.app_builder({"base": "builtin:tiny", "tuned": "/no/such/final"})
    with pytest.raises(ConfigError, match="serve.tuned: required"):
        serve_app.app_builder({"base": "builtin:tiny"})


def test_serve_config_file_names_an_importable_builder() -> None:
    import importlib

    import yaml

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    (application,) = config["applications"]
    module, _, attr = application["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert (REPO / application["args"]["config"]).is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_runs_until_interrupted(tmp_path: Path) -> None:
    final = build_lora_final(tmp_path / "final")
    port = _free_port()
    env = os.environ | {"DPO_CLUSTER_API_KEY": API_KEY, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dpo_cluster.cli",
            "serve",
            "--base",
            "builtin:tiny",
            "--tuned",
            str(final),
            f"serve.port={port}",
            f"serve.arena_db={tmp_path / 'votes.sqlite'}",
            "serve.num_cpus=0",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        # The app is up once the command says how to stop it (it prints the URLs first).
        while not any("Ctrl-C stops the app." in line for line in lines):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "dpo-cluster serve did not start:\n" + "".join(lines)
            time.sleep(0.5)
        assert requests.get(url + "/healthz", timeout=30).status_code == 200
        client = Client(url)
        # The key in the CLI's environment reached the front replica.
        assert client.post("/v1/compare", {"prompt": "hi"}, key=None).status_code == 401
        compared = client.post("/v1/compare", {"prompt": "hi", "max_new_tokens": 4})
        assert compared.status_code == 200, compared.text
        assert set(compared.json()) >= {"base", "tuned", "params"}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, "".join(lines)
        reader.join(timeout=10)
        output = "".join(lines)
        assert f"arena:    {url}/arena" in output
        assert "Traceback" not in output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.parametrize(
    "args,message",
    [
        (["serve"], "serve.base: required"),
        (["serve", "--base", "builtin:tiny"], "serve.tuned: required"),
        (
            ["serve", "--base", "builtin:tiny", "--tuned", "/no/such/final"],
            "serve.tuned: no such model directory",
        ),
        (["serve", "--base", "builtin:tiny", "--tuned", "/x", "serve.port=0"], "serve.port: must be > 0"),
    ],
)
def test_cli_serve_config_errors_are_one_line(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dpo_cluster.cli", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert json.dumps(message)  # the message is plain text
