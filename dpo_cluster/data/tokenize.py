"""Per-pair tokenization: canonical `Pair`s in, `TokenizedPair`s (or `DropRow`s) out.

Rows that need no truncation get exactly the ids of TRL's DPOTrainer preprocessing, so a model
trained here sees its data the way a TRL-trained one does; a batch is rendered to text first and
encoded with one batched tokenizer call, which gives the same ids faster.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from transformers import PreTrainedTokenizerBase

from dpo_cluster.config.specs import TokenizeSpec
from dpo_cluster.config.specs import load_chat_template as load_chat_template  # re-exported
from dpo_cluster.data.records import DropRow, Pair, TokenizedPair

PLAIN_CHAT_TEMPLATE: str = (
    resources.files("dpo_cluster.data").joinpath("templates/plain.jinja").read_text(encoding="utf-8")
)
"""Fallback chat template for tokenizers without one: "User: ...\\n\\nAssistant: ...<eos>"."""


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """Number of leading ids the two sequences share (as `trl.data_utils.common_prefix_length`)."""
    length = 0
    for token, other_token in zip(ids, other_ids):
        if token != other_token:
            break
        length += 1
    return length


def chat_template_override(tokenizer: PreTrainedTokenizerBase, configured: str | None) -> str | None:
    """The template to pass to `apply_chat_template`: a configured one wins; otherwise None, the
    tokenizer's own (letting transformers pick it, including from a dict of named templates); the
    plain fallback only when the tokenizer has none. Serving formats prompts with the same rule,
    so a model is asked questions exactly the way it was trained on them."""
    if configured is not None:
        return configured
    if tokenizer.chat_template is not None:
        return None
    return PLAIN_CHAT_TEMPLATE


class PairTokenizer:
    """Tokenizes batches of pairs with one tokenizer and one `TokenizeSpec`.

    Without truncation the ids are those of TRL 1.16's `DPOTrainer._prepare_dataset`:
    - standard pairs: the completion gets the eos appended unless it already ends with it;
      prompt = tokenizer(prompt), full = tokenizer(prompt + completion), with the tokenizer's
      default special tokens (a bos-adding tokenizer adds its bos to both);
    - conversational pairs: prompt = chat template of the prompt messages with the generation
      prompt, full = chat template of prompt + completion messages, tokenized without adding
      special tokens (what `apply_chat_template(tokenize=True)` does in transformers 5);
    - the completion starts where the prompt ids and the full ids diverge, which is earlier than
      the end of the prompt when tokens merge across the boundary (note "boundary_merge").

    The length policy then applies per sequence (prompt + chosen, prompt + rejected): the prompt
    is kept within its budget (dropped or truncated), then completions are cut to fit.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, spec: TokenizeSpec) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.chat_template = chat_template_override(tokenizer, spec.chat_template)

    def tokenize(self, pairs: list[Pair]) -> list[TokenizedPair | DropRow]:
        """One result per pair, in order: the tokenized pair, or the `DropRow` that drops it."""
        results: list[TokenizedPair | DropRow | None] = [None] * len(pairs)
        # Texts to encode, three per pair (prompt, prompt + chosen, prompt + rejected), grouped by
        # whether the tokenizer adds its special tokens: standard text gets them as in
        # `tokenizer(text)`, rendered chat does not (the template writes them).
        texts: dict[bool, list[str]] = {True: [], False: []}
        owners: dict[bool, list[int]] = {True: [], False: []}
        for index, (pair, rendered) in enumerate(zip(pairs, self._render_all(pairs))):
            if isinstance(rendered, DropRow):
                results[index] = rendered
                continue
            add_special_tokens = not pair.conversational
            texts[add_special_tokens].extend(rendered)
            owners[add_special_tokens].append(index)

        for add_special_tokens, batch in texts.items():
            if not batch:
                continue
            ids = self._encode(batch, add_special_tokens)
            for k, index in enumerate(owners[add_special_tokens]):
                prompt_ids, full_chosen, full_rejected = ids[3 * k : 3 * k + 3]
                split = split_pair(prompt_ids, full_chosen, full_rejected)
                results[index] = self._fit(split, pairs[index].label)
        return results  # type: ignore[return-value]  # every slot is filled above

    def _encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """The ids `tokenizer(texts, add_special_tokens=...)["input_ids"]` gives. With a Rust
        (fast) tokenizer, all texts but the first go straight to its `encode_batch`: transformers'
        conversion of every encoding into a dict of lists was an eighth of the time of a pair. The
        first goes through transformers, which sets the backend's truncation, padding and special-
        token handling as a plain call has them, so the direct call encodes alike (tested equal)."""

        def encode(batch: list[str]) -> list[list[int]]:
            return self.tokenizer(
                batch,
                add_special_tokens=add_special_tokens,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]

        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch"):
            return encode(texts)
        first = encode(texts[:1])
        rest = backend.encode_batch(texts[1:], add_special_tokens=add_special_tokens)
        return first + [encoding.ids for encoding in rest]

    def _render_all(self, pairs: list[Pair]) -> list[tuple[str, str, str] | DropRow]:
        """`_render` of every pair, the conversational ones in two batched template calls (one per
        add_generation_prompt), which spares the per-call set-up of `apply_chat_template` (a
        sixth of the rendering time; the template renders each conversation alike). Where a
        batch fails, its pairs are rendered one by one so the failure drops only its own row."""
        rendered: list[tuple[str, str, str] | DropRow | None] = [None] * len(pairs)
        chats = [i for i, pair in enumerate(pairs) if pair.conversational]
        if chats:
            try:
                prompts = self._apply_template([pairs[i].prompt for i in chats], add_generation_prompt=True)
                fulls = self._apply_template(
                    [
                        pairs[i].prompt + answer
                        for i in chats
                        for answer in (pairs[i].chosen, pairs[i].rejected)
                    ],
                    add_generation_prompt=False,
                )
            except DropRow:
                pass  # some row's template failed: all are rendered one by one below
            else:
                for k, i in enumerate(chats):
                    rendered[i] = (prompts[k], fulls[2 * k], fulls[2 * k + 1])
        for i, pair in enumerate(pairs):
            if rendered[i] is None:
                try:
                    rendered[i] = self._render(pair)
                except DropRow as drop:
                    rendered[i] = drop
        return rendered  # type: ignore[return-value]  # every slot is filled above

    def _render(self, pair: Pair) -> tuple[str, str, str]:
        """(prompt, prompt + chosen, prompt + rejected) as the text the tokenizer encodes."""
        if not pair.conversational:
            eos = self.tokenizer.eos_token
            if eos is None:
                raise ValueError("the tokenizer has no eos_token; standard pairs need one to end completions")
            chosen = pair.chosen if pair.chosen.endswith(eos) else pair.chosen + eos
            rejected = pair.rejected if pair.rejected.endswith(eos) else pair.rejected + eos
            return pair.prompt, pair.prompt + chosen, pair.prompt + rejected
        return (
            self._apply_template(pair.prompt, add_generation_prompt=True),
            self._apply_template(pair.prompt + pair.chosen, add_generation_prompt=False),
            self._apply_template(pair.prompt + pair.rejected, add_generation_prompt=False),
        )

    def _apply_template(self, messages: list[Any], add_generation_prompt: bool) -> Any:
        """One conversation (a list of messages) -> its text; a list of conversations -> their texts."""
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=None,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        # The template is third-party code run on this row's data (it may `raise_exception`, read an
        # undefined field, concatenate a non-string): whatever it raises is this row's failure.
        except Exception as error:
            raise DropRow("template_error", f"{type(error).__name__}: {error}") from error

    def _fit(self, pair: TokenizedPair, label: bool | None = None) -> TokenizedPair | DropRow:
        """Apply the length policy of `self.spec` to a split pair; an unpaired row (`label` not
        None, its completion on both sides) keeps it on its label's side only."""
        spec = self.spec
        budget = spec.prompt_budget
        prompt_ids = pair.prompt_ids
        if len(prompt_ids) > budget:
            if spec.prompt_overflow == "drop":
                return DropRow(
                    "prompt_too_long",
                    f"prompt has {len(prompt_ids)} tokens, over its budget of {budget} "
                    f"(max_length={spec.max_length}, max_prompt_length={spec.max_prompt_length})",
                )
            if spec.truncation_mode == "keep_end":
                prompt_ids = prompt_ids[len(prompt_ids) - budget :]
            else:
                prompt_ids = prompt_ids[:budget]
            pair.notes.add("truncated_prompt")

        room = spec.max_length - len(prompt_ids)
        chosen_ids, rejected_ids = pair.chosen_ids, pair.rejected_ids
        if len(chosen_ids) > room or len(rejected_ids) > room:
            # Keep the start of each answer: it is what the prompt conditions most directly.
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
            pair.notes.add("truncated_completion")
        if label is not None:
            completion_ids = chosen_ids if label else rejected_ids
            return TokenizedPair(
                prompt_ids, completion_ids if label else [], [] if label else completion_ids, pair.notes
            )
        if chosen_ids == rejected_ids:
            if "truncated_completion" in pair.notes:
                return DropRow(
                    "identical_after_truncation",
                    f"chosen and rejected share their first {room} tokens, all that fit after a "
                    f"{len(prompt_ids)}-token prompt within max_length={spec.max_length}",
                )
            return DropRow("chosen_equals_rejected", "chosen and rejected tokenize to the same ids")
        return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, pair.notes)


def split_pair(prompt_ids: list[int], full_chosen: list[int], full_rejected: list[int]) -> TokenizedPair:
    """Split prompt + completion ids where they diverge from the prompt ids, as TRL does.

    The prompt keeps only what both full sequences share with it; a shorter prompt than its own
    tokenization means tokens merged across the boundary (note "boundary_merge").
    """
    prompt_len = min(
        common_prefix_length(prompt_ids, full_chosen),
        common_prefix_length(prompt_ids, full_rejected),
    )
    notes = {"boundary_merge"} if prompt_len < len(prompt_ids) else set()
    return TokenizedPair(
        prompt_ids=list(prompt_ids[:prompt_len]),
        chosen_ids=list(full_chosen[prompt_len:]),
        rejected_ids=list(full_rejected[prompt_len:]),
        notes=notes,
    )
