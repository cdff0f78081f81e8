"""The serving app on vLLM: a real vLLM engine (the CPU build) in a real Ray Serve replica, over
real HTTP on 127.0.0.1, serving SmolLM2-135M-Instruct and a LoRA adapter over it in one engine.

The same routes, limits and answers as the transformers backend: greedy text and token counts
equal that backend's for the same prompts (the front renders the prompt ids for both), the
adapter changes the tuned answers, compare and a blind battle with a vote work, the official
openai client works unchanged, and a burst of mixed valid and invalid requests gets no 5xx.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dpo_cluster.config import ConfigError, ServeConfig, load_config
from dpo_cluster.serving.app import choose_backend
from dpo_cluster.serving.generation import GenerationRequest, SamplingParams, TransformersBackend
from dpo_cluster.serving.launch import start_serving, stop_serving
from dpo_cluster.serving.prompts import render_prompt_ids
from tests.serve_helpers import API_KEY, Client, build_smollm2_adapter, mixed_burst, sse_events
from tests.test_serve_app import BAD_REQUESTS

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me a title for a video about sourdough bread.",
    "Name three prime numbers.",
]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, serve_port: int, smollm2_dir: Path
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("serve_vllm")
    final = build_smollm2_adapter(smollm2_dir, root / "final")
    (root / "key").write_text(API_KEY)
    # The limits of test_serve_app's app, so its catalogue of bad requests means the same here.
    config = load_config(
        None,
        [
            f"serve.base={smollm2_dir}",
            f"serve.tuned={final}",
            "serve.backend=vllm",
            f"serve.port={serve_port}",
            f"serve.arena_db={root / 'votes.sqlite'}",
            f"serve.api_key_file={root / 'key'}",
            "serve.num_cpus=0",
            "serve.max_new_tokens=32",
            "serve.default_max_new_tokens=8",
            "serve.max_prompt_tokens=64",
            "serve.max_body_bytes=4096",
            "serve.max_batch_size=4",
            "serve.max_ongoing_requests=16",
            "serve.vllm_kv_cache_gb=0.5",
        ],
        serving=True,
    )
    urls = start_serving(config)
    yield {"url": urls.base, "final": final, "base": smollm2_dir}
    stop_serving()


@pytest.fixture(scope="module")
def client(served: dict[str, Any]) -> Client:
    return Client(served["url"])


@pytest.fixture(scope="module")
def hf_answers(served: dict[str, Any]) -> dict[tuple[str, str], tuple[str, int, int]]:
    """(model, question) -> (text, prompt tokens, completion tokens) from the transformers
    backend, greedy, on the prompt ids the front renders, in the same dtype (float32)."""
    backend = TransformersBackend(str(served["base"]), {"base": None, "tuned": str(served["final"])})
    tokenizer = backend.tokenizer("base")
    requests_ = [
        GenerationRequest(
            model,
            tuple(render_prompt_ids(tokenizer, messages=chat(q), max_prompt_tokens=64)),
            SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0),
        )
        for model in ("base", "tuned")
        for q in QUESTIONS
    ]
    results = backend.generate(requests_)
    keys = [(model, q) for model in ("base", "tuned") for q in QUESTIONS]
    return {k: (r.text, r.prompt_tokens, r.completion_tokens) for k, r in zip(keys, results)}


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def ask(client: Client, model: str, question: str) -> dict[str, Any]:
    body = {"model": model, "messages": chat(question), "max_tokens": MAX_NEW_TOKENS, "temperature": 0}
    response = client.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    return response.json()


def test_healthz_says_vllm_serves_base_and_adapter_in_one_engine(client: Client) -> None:
    health = client.get("/healthz", key=None).json()
    assert health["status"] == "ok"
    assert {m["backend"] for m in health["models"].values()} == {"vllm"}
    assert health["models"]["base"] == health["models"]["tuned"]  # one deployment, one engine
    assert health["models"]["base"]["dtype"] == "float32"


def test_greedy_text_and_token_counts_equal_the_transformers_backend(
    client: Client, hf_answers: dict[tuple[str, str], tuple[str, int, int]]
) -> None:
    # Submitted together, so the engine runs base and adapter rows in the same batches.
    with ThreadPoolExecutor(8) as pool:
        keys = [(model, q) for model in ("base", "tuned") for q in QUESTIONS]
        replies = list(pool.map(lambda k: ask(client, *k), keys))
    for key, reply in zip(keys, replies):
        text, prompt_tokens, completion_tokens = hf_answers[key]
        usage = reply["usage"]
        assert reply["choices"][0]["message"]["content"] == text, key
        # The engine counts the prompt ids it was given: the same the transformers backend got.
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt_tokens, completion_tokens), key


def test_the_adapter_changes_the_tuned_answers(
    hf_answers: dict[tuple[str, str], tuple[str, int, int]],
) -> None:
    differing = [q for q in QUESTIONS if hf_answers[("base", q)][0] != hf_answers[("tuned", q)][0]]
    assert len(differing) >= 2, differing


def test_streaming_concatenates_to_the_unstreamed_text(client: Client) -> None:
    question = QUESTIONS[1]
    whole = ask(client, "tuned", question)["choices"][0]["message"]["content"]
    body = {"model": "tuned", "messages": chat(question), "max_tokens": MAX_NEW_TOKENS, "temperature": 0}
    response = client.post("/v1/chat/completions", body | {"stream": True})
    assert response.status_code == 200
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == whole
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) > 1  # it did stream
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings_and_seeds(client: Client) -> None:
    body = {"model": "base", "prompt": "1, 2, 3, 4,", "max_tokens": 16, "temperature": 0}
    plain = client.post("/v1/completions", body).json()["choices"][0]["text"]
    stopped = client.post("/v1/completions", body | {"stop": [" 6"]}).json()["choices"][0]
    assert " 6" in plain and stopped["text"] == plain[: plain.index(" 6")]
    assert stopped["finish_reason"] == "stop"
    sampled = body | {"temperature": 1.0, "seed": 7}
    first, second = (client.post("/v1/completions", sampled).json()["choices"][0]["text"] for _ in range(2))
    assert first == second


def test_compare_and_a_blind_battle_with_a_vote(client: Client) -> None:
    body = {"messages": chat(QUESTIONS[1]), "max_tokens": MAX_NEW_TOKENS, "temperature": 0}
    compared = client.post("/v1/compare", body)
    assert compared.status_code == 200, compared.text
    answers = compared.json()
    assert answers["base"]["text"] == ask(client, "base", QUESTIONS[1])["choices"][0]["message"]["content"]
    assert answers["base"]["text"] != answers["tuned"]["text"]

    created = client.post("/v1/arena/battles", body)
    assert created.status_code == 200, created.text
    battle = created.json()
    assert set(battle["answers"]) == {"A", "B"}
    voted = client.post(f"/v1/arena/battles/{battle['battle_id']}/vote", {"winner": "B"})
    assert voted.status_code == 200, voted.text
    models = voted.json()["models"]
    assert sorted(models.values()) == ["base", "tuned"]
    rows = [json.loads(line) for line in client.get("/v1/arena/export").text.splitlines()]
    row = next(r for r in rows if r["battle_id"] == battle["battle_id"])
    assert row["chosen_model"] == models["B"]
    assert row["chosen"] == [{"role": "assistant", "content": battle["answers"]["B"]}]


def test_openai_client_works_unchanged(served: dict[str, Any]) -> None:
    import openai

    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key=API_KEY, max_retries=0)
    assert sorted(m.id for m in client.models.list()) == ["base", "tuned"]
    reply = client.chat.completions.create(
        model="tuned", messages=chat(QUESTIONS[0]), max_tokens=12, temperature=0
    )
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="tuned", messages=chat(QUESTIONS[0]), max_tokens=12, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == reply.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=chat("x"))


@pytest.mark.parametrize("path,body,status,field", BAD_REQUESTS)
def test_client_mistakes_are_4xx_json_naming_the_field(
    client: Client, path: str, body: Any, status: int, field: str | None
) -> None:
    raw = body if isinstance(body, bytes) else None
    response = client.post(path, None if raw else body, raw=raw)
    assert response.status_code == status, response.text
    if field is not None:
        assert response.json()["error"]["param"] == field


def test_burst_of_mixed_requests_never_gets_a_5xx(client: Client) -> None:
    valid = [
        ("/v1/chat/completions", {"model": "tuned", "messages": chat("hi"), "max_tokens": 4}),
        ("/v1/chat/completions", {"model": "base", "messages": chat("hi"), "max_tokens": 4, "stream": True}),
        ("/v1/completions", {"model": "base", "prompt": "Once", "max_tokens": 4}),
        ("/v1/compare", {"prompt": "Once", "max_new_tokens": 4}),
    ]
    invalid = [(path, body) for path, body, _, _ in BAD_REQUESTS]
    statuses = mixed_burst(client, valid, invalid, 120)
    assert [s for s in statuses if s >= 500] == []
    assert statuses.count(200) >= 40  # the valid half really ran


def test_auto_backend_picks_vllm_for_smollm2_and_hf_where_vllm_cannot(
    smollm2_dir: Path, base_dir: Path
) -> None:
    serve = ServeConfig()
    assert choose_backend(serve, [str(smollm2_dir)], []) == "vllm"
    # The tiny model's head size (16) has no CPU attention kernel in vLLM.
    assert choose_backend(serve, [str(base_dir)], []) == "hf"
    serve.backend = "hf"
    assert choose_backend(serve, [str(smollm2_dir)], []) == "hf"


def test_vllm_asked_for_without_vllm_installed_names_the_extra(smollm2_dir: Path) -> None:
    # A fresh interpreter in which `import vllm` finds nothing, as where the extra is missing.
    code = f"""
import sys
sys.modules["vllm"] = None
from dpo_cluster.config import ConfigError, ServeConfig
from dpo_cluster.serving.app import choose_backend
serve = ServeConfig(backend="vllm")
try:
    choose_backend(serve, [{str(smollm2_dir)!r}], [])
except ConfigError as error:
    print("ERROR", error)
serve.backend = "auto"
print("AUTO", choose_backend(serve, [{str(smollm2_dir)!r}], []))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERROR serve.backend: vLLM is not installed: pip install -e '.[vllm]'" in out.stdout, out.stderr
    assert "AUTO hf" in out.stdout
    with pytest.raises(ConfigError, match="vllm_kv_cache_gb"):
        load_config(None, ["serve.base=x", "serve.tuned=y", "serve.vllm_kv_cache_gb=0"], serving=True)
