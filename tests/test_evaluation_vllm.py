"""`dpo-cluster eval` answering on vLLM: the same requests as on transformers (the serve app's
rendering, limits and per-prompt seeds), handed to a real vLLM engine (the CPU build) at once,
give the same greedy answers, for a LoRA tuned model (one engine) and a full one (one each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dpo_cluster.config import EvalConfig
from dpo_cluster.evaluation.models import load_eval_models
from dpo_cluster.evaluation.vllm_answers import generate_side_by_side_vllm
from dpo_cluster.evaluation.win_rate import build_side_by_side, generate_side_by_side
from tests.serve_helpers import build_smollm2_adapter

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["adapter", "full"])
def test_vllm_answers_equal_the_transformers_answers(
    kind: str, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if kind == "adapter":
        tuned = str(build_smollm2_adapter(smollm2_dir, tmp_path_factory.mktemp("eval_vllm") / "final"))
    else:
        tuned = str(smollm2_dir)  # a full model; the base's own weights keep this test's disk small
    models = load_eval_models(str(smollm2_dir), tuned, device="cpu")
    prompts: list[Any] = [
        [{"role": "user", "content": "Give me a title for a video about tea."}],
        "word " * 80,  # over the prompt limit: skipped for both
        [{"role": "user", "content": "What is the capital of France?"}],
        "The three primary colours are",
    ]
    settings = EvalConfig(max_new_tokens=16, temperature=0.0, backend="vllm")
    expected, skipped = generate_side_by_side(models, prompts, settings, max_prompt_tokens=48, progress=False)
    kept, skipped_too = build_side_by_side(models, prompts, settings, max_prompt_tokens=48)
    assert skipped == skipped_too and [s["index"] for s in skipped] == [1]
    engine = {"dtype": "float32", "max_model_len": 64, "kv_cache_gb": 0.25}
    answers = generate_side_by_side_vllm(
        kept,
        base=models.base,
        tuned=models.tuned,
        tuned_is_adapter=models.tuned_is_adapter,
        engine=engine,
        progress=False,
    )
    assert answers == expected
    if kind == "adapter":
        assert any(a.base != a.tuned for a in answers)
