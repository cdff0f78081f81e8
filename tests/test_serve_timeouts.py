"""Per-request time limits over real HTTP: a generation that outlives `serve.request_timeout_s`
is a 504 JSON error (an error event inside an already-started stream), and the replica stops
working on it rather than finishing the tokens nobody will read."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dpo_cluster.config import load_config
from dpo_cluster.serving.launch import start_serving, stop_serving
from tests.serve_helpers import Client, sse_events

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, serve_port: int) -> Iterator[Client]:
    root = tmp_path_factory.mktemp("timeouts")
    config = load_config(
        None,
        [
            "serve.base=builtin:tiny",
            "serve.tuned=builtin:tiny",
            f"serve.port={serve_port}",
            f"serve.arena_db={root / 'votes.sqlite'}",
            "serve.num_cpus=0",
            "serve.api_key_env=DPO_CLUSTER_TEST_NO_SUCH_VARIABLE",
            "serve.request_timeout_s=0.3",
            "serve.max_new_tokens=1000",
        ],
        serving=True,
    )
    urls = start_serving(config)
    yield Client(urls.base, key=None)
    stop_serving()


def test_slow_generation_is_a_504_and_stops(client: Client) -> None:
    # 1000 tokens take seconds on the tiny model; the limit is 0.3 s. Stop strings force a
    # decode per token, making each step slower still.
    body = {
        "model": "base",
        "prompt": "Once upon",
        "max_tokens": 1000,
        "temperature": 0,
        "stop": ["\u0000never"],
    }
    response = client.post("/v1/completions", body)
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["type"] == "timeout" and "0.3 s" in error["message"]

    streamed = client.post(
        "/v1/completions", body | {"stream": True, "stream_options": {"include_usage": True}}
    )
    assert streamed.status_code == 200  # headers went out with the first token
    events = sse_events(streamed)
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "timeout"
    # The replica stopped at the deadline: far fewer than the 1000 tokens asked for were made.
    text = "".join(e["choices"][0]["text"] for e in events[:-2] if e.get("choices"))
    assert len(text) < 1000

    # A short one still fits in the limit.
    quick = client.post("/v1/completions", {"model": "base", "prompt": "Once", "max_tokens": 2})
    assert quick.status_code == 200, quick.text
