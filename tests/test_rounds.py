"""`dpo-cluster rounds`: pairing and its accounting against literal candidates, the LLM judge's
reading of replies, the derived configs, and a real two-round run on the tiny model (sampling,
rule judge, pairing, DPO on Ray Train + DeepSpeed, evaluation, summary), extended and resumed.

The LLM judge and the arena judge over real HTTP are in test_serve_app.py, on its served app."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dpo_cluster.config import ConfigError, load_config
from dpo_cluster.rounds.candidates import Candidate
from dpo_cluster.rounds.comparisons import EQUAL_SCORES, candidate_pairs, compare_by_scores
from dpo_cluster.rounds.llm_judge import decide, read_choice
from dpo_cluster.rounds.pairing import build_pairs, check_accounting, keep_candidates

PROMPTS = ["p0", [{"role": "user", "content": "p1"}], "p2", "p3"]


def _candidates(texts: dict[int, list[str]]) -> list[Candidate]:
    return [
        Candidate(i, j, 100 * i + j, t, "stop") for i, answers in texts.items() for j, t in enumerate(answers)
    ]


def _pair_up(
    pairing: str, scores: dict[tuple[int, int], float]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    # prompt 0: three distinct answers; prompt 1: one empty and one duplicate leave two;
    # prompt 2: refused at sampling (no candidates); prompt 3: two answers that tie.
    candidates = _candidates({0: ["a", "b", "c"], 1: ["x", " ", "x ", "y"], 3: ["m", "n"]})
    kept, cand_report = keep_candidates(candidates)
    texts = {(c.prompt_index, c.sample): c.text for c in candidates}
    comparisons = compare_by_scores(candidate_pairs(kept), scores)
    rows, report = build_pairs(PROMPTS, [2], kept, texts, comparisons, pairing)
    return rows, {"candidates": cand_report, **report}


SCORES = {(0, 0): 1.0, (0, 1): 0.0, (0, 2): 0.5, (1, 0): 0.0, (1, 3): 1.0, (3, 0): 1.0, (3, 1): 1.0}


def test_all_decisive_pairs_and_every_candidate_prompt_and_comparison_accounted() -> None:
    """Candidates: 9 sampled = 7 kept + 1 empty + 1 duplicate ("x " strips to "x").
    Comparisons: prompt 0 has C(3,2) = 3 (a>b, a>c, c>b: all decisive), prompt 1 has 1 (y > x),
    prompt 3 has 1 (m = n: a tie) -> 5 judged = 4 decisive + 1 tie.
    Prompts: 4 in = 2 with a pair + 1 refused + 1 without a decisive pair."""
    rows, report = _pair_up("all", SCORES)
    check_accounting(report)
    assert report["candidates"] == {
        "sampled": 9,
        "kept": 7,
        "dropped": {"empty_answer": 1, "duplicate_answer": 1},
    }
    assert report["comparisons"] == {"judged": 5, "decisive": 4, "ties": {EQUAL_SCORES: 1}}
    assert report["prompts"] == {
        "in": 4,
        "with_pair": 2,
        "dropped": {"prompt_refused": 1, "no_decisive_pair": 1},
    }
    assert [(r["chosen"], r["rejected"]) for r in rows[:3]] == [("a", "b"), ("a", "c"), ("c", "b")]
    # A chat prompt gives a conversational row, as the data pipeline reads them.
    assert rows[3] == {
        "prompt": [{"role": "user", "content": "p1"}],
        "chosen": [{"role": "assistant", "content": "y"}],
        "rejected": [{"role": "assistant", "content": "x"}],
    }


def test_best_vs_worst_pairs_the_top_record_against_the_bottom_one() -> None:
    """Prompt 0: records a = +2, c = 0, b = -2 -> (a, b); prompt 1: (y, x); prompt 3: equal."""
    rows, report = _pair_up("best_vs_worst", SCORES)
    check_accounting(report)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("a", "b"),
        ([{"role": "assistant", "content": "y"}], [{"role": "assistant", "content": "x"}]),
    ]
    assert report["pairs"] == {"written": 2, "pairing": "best_vs_worst"}


def test_a_report_that_does_not_add_up_is_refused() -> None:
    _, report = _pair_up("all", SCORES)
    report["comparisons"]["decisive"] -= 1
    with pytest.raises(AssertionError, match="comparisons"):
        check_accounting(report)


@pytest.mark.parametrize(
    ("reply", "choice"),
    [("A", "A"), (" B.", "B"), ("Answer B is better", "B"), ("", None), ("Both are good", None), ("a", None)],
)
def test_the_judge_reply_names_a_b_or_neither(reply: str, choice: str | None) -> None:
    assert read_choice(reply) == choice


def test_both_orders_must_agree() -> None:
    """Order 1 shows the first candidate as A, order 2 as B."""
    assert decide("A", "B") == ("first", None)
    assert decide("B", "A") == ("second", None)
    assert decide("A", "A") == (None, "orders_disagree")  # position bias: always the first shown
    assert decide(None, "B") == (None, "judge_named_neither")


def _base_overrides(tmp_path: Path) -> list[str]:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n')
    return [f"output_dir={tmp_path / 'out'}", "model.name_or_path=builtin:tiny", f"data.train={pairs}"]


def test_rounds_config_is_checked_at_load(tmp_path: Path) -> None:
    base = _base_overrides(tmp_path)
    with pytest.raises(ConfigError, match="rounds.judge_url: required"):
        load_config(None, [*base, "rounds.judge=llm_judge", "rounds.judge_model=tuned"])
    with pytest.raises(ConfigError, match="rounds.arena_url: expected an http"):
        load_config(None, [*base, "rounds.judge=arena", "rounds.arena_url=localhost:8000"])
    with pytest.raises(ConfigError, match="rounds.temperature: must be > 0"):
        load_config(None, [*base, "rounds.temperature=0"])
    with pytest.raises(ConfigError, match="rounds.samples_per_prompt: must be >= 2"):
        load_config(None, [*base, "rounds.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="rounds.judge_template: must contain"):
        load_config(
            None,
            [
                *base,
                "rounds.judge=llm_judge",
                "rounds.judge_url=http://h/v1",
                "rounds.judge_model=m",
                "rounds.judge_template=x {prompt}",
            ],
        )


def test_a_rounds_training_config_trains_the_policy_against_the_chosen_reference(
    tmp_path: Path, base_dir: Path
) -> None:
    import shutil

    from dpo_cluster.rounds.settings import training_config

    policy = str(shutil.copytree(base_dir, tmp_path / "round-1-final"))

    config = load_config(None, [*_base_overrides(tmp_path), "lora.enabled=true", "rounds.reference=base"])
    pairs = tmp_path / "round-2" / "pairs.jsonl"
    derived = training_config(config, tmp_path / "round-2", pairs, policy, str(base_dir))
    assert derived.model.name_or_path == policy
    assert derived.output_dir == str(tmp_path / "round-2" / "run")
    # The base as reference under LoRA: a reference copy, since the adapter off is round 1's policy.
    assert (derived.reference.mode, derived.reference.name_or_path) == ("model", str(base_dir))
    assert derived.lora.merge_on_save  # final/ is a full model the next round starts from
    assert derived.data.eval is None and derived.train.eval_strategy == "no"
    previous = load_config(
        None, [*_base_overrides(tmp_path), "lora.enabled=true", "rounds.reference=previous"]
    )
    derived = training_config(previous, tmp_path / "round-2", pairs, policy, str(base_dir))
    assert derived.reference_mode() == "adapter_disabled" and derived.reference.name_or_path is None


def _rounds_overrides(tmp_path: Path, num_rounds: int) -> list[str]:
    from dpo_cluster.data.samples import generate_title_pairs, write_jsonl

    data = write_jsonl(generate_title_pairs(120, seed=5), tmp_path / "titles.jsonl")
    return [
        f"output_dir={tmp_path / 'out'}",
        "model.name_or_path=builtin:tiny",
        f"data.train={data}",
        "data.eval_fraction=0.2",
        "data.max_length=96",
        "train.micro_batch_size=4",
        "train.learning_rate=1e-3",
        "train.logging_steps=1",
        "deepspeed.zero_stage=0",
        "scaling.num_workers=1",
        f"rounds.num_rounds={num_rounds}",
        "rounds.num_prompts=12",
        "rounds.samples_per_prompt=3",
        "rounds.max_new_tokens=12",
        "rounds.backend=hf",
        # The tiny model writes noise: "contains an e" splits its answers about one in four.
        "evaluation.pattern=e",
        "evaluation.num_prompts=8",
        "evaluation.max_new_tokens=12",
        "evaluation.backend=hf",
    ]


def _rounds_config(tmp_path: Path, num_rounds: int) -> Any:
    return load_config(None, _rounds_overrides(tmp_path, num_rounds))


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


@pytest.mark.slow
def test_two_rounds_end_to_end_then_extended_and_resumed(
    tmp_path: Path, ray_local: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from dpo_cluster.cli import main
    from dpo_cluster.rounds.run import run_rounds

    # Round 1 as `dpo-cluster rounds --config C.yaml overrides...` runs it.
    config_file = tmp_path / "rounds.yaml"
    config_file.write_text("model:\n  name_or_path: builtin:tiny\n")
    assert main(["rounds", "--config", str(config_file), *_rounds_overrides(tmp_path, 1)]) == 0
    printed = capsys.readouterr().out
    assert "round   pairs" in printed and "dpo-cluster serve --config" in printed
    out = tmp_path / "out"
    first = json.loads((out / "rounds_summary.json").read_text())
    candidates_1 = out / "round-1" / "candidates.jsonl"
    stamp = candidates_1.stat().st_mtime_ns
    assert len(first["rounds"]) == 1
    logged: list[str] = []
    # A second round on top: round 1 is reused, not sampled or trained again.
    summary = run_rounds(_rounds_config(tmp_path, 2), progress=False, log=logged.append)
    assert candidates_1.stat().st_mtime_ns == stamp
    assert any("round 1: done earlier" in line for line in logged)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    round_2 = summary["rounds"][1]
    assert round_2["started_from"] == summary["rounds"][0]["policy"]
    assert round_2["reference"] == round_2["started_from"]  # rounds.reference: previous
    for record in summary["rounds"]:
        k, report = record["round"], record["report"]
        check_accounting(report)
        round_dir = out / f"round-{k}"
        assert _lines(round_dir / "candidates.jsonl") == report["candidates"]["sampled"] == 12 * 3
        assert _lines(round_dir / "comparisons.jsonl") == report["comparisons"]["judged"]
        assert _lines(round_dir / "pairs.jsonl") == report["pairs"]["written"] > 0
        assert record["training"]["steps"] >= 1
        assert (round_dir / "run" / "final" / "config.json").is_file()
        for side in ("vs_base", "vs_previous"):
            judge = record[side]["judge"]
            assert judge["name"] == "rule" and judge["prompts"] == 8
            assert "ci_low" in judge["difference"]
    assert summary["rounds"][1]["vs_base"]["base"] != summary["rounds"][1]["vs_previous"]["base"]
    assert summary["held_out_overlap"] == 0  # eval-split prompts are not among the train split's
    assert (out / "rounds_win_rate.png").stat().st_size > 0
    serve = load_config(out / "rounds_serve.yaml", serving=True)  # what `dpo-cluster serve --config` loads
    assert serve.serve_base() == summary["base"]
    assert serve.serve_tuned() == str(out / "round-2" / "run" / "final")
    assert serve.serve.models == {"round-1": str(out / "round-1" / "run" / "final")}
    saved = json.loads((out / "rounds_summary.json").read_text())
    assert [r["report"] for r in saved["rounds"]] == [r["report"] for r in summary["rounds"]]

    # Interrupted inside round 2 after training: the round is redone from its first missing step.
    round_dir = out / "round-2"
    final_stamp = (round_dir / "run" / "final" / "config.json").stat().st_mtime_ns
    comparisons = (round_dir / "comparisons.jsonl").read_text()
    for name in ("round.json", "comparisons.jsonl", "eval_vs_previous.json"):
        (round_dir / name).unlink()
    logged.clear()
    resumed = run_rounds(_rounds_config(tmp_path, 2), progress=False, log=logged.append)
    assert (round_dir / "comparisons.jsonl").read_text() == comparisons  # the rule judges the same
    assert (round_dir / "run" / "final" / "config.json").stat().st_mtime_ns == final_stamp  # not retrained
    assert any("evaluating against the previous round" in line for line in logged)
    assert not any("evaluating against the base" in line for line in logged)
    assert resumed["rounds"][1]["report"] == round_2["report"]
    assert resumed["rounds"][1]["vs_previous"] == round_2["vs_previous"]  # greedy: the same answers


def test_data_train_may_be_left_out_when_the_rounds_have_their_own_prompts(tmp_path: Path) -> None:
    from dpo_cluster.data.pipeline import prepare

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Title my video about bread."}\n')
    base = [f"output_dir={tmp_path / 'out'}", "model.name_or_path=builtin:tiny"]
    with pytest.raises(ConfigError, match="data.train: required"):
        load_config(None, base)
    config = load_config(None, [*base, f"rounds.prompts={prompts}"])
    with pytest.raises(ConfigError, match="data.train: required"):
        prepare(config)  # train and prepare still need it


def test_an_unreachable_judge_stops_the_round_with_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The candidates are kept (a rerun resumes at judging); the command exits 2 naming the URL."""
    import socket

    from dpo_cluster.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "Title my video about bread."}\n{"prompt": "Title my video about chess."}\n'
    )
    config_file = tmp_path / "rounds.yaml"
    config_file.write_text(f"output_dir: {tmp_path / 'out'}\n")
    code = main(
        [
            "rounds",
            "--config",
            str(config_file),
            "model.name_or_path=builtin:tiny",
            f"rounds.prompts={prompts}",
            f"evaluation.prompts={prompts}",
            "evaluation.pattern=e",
            "rounds.judge=llm_judge",
            f"rounds.judge_url=http://127.0.0.1:{port}/v1",
            "rounds.judge_model=judge",
            "rounds.samples_per_prompt=2",
            "rounds.max_new_tokens=4",
            "rounds.backend=hf",
        ]
    )
    assert code == 2
    assert (
        f"dpo-cluster rounds: error: POST http://127.0.0.1:{port}/v1/chat/completions"
        in capsys.readouterr().err
    )
    assert _lines(tmp_path / "out" / "round-1" / "candidates.jsonl") == 4
