"""The serving app's transformers generation backend against transformers' and peft's own
generation, on the built-in tiny model and LoRA adapters made over it here."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dpo_cluster.modeling import count_parameters
from dpo_cluster.serving.generation import (
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    StreamDelta,
    TransformersBackend,
    adapter_base,
    is_adapter_dir,
)
from dpo_cluster.serving.generation.decode import stable_length
from dpo_cluster.tiny import build_lora_adapter, build_tiny_model

PROMPTS = [
    "The cat walks along",
    "Question: What is the capital of France?\nAnswer:",
    "SELECT",
    "今天天气很好",
]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer: Any) -> list[tuple[int, ...]]:
    ids = [tuple(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids), "the prompts must have different lengths"
    return ids


def _make_adapter(base: Path, out: Path, *, seed: int, tokenizer: Any | None) -> Path:
    """A LoRA adapter with random A and B (so it changes the model), saved to `out`."""
    return build_lora_adapter(base, out, tokenizer, random_b=True, seed=seed)


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter with the tokenizer saved beside it, as a training run's final/ is."""
    return _make_adapter(base_dir, tmp_path_factory.mktemp("adapter"), seed=1, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def bare_adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter without tokenizer files."""
    return _make_adapter(base_dir, tmp_path_factory.mktemp("bare_adapter"), seed=2, tokenizer=None)


@pytest.fixture(scope="module")
def backend(base_dir: Path, adapter_dir: Path, bare_adapter_dir: Path) -> TransformersBackend:
    """Base, tuned and a second adapter, all from one copy of the base weights."""
    return TransformersBackend(
        "builtin:tiny",
        {"base": None, "tuned": str(adapter_dir), "other.v2": str(bare_adapter_dir)},
        device="cpu",
    )


def _reference(
    model: Any, tokenizer: Any, prompts: Sequence[tuple[int, ...]], max_new_tokens: int
) -> list[tuple[str, int, str]]:
    """(text, completion tokens, finish reason) of `model.generate` greedy on the left-padded batch."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
        )
    eos = tokenizer.eos_token_id
    expected = []
    for row in out[:, width:].tolist():
        if eos in row:
            tokens = row[: row.index(eos)]
            expected.append((tokenizer.decode(tokens, skip_special_tokens=True), len(tokens) + 1, "stop"))
        else:
            expected.append((tokenizer.decode(row, skip_special_tokens=True), len(row), "length"))
    return expected


def _triples(results: Sequence[GenerationResult]) -> list[tuple[str, int, str]]:
    return [(r.text, r.completion_tokens, r.finish_reason) for r in results]


def _settled_window(text: str, start: int, size: int) -> str:
    """The first `size` characters of `text` from `start` on with no replacement character: a stop
    string made of characters that are final as soon as they are decoded."""
    for i in range(start, len(text) - size + 1):
        if "\ufffd" not in text[i : i + size]:
            return text[i : i + size]
    raise AssertionError(f"no window of {size} settled characters in {text!r}")


def _requests(
    model: str, prompts: Sequence[tuple[int, ...]], params: SamplingParams
) -> list[GenerationRequest]:
    return [GenerationRequest(model, p, params) for p in prompts]


def test_greedy_equals_transformers_generate_batched_and_one_by_one(
    base_dir: Path, tokenizer: Any, prompt_ids: list[tuple[int, ...]]
) -> None:
    plain = TransformersBackend(str(base_dir), {"base": None}, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()

    batched = plain.generate(_requests("base", prompt_ids, GREEDY))
    assert _triples(batched) == _reference(model, tokenizer, prompt_ids, GREEDY.max_new_tokens)
    assert [r.prompt_tokens for r in batched] == [len(p) for p in prompt_ids]
    for prompt in prompt_ids:
        alone = plain.generate([GenerationRequest("base", prompt, GREEDY)])
        assert _triples(alone) == _reference(model, tokenizer, [prompt], GREEDY.max_new_tokens)
    assert plain.describe() == {
        "backend": "hf",
        "weights": str(base_dir),
        "names": {"base": None},
        "device": "cpu",
        "dtype": "float32",
        "parameters": count_parameters(model)[1],
    }


def test_base_and_adapters_from_one_copy_in_one_mixed_batch(
    backend: TransformersBackend,
    base_dir: Path,
    adapter_dir: Path,
    bare_adapter_dir: Path,
    tokenizer: Any,
    prompt_ids: list[tuple[int, ...]],
) -> None:
    names = ["base", "tuned", "other.v2"]
    # Every prompt under every name, interleaved, in one batch.
    requests = [GenerationRequest(name, p, GREEDY) for p in prompt_ids for name in names]
    results = backend.generate(requests)
    got = {name: _triples(results[i :: len(names)]) for i, name in enumerate(names)}

    base_model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    base_params = count_parameters(base_model)[1]
    reference = PeftModel.from_pretrained(base_model, adapter_dir, adapter_name="tuned")
    reference.load_adapter(bare_adapter_dir, adapter_name="other")
    reference.eval()
    reference.set_adapter("tuned")
    assert got["tuned"] == _reference(reference, tokenizer, prompt_ids, GREEDY.max_new_tokens)
    reference.set_adapter("other")
    assert got["other.v2"] == _reference(reference, tokenizer, prompt_ids, GREEDY.max_new_tokens)
    with reference.disable_adapter():
        assert got["base"] == _reference(reference, tokenizer, prompt_ids, GREEDY.max_new_tokens)
    # The adapters change every answer, so the rows really ran with different weights.
    for i in range(len(prompt_ids)):
        assert len({got[name][i][0] for name in names}) == 3

    adapter_params = sum(
        t.numel()
        for d in (adapter_dir, bare_adapter_dir)
        for t in load_file(str(d / "adapter_model.safetensors")).values()
    )
    assert 0 < adapter_params < base_params
    description = backend.describe()
    assert description["parameters"] == base_params + adapter_params
    assert description["names"] == {
        "base": None,
        "tuned": str(adapter_dir),
        "other.v2": str(bare_adapter_dir),
    }
    # An adapter directory's own tokenizer, else the base weights'.
    assert backend.tokenizer("tuned").name_or_path == str(adapter_dir)
    assert backend.tokenizer("other.v2") is backend.tokenizer("base")
    assert backend.tokenizer("base").name_or_path == str(base_dir)


def test_a_full_second_model_as_weights(
    tmp_path: Path, base_dir: Path, tokenizer: Any, prompt_ids: list[tuple[int, ...]]
) -> None:
    full = build_tiny_model(tmp_path / "full", tokenizer_dir=base_dir, seed=1)
    served = TransformersBackend(str(full), {"tuned": None}, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(full).eval()
    results = _triples(served.generate(_requests("tuned", prompt_ids, GREEDY)))
    assert results == _reference(model, tokenizer, prompt_ids, GREEDY.max_new_tokens)
    base_model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert results != _reference(base_model, tokenizer, prompt_ids, GREEDY.max_new_tokens)
    assert served.describe()["names"] == {"tuned": None}
    assert served.describe()["parameters"] == count_parameters(model)[1]


def test_the_context_limit_ends_a_row_with_length(tmp_path: Path, base_dir: Path, tokenizer: Any) -> None:
    short = build_tiny_model(tmp_path / "short", tokenizer_dir=base_dir, max_position_embeddings=16)
    served = TransformersBackend(str(short), {"m": None}, device="cpu")
    assert served.max_context == 16
    prompt = tuple(range(300, 310))
    model = AutoModelForCausalLM.from_pretrained(short).eval()
    expected = _reference(model, tokenizer, [prompt], 6)
    assert expected[0][1:] == (6, "length"), "the reference must run into the limit, not an EOS"
    result = served.generate(
        [GenerationRequest("m", prompt, SamplingParams(max_new_tokens=20, temperature=0))]
    )
    assert _triples(result) == expected
    with pytest.raises(ValueError, match="16 tokens and the model's context is 16"):
        served.generate([GenerationRequest("m", tuple(range(5, 21)), GREEDY)])


def test_generation_config_eos_ends_a_row_and_is_not_in_the_text(
    tmp_path: Path, base_dir: Path, prompt_ids: list[tuple[int, ...]]
) -> None:
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        first = int(model(torch.tensor([prompt_ids[0]])).logits[0, -1].argmax())
    assert first > 4, "the first greedy token must be an ordinary (not special) token"
    # The same model, whose generation_config also ends on that ordinary token (as chat models
    # end on "<|im_end|>" besides the tokenizer's EOS).
    copy = Path(shutil.copytree(base_dir, tmp_path / "copy"))
    config = json.loads((copy / "generation_config.json").read_text())
    config["eos_token_id"] = [0, first]
    (copy / "generation_config.json").write_text(json.dumps(config))
    served = TransformersBackend(str(copy), {"m": None}, device="cpu")
    assert served.generate([GenerationRequest("m", prompt_ids[0], GREEDY)]) == [
        GenerationResult("", len(prompt_ids[0]), 1, "stop")
    ]


def test_seeded_sampling_is_the_same_alone_and_in_any_batch(
    backend: TransformersBackend, prompt_ids: list[tuple[int, ...]]
) -> None:
    # A low temperature, so the draw depends on the row's logits as well as on its seed (the
    # random tiny model's logits are nearly flat at temperature 1).
    params = SamplingParams(max_new_tokens=24, temperature=0.1, seed=1234)
    request = GenerationRequest("tuned", prompt_ids[1], params)
    alone = backend.generate([request])[0]
    others = [
        GenerationRequest("base", prompt_ids[0], SamplingParams(max_new_tokens=8, temperature=0.7, seed=1)),
        GenerationRequest("other.v2", prompt_ids[3], GREEDY),
        GenerationRequest(
            "tuned", prompt_ids[2], SamplingParams(max_new_tokens=16, temperature=1.3, top_p=0.9)
        ),
        GenerationRequest("base", prompt_ids[1], params),
    ]
    in_batch = backend.generate([others[0], request, *others[1:]])
    at_end = backend.generate([*others, request])
    assert in_batch[1] == alone
    assert at_end[-1] == alone
    assert alone.completion_tokens == 24
    # The same seed over the base weights gives another text: the logits matter, not the seed alone.
    assert in_batch[-1] == at_end[3] == backend.generate([others[3]])[0]
    assert in_batch[-1].text != alone.text

    other_seed = SamplingParams(max_new_tokens=24, temperature=0.1, seed=99)
    assert backend.generate([GenerationRequest("tuned", prompt_ids[1], other_seed)])[0].text != alone.text
    # No seed draws a fresh one each time.
    unseeded = SamplingParams(max_new_tokens=24, temperature=1.0)
    first, second = backend.generate([GenerationRequest("tuned", prompt_ids[1], unseeded)] * 2)
    assert first.text != second.text


def test_a_tiny_top_p_keeps_only_the_most_likely_token(
    backend: TransformersBackend, prompt_ids: list[tuple[int, ...]]
) -> None:
    greedy = backend.generate(_requests("tuned", prompt_ids, GREEDY))
    nucleus = SamplingParams(max_new_tokens=GREEDY.max_new_tokens, temperature=1.0, top_p=1e-6, seed=5)
    assert backend.generate(_requests("tuned", prompt_ids, nucleus)) == greedy
    # Whereas the whole distribution, at the same seed, does not.
    full = SamplingParams(max_new_tokens=GREEDY.max_new_tokens, temperature=1.0, seed=5)
    assert backend.generate(_requests("tuned", prompt_ids, full)) != greedy


def test_stop_strings_cut_the_text_and_finish_with_stop(
    backend: TransformersBackend, prompt_ids: list[tuple[int, ...]]
) -> None:
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7)
    request = GenerationRequest("base", prompt_ids[0], params)
    full = backend.generate([request])[0]
    assert full.finish_reason == "length" and len(full.text) > 12
    stop = _settled_window(full.text, 8, 3)
    cut = full.text.find(stop)
    stopped = backend.generate(
        [GenerationRequest("base", prompt_ids[0], SamplingParams(24, 1.0, seed=7, stop=("\x00never", stop)))]
    )[0]
    assert stopped.text == full.text[:cut]
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens < full.completion_tokens
    # A stop string that never appears changes nothing.
    untouched = backend.generate(
        [GenerationRequest("base", prompt_ids[0], SamplingParams(24, 1.0, seed=7, stop="\x00never"))]
    )
    assert untouched == [full]


def test_max_new_tokens_ends_with_length_after_exactly_that_many_tokens(
    backend: TransformersBackend, tokenizer: Any, prompt_ids: list[tuple[int, ...]]
) -> None:
    for n in (1, 5, 9):
        results = backend.generate(
            _requests("base", prompt_ids, SamplingParams(max_new_tokens=n, temperature=0))
        )
        assert [(r.completion_tokens, r.finish_reason) for r in results] == [(n, "length")] * len(prompt_ids)
        # The first n greedy tokens of the longer run.
        longer = backend.generate(
            _requests("base", prompt_ids, SamplingParams(max_new_tokens=n + 3, temperature=0))
        )
        assert all(b.text.startswith(a.text) and len(b.text) > len(a.text) for a, b in zip(results, longer))


def test_a_past_deadline_times_out(backend: TransformersBackend, prompt_ids: list[tuple[int, ...]]) -> None:
    past = GenerationRequest("tuned", prompt_ids[0], GREEDY, deadline=time.time() - 1.0)
    ok = GenerationRequest("tuned", prompt_ids[1], GREEDY)
    results = backend.generate([past, ok])
    assert results[0] == GenerationResult("", len(prompt_ids[0]), 0, "timeout")
    assert results[1] == backend.generate([ok])[0]
    assert list(backend.stream(past)) == [StreamDelta("", "timeout", 0)]

    # A deadline that passes while the row runs ends it there, with the text generated so far.
    budget = SamplingParams(max_new_tokens=1000, temperature=0)
    running = GenerationRequest("base", prompt_ids[0], budget, deadline=time.time() + 0.3)
    result = backend.generate([running])[0]
    assert result.finish_reason == "timeout"
    assert 0 < result.completion_tokens < 1000
    greedy = backend.generate(
        [GenerationRequest("base", prompt_ids[0], SamplingParams(result.completion_tokens, 0))]
    )
    assert result.text == greedy[0].text


@pytest.mark.parametrize(
    "params",
    [
        GREEDY,
        SamplingParams(max_new_tokens=24, temperature=1.0, seed=11),
        SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.8, seed=3),
    ],
    ids=["greedy", "sampled", "nucleus"],
)
def test_stream_deltas_concatenate_to_the_generated_text(
    backend: TransformersBackend, prompt_ids: list[tuple[int, ...]], params: SamplingParams
) -> None:
    for name in ("base", "tuned"):
        for prompt in prompt_ids:
            expected = backend.generate([GenerationRequest(name, prompt, params)])[0]
            deltas = list(backend.stream(GenerationRequest(name, prompt, params)))
            assert "".join(d.text for d in deltas) == expected.text
            assert deltas[-1].finish_reason == expected.finish_reason
            assert deltas[-1].completion_tokens == expected.completion_tokens
            assert all(d.finish_reason is None and d.text for d in deltas[:-1])
            counts = [d.completion_tokens for d in deltas]
            assert counts == sorted(counts)


def test_stream_never_sends_text_a_stop_string_then_cuts(
    backend: TransformersBackend, prompt_ids: list[tuple[int, ...]]
) -> None:
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7)
    full = backend.generate([GenerationRequest("base", prompt_ids[0], params)])[0].text
    stop = _settled_window(full, 10, 4)
    request = GenerationRequest("base", prompt_ids[0], SamplingParams(24, 1.0, seed=7, stop=(stop,)))
    expected = backend.generate([request])[0]
    assert expected.text == full[: full.find(stop)]
    deltas = list(backend.stream(request))
    assert "".join(d.text for d in deltas) == expected.text
    assert deltas[-1].finish_reason == "stop"


def test_stream_holds_back_a_character_until_its_last_byte_arrives(
    backend: TransformersBackend, prompt_ids: list[tuple[int, ...]]
) -> None:
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=5)
    expected = backend.generate([GenerationRequest("base", prompt_ids[0], params)])[0]
    prefixes = [
        backend.generate([GenerationRequest("base", prompt_ids[0], SamplingParams(n, 1.0, seed=5))])[0].text
        for n in range(1, expected.completion_tokens)
    ]
    # This seed makes the tiny model spell a character over several byte tokens: some partial
    # completion ends in a replacement character that a later token turns into that character.
    assert any(p.endswith("\ufffd") and not expected.text.startswith(p) for p in prefixes)
    deltas = list(backend.stream(GenerationRequest("base", prompt_ids[0], params)))
    assert "".join(d.text for d in deltas) == expected.text
    assert deltas[-1].finish_reason == expected.finish_reason == "length"


def test_stable_length_holds_back_incomplete_characters_and_stop_prefixes() -> None:
    assert stable_length("hello", ()) == 5
    assert stable_length("hello\ufffd\ufffd", ()) == 5
    assert stable_length("hello wor", ("world",)) == 6
    assert stable_length("hello w", ("xyz", "wo")) == 6
    assert stable_length("hello", ("lo!", "o!")) == 3
    assert stable_length("hel\ufffd", ("l\u00e9",)) == 2
    assert stable_length("hello", ("ohx",)) == 4
    assert stable_length("", ("a",)) == 0


def test_concurrent_calls_give_the_sequential_results(
    backend: TransformersBackend, prompt_ids: list[tuple[int, ...]]
) -> None:
    batches = [
        [
            GenerationRequest(
                name, prompt_ids[(k + j) % len(prompt_ids)], SamplingParams(16, 0.2, seed=100 * k + j)
            )
            for j, name in enumerate(("base", "tuned", "other.v2"))
        ]
        + [GenerationRequest("tuned", prompt_ids[k], GREEDY)]
        for k in range(4)
    ]
    sequential = [backend.generate(b) for b in batches]
    concurrent: list[list[GenerationResult] | None] = [None] * len(batches)
    start = threading.Barrier(len(batches))
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            start.wait()
            concurrent[k] = backend.generate(batches[k])
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert concurrent == sequential


def test_unloadable_weights_and_adapters_raise_value_errors_naming_the_path(
    tmp_path: Path, base_dir: Path, tokenizer: Any, adapter_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="no-such-model"):
        TransformersBackend(missing, {"m": None}, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="could not load weights.*empty"):
        TransformersBackend(str(empty), {"m": None}, device="cpu")
    with pytest.raises(ValueError, match="LoRA adapter directory"):
        TransformersBackend(str(adapter_dir), {"m": None}, device="cpu")

    no_adapter = str(tmp_path / "no-such-adapter")
    with pytest.raises(ValueError, match="no-such-adapter"):
        TransformersBackend(str(base_dir), {"base": None, "tuned": no_adapter}, device="cpu")

    # An adapter trained over a narrower model cannot go over these weights.
    narrow = build_tiny_model(
        tmp_path / "narrow", tokenizer_dir=base_dir, hidden_size=32, intermediate_size=64
    )
    narrow_adapter = _make_adapter(narrow, tmp_path / "narrow-adapter", seed=3, tokenizer=None)
    with pytest.raises(ValueError, match="could not load adapter .*narrow-adapter"):
        TransformersBackend(str(base_dir), {"tuned": str(narrow_adapter)}, device="cpu")

    # Same shapes, another base: served, with a warning.
    sibling = build_tiny_model(tmp_path / "sibling", tokenizer_dir=base_dir, seed=4)
    sibling_adapter = _make_adapter(sibling, tmp_path / "sibling-adapter", seed=5, tokenizer=None)
    with caplog.at_level(logging.WARNING, logger="dpo_cluster.serving.generation.weights"):
        served = TransformersBackend(str(base_dir), {"tuned": str(sibling_adapter)}, device="cpu")
    assert any("sibling-adapter" in r.getMessage() for r in caplog.records)
    assert served.generate([GenerationRequest("tuned", (5, 6, 7), GREEDY)])[0].completion_tokens > 0


def test_bad_requests_and_parameters_raise_value_errors(backend: TransformersBackend) -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        backend.generate([GenerationRequest("nope", (5, 6), GREEDY)])
    with pytest.raises(ValueError, match="must not be empty"):
        backend.generate([GenerationRequest("base", (), GREEDY)])
    with pytest.raises(ValueError, match="token ids in"):
        backend.generate([GenerationRequest("base", (5, 10**6), GREEDY)])
    with pytest.raises(ValueError, match="unknown model"):
        backend.tokenizer("nope")
    for bad in (
        {"max_new_tokens": 0},
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"seed": -1},
        {"stop": ("",)},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop="###").stop == ("###",)
    assert backend.generate([]) == []


def test_adapter_directory_helpers(base_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    assert is_adapter_dir(str(adapter_dir))
    assert not is_adapter_dir(str(base_dir))
    assert not is_adapter_dir(str(tmp_path / "missing"))
    assert adapter_base(str(adapter_dir)) == str(base_dir)
    assert adapter_base(str(base_dir)) is None
