"""`dpo-cluster eval`: judges against hand-counted verdicts, the difference interval against
hand-computed and published values, reward accuracy against a direct log-prob computation on the
built-in tiny model with LoRA adapters and a full second model, and the whole command end to end
(on a real local Ray for the eval split, as a subprocess for the CLI)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, Qwen2ForSequenceClassification

from dpo_cluster import stats
from dpo_cluster.config import ConfigError, DataConfig, EvalConfig, load_config
from dpo_cluster.data.formats import FormatSpec, normalize_row, prompt_key
from dpo_cluster.data.pipeline import assign_split
from dpo_cluster.data.records import DataError
from dpo_cluster.data.samples import generate_title_pairs, is_good_title, write_jsonl
from dpo_cluster.data.tokenize import PairTokenizer
from dpo_cluster.evaluation.judges import (
    RewardModelJudge,
    build_rule,
    newcombe_difference_interval,
    summarize_arena,
    summarize_passes,
)
from dpo_cluster.evaluation.models import load_eval_models
from dpo_cluster.evaluation.prompt_sets import load_prompt_file
from dpo_cluster.evaluation.reward_accuracy import compute_reward_accuracy
from dpo_cluster.evaluation.run import run_evaluation
from dpo_cluster.evaluation.win_rate import (
    SideBySide,
    generate_side_by_side,
    judge_by_reward_model,
    judge_by_rule,
)
from dpo_cluster.losses import PreferenceLogps, compute_dpo_loss
from dpo_cluster.serving.arena_store import ArenaStore
from dpo_cluster.serving.generation import GenerationRequest, SamplingParams, TransformersBackend
from dpo_cluster.serving.prompts import load_served_tokenizer, render_prompt_ids
from dpo_cluster.tiny import build_lora_adapter, build_tiny_model, build_tiny_qwen2_config

REPO = Path(__file__).resolve().parents[1]
BETA = 0.1

GOOD = "A Beginner's Guide to Sourdough Bread"  # 37 characters: a good title
GOOD_2 = "Sourdough Bread: What I Wish I Knew Sooner"  # 42
SHORT = "Bread"
LONG = "In this video I am going to talk about sourdough bread and everything related to it, watch!"


# ----------------------------------------------------------------------------------------------
# Fixtures: the tiny base, adapters over it, a full second model, a reward model.


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random A and B, saved with its tokenizer as a training run's final/ is."""
    out = tmp_path_factory.mktemp("adapter")
    return build_lora_adapter(base_dir, out, tokenizer, random_b=True, seed=3, alpha=16)


@pytest.fixture(scope="module")
def zero_adapter_dir(base_dir: Path, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """peft's default init (B = 0): the adapter changes nothing, exactly as at the start of training."""
    out = tmp_path_factory.mktemp("zero_adapter")
    return build_lora_adapter(base_dir, out, tokenizer, random_b=False, seed=3, alpha=16)


@pytest.fixture(scope="module")
def full_tuned_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full model of the base's shape and vocabulary with other weights (seed 7)."""
    return build_tiny_model(tmp_path_factory.mktemp("full_tuned"), tokenizer_dir=base_dir, seed=7)


@pytest.fixture(scope="module")
def reward_model_dir(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer Qwen2 sequence classifier with one output, saved with the tiny tokenizer."""
    config = build_tiny_qwen2_config(
        tokenizer,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = Qwen2ForSequenceClassification(config)
        # A larger head than the default init, so scores of different texts differ clearly.
        torch.nn.init.normal_(model.score.weight, std=1.0)
    out = tmp_path_factory.mktemp("reward_model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pairs(tokenizer: Any) -> dict[str, list[Any]]:
    """Six tokenized title pairs (conversational, through the ChatML template), as prepared data holds."""
    rows = generate_title_pairs(6, seed=4)
    normalized = [normalize_row(r, "conversational", FormatSpec()) for r in rows]
    tokenized = PairTokenizer(tokenizer, DataConfig(max_length=128).tokenize_spec()).tokenize(normalized)
    return {
        "prompt_ids": [t.prompt_ids for t in tokenized],
        "chosen_ids": [t.chosen_ids for t in tokenized],
        "rejected_ids": [t.rejected_ids for t in tokenized],
    }


def _side_by_side(base: list[str], tuned: list[str], prompt: Any = "Title for my video:") -> list[SideBySide]:
    return [SideBySide(i, prompt, b, t) for i, (b, t) in enumerate(zip(base, tuned))]


# ----------------------------------------------------------------------------------------------
# The rule judge.


def test_rule_judge_title_length_counts_rates_and_wins() -> None:
    """base passes prompts 1, 3 (2/5); tuned passes 0, 1, 2 (3/5). Tuned alone: 0, 2 -> 2 wins;
    base alone: 3 -> 1 win; both: 1; neither: 4. Win rate 2 / 3 decisive."""
    base = [SHORT, GOOD, LONG, GOOD_2, "ok"]
    tuned = [GOOD, GOOD_2, GOOD, SHORT, f"{GOOD}\n{GOOD}"]  # two lines: not a title
    summary, verdicts = judge_by_rule(_side_by_side(base, tuned), EvalConfig(rule="title_length"))
    assert summary["name"] == "rule" and summary["rule"] == "title_length"
    assert summary["prompts"] == 5
    assert summary["pass_rate"]["base"] == stats.rate_with_ci(2, 5)
    assert summary["pass_rate"]["tuned"] == stats.rate_with_ci(3, 5)
    low, high = stats.wilson_interval(3, 5)
    assert (summary["pass_rate"]["tuned"]["ci_low"], summary["pass_rate"]["tuned"]["ci_high"]) == (low, high)
    assert summary["counts"] == {"tuned_wins": 2, "base_wins": 1, "ties_both_pass": 1, "ties_neither_pass": 1}
    assert summary["win_rate"] == stats.rate_with_ci(2, 3)
    assert summary["difference"] == newcombe_difference_interval(3, 5, 2, 5)
    assert summary["difference"]["difference"] == pytest.approx(0.2)
    assert [v["winner"] for v in verdicts] == ["tuned", "tie", "tuned", "base", "tie"]
    assert [v["base_pass"] for v in verdicts] == [False, True, False, True, False]


def test_regex_judge_in_both_polarities() -> None:
    answers = ["Call it 10 Tips", "no digits here", "2024 recap", "plain"]
    passes, description = build_rule(None, r"\d+", pattern_must_match=True)
    assert [passes(a) for a in answers] == [True, False, True, False]
    assert description == {"pattern": r"\d+", "pattern_must_match": True}
    fails, _ = build_rule(None, r"\d+", pattern_must_match=False)
    assert [fails(a) for a in answers] == [False, True, False, True]

    base, tuned = ["x", "1", "2", "y"], ["3", "4", "z", "w"]
    found, _ = judge_by_rule(_side_by_side(base, tuned), EvalConfig(pattern=r"\d"))
    assert found["counts"] == {"tuned_wins": 1, "base_wins": 1, "ties_both_pass": 1, "ties_neither_pass": 1}
    assert found["pass_rate"]["tuned"] == stats.rate_with_ci(2, 4)
    absent, verdicts = judge_by_rule(
        _side_by_side(base, tuned), EvalConfig(pattern=r"\d", pattern_must_match=False)
    )
    assert absent["counts"] == {"tuned_wins": 1, "base_wins": 1, "ties_both_pass": 1, "ties_neither_pass": 1}
    assert [v["winner"] for v in verdicts] == ["base", "tie", "tuned", "tie"]
    assert absent["pattern_must_match"] is False


def test_newcombe_difference_against_hand_computed_values() -> None:
    """8/10 vs 3/10, z = 1.959964, z^2 = 3.841459.

    Wilson 8/10: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.716740, half-width
    z sqrt(0.8*0.2/10 + z^2/400) / (1 + z^2/10) = 0.226578 -> (0.490162, 0.943318).
    Wilson 3/10: centre 0.355507, half-width 0.247715 -> (0.107791, 0.603222).
    d = 0.5; low = 0.5 - sqrt((0.8 - 0.490162)^2 + (0.603222 - 0.3)^2) = 0.5 - sqrt(0.095999 + 0.091943)
    = 0.066476; high = 0.5 + sqrt((0.943318 - 0.8)^2 + (0.3 - 0.107791)^2) = 0.5 + sqrt(0.020540 + 0.036944)
    = 0.739759.
    """
    result = newcombe_difference_interval(8, 10, 3, 10)
    assert result["difference"] == pytest.approx(0.5)
    assert result["ci_low"] == pytest.approx(0.066476, abs=2e-6)
    assert result["ci_high"] == pytest.approx(0.739759, abs=2e-6)
    assert result["method"] == "newcombe_hybrid_score"
    # Newcombe (1998), Table II, method 10, to the four decimals published there.
    for counts, published in [
        ((56, 70, 48, 80), (0.0524, 0.3339)),
        ((9, 10, 3, 10), (0.1705, 0.8090)),
        ((5, 56, 0, 29), (-0.0381, 0.1926)),
        ((0, 10, 0, 20), (-0.1611, 0.2775)),
        ((10, 10, 0, 20), (0.6791, 1.0000)),
    ]:
        got = newcombe_difference_interval(*counts)
        assert (round(got["ci_low"], 4), round(got["ci_high"], 4)) == published, counts
    # Swapping the samples mirrors the interval.
    mirrored = newcombe_difference_interval(3, 10, 8, 10)
    assert (mirrored["ci_low"], mirrored["ci_high"]) == pytest.approx((-0.739759, -0.066476), abs=2e-6)
    assert newcombe_difference_interval(0, 0, 0, 0)["difference"] is None
    with pytest.raises(ValueError):
        newcombe_difference_interval(3, 2, 0, 1)


def test_summaries_of_nothing_are_unknown_not_errors() -> None:
    summary = summarize_passes([], [])
    assert summary["pass_rate"]["base"]["rate"] is None
    assert summary["win_rate"] == stats.rate_with_ci(0, 0)
    assert summary["difference"]["difference"] is None


# ----------------------------------------------------------------------------------------------
# The reward-model judge.


def _own_forward_score(model: Any, ids: list[int]) -> float:
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def test_reward_model_scores_equal_the_models_own_forward(reward_model_dir: Path, tokenizer: Any) -> None:
    judge = RewardModelJudge(str(reward_model_dir), device="cpu", batch_size=3)
    chat = [{"role": "user", "content": "Title for my video about tea?"}]
    prompts: list[Any] = ["Question: a title?\nAnswer: ", chat, chat, "Q: ", chat]
    answers = [GOOD, SHORT, LONG, GOOD_2, "A Beginner's Guide"]
    scores = judge.score(prompts, answers)
    model = Qwen2ForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for prompt, answer, score in zip(prompts, answers, scores):
        if isinstance(prompt, str):
            ids = tokenizer(prompt + answer)["input_ids"]
        else:
            text = tokenizer.apply_chat_template(
                [*prompt, {"role": "assistant", "content": answer}], tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert judge.encode(prompt, answer) == ids
        assert score == pytest.approx(_own_forward_score(model, ids), abs=1e-5)
    assert len(set(scores)) == len(scores)


def test_reward_model_judge_counts_tuned_wins(reward_model_dir: Path, tokenizer: Any) -> None:
    base = [SHORT, GOOD, LONG, GOOD_2, "same answer"]
    tuned = [GOOD, SHORT, GOOD_2, LONG, "same answer"]
    answers = _side_by_side(base, tuned)
    summary, verdicts = judge_by_reward_model(
        answers, EvalConfig(judge="reward_model", reward_model=str(reward_model_dir), device="cpu")
    )
    model = Qwen2ForSequenceClassification.from_pretrained(reward_model_dir).eval()

    def own(answer: str) -> float:
        return _own_forward_score(model, tokenizer("Title for my video:" + answer)["input_ids"])

    expected = []
    for b, t in zip(base, tuned):
        sb, st = own(b), own(t)
        expected.append("tuned" if st > sb else "base" if sb > st else "tie")
    assert [v["winner"] for v in verdicts] == expected
    assert expected[-1] == "tie"  # one text, one score
    tuned_wins, base_wins = expected.count("tuned"), expected.count("base")
    assert summary["counts"] == {"tuned_wins": tuned_wins, "base_wins": base_wins, "ties": 1}
    assert summary["win_rate"] == stats.rate_with_ci(tuned_wins, tuned_wins + base_wins)
    assert summary["mean_score"]["base"] == pytest.approx(sum(own(b) for b in base) / 5, abs=1e-5)
    assert summary["mean_score"]["tuned"] == pytest.approx(sum(own(t) for t in tuned) / 5, abs=1e-5)
    assert [v["base_score"] for v in verdicts] == pytest.approx([own(b) for b in base], abs=1e-5)


def test_a_rounds_reward_model_judge_compares_candidates_by_their_scores(
    reward_model_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    """`rounds.judge: reward_model`: each candidate scored once by evaluation.reward_model, every
    two of a prompt decided by the higher score, equal texts (equal scores) a tie."""
    from dpo_cluster.config import load_config
    from dpo_cluster.rounds.comparisons import candidate_pairs, compare_by_scores, score_candidates

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    config = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "model.name_or_path=builtin:tiny",
            f"data.train={data}",
            "rounds.judge=reward_model",
            f"evaluation.reward_model={reward_model_dir}",
            "evaluation.device=cpu",
        ],
    )
    prompts = ["Title for my video:"]
    texts = {(0, 0): SHORT, (0, 1): GOOD, (0, 2): LONG, (0, 3): SHORT}
    scores = score_candidates(config, prompts, texts)
    model = Qwen2ForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for key, text in texts.items():
        own = _own_forward_score(model, tokenizer("Title for my video:" + text)["input_ids"])
        assert scores[key] == pytest.approx(own, abs=1e-5)
    comparisons = compare_by_scores(candidate_pairs({0: [0, 1, 2, 3]}), scores)
    tie = next(c for c in comparisons if (c.first, c.second) == (0, 3))
    assert (tie.winner, tie.tie_reason) == (None, "equal_scores")
    for c in comparisons:
        if c.winner is not None:
            loser = c.second if c.winner == c.first else c.first
            assert scores[(0, c.winner)] > scores[(0, loser)]


def test_a_reward_model_with_several_outputs_is_refused(tmp_path: Path, tokenizer: Any) -> None:
    config = build_tiny_qwen2_config(
        tokenizer, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, num_labels=2,
    )  # fmt: skip
    Qwen2ForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_labels 2"):
        RewardModelJudge(str(tmp_path), device="cpu")


# ----------------------------------------------------------------------------------------------
# The arena judge.


def test_arena_judge_reads_planted_votes(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "votes.sqlite")
    rng = random.Random(0)
    # Verdicts by model name; the blind label of each model is the store's seeded draw.
    planned = ["tuned", "tuned", "base", "tie", "tuned", "both_bad"]
    for i, outcome in enumerate(planned):
        battle = store.create_battle(
            prompt=f"Title {i}?",
            messages=None,
            answers_by_model={"base": f"base answer {i}", "tuned": f"tuned answer {i}"},
            params={"temperature": 0.0},
            rng=rng,
        )
        label = {m: lbl for lbl, m in battle.models.items()}
        store.vote(battle.id, label[outcome] if outcome in ("base", "tuned") else outcome)
    store.create_battle(
        prompt=None,
        messages=[{"role": "user", "content": "unvoted"}],
        answers_by_model={"base": "b", "tuned": "t"},
        params={},
        rng=rng,
    )
    summary, examples = summarize_arena(tmp_path / "votes.sqlite")
    assert summary["battles"] == 7 and summary["votes"] == 6
    assert summary["subject"] == "tuned" and summary["opponent"] == "base"
    assert summary["counts"] == {"tuned": 3, "base": 1, "tie": 1, "both_bad": 1}
    assert summary["win_rate"] == stats.rate_with_ci(3, 4)
    assert summary["win_rate_ties_half"] == pytest.approx((3 + 1) / 6)
    assert [e["verdict"] for e in examples] == planned[:5]
    assert examples[0] == {
        "prompt": "Title 0?",
        "base": "base answer 0",
        "tuned": "tuned answer 0",
        "verdict": "tuned",
    }
    with pytest.raises(ValueError, match="no arena database"):
        summarize_arena(tmp_path / "missing.sqlite")


def test_run_evaluation_with_the_arena_judge_needs_no_model(tmp_path: Path) -> None:
    db = tmp_path / "arena" / "votes.sqlite"
    store = ArenaStore(db)
    battle = store.create_battle(
        prompt="p",
        messages=None,
        answers_by_model={"base": "b", "tuned": "t"},
        params={},
        rng=random.Random(1),
    )
    store.vote(battle.id, "A" if battle.models["A"] == "tuned" else "B")
    data = write_jsonl(generate_title_pairs(4), tmp_path / "pairs.jsonl")
    config = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "model.name_or_path=builtin:tiny",
            f"data.train={data}",
            "evaluation.judge=arena",
        ],
    )
    report = run_evaluation(config, progress=False)
    assert report["judge"]["name"] == "arena"
    assert report["judge"]["win_rate"] == stats.rate_with_ci(1, 1)
    assert report["reward_accuracy"]["skipped"].startswith("the data has no eval split")
    assert report["models"] is None
    assert json.loads((tmp_path / "eval_report.json").read_text()) == report

    config.evaluation.arena_db = str(tmp_path / "none.sqlite")
    with pytest.raises(ConfigError, match="evaluation.arena_db: no arena database"):
        run_evaluation(config, progress=False)


# ----------------------------------------------------------------------------------------------
# Reward accuracy.


def _direct_logps(model: Any, pairs: dict[str, list[Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of chosen and rejected, one unpadded sequence at a time, from
    log_softmax directly: sum over completion tokens y_t of log p(y_t | prefix)."""
    out: dict[str, list[float]] = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for k, prompt in enumerate(pairs["prompt_ids"]):
            for side in ("chosen", "rejected"):
                completion = pairs[f"{side}_ids"][k]
                ids = torch.tensor([prompt + completion])
                logps = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                # Token at position t is predicted by the logits at t - 1.
                positions = range(len(prompt), len(prompt) + len(completion))
                out[side].append(sum(float(logps[t - 1, ids[0, t]]) for t in positions))
    return torch.tensor(out["chosen"], dtype=torch.float64), torch.tensor(
        out["rejected"], dtype=torch.float64
    )


def test_a_zero_adapter_has_zero_margins_and_zero_accuracy(zero_adapter_dir: Path, pairs: dict) -> None:
    models = load_eval_models("builtin:tiny", str(zero_adapter_dir), device="cpu")
    assert models.tuned_is_adapter and models.backends["base"] is models.backends["tuned"]
    section = compute_reward_accuracy(
        models.policy_logps(), models.reference_logps(), pairs, beta=BETA, pad_token_id=1, batch_size=4
    )
    assert section["pairs"] == 6
    assert section["rewards/margins"] == 0.0
    assert section["rewards/chosen"] == 0.0 and section["rewards/rejected"] == 0.0
    # A tie is not a correct preference.
    assert section["rewards/accuracies"] == stats.rate_with_ci(0, 6)


def test_reward_accuracy_of_an_adapter_matches_a_direct_computation(
    base_dir: Path, adapter_dir: Path, pairs: dict
) -> None:
    models = load_eval_models("builtin:tiny", str(adapter_dir), device="cpu")
    # From hidden states, 3 completion tokens per head call: the adapter-off reference included.
    section = compute_reward_accuracy(
        models.policy_logps(3), models.reference_logps(3), pairs, beta=BETA, pad_token_id=1, batch_size=4
    )
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    policy_chosen, policy_rejected = _direct_logps(peft_model, pairs)
    with peft_model.disable_adapter():
        ref_chosen, ref_rejected = _direct_logps(peft_model, pairs)
    assert not torch.allclose(policy_chosen, ref_chosen)  # the adapter does change the model
    _check_against(section, policy_chosen, policy_rejected, ref_chosen, ref_rejected)


def test_reward_accuracy_of_a_full_model_matches_a_direct_computation(
    base_dir: Path, full_tuned_dir: Path, pairs: dict
) -> None:
    models = load_eval_models("builtin:tiny", str(full_tuned_dir), device="cpu")
    assert not models.tuned_is_adapter and models.backends["base"] is not models.backends["tuned"]
    section = compute_reward_accuracy(
        models.policy_logps(), models.reference_logps(), pairs, beta=BETA, pad_token_id=1, batch_size=5
    )
    policy_chosen, policy_rejected = _direct_logps(
        AutoModelForCausalLM.from_pretrained(full_tuned_dir), pairs
    )
    ref_chosen, ref_rejected = _direct_logps(AutoModelForCausalLM.from_pretrained(base_dir), pairs)
    _check_against(section, policy_chosen, policy_rejected, ref_chosen, ref_rejected)


def _check_against(
    section: dict[str, Any],
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> None:
    chosen = BETA * (policy_chosen - ref_chosen)
    rejected = BETA * (policy_rejected - ref_rejected)
    margins = chosen - rejected
    assert margins.abs().min() > 1e-3, "a margin this close to 0 would make the accuracy fragile"
    correct = int((chosen > rejected).sum())
    assert section["rewards/accuracies"] == stats.rate_with_ci(correct, 6)
    assert section["rewards/margins"] == pytest.approx(float(margins.mean()), abs=2e-4)
    assert section["rewards/chosen"] == pytest.approx(float(chosen.mean()), abs=2e-4)
    assert section["rewards/rejected"] == pytest.approx(float(rejected.mean()), abs=2e-4)
    assert section["logps/chosen"] == pytest.approx(float(policy_chosen.mean()), abs=2e-3)
    # The same rewards as the training loss reports for these log-probs.
    _, loss_chosen, loss_rejected = compute_dpo_loss(
        PreferenceLogps(policy_chosen, policy_rejected, ref_chosen, ref_rejected),
        loss_types=["sigmoid"],
        loss_weights=None,
        beta=BETA,
        label_smoothing=0.0,
    )
    assert section["rewards/chosen"] == pytest.approx(float(loss_chosen.mean()), abs=2e-4)
    assert section["rewards/rejected"] == pytest.approx(float(loss_rejected.mean()), abs=2e-4)


# ----------------------------------------------------------------------------------------------
# Generation.


@pytest.mark.parametrize("kind", ["adapter", "full"])
def test_answers_are_what_the_server_would_give(
    kind: str, adapter_dir: Path, full_tuned_dir: Path, base_dir: Path
) -> None:
    """Each answer equals a fresh backend's answer to the request the serve app builds for that
    prompt alone (its served tokenizer, render_prompt_ids, seed + prompt index); a prompt over
    the limit is skipped for both models."""
    tuned = str(adapter_dir if kind == "adapter" else full_tuned_dir)
    models = load_eval_models("builtin:tiny", tuned, device="cpu")
    chat = [{"role": "user", "content": "A title for my video about tea?"}]
    too_long = "word " * 60
    prompts: list[Any] = ["Question: What is the capital of France?\nAnswer:", chat, too_long, "SELECT"]
    settings = EvalConfig(max_new_tokens=6, temperature=0.8, seed=11, batch_size=3)
    answers, skipped = generate_side_by_side(models, prompts, settings, max_prompt_tokens=40, progress=False)
    assert [a.index for a in answers] == [0, 1, 3]
    assert [s["index"] for s in skipped] == [2] and "over this server's limit of 40" in skipped[0]["reason"]

    served = {"base": (str(base_dir), {"base": None})}
    served["tuned"] = (str(base_dir), {"tuned": tuned}) if kind == "adapter" else (tuned, {"tuned": None})
    for name, (weights, names) in served.items():
        backend = TransformersBackend(weights, names, device="cpu")
        tokenizer = load_served_tokenizer(tuned if name == "tuned" else str(base_dir), str(base_dir))
        for answer in answers:
            prompt = answer.prompt
            ids = render_prompt_ids(
                tokenizer,
                prompt=prompt if isinstance(prompt, str) else None,
                messages=None if isinstance(prompt, str) else prompt,
                max_prompt_tokens=40,
            )
            params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=11 + answer.index)
            (alone,) = backend.generate([GenerationRequest(name, tuple(ids), params)])
            assert getattr(answer, name) == alone.text, (name, answer.index)
    assert any(a.base != a.tuned for a in answers)


# ----------------------------------------------------------------------------------------------
# Prompts and settings.


def test_prompt_files_take_strings_chats_and_preference_rows(tmp_path: Path) -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Title?"}]
    rows = [
        {"prompt": "Plain prompt"},
        {"prompt": chat, "chosen": [{"role": "assistant", "content": "x"}], "rejected": "ignored"},
        {"prompt": "Plain prompt", "note": "a repeat counts once"},
        {"prompt": "Third"},
        {"prompt": "Fourth"},
    ]
    path = write_jsonl(rows, tmp_path / "prompts.jsonl")
    assert load_prompt_file(path, 3) == ["Plain prompt", chat, "Third"]
    as_json = tmp_path / "prompts.json"
    as_json.write_text(json.dumps(rows))
    assert load_prompt_file(as_json, 10) == ["Plain prompt", chat, "Third", "Fourth"]
    bad = write_jsonl([{"prompt": "ok"}, {"question": "no prompt"}], tmp_path / "bad.jsonl")
    with pytest.raises(
        DataError, match=r"bad.jsonl:2: field 'prompt': expected a string or a non-empty list"
    ):
        load_prompt_file(bad, 10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["evaluation.top_p=0"], "evaluation.top_p: must be in (0, 1]"),
        (["evaluation.num_prompts=0"], "evaluation.num_prompts: must be >= 1"),
        (["evaluation.rule=shortest"], "evaluation.rule: unknown rule 'shortest'; valid: title_length"),
        (["evaluation.pattern=(unclosed"], "evaluation.pattern: not a valid regular expression"),
        (["evaluation.rule=title_length", "evaluation.pattern=x"], "evaluation.pattern: set together"),
        (["evaluation.judge=llm"], "evaluation.judge: 'llm' is not one of: rule, reward_model, arena"),
        (["evaluation.prompts=/no/such.jsonl"], "evaluation.prompts: no such file: /no/such.jsonl"),
        (["evaluation.num_prompt=3"], "did you mean evaluation.num_prompts?"),
    ],
)
def test_evaluation_settings_are_checked_at_load_time(overrides: list[str], message: str) -> None:
    base = ["output_dir=out", "model.name_or_path=builtin:tiny", "data.train=x.jsonl"]
    with pytest.raises(ConfigError) as error:
        load_config(None, base + overrides)
    assert message in str(error.value)


def test_what_a_run_needs_is_checked_before_any_work() -> None:
    with pytest.raises(ConfigError, match="evaluation.judge: rule needs evaluation.rule"):
        EvalConfig().check_ready(has_eval_split=True)
    with pytest.raises(ConfigError, match="evaluation.judge: reward_model needs evaluation.reward_model"):
        EvalConfig(judge="reward_model").check_ready(has_eval_split=True)
    with pytest.raises(ConfigError, match="evaluation.prompts: required when the data has no eval split"):
        EvalConfig(rule="title_length").check_ready(has_eval_split=False)
    EvalConfig(judge="arena").check_ready(has_eval_split=False)
    assert (
        load_config(None, ["output_dir=o", "model.name_or_path=m", "data.train=t"]).evaluation == EvalConfig()
    )


# ----------------------------------------------------------------------------------------------
# End to end.


def _config_lines(tmp_path: Path, data: Path, *extra: str) -> str:
    lines = [
        f"output_dir: {tmp_path / 'out'}",
        "model: {name_or_path: 'builtin:tiny'}",
        f"data: {{train: {data}, max_length: 128}}",
        *extra,
    ]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_run_evaluation_end_to_end_on_the_eval_split(
    tmp_path: Path, adapter_dir: Path, ray_local: None
) -> None:
    rows = generate_title_pairs(24, seed=2)
    data = write_jsonl(rows, tmp_path / "pairs.jsonl")
    config = load_config(
        None,
        [
            f"output_dir={tmp_path / 'out'}",
            "model.name_or_path=builtin:tiny",
            f"data.train={data}",
            "data.eval_fraction=0.25",
            "data.max_length=128",
            f"evaluation.tuned={adapter_dir}",
            "evaluation.rule=title_length",
            "evaluation.num_prompts=3",
            "evaluation.max_new_tokens=8",
            "evaluation.batch_size=2",
        ],
    )
    report = run_evaluation(config, progress=False)
    assert set(report) == {
        "base", "tuned", "models", "reward_accuracy", "judge", "examples", "settings", "seconds", "output",
    }  # fmt: skip
    assert report["models"]["tuned_kind"] == "lora_adapter"
    data_report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    eval_rows = data_report["splits"]["eval"]["rows_kept"]
    assert eval_rows > 0
    reward = report["reward_accuracy"]
    assert reward["pairs"] == eval_rows and reward["beta"] == config.train.beta
    correct = reward["rewards/accuracies"]["successes"]
    assert reward["rewards/accuracies"] == stats.rate_with_ci(correct, eval_rows)

    # The prompts are the first distinct prompts of the rows the split hash put in eval.
    spec = FormatSpec()
    expected: list[Any] = []
    for row in rows:
        pair = normalize_row(row, "conversational", spec)
        if assign_split(prompt_key(pair).encode(), 0.25, 0) == "eval" and pair.prompt not in expected:
            expected.append(pair.prompt)
    judged = report["judge"]
    assert judged["prompts"] == 3 and judged["prompt_source"] == "the eval split"
    assert [e["prompt"] for e in report["examples"]] == expected[:3]
    winners = []
    for example in report["examples"]:  # all three prompts: under the 5 shown
        assert set(example) == {"prompt", "base", "tuned", "verdict"}
        assert example["verdict"]["base_pass"] == is_good_title(example["base"])
        assert example["verdict"]["tuned_pass"] == is_good_title(example["tuned"])
        winners.append(example["verdict"]["winner"])
    counts = judged["counts"]
    assert sum(counts.values()) == 3
    assert (counts["tuned_wins"], counts["base_wins"]) == (winners.count("tuned"), winners.count("base"))
    assert json.loads(Path(report["output"]).read_text()) == report


def _run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DPO_CLUSTER_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "dpo_cluster.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_eval_command_prints_the_table_and_writes_the_report(tmp_path: Path, adapter_dir: Path) -> None:
    """A prompt file and no eval split: nothing needs Ray, so the command runs in seconds."""
    data = write_jsonl(generate_title_pairs(6, seed=1), tmp_path / "pairs.jsonl")
    config = tmp_path / "eval.yaml"
    config.write_text(
        _config_lines(
            tmp_path,
            data,
            f"evaluation: {{prompts: {data}, pattern: 'a', num_prompts: 3, max_new_tokens: 6}}",
        )
    )
    output = tmp_path / "report.json"
    result = _run_cli(
        "eval", "--config", str(config), "--tuned", str(adapter_dir), "--output", str(output),
        "evaluation.seed=3", cache=Path(os.environ["DPO_CLUSTER_CACHE"]),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "held-out reward accuracy: skipped: the data has no eval split" in out
    assert f"win rate, judge rule (a), 3 prompts from {data}" in out
    assert "pass rate base" in out and "difference tuned - base" in out and "tuned win rate" in out
    assert f"report: {output}" in out
    report = json.loads(output.read_text())
    assert report["tuned"] == str(adapter_dir)
    assert report["settings"]["seed"] == 3 and report["judge"]["sampling"]["max_new_tokens"] == 6
    assert len(report["examples"]) == 3


def test_eval_config_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    data = write_jsonl(generate_title_pairs(4), tmp_path / "pairs.jsonl")
    config = tmp_path / "eval.yaml"
    config.write_text(_config_lines(tmp_path, data, "evaluation: {rule: title_length}"))
    cache = Path(os.environ["DPO_CLUSTER_CACHE"])
    result = _run_cli("eval", "--config", str(config), "--judge", "reward_model", cache=cache)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "dpo-cluster eval: error: evaluation.judge: reward_model needs evaluation.reward_model "
        "(a sequence-classification model directory or hub id)"
    ]
    missing = _run_cli("eval", "--config", str(config), "evaluation.prompts=" + str(data), cache=cache)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1] == (
        f"dpo-cluster eval: error: evaluation.tuned: no such model directory: {tmp_path / 'out' / 'final'} "
        "(train first, or set evaluation.tuned / --tuned)"
    )
