"""The tiny Qwen2 model: deterministic from its seed, fast, and loadable like a hub model."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from dpo_cluster.tiny import build_tiny_model, build_tiny_tokenizer


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
