"""The serving app over real HTTP on 127.0.0.1: a real local Ray, real Serve, a tiny base model and
a LoRA adapter over it (one deployment, base weights loaded once), API key on.

Covers every route, streaming, the official openai client, the arena's flow, its durability
across an app restart and a SIGKILL of the front replica, the export feeding the data pipeline,
and a burst of mixed valid and invalid requests that must never get a 5xx.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dpo_cluster.config import load_config
from dpo_cluster.modeling import resolve_name_or_path
from dpo_cluster.serving.launch import start_serving, stop_serving
from tests.serve_helpers import API_KEY, Client, build_lora_final, mixed_burst, sse_events

pytestmark = pytest.mark.slow

PROMPTS = ["Write a title about sourdough bread", "hello", "Why is the sky blue? Explain briefly."]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, serve_port: int) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("serve")
    final = build_lora_final(root / "run" / "final")
    key_file = root / "api-key"
    key_file.write_text(API_KEY + "\n")
    overrides = [
        "serve.base=builtin:tiny",
        f"serve.tuned={final}",
        f"serve.port={serve_port}",
        f"serve.arena_db={root / 'arena' / 'votes.sqlite'}",
        f"serve.api_key_file={key_file}",
        "serve.num_cpus=0",
        "serve.max_new_tokens=32",
        "serve.default_max_new_tokens=8",
        "serve.max_prompt_tokens=64",
        "serve.max_body_bytes=4096",
        "serve.max_batch_size=4",
        "serve.max_ongoing_requests=16",
    ]
    config = load_config(None, overrides, serving=True)
    urls = start_serving(config)
    yield {"config": config, "url": urls.base, "final": final, "root": root}
    stop_serving()


@pytest.fixture(scope="module")
def client(served: dict[str, Any]) -> Client:
    return Client(served["url"])


@pytest.fixture(scope="module")
def reference(served: dict[str, Any]) -> dict[str, Any]:
    """The same base and adapter loaded in this process with peft, for greedy references."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = resolve_name_or_path("builtin:tiny")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(served["final"]))
    model.eval()
    return {"model": model, "tokenizer": AutoTokenizer.from_pretrained(base_dir)}


def greedy(reference: dict[str, Any], messages: list[dict[str, str]], which: str, max_new_tokens: int) -> str:
    """Greedy text from transformers' own generate, adapter on (tuned) or off (base)."""
    tokenizer, model = reference["tokenizer"], reference["model"]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        if which == "base":
            with model.disable_adapter():
                out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)
        else:
            out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def chat(client: Client, model: str, content: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0} | extra
    response = client.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------------------------------------
# Models and health


def test_healthz_and_models_describe_one_shared_deployment(client: Client, served: dict[str, Any]) -> None:
    health = client.get("/healthz", key=None)
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["status"] == "ok" and body["api_key_required"] is True
    # One deployment hosts both names; its module holds the base once plus the adapter.
    described = body["models"]["base"]
    assert described == body["models"]["tuned"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_name_or_path("builtin:tiny"))
    base_params = sum(p.numel() for p in base.parameters())
    with_adapter = PeftModel.from_pretrained(base, str(served["final"]))
    assert described["parameters"] == sum(p.numel() for p in with_adapter.parameters())
    assert base_params < described["parameters"] < 1.2 * base_params

    models = client.get("/v1/models", key=None).json()
    assert models["object"] == "list"
    by_id = {m["id"]: m for m in models["data"]}
    assert set(by_id) == {"base", "tuned"}
    assert by_id["base"]["source"] == "builtin:tiny" and by_id["base"]["adapter_of"] is None
    assert by_id["tuned"]["source"] == str(served["final"])
    assert by_id["tuned"]["adapter_of"] == "builtin:tiny"
    assert by_id["base"]["deployment"] == by_id["tuned"]["deployment"] == "Models"

    from ray import serve

    deployments = serve.status().applications["dpo-cluster"].deployments
    assert set(deployments) == {"Frontend", "Models"}


# ---------------------------------------------------------------------------------------------
# OpenAI-shaped generation


def test_chat_completions_match_transformers_greedy_for_base_and_tuned(
    client: Client, reference: dict[str, Any]
) -> None:
    texts = {}
    for model in ("base", "tuned"):
        for prompt in PROMPTS:
            body = chat(client, model, prompt, max_tokens=12)
            assert body["object"] == "chat.completion" and body["model"] == model
            choice = body["choices"][0]
            assert choice["message"]["role"] == "assistant"
            expected = greedy(reference, [{"role": "user", "content": prompt}], model, 12)
            assert choice["message"]["content"] == expected
            usage = body["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert 1 <= usage["completion_tokens"] <= 12
            texts[model, prompt] = expected
    # The adapter changes what the model says.
    assert any(texts["base", p] != texts["tuned", p] for p in PROMPTS)


def test_completions_and_token_counts(client: Client, reference: dict[str, Any]) -> None:
    tokenizer = reference["tokenizer"]
    prompt = "The best title is"
    response = client.post(
        "/v1/completions", {"model": "tuned", "prompt": prompt, "max_tokens": 6, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["usage"]["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    # A one-item prompt list is the same request.
    again = client.post(
        "/v1/completions", {"model": "tuned", "prompt": [prompt], "max_tokens": 6, "temperature": 0}
    )
    assert again.json()["choices"][0]["text"] == body["choices"][0]["text"]


def test_model_may_be_named_by_its_source(client: Client) -> None:
    by_name = chat(client, "base", "hello", max_tokens=5)
    by_source = chat(client, "builtin:tiny", "hello", max_tokens=5)
    assert by_source["choices"][0]["message"] == by_name["choices"][0]["message"]


def test_streaming_chat_and_completion_equal_the_unstreamed_text(client: Client) -> None:
    for seed in (0, 1):
        body = {
            "model": "tuned",
            "messages": [{"role": "user", "content": "Name a dog"}],
            "max_tokens": 16,
            "seed": seed,
            "temperature": 1.0,
        }
        whole = client.post("/v1/chat/completions", body).json()
        streamed = client.post(
            "/v1/chat/completions", body | {"stream": True, "stream_options": {"include_usage": True}}
        )
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = sse_events(streamed)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == whole["choices"][0]["message"]["content"]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == whole["choices"][0]["finish_reason"] and all(f is None for f in finishes[:-1])
        assert chunks[-1]["usage"] == whole["usage"]

    body = {"model": "base", "prompt": "Once upon", "max_tokens": 10, "temperature": 0}
    whole = client.post("/v1/completions", body).json()
    events = sse_events(client.post("/v1/completions", body | {"stream": True}))
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert text == whole["choices"][0]["text"]


def test_stop_strings_and_seeds(client: Client) -> None:
    story = {"max_tokens": 24, "temperature": 1.0, "seed": 7}
    text = chat(client, "tuned", "Tell me a story", **story)["choices"][0]["message"]["content"]
    again = chat(client, "tuned", "Tell me a story", **story)
    assert again["choices"][0]["message"]["content"] == text
    other = chat(client, "tuned", "Tell me a story", **(story | {"seed": 8}))
    assert other["choices"][0]["message"]["content"] != text
    assert len(text) >= 4, text  # 24 sampled tokens of byte-level BPE
    stop = text[2:4]
    cut = chat(client, "tuned", "Tell me a story", **story, stop=[stop])
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_openai_client_works_unchanged(served: dict[str, Any]) -> None:
    import openai

    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key=API_KEY, max_retries=0)
    listed = sorted(m.id for m in client.models.list())
    assert listed == ["base", "tuned"]
    reply = client.chat.completions.create(
        model="tuned", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="tuned",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == reply.choices[0].message.content
    completion = client.completions.create(model="base", prompt="Once upon", max_tokens=5, temperature=0)
    assert completion.choices[0].text is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
        openai.OpenAI(base_url=served["url"] + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="tuned", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------------------------------
# Compare


def test_compare_runs_both_models_with_the_same_parameters(client: Client) -> None:
    body = {"messages": [{"role": "user", "content": "Write a title"}], "max_new_tokens": 10, "seed": 3}
    response = client.post("/v1/compare", body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["params"] == {"max_new_tokens": 10, "temperature": 1.0, "top_p": 1.0, "seed": 3, "stop": []}
    for model in ("base", "tuned"):
        one = chat(client, model, "Write a title", max_tokens=10, seed=3, temperature=1.0)
        assert result[model]["text"] == one["choices"][0]["message"]["content"]
        assert result[model]["usage"] == one["usage"]
        assert result[model]["latency_s"] > 0
    text_prompt = client.post("/v1/compare", {"prompt": "Once upon", "max_new_tokens": 4, "temperature": 0})
    assert text_prompt.status_code == 200
    assert set(text_prompt.json()) >= {"base", "tuned"}


# ---------------------------------------------------------------------------------------------
# Security and bad input


def test_api_key_guards_generation_compare_vote_and_export(client: Client) -> None:
    chat_body = {"model": "base", "messages": [{"role": "user", "content": "x"}]}
    guarded = [
        ("/v1/chat/completions", chat_body),
        ("/v1/completions", {"model": "base", "prompt": "x"}),
        ("/v1/compare", {"prompt": "x"}),
        ("/v1/arena/battles", {"prompt": "x"}),
        ("/v1/arena/battles/abc/vote", {"winner": "A"}),
    ]
    for path, body in guarded:
        for key in (None, "wrong-key"):
            response = client.post(path, body, key=key)
            assert response.status_code == 401, (path, key, response.text)
            assert response.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/arena/export", key=None).status_code == 401
    # Public: health, model list, leaderboard, the page itself (it asks for the key).
    for path in ("/healthz", "/v1/models", "/v1/arena/leaderboard", "/arena"):
        assert client.get(path, key=None).status_code == 200, path


BAD_REQUESTS: list[tuple[str, Any, int, str | None]] = [
    # (path, body (bytes = raw), status, field named)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", b"\xff\xfe", 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("/v1/chat/completions", {"model": "base"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "base", "messages": []}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": ""}]},
        400,
        "messages",
    ),
    (
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages.0.role",
    ),
    ("/v1/chat/completions", {"model": "base", "messages": "hello"}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model",
    ),
    (
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        400,
        "temperature",
    ),
    (
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": -1},
        400,
        "temperature",
    ),
    (
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "x"}], "top_p": 0},
        400,
        "top_p",
    ),
    (
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000},
        400,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "x"}], "n": 2},
        400,
        "n",
    ),
    (
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop",
    ),
    (
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "x"}], "seed": -1},
        400,
        "seed",
    ),
    (
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "word " * 200}]},
        400,
        "messages",
    ),
    ("/v1/completions", {"model": "base", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "base", "prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"model": "base", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "base", "prompt": "x" * 5000}, 413, None),
    ("/v1/compare", {}, 400, None),
    ("/v1/compare", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, None),
    ("/v1/compare", {"prompt": "word " * 200}, 400, "prompt"),
    ("/v1/arena/battles", {"prompt": ""}, 400, "prompt"),
    ("/v1/arena/battles/does-not-exist/vote", {"winner": "A"}, 404, "battle_id"),
    ("/v1/arena/battles/does-not-exist/vote", {"winner": "C"}, 400, "winner"),
    ("/v1/arena/battles/does-not-exist/vote", {}, 400, "winner"),
    ("/v1/no-such-route", {}, 404, None),
    # Valid JSON that is not Unicode text: a lone UTF-16 surrogate, in every text field.
    ("/v1/completions", {"model": "base", "prompt": "bad \ud800"}, 400, "prompt"),
    ("/v1/completions", {"model": "base", "prompt": ["\udfff"]}, 400, "prompt.0"),
    ("/v1/completions", {"model": "\ud800", "prompt": "x"}, 400, "model"),
    (
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "\ud83d x"}]},
        400,
        "messages.0.content",
    ),  # fmt: skip
    (
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "x"}], "stop": ["\ud800"]},
        400,
        "stop.0",
    ),  # fmt: skip
    ("/v1/compare", {"prompt": "\ud800"}, 400, "prompt"),
    ("/v1/compare", {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages.0.content"),
    ("/v1/arena/battles", {"prompt": "\ud800"}, 400, "prompt"),
]


@pytest.mark.parametrize("path,body,status,field", BAD_REQUESTS)
def test_client_mistakes_are_4xx_json_naming_the_field(
    client: Client, path: str, body: Any, status: int, field: str | None
) -> None:
    raw = body if isinstance(body, bytes) else None
    response = client.post(path, None if raw else body, raw=raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "Traceback" not in response.text
    if field is not None:
        assert error["param"] == field, error
        assert field.split(".")[0] in error["message"]


def test_wrong_methods_and_export_format_are_4xx(client: Client) -> None:
    response = client.get("/v1/chat/completions")
    assert response.status_code == 405 and "error" in response.json()
    response = client.get("/v1/arena/export", params={"format": "csv"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "format"


# ---------------------------------------------------------------------------------------------
# Arena


def battle(client: Client, content: str) -> dict[str, Any]:
    response = client.post(
        "/v1/arena/battles", {"messages": [{"role": "user", "content": content}], "max_new_tokens": 8}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_arena_battle_vote_leaderboard_and_export(client: Client) -> None:
    before = client.get("/v1/arena/leaderboard", key=None).json()
    created = battle(client, "Pick a title for a cooking video")
    assert set(created) == {"battle_id", "answers"}  # nothing says which model is which
    assert set(created["answers"]) == {"A", "B"}

    # Vote for a side that said something: a vote for an empty answer is not exported as a pair.
    side = "A" if created["answers"]["A"].strip() else "B"
    voted = client.post(f"/v1/arena/battles/{created['battle_id']}/vote", {"winner": side})
    assert voted.status_code == 200, voted.text
    models = voted.json()["models"]
    assert sorted(models.values()) == ["base", "tuned"]
    again = client.post(f"/v1/arena/battles/{created['battle_id']}/vote", {"winner": "B"})
    assert again.status_code == 409 and again.json()["error"]["param"] == "battle_id"

    after = client.get("/v1/arena/leaderboard", key=None).json()
    assert after["votes"] == before["votes"] + 1
    winner = models[side]
    assert after["counts"][winner] == before["counts"][winner] + 1

    rows = [json.loads(line) for line in client.get("/v1/arena/export").text.splitlines()]
    row = next(r for r in rows if r["battle_id"] == created["battle_id"])
    assert row["chosen"] == [{"role": "assistant", "content": created["answers"][side]}]
    loser = "B" if side == "A" else "A"
    assert row["rejected"] == [{"role": "assistant", "content": created["answers"][loser]}]
    assert row["prompt"] == [{"role": "user", "content": "Pick a title for a cooking video"}]
    log = [
        json.loads(line)
        for line in client.get("/v1/arena/export", params={"format": "fastchat"}).text.splitlines()
    ]
    entry = next(e for e in log if e["question_id"] == created["battle_id"])
    assert entry["winner"] == f"model_{side.lower()}" and entry[f"model_{side.lower()}"] == models[side]


def _front_replica_pid() -> int:
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Frontend" in a["name"]]
    assert len(names) == 1, names
    actor = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _wait_healthy(client: Client, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/healthz", key=None).status_code == 200:
                return
        except Exception:  # the proxy may refuse while the replica restarts
            pass
        time.sleep(0.5)
    raise AssertionError("the app did not come back healthy")


def test_votes_survive_sigkill_of_the_front_replica_and_an_app_restart(
    client: Client, served: dict[str, Any]
) -> None:
    created = battle(client, "durability check")
    voted = client.post(f"/v1/arena/battles/{created['battle_id']}/vote", {"winner": "tie"})
    assert voted.status_code == 200
    pid = _front_replica_pid()
    os.kill(pid, signal.SIGKILL)  # right after the acknowledgement
    _wait_healthy(client)
    assert _front_replica_pid() != pid
    exported = client.get("/v1/arena/export", params={"format": "fastchat"}).text
    assert created["battle_id"] in exported

    stop_serving()
    start_serving(served["config"])
    _wait_healthy(client)
    log = [
        json.loads(line)
        for line in client.get("/v1/arena/export", params={"format": "fastchat"}).text.splitlines()
    ]
    assert any(e["question_id"] == created["battle_id"] and e["winner"] == "tie" for e in log)
    # The battle is still there too: a second vote on it is a conflict, not a 404.
    again = client.post(f"/v1/arena/battles/{created['battle_id']}/vote", {"winner": "A"})
    assert again.status_code == 409


def test_export_is_training_data_for_the_next_round(client: Client, served: dict[str, Any]) -> None:
    from dpo_cluster.data.pipeline import prepare

    said_something = {}
    for i, winner in enumerate(["A", "B", "A", "tie", "both_bad", "B"]):
        created = battle(client, f"round trip prompt {i}")
        assert (
            client.post(f"/v1/arena/battles/{created['battle_id']}/vote", {"winner": winner}).status_code
            == 200
        )
        if winner in ("A", "B"):
            said_something[created["battle_id"]] = bool(created["answers"][winner].strip())
    exported = client.get("/v1/arena/export").text
    rows = [json.loads(line) for line in exported.splitlines()]
    ids = {r["battle_id"] for r in rows}
    # Every decisive vote of this test is a row unless the winner said nothing (tiny models can).
    assert {b for b in said_something if b in ids} == {b for b, said in said_something.items() if said}
    train_file = served["root"] / "next_round.jsonl"
    train_file.write_text(exported)
    config = load_config(
        None,
        [
            f"output_dir={served['root'] / 'next_round'}",
            "model.name_or_path=builtin:tiny",
            f"data.train={train_file}",
            "data.max_length=128",
        ],
    )
    report = prepare(config).report["splits"]["train"]
    # Every exported row is read; a pair whose two answers are the same text is the only drop.
    assert report["rows_in"] == len(rows)
    same = sum(r["chosen"] == r["rejected"] for r in rows)
    assert report["rows_kept"] == len(rows) - same
    assert sum(report["dropped"].values()) == same


# ---------------------------------------------------------------------------------------------
# The judges of preference rounds, over this app


KEY_ENV = "DPO_CLUSTER_TEST_ROUNDS_KEY"
JUDGED_PROMPTS: list[Any] = ["Write a title about sourdough bread", [{"role": "user", "content": "hello"}]]
JUDGED_TEXTS = {
    (0, 0): "Bread Basics",
    (0, 1): "A loaf",
    (0, 2): "Sourdough at home",
    (1, 0): "hi",
    (1, 1): "hey",
}


def test_llm_judge_asks_both_orders_of_the_served_model_and_reports_unclear_replies(
    client: Client, served: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dpo_cluster.config import RoundsConfig
    from dpo_cluster.rounds.comparisons import candidate_pairs
    from dpo_cluster.rounds.http_json import JudgeHTTPError
    from dpo_cluster.rounds.llm_judge import LLMJudge, decide, prompt_text, read_choice

    monkeypatch.setenv(KEY_ENV, API_KEY)
    settings = RoundsConfig(
        judge="llm_judge",
        judge_url=served["url"] + "/v1",
        judge_model="tuned",
        judge_max_tokens=4,
        api_key_env=KEY_ENV,
        judge_template="{prompt} A: {answer_a} B: {answer_b} Better:",  # this app takes 64 prompt tokens
    )
    pairs = candidate_pairs({0: [0, 1, 2], 1: [0, 1]})
    comparisons = LLMJudge(settings).compare(pairs, JUDGED_PROMPTS, JUDGED_TEXTS)
    assert [(c.prompt_index, c.first, c.second) for c in comparisons] == pairs
    template = settings.judge_prompt_template()
    for c in comparisons:
        a, b = JUDGED_TEXTS[(c.prompt_index, c.first)], JUDGED_TEXTS[(c.prompt_index, c.second)]
        question = prompt_text(JUDGED_PROMPTS[c.prompt_index])
        # Both orders were asked: each reply is the served model's greedy answer to that order.
        expected = [
            chat(client, "tuned", template.format(prompt=question, answer_a=x, answer_b=y), max_tokens=4)
            for x, y in ((a, b), (b, a))
        ]
        assert c.detail["replies"] == [e["choices"][0]["message"]["content"] for e in expected]
        side, reason = decide(*(read_choice(r) for r in c.detail["replies"]))
        assert c.winner == {"first": c.first, "second": c.second}.get(side or "")
        assert c.tie_reason == reason
        if None in [read_choice(r) for r in c.detail["replies"]]:
            assert (c.winner, c.tie_reason) == (None, "judge_named_neither")
    monkeypatch.setenv(KEY_ENV, "wrong-key")
    with pytest.raises(JudgeHTTPError, match="HTTP 401"):
        LLMJudge(settings).ask("q", "a", "b")


def test_arena_judge_posts_blind_pairs_and_reads_votes_cast_over_http(
    client: Client, served: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from dpo_cluster.config import RoundsConfig
    from dpo_cluster.rounds.arena_judge import ArenaJudge, candidate_label
    from dpo_cluster.rounds.comparisons import candidate_pairs

    monkeypatch.setenv(KEY_ENV, API_KEY)
    settings = RoundsConfig(judge="arena", arena_url=served["url"], arena_deadline_s=8, api_key_env=KEY_ENV)
    pairs = candidate_pairs({0: [0, 1, 2], 1: [0, 1]})  # 4 pairs: A, B, tie, and one nobody votes on
    votes = ["A", "B", "tie"]
    seen: list[dict[str, Any]] = []

    def voter() -> None:
        while len(seen) < len(votes):
            shown = client.get("/v1/arena/queue/next").json()
            if shown["battle_id"] is None or (seen and shown["battle_id"] == seen[-1]["battle_id"]):
                time.sleep(0.2)
                continue
            assert "models" not in shown  # blind until the vote
            winner = votes[len(seen)]
            voted = client.post(f"/v1/arena/battles/{shown['battle_id']}/vote", {"winner": winner})
            assert voted.status_code == 200, voted.text
            seen.append(shown | {"winner": winner, "models": voted.json()["models"]})

    thread = threading.Thread(target=voter)
    thread.start()
    battles_file = served["root"] / "arena_battles.json"
    comparisons = ArenaJudge(settings, battles_file).compare(pairs, JUDGED_PROMPTS, JUDGED_TEXTS)
    thread.join(timeout=30)
    assert len(seen) == 3
    for c, shown in zip(comparisons, seen):
        if shown["winner"] == "tie":
            assert (c.winner, c.tie_reason) == (None, "voted_tie")
            continue
        label = shown["models"][shown["winner"]]
        assert c.winner in (c.first, c.second) and label == "queued:" + candidate_label(
            c.prompt_index, c.winner
        )
        assert shown["answers"][shown["winner"]] == JUDGED_TEXTS[(c.prompt_index, c.winner)]
    assert (comparisons[3].winner, comparisons[3].tie_reason) == (None, "no_vote_by_deadline")
    # The candidates are not served models: the leaderboard leaves them out; the export keeps them.
    board = client.get("/v1/arena/leaderboard", key=None).json()
    assert not [name for name in board["counts"] if name.startswith("queued:")]
    exported = [json.loads(line) for line in client.get("/v1/arena/export").text.splitlines()]
    assert {seen[0]["battle_id"], seen[1]["battle_id"]} <= {r["battle_id"] for r in exported}
    # Resumed with the same battles file: the pairs are not posted again.
    before = client.get("/healthz").json()["arena"]["battles"]
    settings.arena_deadline_s = 0.5
    again = ArenaJudge(settings, battles_file).compare(pairs, JUDGED_PROMPTS, JUDGED_TEXTS)
    assert client.get("/healthz").json()["arena"]["battles"] == before
    assert [c.winner for c in again[:3]] == [c.winner for c in comparisons[:3]]
    # A malformed pair is a 400 naming the problem.
    bad = client.post("/v1/arena/queue", {"prompt": "p", "answers": {"x": "1", "y": "2", "z": "3"}})
    assert bad.status_code == 400 and "exactly two answers" in bad.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------
# Load


def test_burst_of_mixed_requests_never_gets_a_5xx(client: Client) -> None:
    valid = [
        (
            "/v1/chat/completions",
            {"model": "tuned", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ),
        ("/v1/completions", {"model": "base", "prompt": "Once", "max_tokens": 2}),
        ("/v1/compare", {"prompt": "Once", "max_new_tokens": 2}),
    ]
    invalid = [(path, body) for path, body, _, _ in BAD_REQUESTS]
    statuses = mixed_burst(client, valid, invalid, 500)
    assert len(statuses) == 500
    assert [s for s in statuses if s >= 500] == []
    assert statuses.count(200) >= 200  # the valid half really ran


def test_key_file_must_exist(tmp_path: Path) -> None:
    from dpo_cluster.config import ConfigError
    from dpo_cluster.serving.app import read_api_key

    with pytest.raises(ConfigError, match="no such file"):
        read_api_key("UNUSED", str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_api_key("UNUSED", str(tmp_path / "empty"))
    assert read_api_key("DPO_CLUSTER_TEST_UNSET_VARIABLE", None) is None
