"""Tiny tokenizers and models the project builds itself, so tests, benchmarks and the demo run
offline and deterministically: a byte-level BPE trained on a generated corpus, a small Qwen2 sized
to it (`build_tiny_model` is "builtin:tiny"), its config alone, and LoRA adapters over such a base.
Every builder is a function of its seed: rebuilding writes byte-identical files.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BOS_TOKEN = "<|bos|>"

# Fixed order, so every variant gives these tokens the ids 0..4.
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END, BOS_TOKEN]

# The ChatML template of Qwen2, without its default system message.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# 256 byte symbols + the special tokens; below this there is no room for a single merge.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1

# The files a Hugging Face tokenizer may be saved as; `build_tiny_model` copies those present, and
# nothing else, so a model directory given as tokenizer_dir never leaks its weights or config.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)

_SUBJECTS = [
    "The cat",
    "A young engineer",
    "My grandmother",
    "The old river",
    "Every student",
    "The small robot",
    "Our team",
    "The quiet library",
    "A tired traveler",
    "The city council",
    "This model",
    "The farmer",
]
_VERBS = [
    "walks along",
    "carefully reads",
    "quickly builds",
    "remembers",
    "looks at",
    "writes about",
    "sat down beside",
    "paints",
    "explains",
    "measures",
    "cleans",
    "talks to",
]
_OBJECTS = [
    "the long bridge",
    "a bright red apple",
    "the morning newspaper",
    "an interesting question",
    "the wooden table",
    "a cup of green tea",
    "the training data",
    "the mountain path",
    "a large database",
    "the open window",
    "the final answer",
    "a short story",
]
_PLACES = [
    "in the evening",
    "before breakfast",
    "near the station",
    "after the rain",
    "at the weekend",
    "in the garden",
    "during the meeting",
    "on a sunny day",
]
_CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"),
    ("Brazil", "Brasilia"),
    ("Egypt", "Cairo"),
    ("Spain", "Madrid"),
    ("China", "Beijing"),
    ("Germany", "Berlin"),
    ("Australia", "Canberra"),
    ("Peru", "Lima"),
]
_CHINESE = [
    "今天天气很好，我们去公园散步吧。",
    "你好，请问有什么可以帮你的吗？",
    "我喜欢读书，也喜欢写字。",
    "这个问题的答案是四十二。",
    "北京是中国的首都。",
    "机器学习需要大量的数据。",
    "请把这段话翻译成英文。",
    "他每天早上六点起床。",
    "谢谢你的帮助，我非常感激。",
    "这家餐厅的面条很好吃。",
    "我们明天下午三点开会。",
    "学习语言需要耐心和时间。",
    "猫坐在窗户旁边晒太阳。",
    "数据库里有一百万条记录。",
    "春天来了，花都开了。",
    "模型的回答比以前更好了。",
]
_TABLES = [("users", "name"), ("orders", "total"), ("products", "price"), ("events", "created_at")]
_CODE = [
    "def add(a: int, b: int) -> int:\n    return a + b",
    "for i in range(10):\n    print(i * i)",
    "import json\n\nwith open('data.json') as f:\n    rows = json.load(f)",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y",
    "if __name__ == '__main__':\n    main()",
    "numbers = [n for n in range(100) if n % 3 == 0]",
    "def mean(values):\n    return sum(values) / len(values)",
    "x = {'key': 'value', 'count': 3}  # a small dict",
]


def corpus_lines() -> Iterator[str]:
    """Yield the training corpus (about 260 lines), always the same lines in the same order."""
    # Index arithmetic with coprime strides walks the word lists without repeating a sentence and
    # without a random generator whose sequence could change between Python versions.
    for i in range(144):
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        verb = _VERBS[(i * 5 + i // 12) % len(_VERBS)]
        obj = _OBJECTS[(i * 7) % len(_OBJECTS)]
        place = _PLACES[(i * 3) % len(_PLACES)]
        yield f"{subject} {verb} {obj} {place}."
    for country, capital in _CAPITALS:
        yield f"Question: What is the capital of {country}?\nAnswer: The capital of {country} is {capital}."
        yield f"User: Where is {capital}?\n\nAssistant: {capital} is in {country}."
    for a in range(3, 60, 7):
        for b in (4, 11, 25):
            yield f"Question: What is {a} plus {b}?\nAnswer: {a} + {b} = {a + b}."
    for sentence in _CHINESE:
        yield sentence
        yield f"用户：{sentence}\n助手：好的，我明白了。"
    for table, column in _TABLES:
        yield f"SELECT id, {column} FROM {table} WHERE id = 42;"
        yield f"SELECT COUNT(*) FROM {table} GROUP BY {column} ORDER BY {column} DESC LIMIT 10;"
        yield f"INSERT INTO {table} (id, {column}) VALUES (1, 'hello');"
        yield f"UPDATE {table} SET {column} = NULL WHERE id > 100;"
    yield from _CODE
    yield " ".join(str(n) for n in range(200))
    yield " ".join(f"{n / 8:.3f}" for n in range(64))
    yield "In 1969, 2001, 2024 and 2025 the prices were $3.50, $12.99 and 1,000,000 euros."
    for role in ("system", "user", "assistant"):
        yield f"{IM_START}{role}\nYou are a helpful assistant.{IM_END}\n"
    yield "Emoji are text too: 🙂 👍 🚀 ✨ 🎉"


def build_tiny_tokenizer(
    out_dir: str | Path,
    *,
    vocab_size: int = 1024,
    bos: bool = False,
    chat_template: bool = True,
    extra_corpus: Iterable[str] = (),
) -> Path:
    """Train a tiny byte-level BPE tokenizer on `corpus_lines()` (English prose, questions and
    answers, Chinese, SQL, Python, numbers), save it to `out_dir` in Hugging Face format
    (`AutoTokenizer.from_pretrained(out_dir)` loads it) and return the directory.

    It behaves like the real tokenizers the pipeline meets: byte-level, so any Unicode text
    round-trips exactly; eos "<|endoftext|>", pad "<|pad|>" and the ChatML markers; optionally a
    bos that `tokenizer(text)` prepends (a post-processor, as Llama's) and a ChatML chat template
    (as Qwen2's). Every variant has the same vocabulary and ids; only the post-processor, the
    special-token map and the template differ.

    vocab_size: the most tokens the vocabulary holds, special tokens included (the small corpus may
    run out of merges before reaching it). bos: `tokenizer(text)` prepends "<|bos|>".
    chat_template: save a ChatML chat template; False saves none.
    extra_corpus: lines trained on after the built-in corpus (a domain's words become tokens).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    out_dir = Path(out_dir)
    backend = _train_bpe(vocab_size, extra_corpus)
    if bos:
        # As Llama's tokenizer.json does: the bos is added by the post-processor, so every
        # `tokenizer(text)` call with add_special_tokens=True starts with it.
        bos_id = backend.token_to_id(BOS_TOKEN)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN}:0 $A:0",
            pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, bos_id)],
        )
    else:
        # As Qwen2's: a post-processor that adds nothing.
        backend.post_processor = processors.ByteLevel(trim_offsets=False)

    special_kwargs: dict[str, object] = {
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "extra_special_tokens": [IM_START, IM_END],
    }
    if bos:
        # No add_bos_token: transformers 5 neither saves nor reads it when a tokenizer.json exists;
        # the post-processor above is what adds the bos.
        special_kwargs["bos_token"] = BOS_TOKEN
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        # Exact round trips: never rewrite " ." to "." or similar when decoding.
        clean_up_tokenization_spaces=False,
        chat_template=CHATML_TEMPLATE if chat_template else None,
        **special_kwargs,
    )
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _train_bpe(vocab_size: int, extra_corpus: Iterable[str] = ()) -> Tokenizer:
    """Train the byte-level BPE model on `corpus_lines()` and extra_corpus; special tokens get ids
    0..4."""
    tokenizer = Tokenizer(models.BPE())
    # No normalizer: NFC or lower-casing would break exact round trips of arbitrary text.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so bytes the corpus never shows still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(itertools.chain(corpus_lines(), extra_corpus), trainer=trainer)
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Path:
    """Save a randomly initialized Qwen2 causal LM (grouped-query attention, tied embeddings) and
    its tokenizer to `out_dir` (Hugging Face format, float32 safetensors) and return the directory,
    which loads with `AutoModelForCausalLM` and `AutoTokenizer.from_pretrained` like a hub model.

    tokenizer_dir: a saved tokenizer whose files are copied in; None builds `build_tiny_tokenizer`
    into `out_dir`. The vocabulary is len(tokenizer) and the bos/eos/pad ids are the tokenizer's.
    seed: the weights depend on it alone (same seed -> byte-identical model.safetensors); the
    caller's torch random state is left as it was.
    """
    out_dir = Path(out_dir)
    if tokenizer_dir is None:
        build_tiny_tokenizer(out_dir)
    else:
        tokenizer_dir = Path(tokenizer_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if tokenizer_dir.resolve() != out_dir.resolve():
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, out_dir / name)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)

    config = build_tiny_qwen2_config(
        tokenizer,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    # A forked RNG: seeding here must not change the random stream of whoever called us.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_qwen2_config(tokenizer: Any | None = None, **overrides: Any) -> Qwen2Config:
    """The tiny Qwen2's config: 2 layers, hidden 64, 4 query and 2 kv heads, MLP 128, 1024
    positions, tied embeddings, float32; `overrides` are any `Qwen2Config` fields
    (e.g. num_labels=1 for a reward model). With a tokenizer, the vocabulary is len(tokenizer)
    and the bos/eos/pad ids are its own; without one, a 1024-token vocabulary without them.
    """
    fields: dict[str, Any] = {
        "vocab_size": 1024,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }
    if tokenizer is not None:
        fields |= {
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    return Qwen2Config(**(fields | overrides))


def build_lora_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    tokenizer: Any | None,
    *,
    random_b: bool,
    seed: int = 0,
    r: int = 4,
    alpha: int = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj", "o_proj", "down_proj"),
    b_std: float | None = None,
) -> Path:
    """Save a peft LoRA adapter over the causal LM in `base_dir` to `out_dir`, with `tokenizer`
    saved beside it (as a LoRA training run's final/ is; None saves none), and return `out_dir`.

    random_b False: peft's default init (B = 0), so the adapter changes nothing, as at the start of
    training. True: A and B both random (init_lora_weights=False); b_std: B drawn from N(0, b_std)
    instead, large enough (e.g. 0.5) to change greedy answers. The weights depend on seed alone;
    the caller's torch random state is left as it was.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=not random_b
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora)
    if random_b and b_std is not None:
        randomize_lora_b(peft_model, b_std, seed=seed)
    peft_model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def randomize_lora_b(model: torch.nn.Module, std: float, *, seed: int = 0) -> int:
    """Draw every LoRA B matrix of `model` from N(0, std) (seeded; the global random state is left
    alone), so a fresh adapter (B = 0, the identity) changes the model. Returns how many were drawn.
    """
    generator = torch.Generator().manual_seed(seed)
    drawn = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
                drawn += 1
    return drawn
