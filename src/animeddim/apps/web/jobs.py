"""The web app's jobs: one worker thread runs them in order; each has an id, so a page that
reloads mid-job follows it again (`server` streams them over HTTP).

A job's stream is JSON lines: its id and queue position (`{"job": ID, "queued": N}`), progress
(network evaluations done / total), then the result or an error. One client follows a job at a
time, and a new one takes over. A client that goes away without stopping its job leaves it
running for the app's grace (JOB_GRACE_S); if nobody reattaches by then, it is stopped, so an
abandoned job never holds the one worker. A finished job's result waits for a reattach until it
is delivered, for KEEP_RESULT_S at most (KEEP_RESULTS of them at most).

The page names each job itself (`?job=ID` on the request, kept in the tab before it is sent), so
a reload in the moment before the stream's first line came still knows which job to follow. An
id asked for (followed or stopped) before its job came is refused to that job when it comes
(HTTP 409): the page that asked has moved on, and the job would otherwise run unfollowed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse

from .checks import RequestError
from .handlers import Progress, Stopped

HEARTBEAT_S = 0.5  # while queued: how often the client is told (and checked for presence)
JOB_GRACE_S = 20.0  # a job whose client left runs on this long, waiting for a reattach (a reload)
KEEP_RESULT_S = 300.0  # a finished job's result, not yet delivered, is kept this long ...
KEEP_RESULTS = 8  # ... and this many such results at most (the oldest go first)
JOB_ID = re.compile(r"[0-9a-f]{16}")  # secrets.token_hex(8)
GIVEN_UP_KEPT = 1024  # ids asked for before their job came, remembered to refuse it (newest)


class JobQueue:
    """One worker thread runs the model jobs in order; counts what happened to them."""

    def __init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="animeddim-job")
        self.lock = threading.Lock()
        self.waiting = 0
        self.counts = {"completed": 0, "stopped": 0, "failed": 0}
        self.running = False

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"running": self.running, "waiting": self.waiting, **self.counts}

    def _run(self, work: Callable[[], dict], stop: threading.Event) -> dict:
        with self.lock:
            self.waiting -= 1
            self.running = True
        try:
            if stop.is_set():
                raise Stopped
            result = work()
            outcome = "completed"
            return result
        except Stopped:
            outcome = "stopped"
            raise
        except BaseException:
            outcome = "failed"
            raise
        finally:
            with self.lock:
                self.running = False
                self.counts[outcome] += 1

    def submit(self, work: Callable[[], dict], stop: threading.Event) -> asyncio.Future:
        with self.lock:
            self.waiting += 1
        fut = asyncio.wrap_future(self.pool.submit(self._run, work, stop))
        # A stream that ended first (the client left, the server stops) never reads the job's
        # Stopped; unread, asyncio logs it with a traceback ("Future exception was never
        # retrieved") once the future is collected. Read here; the stream reads it again.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        return fut


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


STOPPING = (
    "the server is stopping (Ctrl-C or a signal): the job was ended; start it again and retry"
)
STOPPED = "the job was stopped before it finished (POST /api/stop)"
TAKEN_OVER = "another page now follows this job (it goes on there)"


class UnknownJob(RequestError):
    """A job id that names no job held (HTTP 404)."""

    status = 404


class JobIdTaken(RequestError):
    """A job named by its client with an id already used or given up on (HTTP 409)."""

    status = 409


def _checked_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise RequestError(
            "a job id is 16 hexadecimal digits, as the first line of a job's stream gives "
            f"it; got {str(job_id)[:40]!r}"
        )
    return job_id


class Job:
    """One submitted job: its future and stop flag, its progress, and who follows it. Every
    attribute is read and written on the event loop's thread only."""

    def __init__(self, job_id: str, number: int, stop: threading.Event) -> None:
        self.id = job_id
        self.number = number  # the order of submission: the jobs ahead have smaller ones
        self.stop = stop
        self.fut: asyncio.Future  # set by Jobs.start once submitted
        self.updates: asyncio.Queue = asyncio.Queue()  # progress lines not yet streamed
        self.latest: dict[str, Any] | None = None  # the last one, streamed first on a reattach
        self.listener = 0  # which attach follows it: each new one takes over
        self.attached = True  # the request that started it follows it first
        self.ended_at: float | None = None  # loop time when it finished

    def progressed(self, msg: dict[str, Any]) -> None:
        self.latest = msg
        if self.attached:
            self.updates.put_nowait(msg)

    def attach(self) -> int:
        """Follow this job from now on; the number of this attach."""
        self.listener += 1
        self.attached = True
        if self.listener > 1:  # a reattach: lines meant for the one before are stale
            while not self.updates.empty():
                self.updates.get_nowait()
        return self.listener


def _outcome(fut: asyncio.Future) -> dict[str, Any]:
    """A finished job's last line: its result or why there is none."""
    try:
        return {"result": fut.result()}
    except RequestError as e:
        return {"error": str(e)}
    except Stopped:
        return {"error": STOPPED}
    except Exception as e:  # noqa: BLE001 - the page shows it; the server goes on
        return {"error": f"the job failed: {type(e).__name__}: {e}"}


class Jobs:
    """The jobs by id: queued and running ones, and finished ones whose outcome no client has
    received yet (kept KEEP_RESULT_S, KEEP_RESULTS of them at most). Used on the event loop."""

    def __init__(
        self, queue: JobQueue, grace_s: Callable[[], float], stopping: Callable[[], bool]
    ) -> None:
        self.queue, self.grace_s, self.stopping = queue, grace_s, stopping
        self.jobs: dict[str, Job] = {}
        self.given_up: dict[str, None] = {}  # ids asked for before their job came, oldest first
        self.submitted = 0
        self.watchers: set[asyncio.Task] = set()  # referenced, so none is collected early

    def start(self, work: Callable[[Progress], dict], job_id: str | None = None) -> Job:
        """Queue `work` as a job named `job_id` (the client's choice), else a new id."""
        if job_id is None:
            job_id = secrets.token_hex(8)
        elif _checked_id(job_id) in self.jobs or job_id in self.given_up:
            raise JobIdTaken(
                f"job id {job_id} is in use, or was followed or stopped before this request "
                "came (a page reloaded or stopped as it was sent): the job is not started; "
                "name each job with new random digits, or leave ?job= out"
            )
        loop = asyncio.get_running_loop()
        self.submitted += 1
        job = Job(job_id, self.submitted, threading.Event())

        def report(done: int, total: int) -> None:  # on the worker thread
            msg = {"progress": done, "total": total, "unit": progress.unit}
            loop.call_soon_threadsafe(job.progressed, msg)

        progress = Progress(1, report, job.stop)
        job.fut = self.queue.submit(lambda: work(progress), job.stop)
        job.fut.add_done_callback(lambda f: setattr(job, "ended_at", loop.time()))
        self._prune()
        self.jobs[job.id] = job
        self._watch(job, 0)  # a stream that never starts (its client left at once) never attaches
        return job

    def ahead(self, job: Job) -> int:
        """How many jobs run or wait before `job` (0 once it runs)."""
        return sum(j.number < job.number and not j.fut.done() for j in self.jobs.values())

    def stop(self, job: Job) -> bool:
        """Stop `job` at its next network evaluation (queued: before it starts) and forget it
        (a finished one's kept result is dropped); whether it was still queued or running."""
        running = not job.fut.done()
        job.stop.set()
        self.forget(job)
        return running

    def find(self, job_id: Any) -> Job:
        """The job named by `job_id` (from a query or a JSON body), else a RequestError."""
        if job_id is None or job_id == "":
            raise RequestError("no job given: send its id, the first line of its stream")
        _checked_id(job_id)
        self._prune()
        if job_id not in self.jobs:
            # Its request may still be on its way (the page names its job before sending
            # it): that job, should it come, is refused rather than run unfollowed.
            self.given_up[job_id] = None
            while len(self.given_up) > GIVEN_UP_KEPT:
                del self.given_up[next(iter(self.given_up))]
            raise UnknownJob(
                f"no job {job_id}: it was stopped, it ended and its result was delivered (or "
                f"kept over {KEEP_RESULT_S / 60:g} minutes), the server was restarted, or its "
                f"request (?job={job_id}) did not reach the server, and is refused should it "
                "come now; start it again"
            )
        return self.jobs[job_id]

    def forget(self, job: Job) -> None:
        self.jobs.pop(job.id, None)

    def detach(self, job: Job, listener: int) -> None:
        """Attach `listener` has ended without delivering the outcome: unless another took
        over, the job runs on for the grace period (a reload reattaches), then is stopped."""
        if job.listener != listener:
            return
        job.attached = False
        while not job.updates.empty():
            job.updates.get_nowait()
        if self.stopping():
            job.stop.set()
        elif not job.fut.done():  # a finished job's outcome waits (pruned in time)
            self._watch(job, listener)

    def _watch(self, job: Job, listener: int) -> None:
        task = asyncio.ensure_future(self._abandon(job, listener))
        self.watchers.add(task)
        task.add_done_callback(self.watchers.discard)

    async def _abandon(self, job: Job, listener: int) -> None:
        """Stop `job` unless a client attaches after `listener` within the grace period or it
        ends first; at once when the server stops (this task is cancelled then, at the latest)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s()
        try:
            while loop.time() < deadline and not self.stopping():
                await asyncio.sleep(min(HEARTBEAT_S, max(deadline - loop.time(), 0.0)))
                if job.listener != listener or job.fut.done():
                    return
        finally:
            if job.listener == listener and not job.fut.done():
                job.stop.set()
                self.forget(job)

    def _prune(self) -> None:
        """Drop the outcomes nobody came for: after KEEP_RESULT_S, and beyond KEEP_RESULTS."""
        now = asyncio.get_running_loop().time()
        ended = [
            j
            for j in self.jobs.values()
            if j.ended_at is not None and (not j.attached or j.listener == 0)
        ]
        ended.sort(key=lambda j: j.ended_at or 0.0)
        for k, j in enumerate(ended):
            if now - (j.ended_at or 0.0) > KEEP_RESULT_S or k < len(ended) - KEEP_RESULTS:
                self.forget(j)


def follow(jobs: Jobs, job: Job) -> StreamingResponse:
    """Stream `job`'s id and position, its progress (on a reattach, the latest first) and its
    outcome as JSON lines. Once `jobs.stopping()` is true the stream ends with an error line
    (within HEARTBEAT_S) and the job is stopped, so the server's graceful shutdown finds no
    response it must cancel."""

    async def lines() -> AsyncIterator[bytes]:
        listener = job.attach()
        delivered = False
        try:
            yield _line({"job": job.id, "queued": jobs.ahead(job)})
            if listener > 1 and job.latest is not None:
                yield _line(job.latest)
            while not job.fut.done():
                if jobs.stopping():
                    job.stop.set()
                    yield _line({"error": STOPPING})
                    return
                if job.listener != listener:
                    yield _line({"error": TAKEN_OVER})
                    return
                getter = asyncio.ensure_future(job.updates.get())
                try:
                    done, _ = await asyncio.wait(
                        {getter, job.fut}, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:  # also when the client leaves: a getter left waiting takes a line
                    getter.cancel()  # meant for the next client
                if getter in done:
                    yield _line(getter.result())
                else:
                    yield _line({"waiting": True})
            if job.listener != listener:
                return
            # The job's last reports were queued before it finished: send them before its result.
            while not job.updates.empty():
                yield _line(job.updates.get_nowait())
            yield _line(_outcome(job.fut))
            delivered = True
            jobs.forget(job)
        finally:
            if not delivered:  # the client left (or the server stops): a grace, or a stop
                jobs.detach(job, listener)

    return StreamingResponse(lines(), media_type="application/x-ndjson")
