"""Turning a request's prompt into token ids, the way training rendered its pairs.

A chat request (a message list) goes through the tokenizer's chat template with the generation
prompt appended, then is encoded without special tokens, exactly as `PairTokenizer` renders a
conversational pair's prompt; a plain-text prompt is encoded with the tokenizer's special tokens,
as a standard pair's prompt is. A tokenizer without a chat template uses the same plain fallback
training used (`chat_template_override`), so a model is asked questions in its training format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_cluster.data.tokenize import chat_template_override
from dpo_cluster.modeling import load_tokenizer
from dpo_cluster.serving.generation import has_own_tokenizer


class PromptError(ValueError):
    """A prompt this server will not run; `field` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def tokenizer_source(served: str, base: str) -> str:
    """Where a served model's tokenizer lives: its own directory when it has tokenizer files (a
    training run's final/ always does), else the base it applies to (a bare LoRA adapter)."""
    if Path(served).expanduser().is_dir() and not has_own_tokenizer(served):
        return base
    return served


def load_served_tokenizer(served: str, base: str, *, trust_remote_code: bool = False) -> Any:
    return load_tokenizer(tokenizer_source(served, base), trust_remote_code=trust_remote_code)


def render_prompt_ids(
    tokenizer: Any,
    *,
    prompt: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    max_prompt_tokens: int,
) -> list[int]:
    """Token ids of a text prompt or a chat (exactly one of the two).

    Raises PromptError naming the field when the prompt is empty, the chat template rejects the
    messages, or the ids exceed max_prompt_tokens.
    """
    if (prompt is None) == (messages is None):
        raise PromptError("prompt", "give exactly one of 'prompt' (text) or 'messages' (a chat)")
    if messages is not None:
        field = "messages"
        if not messages:
            raise PromptError(field, "messages: at least one message is needed")
        if not any(m.get("content") for m in messages):
            raise PromptError(field, "messages: every message is empty")
        try:
            text = tokenizer.apply_chat_template(
                messages,
                chat_template=chat_template_override(tokenizer, None),
                add_generation_prompt=True,
                tokenize=False,
            )
        # The template is model-supplied jinja run on the client's messages: whatever it raises
        # (a role order it forbids, say) is a fault of this request, not of the server.
        except Exception as error:
            raise PromptError(field, f"messages: the chat template rejected them: {error}") from error
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        field = "prompt"
        if not prompt:
            raise PromptError(field, "prompt: must not be empty")
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(ids) > max_prompt_tokens:
        raise PromptError(
            field, f"{field}: {len(ids)} tokens, over this server's limit of {max_prompt_tokens}"
        )
    return list(ids)
