"""The demo's base model, "builtin:demo": a small causal LM that really writes video titles, built
offline, so the demo shows DPO moving a real preference rather than noise. Its owner provides it by
name through the `dpo_cluster.builtins` entry point.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch

from dpo_cluster.data.samples import generate_title_pairs
from dpo_cluster.tiny import IM_END, build_tiny_model, build_tiny_tokenizer

SFT_SEED = 1234  # prompts of the warm-up; the demo's preference pairs use other seeds
SFT_EXAMPLES = 6000


def demo_corpus_lines(n: int = 2000) -> Iterator[str]:
    """Title-domain text for the tokenizer: prompts with both kinds of answer."""
    for row in generate_title_pairs(n, seed=SFT_SEED + 1):
        yield row["prompt"][0]["content"]
        yield row["chosen"][0]["content"]
        yield row["rejected"][0]["content"]


def sft_examples(tokenizer: object, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, answer_ids) pairs rendered as the training pipeline renders a conversational
    pair: the chat template with the generation prompt, then the answer and the end-of-turn."""
    rng = random.Random(seed)
    examples = []
    for row in generate_title_pairs(n, seed=seed):
        answer = row["chosen"] if rng.random() < 0.5 else row["rejected"]
        prompt_text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(row["prompt"] + answer, tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        examples.append((prompt_ids, full_ids[len(prompt_ids) :]))
    return examples


def build_demo_model(
    out_dir: str | Path,
    *,
    steps: int = 1200,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Build the demo base model into out_dir (Hugging Face format, tokenizer included) and return it.

    A byte-level BPE trained on the built-in corpus plus the title domain, and a randomly
    initialized 4-layer Qwen2 warmed up by supervised fine-tuning on title prompts answered half
    the time in the preferred style (30-75 characters) and half outside it (a terse label or a
    rambling sentence): both styles are readable, and before DPO about half of its greedy answers
    show the preferred trait. Deterministic for a seed; a couple of minutes on 2 CPU cores.
    """
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    build_tiny_tokenizer(out_dir, vocab_size=2048, extra_corpus=demo_corpus_lines())
    build_tiny_model(
        out_dir,
        tokenizer_dir=out_dir,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        max_position_embeddings=512,
        seed=seed,
    )
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    # A chat model ends its turn with <|im_end|>: generation stops there (as Qwen2's config says).
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id]

    examples = sft_examples(tokenizer, SFT_EXAMPLES, SFT_SEED)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    bar = tqdm(range(steps), desc="warming up the demo model", disable=not progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in bar:
            picks = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
            input_ids, labels = _batch([examples[i] for i in picks], tokenizer.pad_token_id)
            # Right padding after every real token: causal attention never lets it reach them.
            loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids (B, T) and labels (B, T): -100 on the prompt and on padding."""
    width = max(len(p) + len(a) for p, a in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (prompt, answer) in enumerate(examples):
        ids = prompt + answer
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(prompt) : len(ids)] = torch.tensor(answer)
    return input_ids, labels
