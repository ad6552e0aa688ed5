"""Serving limits without a server: places per client counted from Gradio's own queue,
cancellation that stops work at the next stage, bounded request bodies, bounded per-session
state, throttled logins and the login file."""

import asyncio
import json
import threading

import gradio as gr
import numpy as np
import pytest
from fastapi import HTTPException
from gradio.data_classes import PredictBodyInternal
from starlette.requests import Request

from covidxr.app.jobs import AnalysisPlaces, Cancelled, OneAtATime, stop_if_cancelled
from covidxr.app.logins import FREE_FAILURES, LoginGuard, Throttle, read_logins
from covidxr.app.middleware import BoundedBodies
from covidxr.app.sessions import KeptMaps, Shown


class Clock:
    """A monotonic clock a test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def queued_blocks(places: AnalysisPlaces):
    """A page with one handler that runs a model (in the places' group, with a validator that
    yields to the event loop, as Gradio's validators do) and one that runs none; queued, with
    `places` attached to its queue. Nothing processes the queue: what joins stays waiting."""
    with gr.Blocks() as demo:
        text = gr.Textbox()
        go, other = gr.Button(), gr.Button()
        go.click(lambda value: value, text, text, api_name="analyse", concurrency_id=places.group,
                 validator=lambda value: gr.validate(True, ""))
        other.click(lambda value: value, text, text, api_name="blend")
    demo.queue(default_concurrency_limit=1, max_size=64, api_open=False)
    places.attach(demo._queue)
    return demo, {fn.api_name: fn._id for fn in demo.fns.values()}


def join(demo, fn_index: int, host: str, session: str = "s"):
    """What Gradio's join route does with a request: Queue.push, from a client at `host`."""
    request = Request({"type": "http", "method": "POST", "path": "/gradio_api/queue/join", "headers": [],
                       "query_string": b"", "client": (host, 5000), "server": ("127.0.0.1", 7860),
                       "scheme": "http", "root_path": ""})
    body = PredictBodyInternal(session_hash=session, fn_index=fn_index, data=["x"], request=request)
    return demo._queue.push(body=body, request=request, username=None)


def test_places_are_what_the_queue_holds_of_a_clients_analyses():
    """Counted from Gradio's queue: a burst of 30 joins gets the cap and no more; what runs no model
    is never counted; an event Gradio drops (a cancel) or marks closed (its page went away) frees
    its place at once; a running one still holds it; other addresses are not held back."""
    places = AnalysisPlaces(cap=3, group="model")
    demo, fns = queued_blocks(places)

    async def scenario():
        burst = await asyncio.gather(*[join(demo, fns["analyse"], "10.0.0.1") for _ in range(30)],
                                     return_exceptions=True)
        accepted = [answer[1] for answer in burst if not isinstance(answer, Exception)]
        refused = [answer for answer in burst if isinstance(answer, HTTPException)]
        assert len(accepted) == 3 and len(refused) == 27 and {r.status_code for r in refused} == {429}
        assert "3 analyses waiting or running from this address" in refused[0].detail
        # Clicks that run no model: any number, and no place taken by them.
        for _ in range(12):
            assert (await join(demo, fns["blend"], "10.0.0.1"))[0]
        assert places.taken("10.0.0.1") == 3
        assert (await join(demo, fns["analyse"], "10.0.0.2"))[0]  # another address
        # A cancel (Gradio drops the event) and a page that went away (closed) free their places.
        await demo._queue.remove_from_queue(accepted[0])
        demo._queue.event_ids_to_events[accepted[1]].closed = True
        assert places.taken("10.0.0.1") == 1
        assert (await join(demo, fns["analyse"], "10.0.0.1"))[0]
        # A running event (moved to the queue's active jobs) keeps its place until it ends.
        running = demo._queue.event_ids_to_events[accepted[2]]
        line = demo._queue.event_queue_per_concurrency_id[running.concurrency_id].queue
        line.remove(running)
        demo._queue.active_jobs = [[running], None]
        assert places.taken("10.0.0.1") == 2
        demo._queue.active_jobs = [None, None]  # it ended
        assert places.taken("10.0.0.1") == 1 and not places.joining

    asyncio.run(scenario())


def test_a_request_body_over_its_limit_is_refused_with_413():
    seen = []

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(len(body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    bounded = BoundedBodies(app, max_bytes=1000, upload_bytes=5000)

    async def post(path, chunks, declared=None):
        headers = [(b"content-length", str(declared).encode())] if declared is not None else \
            [(b"transfer-encoding", b"chunked")]
        scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
        messages = iter([{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
                         for i, chunk in enumerate(chunks)])
        sent = []

        async def receive():
            return next(messages)

        async def send(message):
            sent.append(message)
        await bounded(scope, receive, send)
        return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]) or b"{}")

    assert asyncio.run(post("/gradio_api/queue/join", [b"x" * 900]))[0] == 200
    status, answer = asyncio.run(post("/gradio_api/queue/join", [b"x"], declared=10**9))  # refused unread
    assert status == 413 and "at most" in answer["detail"]
    assert asyncio.run(post("/gradio_api/queue/join", [b"x" * 600, b"x" * 600]))[0] == 413  # streamed, no length
    assert asyncio.run(post("/gradio_api/upload", [b"x" * 4000]))[0] == 200  # uploads have their own limit
    assert asyncio.run(post("/gradio_api/upload", [b"x" * 3000] * 2))[0] == 413
    assert seen == [900, 4000]


def test_a_cancelled_analysis_stops_at_its_next_forward_pass():
    """Cancelling the coroutine returns at once; the thread stops at the next stage boundary, and
    until it has, it holds the lock, so the next analysis cannot run beside it."""
    passes, started, stopped, go_on = [], threading.Event(), threading.Event(), threading.Event()

    def analysis():
        try:
            for step in range(200):
                stop_if_cancelled()  # as the forward pre-hook does before each pass
                passes.append(step)
                started.set()
                go_on.wait(5)  # the next pass waits until the test has cancelled
        except Cancelled:
            stopped.set()
            raise

    runner = OneAtATime()

    async def cancel_it():
        task = asyncio.create_task(runner.run(analysis))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert runner.lock.locked()  # the thread has not stopped yet: it still holds the lock
        go_on.set()
    asyncio.run(cancel_it())
    assert stopped.wait(5) and passes == [0]
    with runner.lock:  # released once stopped
        pass


def test_session_state_is_small_bounded_and_expires():
    rng = np.random.default_rng(0)
    image, heatmap = rng.random((1024, 1024), np.float32), rng.random((1024, 1024), np.float32)
    shown = Shown.of(image, heatmap, None)
    assert shown.nbytes == 2 * 1024 * 1024  # 8-bit, where the float arrays took 8 MiB
    # The overlay made from the kept 8-bit map is the one made from the float map.
    from covidxr.explain import overlay
    assert shown.overlay(0.4).tobytes() == overlay(shown.image / np.float32(255), heatmap, 0.4).tobytes()
    clock = Clock()
    kept = KeptMaps(most=3, lifetime_s=10, clock=clock)
    keys = [kept.keep(shown) for _ in range(5)]
    assert len(kept) == 3 and kept.get(keys[0]) is None and kept.get(keys[-1]) is shown
    assert kept.get("forged key") is None and kept.get(12) is None
    clock.now = 8
    assert kept.get(keys[-1]) is shown  # used again: its ten seconds start again
    clock.now = 12
    assert len(kept) == 1 and kept.get(keys[-1]) is shown
    clock.now = 30
    assert len(kept) == 0


def test_fifty_wrong_passwords_are_refused_after_a_few():
    throttle = Throttle()
    now, refused, tried = 0.0, 0, 0
    for _ in range(50):  # as fast as a script can
        if throttle.wait_s("user ana", "address 1.2.3.4", now=now) > 0:
            refused += 1
        else:
            tried += 1
            throttle.failed("user ana", "address 1.2.3.4", now=now)
        now += 0.01
    assert tried == FREE_FAILURES + 1 and refused == 50 - tried
    # Waiting out each back-off, 50 attempts take far more than 30 s.
    patient, now = Throttle(), 0.0
    for _ in range(50):
        now += patient.wait_s("user bo", now=now)
        patient.failed("user bo", now=now)
    assert now > 30 * 60
    patient.succeeded("user bo")
    assert patient.wait_s("user bo", now=now) == 0


def test_login_middleware_throttles_and_expires_tokens():
    clock = Clock()
    guard = LoginGuard(token_lifetime_s=3, clock=clock)
    calls = []

    async def gradio(scope, receive, send):
        body = (await receive())["body"] if scope["method"] == "POST" else b""
        cookie = dict(scope["headers"]).get(b"cookie", b"")
        calls.append(cookie)
        ok = b"password=right" in body
        headers = [(b"set-cookie", b"access-token-unsecure-x=TOKEN; HttpOnly")] if ok else []
        await send({"type": "http.response.start", "status": 200 if ok else 400, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})
    app = guard.middleware(gradio)

    async def login(password):
        scope = {"type": "http", "method": "POST", "path": "/login", "headers": [], "client": ("5.6.7.8", 1)}
        sent = []

        async def receive():
            return {"type": "http.request", "body": f"username=ana&password={password}".encode()}

        async def send(message):
            sent.append(message)
        await app(scope, receive, send)
        return sent[0]["status"]

    async def page():
        scope = {"type": "http", "method": "GET", "path": "/config", "client": ("5.6.7.8", 1),
                 "headers": [(b"cookie", b"theme=dark; access-token-unsecure-x=TOKEN")]}
        await app(scope, None, lambda message: asyncio.sleep(0))

    assert asyncio.run(login("right")) == 200
    asyncio.run(page())
    assert b"TOKEN" in calls[-1]
    clock.now = 3.5
    asyncio.run(page())
    assert b"TOKEN" not in calls[-1] and b"theme=dark" in calls[-1]  # expired: Gradio sees no login
    statuses = [asyncio.run(login("wrong")) for _ in range(10)]
    assert statuses[:FREE_FAILURES + 1] == [400] * (FREE_FAILURES + 1) and set(statuses[FREE_FAILURES + 1:]) == {429}


def test_login_lines_with_stray_spaces_are_refused_by_line(tmp_path):
    logins = tmp_path / "logins.txt"
    logins.write_text("# who may use the app\nana:s3cret:with:colons\ndave : pw1\n")
    with pytest.raises(ValueError, match=r"logins.txt, line 3: spaces around"):
        read_logins([], [logins])
    logins.write_text("ana:s3cret:with:colons\n")
    assert read_logins(["bo:pw"], [logins]) == [("bo", "pw"), ("ana", "s3cret:with:colons")]
    with pytest.raises(ValueError, match="--auth 1: a login must be USER:PASSWORD"):
        read_logins(["no-colon"], [])
