"""Dynamic batching: requests from any client and task are queued and run as mixed-task engine batches.

One worker thread owns the engine calls. It waits for a first request, keeps collecting until the batch is
full (``max_batch_size``) or ``max_wait_ms`` has passed, then runs each kind of request (classify, generate,
score) as one engine call. A request the engine rejects fails alone: the batch is retried request by
request so its neighbours still get their results.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from softprompt.engine import EngineError

log = logging.getLogger("softprompt.server")

KINDS = ("classify", "generate", "score")


class QueueFullError(Exception):
    """The scheduler's queue is at ``max_queue`` (HTTP 429)."""


@dataclass
class Job:
    kind: str
    request: object
    future: Future
    on_token: Callable[[list[int]], None] | None = None
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class SchedulerStats:
    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    failed: int = 0
    batch_seconds: float = 0.0


class Scheduler:
    """Queue + worker thread in front of an :class:`Engine`.

    Args:
        engine: the engine to call (only this scheduler's thread calls it).
        max_batch_size: most requests per engine call.
        max_wait_ms: how long the first request of a batch may wait for company.
        max_queue: most requests waiting; more are refused with :class:`QueueFullError`.
    """

    def __init__(self, engine, max_batch_size: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024):
        self.engine = engine
        self.max_batch_size, self.max_wait, self.max_queue = max_batch_size, max_wait_ms / 1000, max_queue
        self._q: queue.Queue[Job | None] = queue.Queue()
        self.stats = SchedulerStats()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the worker thread (again, after :meth:`stop`)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="softprompt-scheduler", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Finish the queued requests, then end the worker thread."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._q.put(None)
                self._thread.join(timeout=60)
            self._thread = None

    def depth(self) -> int:
        return self._q.qsize()

    def submit(self, kind: str, request, on_token: Callable[[list[int]], None] | None = None) -> Future:
        """Queue one request; the future resolves to the engine's result or raises its error."""
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r}")
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the scheduler is not running: call start() first")
        if self._q.qsize() >= self.max_queue:
            raise QueueFullError(f"queue full ({self.max_queue} requests waiting); retry later")
        job = Job(kind, request, Future(), on_token)
        self._q.put(job)
        return job.future

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        jobs, deadline = [first], time.perf_counter() + self.max_wait
        while len(jobs) < self.max_batch_size:
            left = deadline - time.perf_counter()
            try:
                job = self._q.get(timeout=max(left, 0)) if left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _run(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            jobs, stopping = self._collect(first)
            t0 = time.perf_counter()
            for kind in KINDS:
                group = [j for j in jobs if j.kind == kind]
                if group:
                    self._execute(kind, group)
            self.stats.batches += 1
            self.stats.rows += len(jobs)
            self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
            self.stats.batch_seconds += time.perf_counter() - t0
            if stopping:
                return

    def _call(self, kind: str, jobs: list[Job]):
        reqs = [j.request for j in jobs]
        if kind == "generate":
            streams = [j.on_token for j in jobs]
            hook = (lambda i, toks: streams[i](toks) if streams[i] else None) if any(streams) else None
            return self.engine.generate(reqs, on_token=hook)
        return getattr(self.engine, kind)(reqs)

    def _execute(self, kind: str, jobs: list[Job]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self._call(kind, live)
        except EngineError as e:
            if len(live) == 1:
                self._fail(live[0], e)
                return
            for job in live:  # isolate the bad request(s): each alone
                try:
                    job.future.set_result(self._call(kind, [job])[0])
                except Exception as e:  # noqa: BLE001 - delivered to the waiting request
                    self._fail(job, e)
            return
        except Exception as e:  # noqa: BLE001 - an engine bug must not kill the worker thread
            log.exception("engine %s batch of %d failed", kind, len(live))
            for job in live:
                self._fail(job, e)
            return
        for job, res in zip(live, results, strict=True):
            job.future.set_result(res)

    def _fail(self, job: Job, error: BaseException) -> None:
        self.stats.failed += 1
        job.future.set_exception(error)

