"""The model replicas of the serve app: one Ray Serve deployment per generation engine.

Both answer the same calls from the front (`generate`, `stream`, `describe`, `check_health`) with
the same request and result types, so the gateway, the routes and the arena do not know which
engine runs behind a name. `ModelServer` runs the transformers backend, batched by `@serve.batch`,
its decode loop in a worker thread so the replica's event loop keeps taking requests while a
batch computes; `VLLMServer` hands every request straight to a vLLM engine, whose own scheduler
batches them continuously.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from dpo_cluster.serving.generation import (
    GenerationRequest,
    GenerationResult,
    StreamDelta,
    TransformersBackend,
)

_END = object()


@serve.deployment
class ModelServer:
    """Hosts one set of weights and serves one or more names from it (see TransformersBackend)."""

    def __init__(
        self,
        weights: str,
        names: dict[str, str | None],
        *,
        device: str | None,
        dtype: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        self.backend = TransformersBackend(weights, names, device=device, dtype=dtype)
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.failure: BaseException | None = None

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        try:
            return await asyncio.to_thread(self.backend.generate, requests)
        except (RuntimeError, MemoryError) as error:  # a broken device: let Serve replace us
            self.failure = error
            raise

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.backend.validate(request)  # a bad request fails alone, not the batch it would join
        return await self.generate_batch(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Deltas of one generation, computed in a thread and handed over through a queue; a
        client that goes away stops the computation at its next step."""
        self.backend.validate(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            try:
                for delta in self.backend.stream(request):
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
                    if stop.is_set():
                        break
            except BaseException as error:  # re-raised on the event loop below
                loop.call_soon_threadsafe(queue.put_nowait, error)
            loop.call_soon_threadsafe(queue.put_nowait, _END)

        worker = asyncio.ensure_future(asyncio.to_thread(produce))
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            await asyncio.shield(worker)

    def describe(self) -> dict[str, Any]:
        return self.backend.describe()

    def check_health(self) -> None:
        if self.failure is not None:
            raise RuntimeError(f"generation failed on this replica: {self.failure!r}")


@serve.deployment
class VLLMServer:
    """Hosts one vLLM engine serving one or more names (see VLLMBackend)."""

    def __init__(
        self, weights: str, names: dict[str, str | None], *, dtype: str, engine: dict[str, Any]
    ) -> None:
        from dpo_cluster.serving.generation.vllm_backend import VLLMBackend

        self.backend = VLLMBackend(weights, names, dtype=dtype, **engine)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self.backend.generate(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        # Checked before the first delta, so the front answers a refused request with a 400.
        self.backend.validate(request)
        async for delta in self.backend.stream(request):
            yield delta

    def describe(self) -> dict[str, Any]:
        return self.backend.describe()

    async def check_health(self) -> None:
        await self.backend.check_health()

    def __del__(self) -> None:
        # Serve calls this when the replica goes away: stop the engine's processes with it.
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.shutdown()
