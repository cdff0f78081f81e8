"""The demo, end to end in a reduced form: a shorter warm-up of the demo model, fewer pairs, the
same pipeline (real Ray Data, Ray Train with DeepSpeed on 2 CPU workers, real generation). DPO
must raise the rate of well-sized titles on held-out prompts by more than the two 95% intervals
leave to chance, and the report must be written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_cluster.data.samples import is_good_title

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dpo_cluster.demo.model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo_model"), steps=500, progress=False)


def test_demo_model_writes_titles_in_both_styles(demo_model: Path) -> None:
    from dpo_cluster.data.samples import generate_title_pairs
    from dpo_cluster.serving.generation import GenerationRequest, SamplingParams, TransformersBackend
    from dpo_cluster.serving.prompts import render_prompt_ids

    backend = TransformersBackend(str(demo_model), {"base": None})
    tokenizer = backend.tokenizer("base")
    rows = generate_title_pairs(40, seed=99)
    requests = [
        GenerationRequest(
            "base",
            tuple(render_prompt_ids(tokenizer, messages=r["prompt"], max_prompt_tokens=256)),
            SamplingParams(max_new_tokens=48, temperature=0),
        )
        for r in rows
    ]
    texts = [r.text for r in backend.generate(requests)]
    good = sum(is_good_title(t) for t in texts)
    # Both styles occur: the preference is there to be learned, not already learned.
    assert 4 <= good <= 30, texts
    # Readable and on topic: most answers name a word of the video's topic from the prompt.
    template_words = set(
        [
            "write",
            "youtube",
            "title",
            "video",
            "about",
            "catchy",
            "suggest",
            "covering",
            "should",
            "aimed",
            "beginners",
            "friendly",
            "twelve",
            "minutes",
            "audience",
            "mostly",
            "students",
        ]
    )
    mentions = 0
    for row, text in zip(rows, texts):
        words = [w.strip(".,?!").lower() for w in row["prompt"][0]["content"].split()]
        topic = [w for w in words if len(w) > 3 and w not in template_words]
        mentions += any(w in text.lower() for w in topic)
    assert mentions >= 25, list(zip((r["prompt"][0]["content"] for r in rows), texts))


def test_demo_end_to_end_moves_the_preference(ray_local: None, demo_model: Path, tmp_path: Path) -> None:
    from dpo_cluster.demo.run import run_demo

    out = tmp_path / "demo"
    result = run_demo(
        out,
        model="builtin:demo",
        pairs=800,
        overrides=[f"model.name_or_path={demo_model}", "evaluation.num_prompts=60"],
    )
    evaluation = result["evaluation"]
    rates = evaluation["judge"]["pass_rate"]
    base, tuned = rates["base"], rates["tuned"]
    # The tuned model shows the trait more often, and the difference's 95% interval excludes 0.
    assert tuned["rate"] > base["rate"], rates
    assert evaluation["judge"]["difference"]["ci_low"] > 0, evaluation["judge"]["difference"]
    assert evaluation["reward_accuracy"]["rewards/accuracies"]["rate"] > 0.8

    report = (out / "report.md").read_text()
    assert "## Evaluation" in report and "training_curves.png" in report
    assert (out / "training_curves.png").stat().st_size > 0
    assert json.loads((out / "eval_report.json").read_text())["judge"]["name"] == "rule"
