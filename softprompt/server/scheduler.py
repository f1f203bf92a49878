"""Dynamic batching: requests from any client and task are queued and run as mixed-task engine batches.

A request is prepared (checked, rendered, tokenised: :meth:`Engine.prepare`) in the submitting thread,
never in the batch loop, and is queued only once it is valid; the requests of one HTTP request are
admitted together or not at all. One worker thread owns the engine calls, under one of two policies:

- ``continuous`` (default): generations join a :class:`~softprompt.engine.running.RunningBatch` at every
  decode step, as soon as there is room, and leave it as soon as they end; classification and scoring
  requests run between two decode steps, at most ``max_batch_requests`` of them between two steps (oldest
  first), so a large classification request does not hold the running generations' streams until all of
  its inputs are done. A short request never waits for a long generation to finish.
- ``batch``: wait for a first request, keep collecting until the batch is full (``max_batch_requests``)
  or ``max_wait_ms`` has passed, then run each kind of request as one engine call to completion; requests
  arriving meanwhile wait for the next batch. Kept for comparison (``benchmarks/server.py``), and used on
  a model whose attention the running batch does not reproduce (:meth:`Engine.continuous_problem`).

Between clients, the order is fair (:class:`~softprompt.server.fair.FairQueue`): under both policies the
waiting requests are taken round-robin over their clients (each client's own in arrival order), so a client
with hundreds of texts queued delays another client's request by one turn, not by all of them; with
``max_queue_per_client`` one client cannot fill the queue either (the others are still admitted).

A batch that fails, whatever the exception, is split in halves and run again until the failing request
fails alone (the running batch does the same per forward). A cancelled request (its client went away) is
skipped before it runs, and a generation leaves at its next token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from softprompt.engine import EngineError
from softprompt.engine.running import OnToken, RunningBatch  # a job's streaming hook: (tokens, logprobs)
from softprompt.server.fair import FairQueue

log = logging.getLogger("softprompt.server")

KINDS = ("classify", "generate", "score")
POLICIES = ("continuous", "batch")


class QueueFullError(Exception):
    """The scheduler's queue is at ``max_queue``, or the client's share of it (HTTP 429)."""


class OverShareError(Exception):
    """A request with more texts than the whole queue or a client's whole share of it: it can never be admitted,
    so retrying cannot help (HTTP 400, not 429)."""


@dataclass
class Job:
    """One prepared request waiting for (or in) a batch; :meth:`cancel` when its client is gone."""

    kind: str
    item: object  # the engine's Prepared request
    future: Future
    on_token: OnToken | None = None
    client: str = ""  # whose request (the fair order and the per-client share of the queue)
    queued: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    first_token: float | None = None  # seconds from queued to its first generated token

    def token(self, tokens: list[int], logprobs: list | None, observe: Callable[[float], None] | None) -> None:
        """A new token: time the first, then stream."""
        if self.first_token is None:
            self.first_token = time.perf_counter() - self.queued
            if observe is not None:
                observe(self.first_token)
        if self.on_token is not None:
            self.on_token(tokens, logprobs)

    def cancel(self) -> None:
        """Drop the request: skipped if it has not run yet, stopped at its next token if generating."""
        self.cancelled.set()
        self.future.cancel()


@dataclass
class SchedulerStats:
    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    failed: int = 0
    cancelled: int = 0
    batch_seconds: float = 0.0
    steps: int = 0  # decode steps of the running batch (continuous policy)
    running: int = 0  # generations in the running batch now
    slot_bytes: int = 0  # bytes of its key/value slots now
    slot_tokens: int = 0  # tokens they hold


class Scheduler:
    """Queue + worker thread in front of an :class:`Engine`.

    Args:
        engine: the engine to call (only this scheduler's thread calls it).
        max_batch_requests: most requests per engine call (the engine splits their rows into forwards of
            at most its ``max_batch_rows``).
        max_wait_ms: how long the first request of a batch may wait for company.
        max_queue: most requests waiting (>= 1); more are refused with :class:`QueueFullError`, a request of
            more texts than ``max_queue`` with :class:`OverShareError`.
        max_queue_per_client: most requests of one client waiting (0: no share, only ``max_queue``); more of
            that client's are refused with :class:`QueueFullError`, the other clients' still admitted; a
            request of more texts than the whole share with :class:`OverShareError`.
        policy: ``continuous`` or ``batch`` (see the module docstring); ``continuous`` on a model the running
            batch cannot serve falls back to ``batch`` with a logged warning (``self.policy`` says which runs).
        observe_ttft: called with each generation's seconds from queued to its first token (metrics).
    """

    def __init__(self, engine, max_batch_requests: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 policy: str = "continuous", observe_ttft: Callable[[float], None] | None = None,
                 max_queue_per_client: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 (no request could ever be admitted), got {max_queue}")
        self.engine = engine
        self.max_batch_requests, self.max_wait, self.max_queue = max_batch_requests, max_wait_ms / 1000, max_queue
        self.max_queue_per_client = max_queue_per_client
        self.policy, self.observe_ttft = policy, observe_ttft
        if policy == "continuous":
            problem = engine.continuous_problem()
            if problem:
                log.warning("scheduling batch-at-a-time: %s", problem)
                self.policy = "batch"
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._pending = FairQueue()  # generations taken from the queue, waiting for room to run
        self._scoring = FairQueue()  # classify/score jobs taken from the queue, waiting for their turn
        self._backlog = FairQueue()  # batch policy: jobs taken from the queue, waiting for a batch
        self._waiting = 0  # admitted requests not yet taken from the queue
        self._by_client: Counter[str] = Counter()  # admitted requests not yet running, per client
        self._admit_lock = threading.Lock()
        self.stats = SchedulerStats()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the worker thread (again, after :meth:`stop`)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                loop = self._run_continuous if self.policy == "continuous" else self._run
                self._thread = threading.Thread(target=loop, name="softprompt-scheduler", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Finish the queued requests, then end the worker thread."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._q.put(None)
                self._thread.join(timeout=60)
            self._thread = None

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive (it serves every request)."""
        return self._thread is not None and self._thread.is_alive()

    def depth(self) -> int:
        """Requests admitted and not yet running."""
        return self._waiting + len(self._pending) + len(self._scoring) + len(self._backlog)

    def clients_waiting(self) -> int:
        """How many clients have requests admitted and not yet running."""
        with self._admit_lock:
            return len(self._by_client)

    def _check_running(self) -> None:
        if not self.running:
            raise RuntimeError("the scheduler is not running: call start() first")

    def _check_room(self, n: int, client: str) -> None:
        if n > self.max_queue:
            raise OverShareError(f"this request brings {n} texts, more than the whole queue holds (--max-queue "
                                 f"{self.max_queue}): it can never be admitted; send at most {self.max_queue} per "
                                 "request")
        waiting = self.depth()
        if waiting + n > self.max_queue:
            raise QueueFullError(f"queue full ({waiting} of {self.max_queue} requests waiting; this one "
                                 f"brings {n}); retry later")
        share = self.max_queue_per_client
        if not share:
            return
        if n > share:
            raise OverShareError(f"this request brings {n} texts, more than a client's whole share of the queue "
                                 f"({share}): it can never be admitted; send at most {share} per request")
        mine = self._by_client.get(client, 0)
        if mine + n > share:
            raise QueueFullError(f"this client's share of the queue is full ({mine} of its {share} requests "
                                 f"waiting; this one brings {n}); retry later")

    def submit_many(self, kind: str, requests: list, on_token: OnToken | None = None, client: str = "",
                    ) -> list[Job]:
        """Prepare ``requests`` here (the caller's thread), then queue all of them or none; ``client`` names
        whose they are (the fair order between clients and ``max_queue_per_client``).

        Raises:
            QueueFullError: they do not all fit in the queue (nothing is queued).
            EngineError: a request is invalid (nothing is queued).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r}")
        self._check_running()
        if not isinstance(client, str):
            raise TypeError(f"client must be a str, got {type(client).__name__}")
        self._check_room(len(requests), client)  # before tokenising anything: an overloaded server answers at once
        many = len(requests) > 1
        items = [self.engine.prepare(kind, r, i if many else None) for i, r in enumerate(requests)]
        jobs = [Job(kind, item, Future(), on_token, client) for item in items]
        with self._admit_lock:
            self._check_room(len(jobs), client)
            self._waiting += len(jobs)
            self._by_client[client] += len(jobs)
        for job in jobs:
            self._q.put(job)
        return jobs

    def submit(self, kind: str, request, on_token: OnToken | None = None, client: str = "") -> Future:
        """Queue one request; the future resolves to the engine's result or raises its error."""
        try:
            (job,) = self.submit_many(kind, [request], on_token, client)
        except EngineError as e:
            failed: Future = Future()
            failed.set_exception(e)
            return failed
        return job.future

    def _take(self, block: bool, timeout: float | None = None) -> Job | None:
        job = self._q.get(block, timeout)
        if job is not None:
            with self._admit_lock:
                self._waiting -= 1
        return job

    def _pop(self, waiting: FairQueue) -> Job:
        """The next job of ``waiting`` in the fair order; it no longer counts toward its client's share."""
        job = waiting.pop()
        with self._admit_lock:
            self._by_client[job.client] -= 1
            if self._by_client[job.client] <= 0:
                del self._by_client[job.client]
        return job

    def _gather(self, jobs: list[Job], held: int = 0) -> tuple[list[Job], bool]:
        """``jobs`` and what arrives within ``max_wait`` while they and the ``held`` ones are short of a batch,
        then every job queued now (all of them take part in the fair order); True when the stop sentinel was
        among them."""
        deadline = time.perf_counter() + self.max_wait
        while held + len(jobs) < self.max_batch_requests:
            left = deadline - time.perf_counter()
            try:
                job = self._take(True, left) if left > 0 else self._take(False)
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        more, stopping = self._drain()
        return jobs + more, stopping

    def _run(self) -> None:
        stopping = False
        while not (stopping and not len(self._backlog)):
            if not stopping:
                if not len(self._backlog):
                    first = self._take(True)
                    if first is None:
                        return
                    self._backlog.push(first)
                more, stopping = self._gather([], len(self._backlog))
                self._backlog.extend(more)
            jobs = [self._pop(self._backlog) for _ in range(min(len(self._backlog), self.max_batch_requests))]
            t0 = time.perf_counter()
            for kind in KINDS:
                group = [j for j in jobs if j.kind == kind]
                if group:
                    self._execute(kind, group)
            self.stats.batches += 1
            self.stats.rows += len(jobs)
            self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
            self.stats.batch_seconds += time.perf_counter() - t0

    def _run_continuous(self) -> None:
        batch = RunningBatch(self.engine, max_rows=self.max_batch_requests)
        stopping = False
        while not (stopping and not len(batch) and not self._pending and not self._scoring):
            idle = not len(batch) and not self._pending and not self._scoring
            jobs: list[Job] = []
            if not stopping:
                if idle:  # nothing to step: wait for work, and a little company for it
                    first = self._take(True)
                    if first is None:
                        return
                    jobs, stopping = self._gather([first])
                else:
                    jobs, stopping = self._drain()
            self._pending.extend(j for j in jobs if j.kind == "generate")
            self._scoring.extend(j for j in jobs if j.kind != "generate")
            t0 = time.perf_counter()
            turn = [self._pop(self._scoring) for _ in range(min(len(self._scoring), self.max_batch_requests))]
            for kind in ("classify", "score"):  # between two decode steps, a bounded share
                group = [j for j in turn if j.kind == kind]
                if group:
                    self._execute(kind, group)
                    self._count(group)
            self._admit(batch)
            if len(batch):
                try:
                    batch.step()
                except Exception as e:  # noqa: BLE001 - no row to blame: fail the running ones, keep serving
                    log.error("decode step failed: %s: %s; failing the %d running generation(s)",
                              type(e).__name__, e, len(batch), exc_info=e)
                    batch.abort(e)
                self.stats.steps += 1
            mem = batch.memory()
            self.stats.running, self.stats.slot_bytes, self.stats.slot_tokens = mem["rows"], mem["bytes"], mem["tokens"]
            self.stats.batch_seconds += time.perf_counter() - t0

    def _drain(self) -> tuple[list[Job], bool]:
        """Every job queued now, without waiting; True when the stop sentinel was among them."""
        jobs = []
        while True:
            try:
                job = self._take(False)
            except queue.Empty:
                return jobs, False
            if job is None:
                return jobs, True
            jobs.append(job)

    def _admit(self, batch: RunningBatch) -> None:
        """Pending generations join the running batch while it has room (in the fair order)."""
        while self._pending:
            job = self._pending.peek()
            # a cancelled job leaves first: a large one whose client left blocked the live ones behind it until
            # the running batch had room for it
            if not (job.cancelled.is_set() or job.future.cancelled()) and not batch.room(job.item):
                break
            self._pop(self._pending)
            if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
                self.stats.cancelled += 1
                continue
            try:
                batch.admit(job.item, lambda toks, lps, job=job: job.token(toks, lps, self.observe_ttft),
                            job.cancelled.is_set, lambda res, job=job: self._settle(job, res))
            except Exception as e:  # noqa: BLE001 - it fails alone
                self._fail(job, e)
                continue
            self.stats.rows += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))

    def _settle(self, job: Job, res) -> None:
        if isinstance(res, BaseException):
            self._fail(job, res)
        elif not job.future.done():
            job.future.set_result(res)

    def _count(self, jobs: list[Job]) -> None:
        self.stats.batches += 1
        self.stats.rows += len(jobs)
        self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))

    def _call(self, kind: str, jobs: list[Job]):
        items = [j.item for j in jobs]
        hook = (lambda i, toks, lps: jobs[i].token(toks, lps, self.observe_ttft)) if kind == "generate" else None
        return self.engine.run(kind, items, on_token=hook, cancelled=lambda i: jobs[i].cancelled.is_set(),
                               return_errors=True)

    def _execute(self, kind: str, jobs: list[Job]) -> None:
        live = []
        for j in jobs:
            if not j.cancelled.is_set() and j.future.set_running_or_notify_cancel():
                live.append(j)
            else:
                self.stats.cancelled += 1
        if live:
            self._isolate(kind, live)

    def _isolate(self, kind: str, jobs: list[Job]) -> None:
        """Run ``jobs``; if that fails, run each half again, so a failing request fails alone."""
        try:
            results = self._call(kind, jobs)
        except Exception as e:  # noqa: BLE001 - whatever it is, it must not fail the other requests
            if len(jobs) == 1:
                if not isinstance(e, EngineError):
                    log.error("engine %s request failed: %s: %s", kind, type(e).__name__, e, exc_info=e)
                self._fail(jobs[0], e)
                return
            half = len(jobs) // 2
            self._isolate(kind, jobs[:half])
            self._isolate(kind, jobs[half:])
            return
        for job, res in zip(jobs, results, strict=True):  # a generation that failed alone fails alone
            if isinstance(res, BaseException):
                if not isinstance(res, EngineError):
                    log.error("engine %s request failed: %s: %s", kind, type(res).__name__, res, exc_info=res)
                self._fail(job, res)
            else:
                job.future.set_result(res)

    def _fail(self, job: Job, error: BaseException) -> None:
        self.stats.failed += 1
        job.future.set_exception(error)
