"""AsyncEngine: one LLMEngine stepped by one background thread, fed by asyncio.

The engine is not thread-safe, so exactly one thread (the engine loop) calls
it. Callers on the asyncio event loop hand it commands through a queue
(add a batch of requests, abort requests, stop) and get each request's
outputs back through the asyncio queue of its ``RequestStream``
(``loop.call_soon_threadsafe``, once per step for all outputs of the step).

The loop, once per iteration:
  1. takes every queued command (blocking only when the engine is idle);
  2. runs one ``engine.step()`` if any request is unfinished;
  3. hands the step's outputs to their streams and publishes a snapshot of
     the engine's load (``load``) for /metrics and the admission check.

Host only: this file imports no jax (the engine is built by the caller).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EngineRequest:
    """One engine request: what ``LLMEngine.add_request`` takes."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: object  # jpaged.sampling_params.SamplingParams


class EngineStopped(RuntimeError):
    """The engine loop is shutting down or has died: no request is taken."""


class QueueFull(RuntimeError):
    """Too many requests are unfinished; try again later."""


def engine_limits(engine) -> dict:
    """What the server checks requests against: model name, max_model_len,
    max_num_seqs, vocab_size (fixed once the engine is built)."""
    cfg = engine.config
    return dict(model=cfg.model, max_model_len=cfg.max_model_len,
                max_num_seqs=cfg.max_num_seqs, vocab_size=engine.model.config.vocab_size)


def engine_load(engine) -> dict:
    """The engine's load: requests running / waiting / swapped, KV blocks
    (free device blocks count the prefix-cached ones, which a request may
    revive), free host swap blocks, preemptions and generated tokens. With engine_limits, the only reader
    of engine internals here, so a rename inside the engine is adapted in
    one place."""
    sched, bm = engine.scheduler, engine.block_manager
    return dict(num_running=len(sched.running), num_waiting=len(sched.waiting),
                num_swapped=len(sched.swapped),
                num_free_blocks=bm.get_num_free_gpu_blocks(),
                num_total_blocks=bm.get_num_total_gpu_blocks(),
                num_cached_blocks=bm.gpu_allocator.get_num_cached_blocks(),
                num_free_cpu_blocks=bm.get_num_free_cpu_blocks(),
                num_preemptions=engine.stats.num_preemptions,
                num_generated_tokens=engine.stats.num_generated_tokens,
                num_steps=engine.stats.num_steps)


class RequestStream:
    """The outputs of one batch of requests, read on the event loop.

    ``async for index, output in stream`` yields (position of the request in
    the batch, RequestOutput) until every request has finished; ``close()``
    aborts those that have not (call it in a ``finally``)."""

    def __init__(self, owner: AsyncEngine, requests: list[EngineRequest]):
        self._owner = owner
        self.requests = requests
        self.index = {r.request_id: i for i, r in enumerate(requests)}
        self.unfinished = set(self.index)
        self.accepted: asyncio.Future = owner._loop.create_future()
        # NOTE: a rejection that arrives after its waiter was cancelled is not an error.
        self.accepted.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue: asyncio.Queue = asyncio.Queue()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.unfinished and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return self.index[item.request_id], item

    def ready(self) -> list:
        """The (index, output) pairs already queued, taken without waiting
        (an error queued among them is raised when it is reached)."""
        items = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, BaseException):
                if items:  # hand out what came before it; raise it next time
                    self._queue.put_nowait(item)
                    return items
                raise item
            items.append((self.index[item.request_id], item))
        return items

    def close(self) -> None:
        """Aborts the requests not finished yet (no-op once all are)."""
        if self.unfinished:
            ids = list(self.unfinished)
            self._owner._release(self, ids)
            self._owner.num_aborted += len(ids)
            self._owner._inbox.put(("abort", ids))

    # -------------------------------------------------- event-loop side
    def _deliver(self, item) -> None:
        if isinstance(item, BaseException):
            self._owner._release(self, list(self.unfinished))
        elif item.finished and item.request_id in self.unfinished:
            self._owner._release(self, [item.request_id])
        self._queue.put_nowait(item)


class AsyncEngine:
    """Runs `engine` in a background thread for asyncio callers.

    Args:
      engine: an LLMEngine (``LLM(...).engine``); from ``start`` on only the
        loop thread touches it, until ``shutdown`` returns.
      max_num_requests: unfinished requests held at once (running and
        waiting); ``add`` raises ``QueueFull`` beyond it.
    """

    def __init__(self, engine, max_num_requests: int):
        assert max_num_requests >= 1
        self.engine = engine
        self.max_num_requests = max_num_requests
        # Event-loop side: requests added and neither finished nor aborted,
        # and requests aborted by close() (a client gone, a shutdown).
        self.num_unfinished = 0
        self.num_aborted = 0
        self.load = engine_load(engine)  # replaced whole by the loop thread
        self.error: BaseException | None = None  # why the loop died, if it did
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # _closed and the last puts into _inbox
        self._closed = False  # the loop thread takes no more commands
        self._stopping = False
        self._streams: dict[str, RequestStream] = {}  # loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -------------------------------------------------- event-loop API
    def start(self) -> None:
        """Starts the loop thread; call from the event loop that reads outputs."""
        assert self._thread is None, "started twice"
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="jpaged-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and not self._closed and not self._stopping

    async def add(self, requests: list[EngineRequest]) -> RequestStream:
        """Queues a batch of requests, all or none.

        Returns: their RequestStream, once the engine has taken them.
        Raises: QueueFull; EngineStopped; ValueError from add_request for a
        malformed request (its message names it; none of the batch is
        queued); another exception if add_request failed otherwise.
        """
        with self._lock:
            if not self.is_running:
                raise EngineStopped("the server is shutting down" if self._stopping else
                                    f"the engine loop has stopped: {self.error!r}")
            stream = RequestStream(self, requests)
            if self.num_unfinished + len(requests) > self.max_num_requests:
                raise QueueFull(
                    f"the server holds {self.num_unfinished} unfinished requests, at most "
                    f"{self.max_num_requests}; retry later")
            self.num_unfinished += len(requests)
            self._inbox.put(("add", stream))
        try:
            await asyncio.shield(stream.accepted)
        except asyncio.CancelledError:
            stream.close()  # the caller left while it was queued: abort it once it is
            raise
        except BaseException:
            self._release(stream, list(stream.unfinished))  # rejected: nothing is queued
            raise
        return stream

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Aborts every unfinished request and stops the loop thread."""
        self._stopping = True
        if self._thread is None:
            return
        self._inbox.put(("stop", None))
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            logger.error("the engine loop did not stop within %.0f s", timeout)

    def _release(self, stream: RequestStream, ids) -> None:
        for rid in ids:
            if rid in stream.unfinished:
                stream.unfinished.discard(rid)
                self.num_unfinished -= 1

    # -------------------------------------------------- loop thread
    def _run(self) -> None:
        eng = self.engine
        reason = EngineStopped("the server is shutting down")
        try:
            while self._take_commands(block=not eng.has_unfinished_requests()):
                if eng.has_unfinished_requests():
                    self._hand_out(eng.step())
                self.load = engine_load(eng)
        except BaseException as e:  # a bug: fail every request rather than hang them
            logger.exception("the engine loop died")
            self.error = e
            reason = EngineStopped(f"the engine loop died: {e!r}")
        with self._lock:
            self._closed = True
        left = []
        while True:
            try:
                left.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        streams = {id(s): s for s in self._streams.values()}
        streams.update({id(arg): arg for kind, arg in left if kind == "add"})
        if self._streams:
            eng.abort_request(list(self._streams))
        self._streams.clear()
        for s in streams.values():
            self._call(s.accepted.set_exception, reason)
        self._call(_deliver_all, [(s, reason) for s in streams.values()])
        self.load = engine_load(eng)

    def _take_commands(self, block: bool) -> bool:
        """Runs the queued commands; False once told to stop."""
        while True:
            try:
                kind, arg = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                self._add(arg)
            elif kind == "abort":
                self._drop(arg)
            else:
                raise AssertionError(f"unknown command {kind!r}")

    def _add(self, stream: RequestStream) -> None:
        added = []
        try:
            for r in stream.requests:
                self.engine.add_request(r.request_id, r.prompt, r.sampling_params,
                                        prompt_token_ids=r.prompt_token_ids)
                added.append(r.request_id)
                self._streams[r.request_id] = stream
        except Exception as e:  # ValueError: malformed; anything else: a bug, this batch only
            if not isinstance(e, ValueError):
                logger.exception("add_request failed")
            self._drop(added)
            self._call(stream.accepted.set_exception, e)
        else:
            self._call(stream.accepted.set_result, None)

    def _drop(self, ids) -> None:
        self.engine.abort_request(ids)
        for rid in ids:
            self._streams.pop(rid, None)

    def _hand_out(self, outputs) -> None:
        items = []
        for out in outputs:
            stream = (self._streams.pop(out.request_id, None) if out.finished
                      else self._streams.get(out.request_id))
            if stream is not None:
                items.append((stream, out))
        if items:
            self._call(_deliver_all, items)

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(_ignore_done, fn, *args)
        except RuntimeError:  # the event loop is closed: nobody waits any more
            pass


def _deliver_all(items) -> None:
    for stream, item in items:
        stream._deliver(item)


def _ignore_done(fn, *args) -> None:
    """Runs fn(*args); a future set after its waiter gave up is fine."""
    try:
        fn(*args)
    except asyncio.InvalidStateError:
        pass
