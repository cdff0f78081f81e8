"""What the HTTP front does between a validated request and the model replicas.

`Gateway` owns the served models' tokenizers and the request limits: it renders a prompt into
token ids (rejecting empty or oversize prompts with the field named), clamps the token budget,
and calls the model deployment that hosts the requested name, with a deadline. It knows nothing
of HTTP; `api_errors.py` maps its errors onto status codes. Handles are Ray Serve `DeploymentHandle`s
to `ModelServer` replicas, so one gateway can front one deployment hosting both names (a LoRA
adapter over its base) or one deployment per name (two full models).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from dpo_cluster.serving.generation import GenerationRequest, GenerationResult, SamplingParams, StreamDelta
from dpo_cluster.serving.prompts import PromptError, render_prompt_ids
from dpo_cluster.serving.schemas import Sampling

# Extra seconds the front waits beyond a request's deadline for the replica to report the
# timeout itself (queueing and transfer), before it gives up on the call.
DEADLINE_SLACK_S = 5.0


class UnknownModel(LookupError):
    def __init__(self, name: str, served: list[str]) -> None:
        super().__init__(f"model: unknown model {name!r}; this server has {', '.join(served)}")


class GenerationTimeout(TimeoutError):
    pass


@dataclass(frozen=True)
class ServedModel:
    """One name this server answers to, the source it was loaded from and who hosts it."""

    name: str
    source: str
    adapter_of: str | None  # the base it is a LoRA adapter over, None for full weights
    deployment: str


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int
    default_max_new_tokens: int
    request_timeout_s: float


@dataclass(frozen=True)
class Answer:
    """A finished generation as the routes report it."""

    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_s: float


class Gateway:
    def __init__(
        self,
        models: Mapping[str, ServedModel],
        handles: Mapping[str, Any],
        tokenizers: Mapping[str, Any],
        limits: Limits,
    ) -> None:
        self.models = dict(models)
        self.handles = dict(handles)
        self.tokenizers = dict(tokenizers)
        self.limits = limits

    def names(self) -> list[str]:
        return list(self.models)

    def resolve(self, name: str) -> str:
        """A served name from the request's `model`: the name itself or the source it was loaded
        from (so a client may say "Qwen/Qwen2.5-0.5B-Instruct" for the base)."""
        if name in self.models:
            return name
        for served in self.models.values():
            if name == served.source:
                return served.name
        raise UnknownModel(name, self.names())

    def build_request(
        self,
        name: str,
        sampling: Sampling,
        *,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
    ) -> GenerationRequest:
        """Raises PromptError naming the field for an empty or oversize prompt or token budget."""
        limits = self.limits
        requested = sampling.requested_tokens()
        if requested is not None and requested > limits.max_new_tokens:
            raise PromptError(
                "max_tokens",
                f"max_tokens: {requested} is over this server's limit of {limits.max_new_tokens}",
            )
        ids = render_prompt_ids(
            self.tokenizers[name],
            prompt=prompt,
            messages=messages,
            max_prompt_tokens=limits.max_prompt_tokens,
        )
        params = SamplingParams(
            max_new_tokens=requested or limits.default_max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=sampling.stop_strings(),
        )
        return GenerationRequest(
            model=name,
            prompt_ids=tuple(ids),
            params=params,
            deadline=time.time() + limits.request_timeout_s,
        )

    async def generate(self, request: GenerationRequest) -> Answer:
        """One generation on the replica hosting request.model. Raises GenerationTimeout."""
        started = time.perf_counter()
        response = self.handles[request.model].generate.remote(request)
        try:
            result: GenerationResult = await asyncio.wait_for(
                response, self.limits.request_timeout_s + DEADLINE_SLACK_S
            )
        except asyncio.TimeoutError:
            response.cancel()
            raise GenerationTimeout(self.timeout_message()) from None
        except ValueError as error:  # the replica refused the request (e.g. over its context)
            raise PromptError("prompt", f"prompt: {_cause(error)}") from None
        if result.finish_reason == "timeout":
            raise GenerationTimeout(self.timeout_message())
        return Answer(
            model=request.model,
            text=result.text,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason,
            latency_s=time.perf_counter() - started,
        )

    async def generate_all(self, requests: list[GenerationRequest]) -> list[Answer]:
        """Several generations at once (both sides of a comparison): the replicas batch them."""
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    async def open_stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Start a generation whose text arrives as it is made; the last delta carries
        finish_reason. The first delta is awaited here, so a request the replica refuses raises
        PromptError before the caller has sent any response."""
        stream = self.handles[request.model].options(stream=True).stream.remote(request)
        try:
            first = await stream.__anext__()
        except ValueError as error:
            raise PromptError("prompt", f"prompt: {_cause(error)}") from None

        async def deltas() -> AsyncIterator[StreamDelta]:
            yield first
            async for delta in stream:
                yield delta

        return deltas()

    async def ping(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Each model deployment's own description, or raises if one does not answer in time."""
        described = {}
        for name, handle in self.handles.items():
            described[name] = await asyncio.wait_for(handle.describe.remote(), timeout_s)
        return described

    def timeout_message(self) -> str:
        return f"generation took longer than this server's limit of {self.limits.request_timeout_s:g} s"


def _cause(error: BaseException) -> str:
    """The message of the exception a replica raised, without Ray's remote traceback."""
    cause = getattr(error, "cause", None)
    return str(cause if cause is not None else error).strip().splitlines()[-1]
