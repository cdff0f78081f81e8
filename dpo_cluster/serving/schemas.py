"""Request bodies of the HTTP API, validated with pydantic (the only place pydantic is used).

Shapes follow OpenAI's chat and completions APIs closely enough that the official `openai`
client works unchanged: unknown fields are ignored (clients send `user`, `presence_penalty`...),
while fields this server cannot honour with a non-default value (`n` > 1, `logprobs`) are a 400
rather than silently ignored. `/v1/compare` and arena battles take the same sampling fields with
one prompt: a text `prompt` or a chat `messages`; an arena battle's follow-up turn takes only the
next user message.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4


def _encodable(value: str) -> str:
    # JSON may carry a lone UTF-16 surrogate ("\ud800"): a valid JSON string, but no Unicode
    # text, so neither a tokenizer nor a JSON response could encode it.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"not valid Unicode text: a lone surrogate U+{ord(value[error.start]):04X} at character {error.start}"
        ) from None
    return value


# Every text field of a request: Unicode that encodes as UTF-8.
Text = Annotated[str, AfterValidator(_encodable)]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: Text


class Sampling(BaseModel):
    """Sampling fields shared by every generating route."""

    model_config = ConfigDict(extra="ignore")

    # OpenAI's names for the token budget (the newer one wins) and this API's own.
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: Text | list[Text] | None = None
    n: int = 1
    logprobs: bool | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("n")
    @classmethod
    def _check_n(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("logprobs")
    @classmethod
    def _check_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    def requested_tokens(self) -> int | None:
        return self.max_new_tokens or self.max_completion_tokens or self.max_tokens

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(Sampling):
    model: Text
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(Sampling):
    model: Text
    # OpenAI also allows a list of prompts; one prompt per request here (a one-item list is fine).
    prompt: Text | list[Text]
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class OnePrompt(Sampling):
    """`/v1/compare` and arena battles: a text prompt or a chat, both models answer it."""

    prompt: Text | None = None
    messages: list[Message] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> OnePrompt:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'messages' (a chat)")
        return self

    def message_dicts(self) -> list[dict[str, str]] | None:
        return None if self.messages is None else [m.model_dump() for m in self.messages]


class BattleRequest(OnePrompt):
    """`POST /v1/arena/battles`: as `OnePrompt`; `stream` sends both answers as server-sent events
    while they are generated instead of one JSON body at the end."""

    stream: bool = False


class TurnRequest(BaseModel):
    """`POST /v1/arena/battles/{id}/turns`: the user's next message of a chat battle. The sampling
    parameters are the battle's own, so both sides keep being asked the same way; a sampling field
    here would be silently ignored, so any unknown field is a 400."""

    model_config = ConfigDict(extra="forbid")

    content: Text
    stream: bool = False

    @field_validator("content")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the follow-up message must not be empty")
        return value


class VoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    winner: Literal["A", "B", "tie", "both_bad"]


class QueuedPairRequest(BaseModel):
    """`POST /v1/arena/queue`: two answers already written (a preference round's candidates) to one
    prompt, put before voters as a blind battle. `answers` maps a label of each answer (returned
    with the vote, never shown before it) to its text."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text | None = None
    messages: list[Message] | None = Field(default=None, min_length=1)
    answers: dict[Text, Text]

    @model_validator(mode="after")
    def _check(self) -> QueuedPairRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'messages' (a chat)")
        if len(self.answers) != 2 or not all(label.strip() for label in self.answers):
            raise ValueError("answers: expected exactly two answers under two non-empty labels")
        return self

    def message_dicts(self) -> list[dict[str, str]] | None:
        return None if self.messages is None else [m.model_dump() for m in self.messages]
