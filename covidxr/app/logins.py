"""Logins for `covidxr serve --auth/--auth-file`: the login file, throttled failed logins, and
login tokens that expire.

Gradio checks the password (`POST /login`) and keeps every token it hands out for as long as
the app runs. `LoginGuard` (ASGI middleware) adds what it leaves out:

- failed logins are throttled per user name and per address: after FREE_FAILURES failures the
  next attempt is refused (HTTP 429) until a back-off has passed, doubling with each further
  failure up to MAX_BACKOFF_S. 50 wrong passwords in a row take more than ten minutes. A
  successful login clears the user's and the address's count.
- a token older than TOKEN_LIFETIME_S is no longer accepted: its cookie is dropped from the
  request, so the user is asked to log in again.
"""

from __future__ import annotations

import logging
import threading
import time
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs

from .middleware import read_body, scope_client, send_json

log = logging.getLogger("covidxr.serve")

FREE_FAILURES = 3
FIRST_BACKOFF_S = 2.0
MAX_BACKOFF_S = 300.0
TOKEN_LIFETIME_S = 8 * 3600
TOKEN_COOKIE = "access-token"  # Gradio's cookies: access-token-<id>, access-token-unsecure-<id>


def read_logins(pairs: list[str], files: list[Path]) -> list[tuple[str, str]]:
    """USER:PASSWORD pairs from the command line and from files (one a line, # comments). A line
    with spaces around the user or the password is refused, naming the line: Gradio strips the
    name typed at login, so `dave : pw1` would make an account nobody can use."""
    lines = [(f"--auth {index + 1}", pair) for index, pair in enumerate(pairs)]
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if line.strip() and not line.strip().startswith("#"):
                lines.append((f"{file}, line {number}", line.rstrip("\r\n")))
    logins = []
    for where, line in lines:
        user, colon, password = line.partition(":")
        if not colon or not user.strip() or not password:
            raise ValueError(f"{where}: a login must be USER:PASSWORD, with neither empty")
        if user != user.strip() or password != password.strip():
            raise ValueError(f"{where}: spaces around the user name or the password (write USER:PASSWORD "
                             "with no spaces around the colon)")
        logins.append((user, password))
    return logins


class Throttle:
    """Failed attempts by key (a user name, an address), and when the next may be tried."""

    def __init__(self, free: int = FREE_FAILURES, first_s: float = FIRST_BACKOFF_S, most_s: float = MAX_BACKOFF_S):
        self.free, self.first_s, self.most_s = free, first_s, most_s
        self.failures: dict[str, tuple[int, float]] = {}  # key -> (failures, next attempt allowed at)
        self.lock = threading.Lock()

    def wait_s(self, *keys: str, now: float | None = None) -> float:
        """Seconds before any of `keys` may try again; 0 when all may."""
        now = time.monotonic() if now is None else now
        with self.lock:
            return max([0.0, *(self.failures.get(key, (0, 0.0))[1] - now for key in keys)])

    def failed(self, *keys: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self.lock:
            for key in keys:
                count = self.failures.get(key, (0, 0.0))[0] + 1
                backoff = 0.0 if count <= self.free else min(self.most_s, self.first_s * 2 ** (count - self.free - 1))
                self.failures[key] = (count, now + backoff)

    def succeeded(self, *keys: str) -> None:
        with self.lock:
            for key in keys:
                self.failures.pop(key, None)


class LoginGuard:
    def __init__(self, throttle: Throttle | None = None, token_lifetime_s: float = TOKEN_LIFETIME_S,
                 clock=time.monotonic):
        self.throttle = throttle or Throttle()
        self.token_lifetime_s = token_lifetime_s
        self.clock = clock  # seconds, monotonic (a test passes its own)
        self.issued: dict[str, float] = {}  # token -> when
        self.lock = threading.Lock()

    def middleware(self, app):
        guard = self

        async def guarded(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            guard._drop_expired_tokens(scope)
            if scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/login"):
                return await guard._login(app, scope, receive, send)
            return await app(scope, receive, send)

        return guarded

    async def _login(self, app, scope, receive, send):
        body, receive = await read_body(receive)
        user = (parse_qs(body.decode("utf-8", "replace")).get("username") or [""])[0].strip()
        keys = (f"user {user}", f"address {scope_client(scope)}")
        wait = self.throttle.wait_s(*keys)
        if wait > 0:
            return await send_json(send, 429, {"detail": f"Too many failed logins: try again in {wait:.0f} s."})
        status, cookies = 0, []

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                cookies.extend(value.decode("latin-1") for name, value in message.get("headers", [])
                               if name.lower() == b"set-cookie")
            await send(message)

        await app(scope, receive, watch)
        if status == 200:
            self.throttle.succeeded(*keys)
            with self.lock:
                for cookie in cookies:
                    for name, morsel in SimpleCookie(cookie).items():
                        if name.startswith(TOKEN_COOKIE):
                            self.issued[morsel.value] = self.clock()
        elif status in (400, 401, 403):
            self.throttle.failed(*keys)
            log.info("failed login for %s", " from ".join(keys))

    def _drop_expired_tokens(self, scope) -> None:
        """Remove cookies carrying an expired token from the request: Gradio then sees no login."""
        headers = scope.get("headers", [])
        if not any(name == b"cookie" and TOKEN_COOKIE.encode() in value for name, value in headers):
            return
        now = self.clock()
        kept = []
        for name, value in headers:
            if name == b"cookie":
                parts = [part for part in value.decode("latin-1").split(";") if not self._expired(part, now)]
                value = ";".join(parts).encode("latin-1")
            kept.append((name, value))
        scope["headers"] = kept

    def _expired(self, cookie: str, now: float) -> bool:
        name, _, value = cookie.strip().partition("=")
        if not name.startswith(TOKEN_COOKIE):
            return False
        with self.lock:  # every token Gradio hands out comes through _login, and stays listed
            issued = self.issued.get(value)
        return issued is not None and now - issued > self.token_lifetime_s
