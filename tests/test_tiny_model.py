"""The tiny Qwen2 model: deterministic from its seed, fast, and loadable like a hub model; its config
alone; and LoRA adapters over it, zero (the base itself) or random, deterministic from their seed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from dpo_cluster.tiny import (
    build_lora_adapter,
    build_tiny_model,
    build_tiny_qwen2_config,
    build_tiny_tokenizer,
    randomize_lora_b,
)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    start = time.perf_counter()
    first = build_tiny_model(tmp_path / "a")
    # Generous bound: a build takes a fraction of a second.
    assert time.perf_counter() - start < 2.0
    again = build_tiny_model(tmp_path / "b")
    other = build_tiny_model(tmp_path / "c", seed=1)
    weights = (first / "model.safetensors").read_bytes()
    assert weights == (again / "model.safetensors").read_bytes()
    assert weights != (other / "model.safetensors").read_bytes()
    assert (first / "config.json").read_bytes() == (again / "config.json").read_bytes()


def test_building_leaves_the_callers_random_stream_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_model(tmp_path, seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_loads_as_a_qwen2_with_the_tokenizers_vocabulary_and_ids(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, Qwen2ForCausalLM)
    config = model.config
    assert config.vocab_size == len(tokenizer) == 1024
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (0, 1, None)
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    # Tied: the output head is the embedding matrix, stored once.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    batch = tokenizer(["The cat sat.", "今天天气很好"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 1024)
    assert torch.isfinite(logits).all()


def test_copies_a_given_tokenizer(tmp_path: Path) -> None:
    tokenizer_dir = build_tiny_tokenizer(tmp_path / "tok", bos=True, chat_template=False)
    path = build_tiny_model(tmp_path / "model", tokenizer_dir=tokenizer_dir, hidden_size=32, num_layers=1)
    assert (path / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.bos_token == "<|bos|>" and tokenizer.chat_template is None
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.bos_token_id == tokenizer.bos_token_id == 4
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 1)


def test_the_config_helper_gives_the_tiny_shape_with_overrides(tokenizer: Any) -> None:
    plain = build_tiny_qwen2_config()
    assert (plain.vocab_size, plain.hidden_size, plain.num_hidden_layers) == (1024, 64, 2)
    assert (plain.num_attention_heads, plain.num_key_value_heads, plain.intermediate_size) == (4, 2, 128)
    assert plain.tie_word_embeddings and plain.pad_token_id is None
    reward = build_tiny_qwen2_config(tokenizer, hidden_size=32, num_labels=1, tie_word_embeddings=False)
    assert (reward.vocab_size, reward.pad_token_id, reward.eos_token_id) == (len(tokenizer), 1, 0)
    assert (reward.hidden_size, reward.num_labels, reward.tie_word_embeddings) == (32, 1, False)


def _lora_b(adapter_dir: Path) -> dict[str, torch.Tensor]:
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    return {name: w for name, w in weights.items() if "lora_B" in name}


def test_a_zero_adapter_is_its_base_and_a_random_one_is_not(
    base_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    zero = build_lora_adapter(base_dir, tmp_path / "zero", tokenizer, random_b=False)
    random_b = build_lora_adapter(base_dir, tmp_path / "random", None, random_b=True, seed=1)
    assert torch.equal(torch.rand(4), expected)  # the caller's random stream is left alone
    assert (zero / "tokenizer.json").is_file() and not (random_b / "tokenizer.json").exists()
    # q, v, o and down of 2 layers by default.
    assert len(_lora_b(zero)) == 8 and all(not b.any() for b in _lora_b(zero).values())
    assert all(b.any() for b in _lora_b(random_b).values())

    ids = tokenizer("The cat sat.", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        for adapter, same in ((zero, True), (random_b, False)):
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
            assert torch.equal(model(input_ids=ids).logits, base_logits) == same


def test_an_adapter_depends_on_its_seed_and_b_std(base_dir: Path, tmp_path: Path) -> None:
    def lora_b(name: str, **kwargs: Any) -> dict[str, torch.Tensor]:
        return _lora_b(build_lora_adapter(base_dir, tmp_path / name, None, random_b=True, **kwargs))

    first, again, other = lora_b("a", seed=2), lora_b("b", seed=2), lora_b("c", seed=3)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)
    wide = lora_b("wide", seed=2, b_std=0.5, r=8, target_modules=("q_proj", "v_proj"))
    assert len(wide) == 4 and all(b.shape[1] == 8 for b in wide.values())
    assert torch.cat([b.flatten() for b in wide.values()]).std().item() == pytest.approx(0.5, rel=0.1)


def test_randomize_lora_b_draws_every_b_and_nothing_else(base_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, target_modules=["q_proj"])
    )
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert randomize_lora_b(model, 0.1, seed=0) == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if "lora_B" in n} and len(changed) == 2
