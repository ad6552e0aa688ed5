"""The web server's middleware (ASGI), outermost first as `server.launch` stacks it: security
headers, bounded request bodies, logins (logins.py, with `--auth`), and known API names.

Nothing here runs a model or knows the page; each class wraps the next ASGI app and sees only
the request's path, headers and body.
"""

from __future__ import annotations

import json

# A request body (anything but an upload) is JSON of a few kilobytes: the page's and the API's
# calls name uploaded files by path; the files themselves go to /gradio_api/upload.
MAX_BODY_BYTES = 1 << 20
UPLOAD_ROUTE = "/gradio_api/upload"


class BodyTooLarge(Exception):
    """A request body went over its limit while it was read."""


class BoundedBodies:
    """At most `max_bytes` of request body (`upload_bytes` for an upload), answered 413 with the
    limit when over: by its Content-Length before anything is read, or, for a body sent in chunks
    with no length, once the limit is passed (what came so far is all that is held). Without it,
    the login guard buffered a body of any size, and Gradio's routes parse JSON of any size."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES, upload_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = upload_bytes

    def limit_for(self, path: str) -> int:
        return self.upload_bytes if path.rstrip("/").endswith(UPLOAD_ROUTE) else self.max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit():  # the server reads no more than it says (h11 holds it to that)
            if int(declared) > limit:
                return await send_json(send, 413, {"detail": self.too_large(scope["path"], limit)})
            return await self.app(scope, receive, send)
        if b"transfer-encoding" not in headers:  # no length, not chunked: no body
            return await self.app(scope, receive, send)
        try:
            _, receive = await read_body(receive, limit)
        except BodyTooLarge:
            return await send_json(send, 413, {"detail": self.too_large(scope["path"], limit)})
        await self.app(scope, receive, send)

    def too_large(self, path: str, limit: int) -> str:
        what = "An upload" if path.rstrip("/").endswith(UPLOAD_ROUTE) else "A request"
        return f"{what} may be at most {limit / (1 << 20):g} MiB; this one is larger."


class SecurityHeaders:
    """Adds the response headers Gradio leaves out: browsers must not guess a served file's type
    (an upload served back never runs as a page or script), and other sites may not show the app
    in a frame (clickjacking)."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"SAMEORIGIN"),
               (b"content-security-policy", b"frame-ancestors 'self'")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *[(name, value) for name, value in self.HEADERS if name not in present]]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class KnownEndpoints:
    """A call to an API name the app does not have gets 404 and one plain line (Gradio answered
    500 with the server's working directory in it), and no other server error carries Gradio's
    own text either (it may name files of this machine)."""

    CALL_ROUTES = ("/call/", "/run/", "/api/")

    def __init__(self, app, api_names: set[str]):
        self.app = app
        self.api_names = api_names

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        for route in self.CALL_ROUTES:
            if scope["method"] == "POST" and f"/gradio_api{route}" in path:
                name = path.split(f"/gradio_api{route}", 1)[1].strip("/").split("/")[0]
                if route == "/call/" and name == "v2":  # /call/v2/NAME: the same call, newer wire format
                    name = path.split("/gradio_api/call/v2/", 1)[1].strip("/").split("/")[0]
                if name not in self.api_names:
                    shown = repr(name) if len(repr(name)) <= 30 else repr(name)[:30] + "..."
                    return await send_json(send, 404, {"detail": f"No API endpoint named {shown}; "
                                                                 f"this app has {', '.join(sorted(self.api_names))}."})
        failed = False

        async def without_server_details(message):
            nonlocal failed
            if message["type"] == "http.response.start" and message["status"] >= 500:
                failed = True
                await send({**message, "headers": [(b"content-type", b"application/json")]})
                return
            if failed and message["type"] == "http.response.body":
                if not message.get("more_body"):
                    await send({"type": "http.response.body", "body": b'{"detail": "internal server error"}'})
                return
            await send(message)

        await self.app(scope, receive, without_server_details)


async def read_body(receive, limit: int = MAX_BODY_BYTES) -> tuple[bytes, object]:
    """The whole request body (at most `limit` bytes: BoundedBodies, outside, answers 413 beyond
    it), and a `receive` that replays it to the app."""
    chunks, more, size = [], True, 0
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise BodyTooLarge
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


def scope_client(scope) -> str:
    """The client's address of an ASGI scope (uvicorn has already put X-Forwarded-For's there for
    a proxy named by --trusted-proxy)."""
    client = scope.get("client")
    return client[0] if client else "unknown"
