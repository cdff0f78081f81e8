"""The real-model demo's parts that run in seconds: its ideas (training and held-out topics
disjoint), its config (one round of `dpo-cluster rounds` on SmolLM2, the plain_title rule judging
candidates and evaluation alike) and its report's accounting table. The whole demo takes minutes
on SmolLM2 (`make demo`); its machinery runs end to end in test_rounds.py on the tiny model."""

from __future__ import annotations

from pathlib import Path

from dpo_cluster.demo.ideas import ANGLES, HELD_OUT_TOPICS, TRAIN_TOPICS, video_ideas
from dpo_cluster.evaluation.prompt_sets import load_prompt_file


def test_held_out_ideas_are_on_topics_the_training_never_saw() -> None:
    assert not set(TRAIN_TOPICS) & set(HELD_OUT_TOPICS)
    train = video_ideas(TRAIN_TOPICS, 64, seed=1)
    held_out = video_ideas(HELD_OUT_TOPICS, 100, seed=2)
    assert len(set(train)) == 64 and len(set(held_out)) == 100
    for idea in held_out:
        assert not any(topic in idea for topic in TRAIN_TOPICS), idea
    assert video_ideas(TRAIN_TOPICS, 64, seed=1) == train  # seeded
    assert len(video_ideas(TRAIN_TOPICS, len(TRAIN_TOPICS) * len(ANGLES), seed=0)) == 300


def test_the_demo_is_one_round_judged_and_evaluated_by_one_rule(tmp_path: Path) -> None:
    from dpo_cluster.demo.real import real_demo_config

    config = real_demo_config(tmp_path, ideas=16, held_out=20, overrides=["rounds.samples_per_prompt=3"])
    assert config.model.name_or_path == "builtin:smollm2-135m-instruct" and config.lora.enabled
    assert (config.rounds.num_rounds, config.rounds.judge, config.evaluation.rule) == (
        1,
        "rule",
        "plain_title",
    )
    assert config.rounds.samples_per_prompt == 3  # overrides apply last
    train = load_prompt_file(config.rounds.prompts, 10**6)
    held_out = load_prompt_file(config.evaluation.prompts, 10**6)
    assert (len(train), len(held_out)) == (16, 20)
    assert not {p[0]["content"] for p in train} & {p[0]["content"] for p in held_out}
    assert config.serve_tuned() == str(tmp_path / "round-1" / "run" / "final")


def test_the_report_accounts_for_the_round(tmp_path: Path) -> None:
    from dpo_cluster.demo.real import _round_section

    record = {
        "report": {
            "candidates": {"sampled": 256, "kept": 250, "dropped": {"duplicate_answer": 6}},
            "prompts": {"in": 64, "with_pair": 50, "dropped": {"no_decisive_pair": 14}},
            "comparisons": {"judged": 370, "decisive": 180, "ties": {"equal_scores": 190}},
            "pairs": {"written": 180, "pairing": "all"},
        },
        "seconds": {"sample": 60.0, "judge": 0.0, "train": 150.0, "evaluate": 90.0},
    }
    table = "\n".join(_round_section(record))
    assert "| titles sampled | 256 | 250 | duplicate_answer 6 |" in table
    assert "| ideas | 64 | 50 with a pair | no_decisive_pair 14 |" in table
    assert "| comparisons | 370 | 180 decisive | equal_scores 190 |" in table
