"""Tests for dpo_cluster.batch.packing: packing arithmetic on literal tensors, the attention masks
transformers builds from packed position ids, packed forwards equal padded ones on the tiny Qwen2
(log-probs, loss, metric sums, gradients), length grouping, the config rules, and one-worker
training runs with packing and grouping (the last ones `slow`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from dpo_cluster.batch import packing
from dpo_cluster.batch.collate import collate_pairs
from dpo_cluster.batch.logps import MicroBatch, sequence_logps
from dpo_cluster.batch.packing import (
    PackedBatch,
    group_by_length,
    pack_pairs,
    packing_route,
    pair_lengths,
    plan_rows,
    row_capacity,
)
from dpo_cluster.config import Config, ConfigError, load_config
from dpo_cluster.data.samples import SAMPLE_FILE
from dpo_cluster.logprobs import build_shifted_labels, compute_token_logps
from dpo_cluster.modeling import resolve_name_or_path
from dpo_cluster.tiny import build_tiny_qwen2_config
from dpo_cluster.train.context import WorkerContext
from dpo_cluster.train.forward import SUM_KEYS, LossSettings, compute_micro_batch, sums_to_metrics

# The example of TRL's DataCollatorForPreference docstring (as in test_collate.py).
TWO_PAIRS: dict[str, Any] = {
    "prompt_ids": [[1, 2, 3], [7, 8]],
    "chosen_ids": [[4, 5], [9]],
    "rejected_ids": [[6], [10, 11]],
}


def pad_share(batch: MicroBatch) -> float:
    """Share of the computed `input_ids` entries ((2B, T) padded, (R, L) packed) that are padding."""
    return 1.0 - batch.num_tokens / batch.input_ids.numel()


# ---------------------------------------------------------------------------------------------
# Packing arithmetic on literal tensors


def test_plan_rows_first_fit_decreasing_literal() -> None:
    """Lengths [5, 3, 8, 2, 6], capacity 8, longest first: 8 (s2) opens row 0 (full); 6 (s4) opens
    row 1 (2 left); 5 (s0) fits neither, opens row 2 (3 left); 3 (s1) fits row 2 (0 left); 2 (s3)
    fits row 1 (0 left)."""
    assert plan_rows([5, 3, 8, 2, 6], 8) == [[2], [4, 3], [0, 1]]
    assert plan_rows([4, 4, 4], 8) == [[0, 1], [2]]  # ties keep index order
    assert plan_rows([3, 3], 100) == [[0, 1]]
    with pytest.raises(ValueError, match="more than the row capacity 4"):
        plan_rows([5, 3], 4)


def test_row_capacity() -> None:
    assert row_capacity([5, 13, 2], None, varlen=False) == 16  # 13 rounded up to a multiple of 8
    assert row_capacity([5, 16, 2], None, varlen=False) == 16
    assert row_capacity([5, 13, 2], None, varlen=True) == 20  # everything in one row
    assert row_capacity([5, 13, 2], 32, varlen=False) == 32
    assert row_capacity([5, 13, 2], 4, varlen=True) == 13  # never below the longest sequence


def test_two_pairs_pack_into_two_full_rows_literal() -> None:
    """Sequences (chosen half first): s0 = [1 2 3 4 5] (5), s1 = [7 8 9] (3), s2 = [1 2 3 6] (4),
    s3 = [7 8 10 11] (4). Capacity = 5 rounded up to 8. FFD: s0 -> row 0 (3 left), s2 -> row 1
    (4 left), s3 -> row 1 (0 left), s1 -> row 0 (0 left). 16 tokens in 2 x 8 slots: no padding,
    where the padded batch has 4 x 5 = 20 slots (4 pads)."""
    batch = pack_pairs({**TWO_PAIRS, "ref_chosen_logps": [-1.5, -2.0], "ref_rejected_logps": [-3.0, -0.5]}, 0)
    assert torch.equal(batch.input_ids, torch.tensor([[1, 2, 3, 4, 5, 7, 8, 9], [1, 2, 3, 6, 7, 8, 10, 11]]))
    assert torch.equal(batch.position_ids, torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]))
    assert torch.equal(
        batch.completion_mask, torch.tensor([[0, 0, 0, 1, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0, 1, 1]])
    )
    assert batch.seq_rows.tolist() == [0, 0, 1, 1]
    assert batch.seq_starts.tolist() == [0, 5, 0, 4]
    assert batch.seq_lengths.tolist() == [5, 3, 4, 4]
    assert batch.cu_seqlens is None  # "mask" route
    for tensor in (batch.input_ids, batch.position_ids, batch.completion_mask):
        assert tensor.dtype == torch.long
    assert batch.num_pairs == 2 and batch.num_tokens == 16
    assert batch.ref_chosen_logps is not None and batch.ref_rejected_logps is not None
    assert torch.equal(batch.ref_chosen_logps, torch.tensor([-1.5, -2.0]))
    assert torch.equal(batch.ref_rejected_logps, torch.tensor([-3.0, -0.5]))
    assert pad_share(batch) == 0.0 < pad_share(collate_pairs(TWO_PAIRS, 0)) == pytest.approx(0.2)
    inputs = batch.model_inputs()
    # No attention mask and no cache: transformers then builds the packed mask from the position ids.
    assert set(inputs) == {"input_ids", "position_ids", "use_cache"} and inputs["use_cache"] is False

    # Labels shift by one; the last token of s0 (column 4) would predict s1's first token: unscored.
    labels, label_mask = batch.shifted_labels()
    assert torch.equal(labels, torch.tensor([[2, 3, 4, 5, 7, 8, 9, 0], [2, 3, 6, 7, 8, 10, 11, 0]]))
    assert torch.equal(label_mask, torch.tensor([[0, 0, 1, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 1, 1, 0]]))

    # unpack: (R, L) -> (2B, T = 5) in collate_pairs' row order, zeros past each sequence's end.
    unpacked = batch.unpack(torch.arange(16).view(2, 8))
    assert torch.equal(
        unpacked, torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 0, 0], [8, 9, 10, 11, 0], [12, 13, 14, 15, 0]])
    )
    padded = collate_pairs(TWO_PAIRS, 0)
    assert torch.equal(batch.unpack(batch.input_ids), padded.input_ids)
    assert torch.equal(batch.unpack(batch.completion_mask), padded.completion_mask)


def test_to_moves_every_tensor_and_keeps_the_rest() -> None:
    ref = {"ref_chosen_logps": [0.0, 1.0], "ref_rejected_logps": [2.0, 3.0]}
    batch = pack_pairs({**TWO_PAIRS, **ref}, 0, varlen=True)
    moved = batch.to("meta")
    assert isinstance(moved, PackedBatch) and moved.max_seqlen == batch.max_seqlen
    tensors = [value for value in vars(moved).values() if isinstance(value, torch.Tensor)]
    assert len(tensors) == 9 and all(t.device.type == "meta" for t in tensors)
    assert batch.input_ids.device.type == "cpu"
    plain = pack_pairs(TWO_PAIRS, 0).to("cpu")
    assert plain.cu_seqlens is None and plain.ref_chosen_logps is None
    assert (plain.num_pairs, plain.num_tokens) == (2, 16)


def test_free_tail_is_its_own_segment_and_varlen_offsets_literal() -> None:
    """One pair: s0 = [1 2 3 4 5 6 7 8] (8), s1 = [1 2 3 9] (4). Capacity 8: one row each; row 1's
    free tail (4 pads) gets positions 0..3, a segment of its own. Varlen with row_tokens 8: segments
    8 | 4 | 4 (the tail) -> cu_seqlens [0, 8, 12, 16]. Varlen by default: one row, [0, 8, 12]."""
    pair = {"prompt_ids": [[1, 2, 3]], "chosen_ids": [[4, 5, 6, 7, 8]], "rejected_ids": [[9]]}
    batch = pack_pairs(pair, 99)
    assert torch.equal(
        batch.input_ids, torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 9, 99, 99, 99, 99]])
    )
    assert torch.equal(batch.position_ids, torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 0, 1, 2, 3]]))
    assert pad_share(batch) == pytest.approx(4 / 16)

    rows_of_8 = pack_pairs(pair, 99, row_tokens=8, varlen=True)
    assert rows_of_8.cu_seqlens is not None and rows_of_8.cu_seqlens.dtype == torch.int32
    assert rows_of_8.cu_seqlens.tolist() == [0, 8, 12, 16] and rows_of_8.max_seqlen == 8
    one_row = pack_pairs(pair, 99, varlen=True)
    assert one_row.input_ids.shape == (1, 12)
    assert one_row.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]]
    assert one_row.cu_seqlens is not None and one_row.cu_seqlens.tolist() == [0, 8, 12]
    inputs = one_row.model_inputs()
    assert inputs["cu_seq_lens_q"] is inputs["cu_seq_lens_k"] is one_row.cu_seqlens
    assert inputs["max_length_q"] == inputs["max_length_k"] == 8
    assert pad_share(one_row) == 0.0


def test_empty_prompt_first_token_is_never_scored_from_the_previous_sequence() -> None:
    """With an empty prompt the padded path cannot score the first completion token (nothing
    precedes it); packed after another sequence, it must not be scored from that one either."""
    pairs = {"prompt_ids": [[], [1, 2]], "chosen_ids": [[3, 4, 5], [6]], "rejected_ids": [[7, 8], [9, 10]]}
    batch = pack_pairs(pairs, 0, row_tokens=64)
    padded = collate_pairs(pairs, 0)
    _, label_mask = batch.shifted_labels()
    _, padded_label_mask = build_shifted_labels(padded.input_ids, padded.completion_mask)
    assert torch.equal(batch.unpack(label_mask), padded_label_mask)
    assert batch.unpack(label_mask).sum(dim=1).tolist() == [2, 1, 1, 2]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_transformers_builds_block_diagonal_causal_masks_from_packed_position_ids(attention: str) -> None:
    """The "mask" route: position ids and no attention mask give, per row, causal attention inside
    each sequence (and inside the free tail) and none across."""
    from transformers.masking_utils import create_causal_mask

    config = build_tiny_qwen2_config(
        hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1
    )
    config._attn_implementation = attention
    pairs = {"prompt_ids": [[1, 2], [7]], "chosen_ids": [[3, 4, 5], [8]], "rejected_ids": [[6], [9, 10]]}
    # s0 (5), s1 (2), s2 (3), s3 (3); rows of 6 by FFD: s0 | tail, s2 | s3, s1 | tail.
    batch = pack_pairs(pairs, 0, row_tokens=6)
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]]
    mask = create_causal_mask(
        config=config,
        inputs_embeds=torch.zeros(3, 6, 8),
        attention_mask=None,
        past_key_values=None,
        position_ids=batch.position_ids,
    )
    assert mask is not None and mask.shape == (3, 1, 6, 6)
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0  # eager: 0 or dtype min
    segments = torch.tensor([[0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    q, k = torch.arange(6).view(1, 6, 1), torch.arange(6).view(1, 1, 6)
    expected = (segments.unsqueeze(2) == segments.unsqueeze(1)) & (k <= q)
    assert torch.equal(allowed, expected)


# ---------------------------------------------------------------------------------------------
# Packed forwards equal padded forwards on the tiny Qwen2


def skewed_pairs(seed: int = 0, num_pairs: int = 6) -> dict[str, Any]:
    """Pairs of very different lengths (3 to ~120 tokens): the case packing is for."""
    rng = np.random.default_rng(seed)
    prompt_lengths = [2, 40, 5, 1, 17, 3][:num_pairs]
    chosen_lengths = [3, 70, 2, 9, 1, 30][:num_pairs]
    rejected_lengths = [8, 2, 50, 1, 25, 4][:num_pairs]

    def ids(n: int) -> list[int]:
        return rng.integers(5, 1000, size=n).tolist()

    return {
        "prompt_ids": [ids(n) for n in prompt_lengths],
        "chosen_ids": [ids(n) for n in chosen_lengths],
        "rejected_ids": [ids(n) for n in rejected_lengths],
    }


def load_tiny(attention: str, seed: int = 0, noise: float = 0.0) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        resolve_name_or_path("builtin:tiny"), attn_implementation=attention, dtype=torch.float32
    )
    if noise:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=generator))
    return model


def assert_same_sequence_results(
    got: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    want: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """`sequence_logps` results (2B,) of two layouts agree. Sums over up to ~120 tokens reach ~500
    in magnitude, where one fp32 ulp is 3e-5; so sums are compared to 1e-5 absolute or 1e-6
    relative, whichever is larger, and token counts exactly."""
    for name, a, b in zip(("logps", "logit sums", "token counts"), want, got):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-6, msg=name)
    assert torch.equal(got[2], want[2])


def token_logps(model: PreTrainedModel, batch: MicroBatch) -> torch.Tensor:
    """Per-token completion log-probs in the padded layout (2B, T), for either batch kind."""
    if isinstance(batch, PackedBatch):
        labels, label_mask = batch.shifted_labels()
        logits = model(**batch.model_inputs()).logits
        return batch.unpack(compute_token_logps(logits, labels, label_mask))
    labels, label_mask = build_shifted_labels(batch.input_ids, batch.completion_mask)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return compute_token_logps(logits, labels, label_mask)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_sequence_logps_equal_padded(attention: str) -> None:
    model = load_tiny(attention)
    assert packing_route(model)[0] == "mask"
    pairs = skewed_pairs()
    padded, packed = collate_pairs(pairs, 1), pack_pairs(pairs, 1)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]
    assert pad_share(packed) < pad_share(padded)
    with torch.no_grad():
        assert_same_sequence_results(sequence_logps(model, packed), sequence_logps(model, padded))
        want_tokens = token_logps(model, padded)
        got_tokens = token_logps(model, packed)
    assert want_tokens.shape == got_tokens.shape == (12, 110)
    torch.testing.assert_close(got_tokens, want_tokens, atol=1e-5, rtol=0)
    # Rows of 256 tokens (train.packing_row_tokens) hold several long sequences each: the same.
    rows_of_256 = pack_pairs(pairs, 1, row_tokens=256)
    assert rows_of_256.input_ids.shape[0] < packed.input_ids.shape[0]
    with torch.no_grad():
        assert_same_sequence_results(sequence_logps(model, rows_of_256), sequence_logps(model, padded))


def test_lora_policy_packs_with_and_without_its_adapter() -> None:
    """A peft LoRA policy passes position ids through to the base model, and the disabled-adapter
    reference (reference.mode adapter_disabled) scores packed rows like padded ones too."""
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(
        load_tiny("sdpa"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    assert packing_route(policy)[0] == "mask"
    pairs = skewed_pairs(seed=9)
    padded, packed = collate_pairs(pairs, 1), pack_pairs(pairs, 1)
    with torch.no_grad():
        assert_same_sequence_results(sequence_logps(policy, packed), sequence_logps(policy, padded))
        with policy.disable_adapter():
            assert_same_sequence_results(sequence_logps(policy, packed), sequence_logps(policy, padded))


def run_micro_batch(
    policy: PreTrainedModel, reference: PreTrainedModel, batch: MicroBatch
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss, metric sums and the policy's parameter gradients of one micro-batch."""
    settings = LossSettings(["sigmoid", "sft"], [1.0, 0.5], beta=0.1, label_smoothing=0.0)

    def reference_logps(b: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logps, _, _ = sequence_logps(reference, b)
        return logps[: b.num_pairs], logps[b.num_pairs :]

    policy.zero_grad(set_to_none=True)
    result = compute_micro_batch(policy, reference_logps, batch, settings)
    result.loss.backward()
    grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    return result.loss.detach(), result.sums, grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_micro_batch_loss_metric_sums_and_gradients_equal_padded(attention: str) -> None:
    policy = load_tiny(attention, seed=1, noise=0.01)  # differs from the reference: rewards != 0
    reference = load_tiny(attention)
    pairs = skewed_pairs(seed=3)
    padded = run_micro_batch(policy, reference, collate_pairs(pairs, 1))
    packed = run_micro_batch(policy, reference, pack_pairs(pairs, 1))

    assert packed[0].item() == pytest.approx(padded[0].item(), abs=1e-5)
    sums = dict(zip(SUM_KEYS, padded[1].tolist()))
    packed_sums = dict(zip(SUM_KEYS, packed[1].tolist()))
    assert sums["rewards/margins"] != 0.0
    for key in SUM_KEYS:
        if key == "padded_tokens":
            continue
        assert packed_sums[key] == pytest.approx(sums[key], abs=1e-4, rel=1e-6), key
    # The same real tokens; far fewer pad slots, and the metric reports the real fraction.
    assert packed_sums["tokens"] == sums["tokens"]
    assert packed_sums["padded_tokens"] < sums["padded_tokens"]
    fraction = sums_to_metrics(packed[1])["padding_fraction"]
    packed_batch = pack_pairs(pairs, 1)
    assert fraction == pytest.approx(pad_share(packed_batch))
    assert fraction < sums_to_metrics(padded[1])["padding_fraction"]

    assert set(packed[2]) == set(padded[2]) and padded[2]
    for name, grad in padded[2].items():
        torch.testing.assert_close(packed[2][name], grad, atol=1e-5, rtol=0, msg=name)


VARLEN_TEST_ATTENTION = "dpo_cluster_test_varlen"


def varlen_reference_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """flash-attn's varlen contract in plain torch: query (R, H, L, D), key/value (R, Hkv, L, D) ->
    (R, L, H, D); causal attention inside each segment of the flattened R * L tokens given by
    `cu_seq_lens_q`, which must arrive as keyword arguments (as for flash_attention_2)."""
    assert attention_mask is None
    offsets = kwargs["cu_seq_lens_q"].tolist()
    assert kwargs["cu_seq_lens_k"].tolist() == offsets
    assert kwargs["max_length_q"] == max(b - a for a, b in zip(offsets[:-1], offsets[1:]))
    rows, heads, width, dim = query.shape
    repeat = heads // key.shape[1]  # grouped-query attention: key head i serves query heads i*repeat...

    def flat(x: torch.Tensor) -> torch.Tensor:  # (R, h, L, D) -> (h, R * L, D)
        return x.transpose(0, 1).reshape(x.shape[1], rows * width, dim)

    q = flat(query)
    k, v = (flat(x).repeat_interleave(repeat, dim=0) for x in (key, value))
    pieces = [
        F.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], is_causal=True, scale=scaling)
        for a, b in zip(offsets[:-1], offsets[1:])
    ]
    out = torch.cat(pieces, dim=1).view(heads, rows, width, dim)
    return out.permute(1, 2, 0, 3).contiguous(), None


def test_varlen_route_kwargs_reach_the_attention_and_match_padded() -> None:
    """The "varlen" route cannot run flash-attn on CPU; a plain-torch kernel registered like
    flash_attention_2 (no mask, segment offsets as kwargs) checks the offsets and the plumbing."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN_TEST_ATTENTION, varlen_reference_attention)
    AttentionMaskInterface.register(VARLEN_TEST_ATTENTION, flash_attention_mask)
    model = load_tiny(VARLEN_TEST_ATTENTION)
    padded_model = load_tiny("sdpa")
    pairs = skewed_pairs(seed=5)
    with torch.no_grad():
        want = sequence_logps(padded_model, collate_pairs(pairs, 1))
        for row_tokens in (None, 128):  # one row; rows of 128 with free tails
            packed = pack_pairs(pairs, 1, row_tokens=row_tokens, varlen=True)
            assert_same_sequence_results(sequence_logps(model, packed), want)


def test_packing_route_and_its_fallback_reasons() -> None:
    sdpa = load_tiny("sdpa")
    assert packing_route(sdpa) == ("mask", "packed rows via block-diagonal causal masks (sdpa)")
    assert packing_route(sdpa, None, load_tiny("eager"))[0] == "mask"
    flash = load_tiny("sdpa")
    flash.config._attn_implementation = "flash_attention_2"  # inspected only, never run
    assert packing_route(flash)[0] == "varlen"
    route, reason = packing_route(flash, sdpa)
    assert route is None and "mix attention implementations" in reason
    flash.config._attn_implementation = "flex_attention"
    route, reason = packing_route(flash)
    assert route is None and "'flex_attention'" in reason
    route, reason = packing_route(torch.nn.Linear(2, 2))
    assert route is None and "Linear is not a transformers model" in reason

    class Engine(torch.nn.Module):  # a DeepSpeed engine keeps the model as .module
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    assert packing_route(Engine(sdpa))[0] == "mask"


# ---------------------------------------------------------------------------------------------
# Length grouping


def pair_stream(num_batches: int, micro: int, seed: int = 0) -> list[dict[str, Any]]:
    """Micro-batches as Ray Data hands them out: numpy columns (object arrays of token ids)."""
    rng = np.random.default_rng(seed)
    batches = []
    for b in range(num_batches):
        rows = range(b * micro, (b + 1) * micro)

        def ids(low: int, high: int) -> np.ndarray:
            column = np.empty(micro, dtype=object)
            column[:] = [
                rng.integers(5, 100, size=rng.integers(low, high)).astype(np.int32) for _ in range(micro)
            ]
            return column

        batches.append(
            {
                "row_id": np.array([f"row-{i}" for i in rows], dtype=object),
                "prompt_ids": ids(1, 30),
                "chosen_ids": ids(1, 60),
                "rejected_ids": ids(1, 60),
                "ref_chosen_logps": rng.normal(size=micro),
                "ref_rejected_logps": rng.normal(size=micro),
            }
        )
    return batches


def padded_slots(batches: list[dict[str, Any]]) -> int:
    return sum(2 * len(b["prompt_ids"]) * int(pair_lengths(b).max()) for b in batches)


def test_group_by_length_regroups_every_pair_once_deterministically() -> None:
    stream = pair_stream(num_batches=10, micro=4)
    grouped = list(group_by_length(iter(stream), window=4, seed=(42, 0)))
    again = list(group_by_length(iter(stream), window=4, seed=(42, 0)))
    assert len(grouped) == 10 and all(len(b["row_id"]) == 4 for b in grouped)

    def fingerprint(batches: list[dict[str, Any]]) -> list[list[str]]:
        return [list(b["row_id"]) for b in batches]

    assert fingerprint(grouped) == fingerprint(again)
    assert sorted(r for b in fingerprint(grouped) for r in b) == sorted(
        r for b in fingerprint(stream) for r in b
    )
    # Windows are [0, 4), [4, 8), [8, 10): pairs never leave their window.
    for start, stop in ((0, 4), (4, 8), (8, 10)):
        assert {r for b in fingerprint(grouped[start:stop]) for r in b} == {
            r for b in fingerprint(stream[start:stop]) for r in b
        }
        # Within a window the micro-batches are consecutive runs of the length order.
        spans = sorted((int(pair_lengths(b).min()), int(pair_lengths(b).max())) for b in grouped[start:stop])
        assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))
    assert padded_slots(grouped) < padded_slots(stream)

    # Each row keeps its own columns together (ids, reference log-probs, row id).
    by_id = {r: (b, i) for b in stream for i, r in enumerate(b["row_id"])}
    for batch in grouped:
        assert isinstance(batch["ref_chosen_logps"], np.ndarray)  # numeric columns stay numpy
        for i, row_id in enumerate(batch["row_id"]):
            source, j = by_id[row_id]
            assert np.array_equal(batch["chosen_ids"][i], source["chosen_ids"][j])
            assert batch["ref_rejected_logps"][i] == source["ref_rejected_logps"][j]
        collate_pairs(batch, 0)  # collates as it is

    other_seed = list(group_by_length(iter(stream), window=4, seed=(42, 1)))
    assert sorted(map(tuple, fingerprint(other_seed))) == sorted(map(tuple, fingerprint(grouped)))
    with pytest.raises(ValueError, match="window must be >= 1"):
        list(group_by_length(iter(stream), window=0, seed=(0,)))


class ListSource:
    """A PairSource over fixed micro-batches (the same for every epoch)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches
        self.num_rows = sum(len(b["row_id"]) for b in batches)

    def iter_batches(self, batch_size: int, epoch: int) -> Iterator[dict[str, Any]]:
        assert all(len(b["row_id"]) == batch_size for b in self.batches)
        yield from self.batches


def worker(rank: int, world_size: int, source: ListSource) -> WorkerContext:
    return WorkerContext(rank, world_size, 0, torch.device("cpu"), source, None, lambda *a: None)


def test_grouped_ownership_is_the_same_stream_whatever_the_worker_count() -> None:
    source = ListSource(pair_stream(num_batches=12, micro=2, seed=7))

    def owned(rank: int, world_size: int) -> dict[int, list[str]]:
        batches = worker(rank, world_size, source).my_micro_batches(
            source, 2, epoch=3, length_group_window=5, seed=11
        )
        return {index: list(batch["row_id"]) for index, batch in batches}

    single = owned(0, 1)
    assert sorted(single) == list(range(12))
    for world_size in (2, 3):
        merged: dict[int, list[str]] = {}
        for rank in range(world_size):
            mine = owned(rank, world_size)
            assert all(index % world_size == rank for index in mine)
            merged |= mine
        assert merged == single
    plain = dict(worker(0, 1, source).my_micro_batches(source, 2, epoch=3))
    assert [list(b["row_id"]) for b in plain.values()] != list(single.values())  # regrouped
    assert sorted(r for ids in single.values() for r in ids) == sorted(
        r for b in plain.values() for r in b["row_id"]
    )


# ---------------------------------------------------------------------------------------------
# Config


def config_with(*overrides: str) -> Config:
    return load_config(
        None,
        [
            "output_dir=/tmp/unused",
            "model.name_or_path=builtin:tiny",
            f"data.train={SAMPLE_FILE}",
            *overrides,
        ],
    )


def test_config_packing_and_grouping_keys() -> None:
    default = config_with().train
    assert (
        default.packing is False and default.group_by_length is False and default.packing_row_tokens is None
    )
    train = config_with(
        "train.packing=true", "train.packing_row_tokens=512", "train.length_group_window=8"
    ).train
    assert (train.packing, train.packing_row_tokens, train.length_group_window) == (True, 512, 8)
    assert (
        config_with("train.group_by_length=true", "train.length_group_window=1").train.length_group_window
        == 1
    )
    bad = {
        ("train.packing_row_tokens=512",): "train.packing_row_tokens: set, but train.packing is false",
        ("train.packing=true", "train.packing_row_tokens=1"): "train.packing_row_tokens: must be >= 2",
        (
            "train.group_by_length=true",
            "train.length_group_window=0",
        ): "train.length_group_window: must be >= 1",
        ("train.length_group_window=8",): "train.length_group_window: set, but neither",
        ("train.packing=maybe",): "train.packing: expected true or false",
    }
    for overrides, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            config_with(*overrides)


# ---------------------------------------------------------------------------------------------
# One-worker training runs (real DeepSpeed on CPU, no Ray): the tokenized split is written here.


@pytest.fixture(scope="module")
def skewed_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 tokenized pairs with skewed lengths (a prepared split directory, as `prepare` writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows: dict[str, list[Any]] = {"row_id": [], "prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for i in range(64):
        long = i % 4 == 0  # a few long pairs among many short ones
        prompt = rng.integers(5, 1000, size=rng.integers(20, 50) if long else rng.integers(2, 8))
        rows["row_id"].append(f"skewed:{i}")
        rows["prompt_ids"].append(prompt.tolist())
        for name in ("chosen_ids", "rejected_ids"):
            size = rng.integers(30, 70) if long else rng.integers(1, 10)
            rows[name].append([*rng.integers(5, 1000, size=size - 1).tolist(), 0])  # ends with eos
    split = tmp_path_factory.mktemp("skewed") / "train"
    split.mkdir()
    pq.write_table(pa.table(rows), split / "part-00000.parquet")
    return split


def run_config(output_dir: Path, *overrides: str) -> Config:
    """tests/test_train_local.py's config with accumulation 2 and 5 steps."""
    from tests.test_train_local import train_config

    return train_config(output_dir, "train.gradient_accumulation_steps=2", "train.max_steps=5", *overrides)


def train_rows(output_dir: Path) -> list[dict[str, Any]]:
    import json

    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


@pytest.mark.slow
def test_packed_training_run_has_the_padded_loss_curve(skewed_split: Path, tmp_path: Path) -> None:
    from dpo_cluster.train.local import run_local

    runs = {}
    evals = {}
    for name, overrides in (("padded", ()), ("packed", ("train.packing=true",))):
        config = run_config(tmp_path / name, *overrides, "train.eval_strategy=steps", "train.eval_steps=5")
        summary, _ = run_local(config, skewed_split, skewed_split)
        runs[name] = train_rows(tmp_path / name)
        evals[name] = summary
    padded, packed = runs["padded"], runs["packed"]
    assert len(padded) == len(packed) == 5
    assert evals["packed"]["eval_loss"] == pytest.approx(evals["padded"]["eval_loss"], abs=1e-4)
    assert evals["packed"]["eval_padding_fraction"] < evals["padded"]["eval_padding_fraction"]
    assert packed[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], abs=1e-4)
    assert packed[-1]["rewards/margins"] != 0.0  # the policy moved away from the reference
    for a, b in zip(padded, packed):
        assert b["padding_fraction"] < a["padding_fraction"]


@pytest.mark.slow
def test_unsupported_packing_falls_back_to_length_grouping(
    skewed_split: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An attention implementation packing does not know (here: none is known) gives one warning
    and padded micro-batches grouped by length: the same pairs per window, less padding."""
    from dpo_cluster.train.local import run_local

    monkeypatch.setattr(packing, "MASK_ATTENTION", ())
    with caplog.at_level(logging.WARNING, logger="dpo_cluster.train.loop"):
        run_local(run_config(tmp_path / "fallback", "train.packing=true", "train.max_steps=2"), skewed_split)
    warnings = [r.getMessage() for r in caplog.records if r.name == "dpo_cluster.train.loop"]
    assert len(warnings) == 1
    assert "padded micro-batches grouped by length" in warnings[0] and "'sdpa'" in warnings[0]
    run_local(run_config(tmp_path / "plain", "train.max_steps=2"), skewed_split)
    fallback, plain = train_rows(tmp_path / "fallback"), train_rows(tmp_path / "plain")
    assert sum(r["padding_fraction"] for r in fallback) < sum(r["padding_fraction"] for r in plain)
