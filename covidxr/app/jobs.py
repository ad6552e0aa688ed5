"""Analyses as jobs: one at a time, stoppable by a cancel, and a few places per client.

- `OneAtATime.run` runs an analysis on a worker thread while holding its own lock (never a
  predictor's: work that needs no model never waits on it). The explainers' hooks and CAM
  objects are shared, so two analyses at once would mix up each other's activations and
  gradients. When Gradio cancels the job (`POST /gradio_api/cancel`, or a closed page), the job
  is marked cancelled and its thread stops at the next stage boundary: the next forward pass of
  a network (`stop_if_cancelled`, a forward pre-hook, so Score-CAM's many batches each check) or
  the next step of the view's work. A cancelled thread that has not stopped yet still holds the
  lock, so the next job waits for it: at most one analysis computes.
- `AnalysisPlaces` gives each client (its address) at most `cap` places in the model's
  concurrency group of Gradio's queue, waiting or running. A place is taken only by an event
  of that group, which is every handler that runs a model, whichever route it came by (the page's
  `/queue/join`, the REST `/call/NAME` two-step, `gradio_client`: all of them go through
  `Queue.push`). It is counted from the queue itself, not kept by hand: an event Gradio dropped
  (cancelled while waiting), one whose page went away (Gradio marks it closed) and one whose
  handler returned are no longer there, so no place can leak. One over the cap is refused as
  it asks to join, with HTTP 429. Clearing the page, the model card, opening the eraser and
  re-blending run no model: they are not queued at all (layout.py), so they never take a place.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import anyio
from fastapi import HTTPException
from gradio import route_utils

log = logging.getLogger("covidxr.serve")


class Cancelled(Exception):
    """The job was cancelled; raised on its thread at the next stage boundary."""


_running = threading.local()  # the Job this thread works for, while it holds the lock


class Job:
    def __init__(self):
        self.cancelled = threading.Event()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("the analysis was cancelled")


def stop_if_cancelled(*_) -> None:
    """A stage boundary: raise `Cancelled` if the job this thread works for was cancelled. Also a
    forward pre-hook (module, inputs), so each forward pass of the network is a boundary."""
    job = getattr(_running, "job", None)
    if job is not None:
        job.check()


class OneAtATime:
    """Runs analyses on worker threads, one at a time under `lock`, each stoppable by cancelling
    the coroutine that awaits it. `before_each()` runs first, under the lock."""

    def __init__(self, before_each=None):
        self.lock = threading.Lock()
        self.before_each = before_each

    async def run(self, work, *args):
        job = Job()

        def in_thread():
            with self.lock:
                _running.job = job
                try:
                    job.check()  # cancelled while it waited for the lock
                    if self.before_each is not None:
                        self.before_each()
                    return work(*args)
                finally:
                    _running.job = None

        try:
            # abandon_on_cancel: Gradio's cancel returns at once; the thread sees the flag below.
            return await anyio.to_thread.run_sync(in_thread, abandon_on_cancel=True)
        except BaseException:
            job.cancelled.set()
            raise


class AnalysisPlaces:
    """At most `cap` events of the concurrency group `group` per client in Gradio's queue,
    waiting or running; the one over is refused with HTTP 429 as it asks to join (`attach`)."""

    def __init__(self, cap: int, group: str):
        self.cap = cap
        self.group = group
        self.queue = None  # Gradio's Queue, once attached
        self.joining: Counter[str] = Counter()  # admitted, not yet in the queue (its validator runs)

    def attach(self, queue) -> None:
        """Count at Gradio's `Queue.push`, which every route that queues an event goes through."""
        push = queue.push

        async def push_within_places(body, request, username):
            client = client_of(request)
            if not self.counts(body):
                return await push(body, request, username)
            if self.taken(client) >= self.cap:
                log.info("refused an analysis from %s: %d already waiting or running", client, self.cap)
                raise HTTPException(status_code=429, detail=(
                    f"You already have {self.cap} analyses waiting or running from this address; "
                    "try again when one of them is done."))
            # Taken before the first await: a burst of joins cannot all pass the check at once.
            self.joining[client] += 1
            try:
                return await push(body, request, username)
            finally:
                self.joining[client] -= 1
                if self.joining[client] <= 0:
                    del self.joining[client]

        self.queue = queue
        queue.push = push_within_places

    def counts(self, body) -> bool:
        """Whether the event `body` asks for runs a model (is of `group`)."""
        try:
            fn = route_utils.get_fn(self.queue.blocks, None, body)
        except (KeyError, TypeError, ValueError, route_utils.FnIndexInferError):
            return False  # Gradio's own push refuses it
        return fn.concurrency_id == self.group

    def taken(self, client: str) -> int:
        """The places `client` holds: its events of `group` waiting in the queue or running, not
        closed (their page went away), and its joins being admitted."""
        queue = self.queue
        if queue is None:
            return self.joining[client]
        waiting = [event for line in list(queue.event_queue_per_concurrency_id.values()) for event in list(line.queue)]
        running = [event for job in list(queue.active_jobs) if job for event in job]
        return self.joining[client] + sum(
            1 for event in waiting + running
            if event.concurrency_id == self.group and event.alive and not event.closed
            and client_of(event.request) == client)


def client_of(request) -> str:
    """The client's address (uvicorn has already replaced a trusted proxy's with X-Forwarded-For's)."""
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "unknown"
