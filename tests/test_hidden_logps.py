"""Log-probs from hidden states (dpo_cluster.batch.hidden_logps) equal the full-logits path: the
per-sequence scores, every loss type's loss and metric sums, and every parameter's gradient, on
padded and packed micro-batches, tied and untied heads, LoRA with the head frozen or adapted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from dpo_cluster.batch.collate import collate_pairs
from dpo_cluster.batch.hidden_logps import find_output_head
from dpo_cluster.batch.logps import MicroBatch, compute_sequence_scores
from dpo_cluster.batch.packing import pack_pairs
from dpo_cluster.config import LOSS_TYPES, TrainConfig
from dpo_cluster.modeling import reference_context
from dpo_cluster.tiny import build_tiny_qwen2_config, randomize_lora_b
from dpo_cluster.train.forward import build_loss_settings, compute_micro_batch

PAIRS: dict[str, Any] = {
    "prompt_ids": [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]],
    "chosen_ids": [[20, 21, 0], [22, 0], [23, 24, 25, 26, 27, 0], [28, 29, 0]],
    "rejected_ids": [[30, 0], [31, 32, 33, 0], [34, 0], [35, 36, 0]],
}
LAYOUTS = ("padded", "packed")


def _noisy(model: PreTrainedModel, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def policy(base_dir: Path) -> PreTrainedModel:
    return _noisy(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))


@pytest.fixture(scope="module")
def untied(tokenizer: Any) -> PreTrainedModel:
    config = build_tiny_qwen2_config(tokenizer, tie_word_embeddings=False)
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config).float()


def _batch(layout: str) -> MicroBatch:
    return collate_pairs(PAIRS, 1) if layout == "padded" else pack_pairs(PAIRS, 1)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _scores_and_grads(
    model: torch.nn.Module, layout: str, chunk_size: int, **options: Any
) -> tuple[Any, dict]:
    model.zero_grad(set_to_none=True)
    scores = compute_sequence_scores(model, _batch(layout), chunk_size=chunk_size, **options)
    weights = torch.linspace(-1.0, 1.0, scores.logps.shape[0])  # every sequence's gradient counts
    (scores.logps * weights).sum().backward()
    return scores, _grads(model)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and want
    for name in want:
        # fp32 rounding of a different summation order, relative to the gradient's own scale
        scale = max(1.0, want[name].abs().max().item())
        torch.testing.assert_close(got[name], want[name], atol=2e-6 * scale, rtol=1e-5, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_scores_and_every_gradient_equal_the_full_logits_path(
    policy: PreTrainedModel, layout: str, chunk_size: int
) -> None:
    want, want_grads = _scores_and_grads(policy, layout, 0, wpo_weights=True, ld_alpha=0.5)
    got, got_grads = _scores_and_grads(policy, layout, chunk_size, wpo_weights=True, ld_alpha=0.5)
    for field in ("logps", "plain_logps", "logit_sums", "lengths", "wpo_log_weights"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), atol=1e-5, rtol=1e-6, msg=field)
    assert got.logps.requires_grad and not got.logit_sums.requires_grad
    _assert_same(got_grads, want_grads)
    assert "model.embed_tokens.weight" in got_grads  # tied: the head's gradient lands on the embedding


def test_untied_head_gets_the_same_gradient(untied: PreTrainedModel) -> None:
    assert find_output_head(untied).head is untied.lm_head
    _, want = _scores_and_grads(untied, "padded", 0)
    _, got = _scores_and_grads(untied, "padded", 3)
    assert "lm_head.weight" in got
    _assert_same(got, want)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_gives_the_same_loss_metrics_and_gradients(
    policy: PreTrainedModel, loss_type: str
) -> None:
    """The production forward (`compute_micro_batch`) with each of TRL's loss types, WPO weights on
    where the loss allows them: loss, metric sums (mean logits included) and gradients match."""
    ref_chosen, ref_rejected = (
        torch.tensor([-9.0, -7.5, -14.0, -8.0]),
        torch.tensor([-6.0, -11.0, -5.5, -9.0]),
    )
    batch_sorted = loss_type in ("sppo_hard", "aot", "aot_unpaired")
    results = {}
    for chunk in (0, 4):
        train = TrainConfig(
            loss_type=[loss_type],
            label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0,
            logps_chunk_size=chunk,
            use_weighting=not batch_sorted,
        )
        policy.zero_grad(set_to_none=True)
        result = compute_micro_batch(
            policy, lambda _b: (ref_chosen, ref_rejected), _batch("packed"), build_loss_settings(train)
        )
        result.loss.backward()
        results[chunk] = (result, _grads(policy))
    (want, want_grads), (got, got_grads) = results[0], results[4]
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sums, want.sums, atol=1e-5, rtol=1e-6)
    _assert_same(got_grads, want_grads)


def _lora(base_dir: Path, targets: list[str]) -> torch.nn.Module:
    model = _noisy(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), seed=2)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_lora_b(peft_model, 0.05)
    return peft_model


@pytest.mark.parametrize(
    "targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]], ids=["head-frozen", "head-adapted"]
)
def test_lora_policy_and_its_adapter_disabled_reference(base_dir: Path, targets: list[str]) -> None:
    model = _lora(base_dir, targets)
    _, want = _scores_and_grads(model, "padded", 0)
    got_scores, got = _scores_and_grads(model, "padded", 3)
    assert all("lora_" in name for name in got)  # only the adapter trains
    assert any("lm_head" in name for name in got) == ("lm_head" in targets)
    _assert_same(got, want)
    with reference_context(model, "adapter_disabled"):
        reference = compute_sequence_scores(model, _batch("padded"), chunk_size=3).logps
        full = compute_sequence_scores(model, _batch("padded")).logps
    torch.testing.assert_close(reference, full, atol=1e-5, rtol=1e-6)
    assert not torch.allclose(reference, got_scores.logps.detach(), atol=1e-3)  # the adapter matters


def test_bf16_matches_the_full_logits_path(base_dir: Path) -> None:
    model = _noisy(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)).to(torch.bfloat16)
    want, want_grads = _scores_and_grads(model, "packed", 0)
    got, got_grads = _scores_and_grads(model, "packed", 4)
    assert got.logps.dtype == torch.float32
    torch.testing.assert_close(got.logps, want.logps, atol=0.05, rtol=0.01)
    for name, grad in want_grads.items():
        cosine = torch.nn.functional.cosine_similarity(
            got_grads[name].float().flatten(), grad.float().flatten(), dim=0
        )
        assert cosine > 0.99, name


def _other_architecture(kind: str) -> PreTrainedModel:
    from transformers import Gemma2Config, GPT2Config, LlamaConfig

    small = {"vocab_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    configs = {
        # Dropout off, as training turns it off (`disable_dropout`): both paths see the same model.
        "gpt2": lambda: GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=2,
            vocab_size=64,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),  # fmt: skip
        "llama": lambda: LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=1, **small),
        # Soft-capped logits: tanh(z / 3) * 3, low enough to bend these logits.
        "gemma2-softcap": lambda: Gemma2Config(
            hidden_size=32,
            intermediate_size=64,
            num_key_value_heads=1,
            head_dim=16,
            final_logit_softcapping=3.0,
            **small,
        ),  # fmt: skip
    }
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(configs[kind](), attn_implementation="eager").float()
    return _noisy(model, seed=3)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2-softcap"])
def test_other_architectures_equal_the_full_logits_path(kind: str) -> None:
    """GPT-2 (its decoder is `transformer`, no gated MLP), Llama, and Gemma 2, whose forward
    soft-caps the head's logits."""
    model = _other_architecture(kind)
    want, want_grads = _scores_and_grads(model, "padded", 0)
    got, got_grads = _scores_and_grads(model, "padded", 3)
    torch.testing.assert_close(got.logps, want.logps, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got.logit_sums, want.logit_sums, atol=1e-5, rtol=1e-6)
    _assert_same(got_grads, want_grads)


class _NoHead(torch.nn.Module):
    """A causal LM whose output head cannot be found: it only maps ids to logits."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(64, 64)

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        return type("Out", (), {"logits": self.table(input_ids)})()


def test_a_model_without_a_findable_head_is_an_error_that_says_how_to_turn_it_off() -> None:
    model = _NoHead()
    with pytest.raises(ValueError, match=r"cannot find the output head.*train.logps_chunk_size: 0"):
        compute_sequence_scores(model, _batch("padded"), chunk_size=8)
    assert compute_sequence_scores(model, _batch("padded")).logps.shape == (8,)  # 0: full logits


def test_the_key_defaults_on_and_rejects_negative_sizes() -> None:
    from dpo_cluster.config import ConfigError, load_config

    assert (
        load_config(
            None, ["output_dir=out", "model.name_or_path=builtin:tiny", "data.train=x.jsonl"]
        ).train.logps_chunk_size
        > 0
    )
    with pytest.raises(ConfigError, match="train.logps_chunk_size"):
        load_config(
            None,
            [
                "output_dir=out",
                "model.name_or_path=builtin:tiny",
                "data.train=x.jsonl",
                "train.logps_chunk_size=-1",
            ],
        )
