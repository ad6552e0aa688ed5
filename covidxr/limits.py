"""Serving limits: analyses that cannot corrupt each other, cancellation that stops them, and a
cap on what one client may have in the queue.

- `OneAtATime.run` runs an analysis on a worker thread while holding the predictor's lock: the
  explainer's hooks and CAM objects are shared, so two analyses at once would mix up each
  other's activations and gradients. When Gradio cancels the job (`POST /gradio_api/cancel`, or
  a closed page), the job is marked cancelled and its thread stops at the next stage boundary:
  the next forward pass of the network (`stop_if_cancelled`, a forward pre-hook, so Score-CAM's
  many batches each check) or the next step of the page's work. A cancelled thread that has not
  stopped yet still holds the lock, so the next job waits for it: at most one analysis computes.
- `ClientLimits` (ASGI middleware) counts each client's jobs the moment they join the queue
  (`POST .../queue/join`), refuses one beyond `cap` with HTTP 429, and releases a job when its
  handler ends or when it is cancelled while waiting. A client is its address: uvicorn takes it
  from `X-Forwarded-For` only when the connection comes from a proxy named by `--trusted-proxy`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import anyio

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
    the coroutine that awaits it."""

    def __init__(self, lock: threading.RLock):
        self.lock = lock

    async def run(self, work, *args):
        job = Job()

        def in_thread():
            with self.lock:
                _running.job = job
                try:
                    job.check()  # cancelled while it waited for the lock
                    return work(*args)
                finally:
                    _running.job = None

        try:
            # abandon_on_cancel: Gradio's cancel returns at once; the thread sees the flag below.
            return await anyio.to_thread.run_sync(in_thread, abandon_on_cancel=True)
        except BaseException:
            job.cancelled.set()
            raise


# --------------------------------------------------------------------------------------------
# Jobs per client, counted as they join the queue
# --------------------------------------------------------------------------------------------

@dataclass
class _Client:
    joining: int = 0  # joins passed on to Gradio, not answered yet
    waiting: dict[str, tuple[str, float]] = field(default_factory=dict)  # event id -> (session, joined at)
    running: int = 0

    @property
    def in_flight(self) -> int:
        return self.joining + len(self.waiting) + self.running


class ClientLimits:
    """At most `cap` jobs per client (address) waiting or running. A job that never reports back
    (its client vanished while it waited, and no cancel came) is forgotten after `forget_after_s`."""

    def __init__(self, cap: int, forget_after_s: float = 900):
        self.cap = cap
        self.forget_after_s = forget_after_s
        self.clients: dict[str, _Client] = defaultdict(_Client)
        self.lock = threading.Lock()  # handlers report from worker threads

    def in_flight(self, client: str) -> int:
        with self.lock:
            return self.clients[client].in_flight if client in self.clients else 0

    def try_join(self, client: str) -> bool:
        with self.lock:
            state = self.clients[client]
            now = time.monotonic()
            for event_id, (_, joined) in list(state.waiting.items()):
                if now - joined > self.forget_after_s:
                    del state.waiting[event_id]
            if state.in_flight >= self.cap:
                return False
            state.joining += 1
            return True

    def joined(self, client: str, session: str, event_id: str | None) -> None:
        """The queue's answer to a join: an event id when the job is in, None when it was refused."""
        with self.lock:
            state = self.clients[client]
            state.joining -= 1
            if event_id:
                state.waiting[event_id] = (session, time.monotonic())
            self._drop_if_idle(client)

    def started(self, client: str, session: str | None) -> None:
        """A handler starts: the session's oldest waiting job is now running."""
        with self.lock:
            state = self.clients[client]
            oldest = next((event for event, (owner, _) in state.waiting.items() if owner == session), None)
            if oldest is None:  # a job that joined past the middleware (none should)
                oldest = next(iter(state.waiting), None)
            if oldest is not None:
                del state.waiting[oldest]
            state.running += 1

    def ended(self, client: str) -> None:
        with self.lock:
            state = self.clients[client]
            state.running = max(0, state.running - 1)
            self._drop_if_idle(client)

    def cancelled(self, event_id: str) -> None:
        """A cancel for `event_id`: released here if it was still waiting (Gradio drops it from the
        queue); a running job is released by its handler as it ends."""
        with self.lock:
            for client, state in list(self.clients.items()):
                if state.waiting.pop(event_id, None) is not None:
                    self._drop_if_idle(client)
                    return

    def _drop_if_idle(self, client: str) -> None:
        if self.clients[client].in_flight == 0:
            del self.clients[client]

    # The ASGI side --------------------------------------------------------------------------

    def middleware(self, app):
        limits = self

        async def counted(scope, receive, send):
            if scope["type"] != "http" or scope["method"] != "POST":
                return await app(scope, receive, send)
            path = scope["path"].rstrip("/")
            if path.endswith("/queue/join"):
                return await limits._join(app, scope, receive, send)
            if path.endswith("/gradio_api/cancel"):
                body, receive = await read_body(receive)
                event_id = _json_field(body, "event_id")
                await app(scope, receive, send)
                if isinstance(event_id, str):
                    limits.cancelled(event_id)
                return
            return await app(scope, receive, send)

        return counted

    async def _join(self, app, scope, receive, send):
        client = client_of(scope)
        body, receive = await read_body(receive)
        if not self.try_join(client):
            log.info("refused a job from %s: %d already waiting or running", client, self.cap)
            return await send_json(send, 429, {"detail": f"You already have {self.cap} analyses waiting or running "
                                                         "from this address; try again when they are done."})
        session = _json_field(body, "session_hash")
        answer = bytearray()
        status = 0

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                answer.extend(message.get("body", b""))
            await send(message)

        event_id = None
        try:
            await app(scope, receive, watch)
            if status == 200:
                event_id = _json_field(bytes(answer), "event_id")
        finally:
            self.joined(client, str(session), event_id if isinstance(event_id, str) else None)


def client_of(scope) -> str:
    """The client's address (uvicorn has already replaced a trusted proxy's with X-Forwarded-For's)."""
    client = scope.get("client")
    return client[0] if client else "unknown"


async def read_body(receive) -> tuple[bytes, object]:
    """The whole request body, and a `receive` that replays it to the app."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body, sent = b"".join(chunks), False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def send_json(send, status: int, content: dict) -> None:
    payload = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _json_field(body: bytes, name: str):
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value.get(name) if isinstance(value, dict) else None
