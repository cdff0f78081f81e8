"""More than two models: `serve.models` puts more tuned runs beside base and tuned (here a second
LoRA adapter and a full model), over real HTTP on a real local Ray and Serve.

Adapters share the base's deployment (one copy of its weights) and a full model gets its own.
Every name answers the OpenAI routes and `/v1/compare`. The arena draws battles among all the
models, and its leaderboard rates all of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dpo_cluster.config import ConfigError, load_config
from dpo_cluster.serving.launch import start_serving, stop_serving
from dpo_cluster.tiny import build_tiny_model
from tests.serve_helpers import API_KEY, Client, build_lora_final

pytestmark = pytest.mark.slow

NAMES = ["base", "tuned", "round2", "full"]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, serve_port: int, base_dir: Path
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("serve_models")
    tuned = build_lora_final(root / "tuned", seed=1)
    round2 = build_lora_final(root / "round2", seed=2)
    full = build_tiny_model(root / "full", tokenizer_dir=base_dir, seed=7)
    (root / "key").write_text(API_KEY)
    config = load_config(
        None,
        [
            "serve.base=builtin:tiny",
            f"serve.tuned={tuned}",
            f'serve.models={{"round2": "{round2}", "full": "{full}"}}',
            f"serve.port={serve_port}",
            f"serve.arena_db={root / 'votes.sqlite'}",
            f"serve.api_key_file={root / 'key'}",
            "serve.num_cpus=0",
            "serve.default_max_new_tokens=6",
        ],
        serving=True,
    )
    urls = start_serving(config)
    yield {"url": urls.base, "round2": round2, "full": full}
    stop_serving()


@pytest.fixture(scope="module")
def client(served: dict[str, Any]) -> Client:
    return Client(served["url"])


def test_adapters_share_the_base_deployment_and_a_full_model_has_its_own(
    client: Client, served: dict[str, Any]
) -> None:
    listed = client.get("/v1/models", key=None).json()["data"]
    assert [m["id"] for m in listed] == NAMES
    by_id = {m["id"]: m for m in listed}
    assert {by_id[n]["deployment"] for n in ("base", "tuned", "round2")} == {"Models"}
    assert by_id["round2"]["adapter_of"] == "builtin:tiny"
    assert (by_id["full"]["deployment"], by_id["full"]["adapter_of"]) == ("Model-full", None)
    health = client.get("/healthz", key=None).json()["models"]
    assert set(health["base"]["names"]) == {"base", "tuned", "round2"}
    assert health["full"]["names"] == {"full": None}


def test_every_name_answers_and_the_models_differ(client: Client) -> None:
    prompts = ["hello", "Write a title about bread", "Why is the sky blue?"]
    texts: dict[str, list[str]] = {}
    for name in NAMES:
        texts[name] = []
        for prompt in prompts:
            body = {"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0}
            response = client.post("/v1/completions", body)
            assert response.status_code == 200, response.text
            texts[name].append(response.json()["choices"][0]["text"])
    # Each model gives its own answers: no two names are served by the same weights.
    assert len({tuple(t) for t in texts.values()}) == len(NAMES), texts


def test_compare_answers_with_every_model(client: Client) -> None:
    compared = client.post("/v1/compare", {"prompt": "hello", "max_new_tokens": 4, "seed": 0})
    assert compared.status_code == 200, compared.text
    assert set(compared.json()) == {"id", "params", *NAMES}


def test_battles_draw_among_all_models_and_the_leaderboard_rates_all(client: Client) -> None:
    seen: Counter[str] = Counter()
    for i in range(40):
        created = client.post("/v1/arena/battles", {"prompt": f"Title {i}", "max_new_tokens": 4})
        assert created.status_code == 200, created.text
        voted = client.post(f"/v1/arena/battles/{created.json()['battle_id']}/vote", {"winner": "A"})
        models = voted.json()["models"]
        assert models["A"] != models["B"] and {models["A"], models["B"]} <= set(NAMES)
        seen.update(models.values())
    # Every model sits in half of the six pairs: each is missing from 40 draws with chance 2**-40.
    assert set(seen) == set(NAMES)
    board = client.get("/v1/arena/leaderboard", key=None).json()
    assert board["votes"] == 40
    ratings = {r["model"]: r for r in board["ratings"]}
    assert set(ratings) == set(NAMES)
    for name, rating in ratings.items():
        assert rating["ci_low"] <= rating["rating"] <= rating["ci_high"], rating
        assert rating["wins"] + rating["losses"] + rating["ties"] == seen[name], (name, rating)


def test_served_names_are_checked_when_the_config_loads() -> None:
    for name in ("base", "tuned", "a b", "", "x" * 65):
        with pytest.raises(ConfigError, match="serve.models"):
            load_config(
                None, ["serve.base=x", "serve.tuned=y", f'serve.models={{"{name}": "/m"}}'], serving=True
            )
    with pytest.raises(ConfigError, match="serve.models.r2: no such model directory"):
        from dpo_cluster.serving.app import build_app

        build_app(
            load_config(
                None,
                ["serve.base=builtin:tiny", "serve.tuned=builtin:tiny", 'serve.models={"r2": "./nope"}'],
                serving=True,
            )
        )
