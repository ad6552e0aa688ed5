"""Serving limits without a server: jobs per client counted as they join, cancellation that stops
work at the next stage, bounded per-session state, throttled logins and the login file."""

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from covidxr.limits import Cancelled, ClientLimits, OneAtATime, stop_if_cancelled
from covidxr.logins import FREE_FAILURES, LoginGuard, Throttle, read_logins
from covidxr.sessions import KeptMaps, Shown


def fake_queue(delay_s: float = 0.05):
    """An ASGI app answering joins as Gradio's queue does: after a pause, an event id."""
    counter = iter(range(10_000))

    async def app(scope, receive, send):
        await receive()
        await asyncio.sleep(delay_s)
        body = json.dumps({"event_id": f"e{next(counter)}"}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
    return app


async def post(app, path: str, body: dict, host: str = "127.0.0.1") -> tuple[int, dict]:
    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "client": (host, 5000)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]) or b"{}")


def test_a_burst_from_one_client_gets_at_most_the_cap():
    """Counted as each job joins (not read from the queue afterwards): 30 joins at once, cap 4."""
    limits = ClientLimits(cap=4)
    app = limits.middleware(fake_queue())

    async def burst():
        return await asyncio.gather(*[post(app, "/gradio_api/queue/join", {"session_hash": "s"})
                                      for _ in range(30)])
    answers = asyncio.run(burst())
    accepted = [body["event_id"] for status, body in answers if status == 200]
    refused = [body["detail"] for status, body in answers if status == 429]
    assert len(accepted) == 4 and len(refused) == 26
    assert "4 analyses waiting or running" in refused[0]
    # Other addresses are not held back by it.
    assert asyncio.run(post(app, "/gradio_api/queue/join", {"session_hash": "t"}, host="10.0.0.2"))[0] == 200


def test_jobs_are_released_when_they_end_or_are_cancelled_while_waiting():
    limits = ClientLimits(cap=2)
    app = limits.middleware(fake_queue(0))
    first = asyncio.run(post(app, "/gradio_api/queue/join", {"session_hash": "s"}))[1]["event_id"]
    second = asyncio.run(post(app, "/gradio_api/queue/join", {"session_hash": "s"}))[1]["event_id"]
    assert asyncio.run(post(app, "/gradio_api/queue/join", {"session_hash": "s"}))[0] == 429
    limits.started("127.0.0.1", "s")  # the first runs ...
    limits.ended("127.0.0.1")  # ... and ends
    assert limits.in_flight("127.0.0.1") == 1
    asyncio.run(post(app, "/gradio_api/cancel", {"session_hash": "s", "fn_index": 0, "event_id": second}))
    assert limits.in_flight("127.0.0.1") == 0 and first != second
    assert asyncio.run(post(app, "/gradio_api/queue/join", {"session_hash": "s"}))[0] == 200


def test_a_cancelled_analysis_stops_at_its_next_forward_pass():
    """Cancelling the coroutine returns at once; the thread stops at the next stage boundary, and
    until it has, it holds the lock, so the next analysis cannot run beside it."""
    lock = threading.RLock()
    passes, stopped = [], threading.Event()

    def analysis():
        try:
            for step in range(200):
                stop_if_cancelled()  # as the forward pre-hook does before each pass
                passes.append(step)
                time.sleep(0.01)
        except Cancelled:
            stopped.set()
            raise

    async def cancel_it():
        task = asyncio.create_task(OneAtATime(lock).run(analysis))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(cancel_it())
    assert stopped.wait(5) and 0 < len(passes) < 200
    with lock:  # released once stopped
        pass


def test_session_state_is_small_bounded_and_expires():
    rng = np.random.default_rng(0)
    image, heatmap = rng.random((1024, 1024), np.float32), rng.random((1024, 1024), np.float32)
    shown = Shown.of(image, heatmap, None)
    assert shown.nbytes == 2 * 1024 * 1024  # 8-bit, where the float arrays took 8 MiB
    # The overlay made from the kept 8-bit map is the one made from the float map.
    from covidxr.explain import overlay
    assert shown.overlay(0.4).tobytes() == overlay(shown.image / np.float32(255), heatmap, 0.4).tobytes()
    kept = KeptMaps(most=3, lifetime_s=0.3)
    keys = [kept.keep(shown) for _ in range(5)]
    assert len(kept) == 3 and kept.get(keys[0]) is None and kept.get(keys[-1]) is shown
    assert kept.get("forged key") is None and kept.get(12) is None
    time.sleep(0.4)
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
    guard = LoginGuard(token_lifetime_s=3)
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
    time.sleep(3.5)
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
