"""The inference engine: one thread that owns every loaded model, fed through a queue, answering asyncio code.

Model compute never runs on the event loop. A route submits a ticket and awaits its admission future (the
engine tokenizes, checks the context and loads the model first, so errors come back before any streaming
starts), then reads the ticket's asyncio queue, which the engine thread fills with
``loop.call_soon_threadsafe``. Cancelling a ticket (client gone) is a flag the engine reads before every
step; the row leaves the batch at the next step.

When the engine is idle, the first request waits ``inference_batch_window_ms`` for others to join it, so a
burst of requests shares its first forward pass. Torch is imported on the engine thread, on first use.
A model that is not in memory yet loads on the loader thread (``load_thread.py``): its requests wait there while
the engine keeps decoding for the models already loaded, and are admitted once the load is back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from api.core.errors import InternalError, ServiceError, ServiceUnavailable
from api.core.gc_pauses import freeze_long_lived
from api.core.settings import Settings
from serving.load_thread import LaneLoader, LoadFinished
from serving.types import (
    Admission,
    Choice,
    ChoiceFinished,
    ClassificationRequest,
    ClassificationResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationDone,
    GenerationRequest,
    TextDelta,
)

logger = logging.getLogger(__name__)

_STOP = object()


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class Ticket:
    """A request in flight between the event loop (which awaits it) and the engine thread (which fills it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request: Any) -> None:
        self.loop = loop
        self.request = request
        self.done: asyncio.Future = loop.create_future()  # admission (generation) or the result
        self.cancelled = False  # set by the loop side, read by the engine thread

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancelled = True

    def resolve(self, value: Any) -> None:
        self._call(_resolve, self.done, value)

    def reject(self, error: BaseException) -> None:
        self._call(_reject, self.done, error)

    def cancel(self) -> None:
        self.cancelled = True


class GenerationTicket(Ticket):
    """Events come as lists (one list per engine step): TextDelta, ChoiceFinished, then GenerationDone; or
    a ServiceError when the engine failed mid-way."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request: GenerationRequest) -> None:
        super().__init__(loop, request)
        self.events: asyncio.Queue = asyncio.Queue()
        self.admission: Admission | None = None
        # engine-thread bookkeeping
        self.rows_left = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def admit(self, admission: Admission) -> None:
        self.resolve(admission)

    def post(self, events: list) -> None:
        self._call(self.events.put_nowait, events)

    async def stream(self) -> AsyncIterator[TextDelta | ChoiceFinished | GenerationDone]:
        """The request's events in order, ending with GenerationDone; raises the engine's error if one came."""
        while True:
            for event in await self.events.get():
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, GenerationDone):
                    return

    async def collect(self) -> tuple[list[Choice], GenerationDone]:
        """Every choice's full text and finish reason (the non-streaming answer)."""
        choices = [Choice(index=i) for i in range(self.admission.choices)]
        async for event in self.stream():
            if isinstance(event, TextDelta):
                choices[event.index].text += event.text
                choices[event.index].logprobs.extend(event.logprobs)
            elif isinstance(event, ChoiceFinished):
                choices[event.index].finish_reason = event.finish_reason
                choices[event.index].completion_tokens = event.completion_tokens
            else:
                return choices, event
        raise RuntimeError("generation ended without a GenerationDone event")


class InferenceEngine:
    """Start with ``start()`` (or implicitly on first use), stop with ``stop()``; both are idempotent."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self.scheduler = None  # built on the engine thread
        self._snapshot: dict = {"decoding": 0, "waiting": 0, "lanes": [], "loaded_bytes": 0}

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="svfit-inference", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            thread, self._stopping = self._thread, True
        if thread is None:
            return
        self._inbox.put(_STOP)
        thread.join(timeout)
        self._thread = None

    def stats(self) -> dict:
        """Rows decoding and waiting, loaded lanes: a snapshot the engine refreshes after every step."""
        return dict(self._snapshot)

    # -- submission (event loop side) --------------------------------------------------------------------

    def _submit(self, ticket: Ticket) -> None:
        if self._stopping:
            raise ServiceUnavailable("The inference engine is shutting down.")
        self.start()
        self._inbox.put(ticket)

    async def generate(self, request: GenerationRequest) -> GenerationTicket:
        """Queue a generation and wait until the engine accepted it (or raise its ServiceError)."""
        ticket = GenerationTicket(asyncio.get_running_loop(), request)
        self._submit(ticket)
        try:
            ticket.admission = await ticket.done
        except BaseException:
            ticket.cancel()
            raise
        return ticket

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        return await self._answer(request)

    async def classify(self, request: ClassificationRequest) -> ClassificationResult:
        return await self._answer(request)

    async def _answer(self, request: Any) -> Any:
        """Queue a one-shot request (no stream) and wait for its result or its ServiceError."""
        ticket = Ticket(asyncio.get_running_loop(), request)
        self._submit(ticket)
        try:
            return await ticket.done
        except BaseException:
            ticket.cancel()
            raise

    # -- the engine thread -------------------------------------------------------------------------------

    def _take(self, block: bool) -> list:
        """Commands waiting in the inbox. When idle, block for the first, then gather for the window."""
        items = []
        if block:
            items.append(self._inbox.get())
            deadline = time.monotonic() + self.settings.inference_batch_window_ms / 1000
            while len(items) < self.settings.inference_max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    items.append(self._inbox.get(timeout=remaining))
                except queue.Empty:
                    break
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _run(self) -> None:
        import torch

        from serving.scheduler import Scheduler

        freeze_long_lived("inference library")  # before any model loads: those must stay collectable
        torch.set_grad_enabled(False)  # grad mode is per thread: this one never trains
        if self.settings.inference_threads:
            torch.set_num_threads(self.settings.inference_threads)  # process-wide: the API only serves
        try:
            scheduler = self.scheduler = Scheduler(self.settings)
        except Exception as exc:  # noqa: BLE001 - a bad setting must fail requests, not hang them
            logger.exception("the inference engine could not start")
            self._drain_failing(ServiceUnavailable(f"The inference engine could not start: {exc}"))
            return
        loader = LaneLoader(self._inbox.put)
        while True:
            commands = self._take(block=not scheduler.has_work)
            if any(c is _STOP for c in commands):
                error = ServiceUnavailable("The inference engine is shutting down.")
                for c in [*commands, *loader.abandon()]:
                    if isinstance(c, Ticket):
                        c.reject(error)
                scheduler.fail_all(error)
                self._drain_failing(error)
                return
            with torch.inference_mode():
                for item in commands:
                    if isinstance(item, LoadFinished):
                        self._install(scheduler, loader, loader.finish(item))
                    else:
                        self._handle(scheduler, loader, item)
                scheduler.step()
            self._snapshot = {**scheduler.snapshot(), "loading": loader.loading}

    def _handle(self, scheduler, loader: LaneLoader, ticket: Ticket) -> None:
        if ticket.cancelled:
            return
        try:
            request = ticket.request
            key = scheduler.lane_key(request.ref, embedding=isinstance(request, EmbeddingRequest))
            lane = scheduler.loaded_lane(key)
            if lane is None:
                loader.wait_for(key, ticket, functools.partial(_build_lane, scheduler, request.ref, key))
            elif isinstance(ticket, GenerationTicket):
                scheduler.admit(ticket, lane)
            elif isinstance(request, EmbeddingRequest):
                ticket.resolve(scheduler.embed(request, lane))
            else:
                ticket.resolve(scheduler.classify(request, lane))
        except ServiceError as exc:
            ticket.reject(exc)
        except Exception:  # noqa: BLE001 - reported to this request, the engine goes on
            logger.exception("inference request failed")
            ticket.reject(InternalError("The server had an error while processing your request."))

    def _install(self, scheduler, loader: LaneLoader, finished: LoadFinished) -> None:
        """Keep a lane the loader brought back and admit the requests that waited for it, or fail them all."""
        try:
            lane = finished.outcome.result()
        except ServiceError as exc:
            error = exc
        except Exception:  # noqa: BLE001 - build_lane maps load errors; anything else is ours
            logger.exception("loading %s failed", finished.key)
            error = InternalError("The server had an error while loading the model.", code="model_load_failed")
        else:
            scheduler.install(finished.key, lane)
            for ticket in finished.waiting:
                self._handle(scheduler, loader, ticket)
            return
        for ticket in finished.waiting:
            ticket.reject(error)

    def _drain_failing(self, error: ServiceError) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Ticket):
                item.reject(error)


def _build_lane(scheduler, ref, key: tuple):
    """Runs on the loader thread; inference mode as on the engine thread, where the lane will be used."""
    import torch

    with torch.inference_mode():
        return scheduler.build_lane(ref, key)
