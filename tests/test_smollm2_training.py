"""DPO on a real pretrained model (SmolLM2-135M-Instruct, its own tokenizer and chat template):
the production forward gives TRL 1.16 `DPOTrainer`'s loss, metrics and every parameter gradient on
the same batch, from hidden states and from full logits, padded and packed; the first-step loss
is ln 2; a LoRA policy's adapter-disabled reference equals the frozen copy."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from dpo_cluster.batch.logps import sequence_logps
from dpo_cluster.modeling import reference_context
from dpo_cluster.tiny import randomize_lora_b
from tests.test_losses import _loss_settings, _micro_batches, check_step_against_trl

pytestmark = pytest.mark.slow

ROWS = [
    {
        "prompt": [{"role": "user", "content": "Write a YouTube title for my video about sourdough bread."}],
        "chosen": [{"role": "assistant", "content": "Sourdough From Scratch: The 3-Ingredient Loaf"}],
        "rejected": [{"role": "assistant", "content": "bread video"}],
    },
    {
        "prompt": [{"role": "user", "content": "Name a colour of the sky."}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "The sky is usually green on clear days."}],
    },
    {
        "prompt": [{"role": "user", "content": "What is 2 + 3?"}],
        "chosen": [{"role": "assistant", "content": "2 + 3 = 5"}],
        "rejected": [{"role": "assistant", "content": "6"}],
    },
]


@pytest.fixture(scope="module")
def trainer(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """TRL's DPOTrainer on SmolLM2 (fp32) with a frozen copy as its reference, its data
    tokenized by TRL's own preprocessing of conversational rows."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        use_cpu=True,
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=len(ROWS),
        max_length=128,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=AutoTokenizer.from_pretrained(smollm2_dir),
    )
    trainer.model.train()
    return trainer


def _compare_with_trl(trainer: Any, loss_type: list[str]) -> float:
    """TRL's loss, metrics and gradients vs ours (hidden states on packed rows, full logits on
    padded rows); returns TRL's loss."""
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    trainer.loss_types, trainer.loss_weights = loss_type, [1.0] * len(loss_type)
    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    trl_loss.backward()
    trl_grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    batches = _micro_batches(trainer, inputs)
    settings = _loss_settings({"loss_type": loss_type})
    for layout, chunk in (("packed", 16), ("padded", 0)):
        check_step_against_trl(
            trainer,
            batches[layout],
            dataclasses.replace(settings, logps_chunk_size=chunk),
            trl_loss,
            trl_metrics,
            trl_grads,
            where=f"{layout}, chunk {chunk}",
            metric_tolerance=1e-4,
            grad_tolerance=2e-4,
        )
    return float(trl_loss)


def test_first_step_is_ln2_and_equals_trl(trainer: Any) -> None:
    assert trainer.model.config.vocab_size == 49152 and trainer.model.config.tie_word_embeddings
    assert _compare_with_trl(trainer, ["sigmoid"]) == pytest.approx(math.log(2), abs=1e-6)


def test_a_moved_policy_equals_trl(trainer: Any) -> None:
    """After the policy moves off the reference (its last layer and norm perturbed), with DPO+SFT."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if ".layers.29." in name or name == "model.norm.weight":
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    loss = _compare_with_trl(trainer, ["sigmoid", "sft"])
    assert abs(loss - math.log(2)) > 1e-3  # the rewards are no longer zero


def test_lora_adapter_disabled_reference_equals_the_frozen_copy(trainer: Any, smollm2_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    policy = get_peft_model(
        AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]),
    )
    randomize_lora_b(policy, 0.02)
    batch = _micro_batches(trainer, trainer.data_collator([trainer.train_dataset[i] for i in range(3)]))[
        "packed"
    ]
    with reference_context(trainer.ref_model, "model"):
        frozen, _, _ = sequence_logps(trainer.ref_model, batch)
    with reference_context(policy, "adapter_disabled"):
        disabled, _, _ = sequence_logps(policy, batch, chunk_size=16)
    with torch.no_grad():
        adapted, _, _ = sequence_logps(policy, batch, chunk_size=16)
    torch.testing.assert_close(disabled, frozen, atol=1e-4, rtol=1e-5)
    assert (adapted - frozen).abs().max() > 1e-2  # the adapter is on outside the context
