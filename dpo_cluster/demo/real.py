"""`dpo-cluster demo`: one on-policy preference round on a real pretrained model, offline.

The recipe people run by hand: SmolLM2-135M-Instruct writes four titles for each of 64 video
ideas, a rule a reader can state in one sentence picks ("a good title is 30-75 characters on one
line, not wrapped in quotation marks"), DPO (plus the chosen titles' NLL) with LoRA trains on every
decisive pair on 2 CPU workers, and both models title 200 held-out ideas on topics the training
never saw. It is `dpo-cluster rounds` with one round; the report adds the round's accounting.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dpo_cluster.config import Config, load_config
from dpo_cluster.demo.ideas import ASK, HELD_OUT_TOPICS, TRAIN_TOPICS, write_idea_prompts
from dpo_cluster.demo.report import write_report

REAL_MODEL = "builtin:smollm2-135m-instruct"
TRAIN_IDEAS, HELD_OUT_IDEAS = 64, 200  # 200: every held-out topic x angle
IDEA_SEEDS = (1, 2)  # train, held out
REAL_PROMPT = ASK.format(idea="a day in my life doing home brewing beer")  # a held-out topic
RULE_SENTENCE = "a good title is 30-75 characters on one line, not wrapped in quotation marks"


def real_demo_config(
    output_dir: str | Path,
    *,
    model: str = REAL_MODEL,
    ideas: int = TRAIN_IDEAS,
    held_out: int = HELD_OUT_IDEAS,
    overrides: list[str] | None = None,
) -> Config:
    """The demo's rounds config: the idea prompts (written once), one round, LoRA DPO on 2 CPU
    workers, the plain_title rule as judge of the candidates and of the evaluation."""
    out = Path(output_dir)
    train_file = out / "data" / "train_ideas.jsonl"
    held_out_file = out / "data" / "held_out_ideas.jsonl"
    write_idea_prompts(train_file, TRAIN_TOPICS, ideas, IDEA_SEEDS[0])
    write_idea_prompts(held_out_file, HELD_OUT_TOPICS, held_out, IDEA_SEEDS[1])
    base = [
        f"output_dir={out}",
        f"model.name_or_path={model}",
        "data.max_length=128",
        "lora.enabled=true",
        # DPO plus the chosen answers' NLL (RPO, Pang et al. 2024, for iterative on-policy rounds):
        # plain DPO on these pairs lowers the chosen titles' likelihood too and overshoots into
        # too-short titles; the NLL term keeps the passing titles likely. Measured on the 200
        # held-out ideas: pass rate +0.05 [-0.08, +0.18] with sigmoid alone, +0.31 [+0.22, +0.39]
        # with sigmoid + sft.
        "train.loss_type=[sigmoid,sft]",
        "train.beta=0.1",
        "train.learning_rate=5e-4",
        "train.micro_batch_size=8",
        "train.num_epochs=1",
        "train.logging_steps=1",
        "deepspeed.zero_stage=2",
        "scaling.num_workers=2",
        "rounds.num_rounds=1",
        f"rounds.prompts={train_file}",
        f"rounds.num_prompts={ideas}",
        "rounds.samples_per_prompt=4",
        "rounds.max_new_tokens=24",
        "rounds.temperature=0.8",
        "rounds.judge=rule",
        "rounds.pairing=all",
        "evaluation.rule=plain_title",
        f"evaluation.prompts={held_out_file}",
        f"evaluation.num_prompts={held_out}",
        "evaluation.max_new_tokens=24",
        "evaluation.batch_size=16",
        f"serve.tuned={out / 'round-1' / 'run' / 'final'}",
        "serve.default_max_new_tokens=24",
    ]
    return load_config(None, base + list(overrides or []))


def run_real_demo(
    output_dir: str | Path = "outputs/demo",
    *,
    model: str = REAL_MODEL,
    ideas: int = TRAIN_IDEAS,
    held_out: int = HELD_OUT_IDEAS,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """The real-model demo up to its report; returns {"config", "metrics", "evaluation", "report"}."""
    from dpo_cluster.modeling import resolve_name_or_path
    from dpo_cluster.rounds.run import run_rounds

    print(f"[1/4] {model} (converted once, then cached) and {ideas} + {held_out} video ideas", flush=True)
    config = real_demo_config(output_dir, model=model, ideas=ideas, held_out=held_out, overrides=overrides)
    resolve_name_or_path(config.model.name_or_path)
    print(
        f"[2/4] one round: {config.rounds.samples_per_prompt} titles per idea, judged by a rule "
        f"({RULE_SENTENCE}), DPO with LoRA on 2 CPU workers, evaluation on held-out ideas",
        flush=True,
    )
    summary = run_rounds(config)
    record = summary["rounds"][0]
    out, round_dir = Path(config.output_dir), Path(config.output_dir) / "round-1"
    evaluation = json.loads((round_dir / "eval_vs_base.json").read_text())
    (out / "eval_report.json").write_text(json.dumps(evaluation, indent=2, ensure_ascii=False))
    curves = round_dir / "run" / "training_curves.png"
    if curves.is_file():
        shutil.copyfile(curves, out / "training_curves.png")
    metrics = json.loads((round_dir / "run" / "final" / "metrics_summary.json").read_text())
    print("[3/4] evaluated base vs tuned on the held-out ideas", flush=True)
    report = write_report(config, _intro(config, record), metrics, evaluation, _round_section(record))
    print(f"[4/4] report: {report}", flush=True)
    return {"config": config, "metrics": metrics, "evaluation": evaluation, "report": report}


def _intro(config: Config, record: dict[str, Any]) -> list[str]:
    r = config.rounds
    return [
        f"One on-policy preference round on a real pretrained model, `{config.model.name_or_path}`:",
        f"it wrote {r.samples_per_prompt} titles for each of {r.num_prompts} video ideas, a rule judge",
        f"({RULE_SENTENCE}) compared every two of an idea's titles, DPO (plus the chosen titles' NLL,",
        "as iterative RPO does) with LoRA trained on the",
        f"{record['report']['pairs']['written']} decisive pairs, and both models titled "
        f"{config.evaluation.num_prompts} held-out ideas on topics the training never saw.",
        f"Tuned model: `{record['policy']}`.",
    ]


def _round_section(record: dict[str, Any]) -> list[str]:
    """The round's accounting: every candidate, idea and comparison, kept or dropped and why."""
    rep = record["report"]
    cand, prompts, comps = rep["candidates"], rep["prompts"], rep["comparisons"]

    def reasons(dropped: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in dropped.items()) or "none"

    return [
        "## The round",
        "",
        "| | in | kept | dropped or tied (why) |",
        "|---|---|---|---|",
        f"| titles sampled | {cand['sampled']} | {cand['kept']} | {reasons(cand['dropped'])} |",
        f"| ideas | {prompts['in']} | {prompts['with_pair']} with a pair | {reasons(prompts['dropped'])} |",
        f"| comparisons | {comps['judged']} | {comps['decisive']} decisive | {reasons(comps['ties'])} |",
        "",
        f"Seconds: {', '.join(f'{k} {v}' for k, v in record['seconds'].items())}.",
        "",
    ]
