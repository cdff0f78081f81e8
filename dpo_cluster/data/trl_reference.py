"""TRL's own DPO dataset preparation, as a function: the reference our tokenization is held to.

`trl_tokenize` calls TRL 1.16's real `DPOTrainer._prepare_dataset`, unbound, with a minimal
stand-in for the trainer and a real `trl.DPOConfig`, so parity tests and the benchmark compare
against what TRL actually produces rather than a re-implementation of it.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer


@dataclass
class _TrainerStandIn:
    """The only trainer attribute `_prepare_dataset` reads besides its arguments."""

    _tokenizer: PreTrainedTokenizerBase


def trl_tokenize(
    rows: list[dict[str, Any]] | datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    num_proc: int | None = None,
    *,
    max_length: int | None = 1024,
) -> datasets.Dataset:
    """Tokenize preference rows exactly as TRL's DPOTrainer does.

    rows: TRL formats, all rows in one format: {"prompt", "chosen", "rejected"} as strings
    (standard) or message lists (conversational), or {"chosen", "rejected"} with an implicit prompt.
    Conversational rows use `tokenizer.chat_template`. num_proc: `DPOConfig.dataset_num_proc`.
    max_length: `DPOConfig.max_length` (TRL's default 1024); TRL drops rows whose prompt alone
    fills it, and None disables that filter.
    Returns the dataset with `prompt_ids`, `chosen_ids`, `rejected_ids` columns added.
    """
    dataset = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(rows)
    with tempfile.TemporaryDirectory() as output_dir:
        # DPOConfig is a TrainingArguments: it wants an output_dir (never written to here) and
        # validates the precision against the hardware; bf16 (TRL's default) plays no part in
        # preparation and would fail on CPU. Its defaults set a field transformers 5 deprecates
        # (gradient_checkpointing); that FutureWarning says nothing about preparation.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            args = DPOConfig(
                output_dir=output_dir,
                dataset_num_proc=num_proc,
                max_length=max_length,
                bf16=False,
                report_to=[],
            )
        return DPOTrainer._prepare_dataset(_TrainerStandIn(tokenizer), dataset, tokenizer, args, "train")
