"""HTTP for the web app (Starlette + uvicorn): the page, a JSON API, one job at a time.

Long requests (generate, interpolate, invert, edit) answer with their job's stream of JSON lines
(`jobs`): its id and queue position, progress, then the result or an error (`?job=ID` names
the job, as the page does before it sends it; else the server does). `GET /api/job?id=ID`
streams the same lines again from the job's current state (a page reloaded mid-job reattaches);
`POST /api/stop` with `{"job": ID}` stops it at its next network evaluation, queued or running.
A job whose client went away runs on for `app.state.job_grace_s`, waiting for a reattach. When
the server stops, every stream ends with a reason and every job is stopped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Callable
from importlib.resources import files
from typing import Any
from urllib.parse import SplitResult, urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
from starlette.routing import Route

from .checks import (
    MAX_UPLOAD_BYTES,
    RequestError,
    check_edit,
    check_interpolate,
    check_invert,
    parse_generate,
)
from .handlers import Engine, Progress, run_summary
from .jobs import JOB_GRACE_S, JobQueue, Jobs, follow


class MediaTypeError(RequestError):
    """A body of a type the endpoint does not read (HTTP 415)."""

    status = 415


def _refuse(e: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=getattr(e, "status", 400))


def _check_type(request: Request, accepted: tuple[str, ...], how: str) -> None:
    """Refuse a body whose Content-Type the endpoint does not read: JSON sent to a form
    endpoint read as an empty form ("unknown model 'None'"), and a JSON endpoint that reads
    any type lets another site's page start jobs with a plain form post."""
    given = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if given not in accepted:
        got = repr(given[:60]) if given else "none"
        raise MediaTypeError(f"send {how}; the Content-Type was {got}")


class ForeignOrigin(RequestError):
    """A job posted by a page of another site (HTTP 403)."""

    status = 403


def _split(url: str) -> SplitResult:
    """`url` split; one that cannot be (an unclosed IPv6 bracket: `[::1`) as nowhere, so a
    malformed Origin or Host is refused with the reason, not a 500 and a traceback."""
    try:
        return urlsplit(url)
    except ValueError:
        return SplitResult("", "", "", "", "")


def _check_origin(request: Request) -> None:
    """Refuse a job posted by another site's page: a browser names the page's origin in
    every POST, and a form post needs no permission to reach 127.0.0.1. Clients that are
    not browsers (curl, scripts) send no Origin and are served."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    host = request.headers.get("host", "").lower()
    allowed = request.app.state.allowed_hosts
    page = _split(origin)
    if origin == "null" or (page.netloc.lower() != host and (page.hostname or "") not in allowed):
        raise ForeignOrigin(
            f"jobs are taken only from this server's own page; this request came from a "
            f"page at {origin[:80]!r}"
        )


LOCAL_NAMES = "localhost and loopback addresses (127.0.0.1, ::1)"


def is_local_name(name: str) -> bool:
    """Whether a Host's name (no port, IPv6 without brackets) names this machine: localhost,
    a name under .localhost, or a loopback address literal (the whole of 127.0.0.0/8, which
    `serve --host 127.0.0.2` binds and prints). No DNS answer can make a Host a literal."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class LocalNamesOnly:
    """Answer only requests addressed to this machine by a local name (ASGI middleware, for a
    server bound to a loopback address). A page of another site whose domain is made to resolve
    to 127.0.0.1 (DNS rebinding) reaches the server as that site, so it could read the answers
    (a run's curves, its images): its Host header names that domain, and it gets a 403."""

    def __init__(self, app: Any, allowed_hosts: frozenset[str] = frozenset()):
        self.app = app
        self.allowed_hosts = allowed_hosts  # `serve --allow-host`: names a proxy passes on

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            name = (_split("//" + host).hostname or "") if host.isprintable() else ""
            if not (is_local_name(name) or name in self.allowed_hosts):
                msg = (
                    f"this server answers to {LOCAL_NAMES} only; the request was "
                    f"addressed to {host[:80]!r} (to answer to that name too, behind a "
                    "reverse proxy: serve --allow-host NAME)"
                )
                await JSONResponse({"error": msg}, 403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


MAX_JSON_BYTES = 64 * 1024  # a Generate request is a few hundred bytes
BODY_TIMEOUT_S = 120.0  # a body not all sent by then (more announced than sent) is refused


class BodyTimeout(RequestError):
    """A request body still incomplete after the app's body timeout (HTTP 408)."""

    status = 408


async def _in_time(request: Request, read: Any) -> Any:
    """Await `read` (the body being read), for at most the app's body timeout: a client that
    announces more than it sends would otherwise hold its connection open for ever."""
    timeout = request.app.state.body_timeout_s
    try:
        return await asyncio.wait_for(read, timeout)
    except asyncio.TimeoutError:
        raise BodyTimeout(f"the request body did not all arrive within {timeout:g} s") from None


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, read up to MAX_JSON_BYTES (a longer body, announced or
    chunked, is refused before it is all in memory)."""
    _check_origin(request)
    _check_type(
        request, ("application/json",), "the request as JSON (Content-Type: application/json)"
    )
    too_large = f"the request body is too large; the limit is {MAX_JSON_BYTES >> 10} kB"
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_JSON_BYTES:
        raise RequestError(too_large)

    async def read() -> bytes:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_JSON_BYTES:
                raise RequestError(too_large)
        return bytes(data)

    data = await _in_time(request, read())
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise RequestError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


async def _form(request: Request, names: tuple[str, ...]) -> tuple[dict[str, Any], list[bytes]]:
    """Form fields and the uploaded files among `names`, in that order, size-checked."""
    _check_origin(request)
    forms = ("multipart/form-data", "application/x-www-form-urlencoded")
    _check_type(
        request, forms, "the fields and files as a form (multipart/form-data, as the page does)"
    )
    length = request.headers.get("content-length", "")
    if not length.isdigit():  # a chunked body could grow without bound before it is checked
        raise RequestError("send uploads with a Content-Length (as browsers do)")
    if int(length) > len(names) * MAX_UPLOAD_BYTES + 65536:
        raise RequestError(f"the upload is too large; the limit is {MAX_UPLOAD_BYTES >> 20} MB")
    try:
        read = request.form(max_files=2, max_fields=20, max_part_size=MAX_UPLOAD_BYTES + 1)
        form = await _in_time(request, read)
    except BodyTimeout:
        raise
    except Exception:  # noqa: BLE001 - multipart errors of every kind: refuse, keep serving
        raise RequestError(
            f"the upload could not be read (files up to {MAX_UPLOAD_BYTES >> 20} MB)"
        ) from None
    fields: dict[str, Any] = {}
    uploads = []
    for key, value in form.multi_items():
        if hasattr(value, "read"):
            if key in names:
                data = await value.read()
                if data or value.filename:
                    uploads.append(data)
        else:
            fields[key] = value
    await form.close()
    return fields, uploads


def _begin(jobs: Jobs, request: Request, work: Callable[[Progress], dict]) -> Response:
    """Queue `work` as a job, named by the request's `?job=ID` when it has one, and stream it."""
    try:
        job = jobs.start(work, request.query_params.get("job"))
    except RequestError as e:
        return _refuse(e)
    return follow(jobs, job)


async def _http_error(request: Request, exc: Exception) -> Response:
    """An unknown path or a method a route does not take: under /api/, JSON naming what exists
    (as every other refusal); elsewhere Starlette's plain text."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if not path.startswith("/api/"):
        return PlainTextResponse(exc.detail, exc.status_code, headers=exc.headers)
    if exc.status_code == 405:
        allow = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "")
        msg = f"{request.method} is not accepted by {path[:80]}; send {allow}"
    else:
        msg = f"no API endpoint {path[:80]!r}; the API has {', '.join(request.app.state.api)}"
    return JSONResponse({"error": msg}, exc.status_code, headers=exc.headers)


def create_app(
    engine: Engine,
    runs_arg: str | None = None,
    *,
    local_names_only: bool = False,
    allowed_hosts: tuple[str, ...] = (),
    body_timeout_s: float = BODY_TIMEOUT_S,
    job_grace_s: float = JOB_GRACE_S,
) -> Starlette:
    """The Starlette app serving `engine`'s models; with `local_names_only`, requests whose Host
    is neither a local name nor one of `allowed_hosts` get a 403 (`LocalNamesOnly`: `serve` on
    a loopback address). Pages at `allowed_hosts` may also post jobs (a reverse proxy that
    rewrites Host to 127.0.0.1 leaves the page's Origin naming the proxy). A job whose client
    leaves without stopping it runs on for `job_grace_s` (app.state.job_grace_s) for a reattach."""
    allowed = frozenset(h.lower() for h in allowed_hosts)
    page = files("animeddim.apps.web").joinpath("page.html").read_text(encoding="utf-8")
    queue = JobQueue()

    def stopping() -> bool:  # `serve` sets app.state.stopping to its uvicorn server's flag
        return app.state.stopping()

    jobs = Jobs(queue, lambda: app.state.job_grace_s, stopping)

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def info(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(engine.info))

    async def status(request: Request) -> Response:
        return JSONResponse(queue.status())

    async def generate(request: Request) -> Response:
        try:
            req = parse_generate(await _json_body(request), engine.catalog)
        except RequestError as e:
            return _refuse(e)
        return _begin(jobs, request, lambda p: engine.generate(req, p, runs_arg))

    async def interpolate(request: Request) -> Response:
        try:
            fields, uploads = await _form(request, ("face_a", "face_b"))
            check_interpolate(fields, len(uploads), engine.catalog)
        except RequestError as e:
            return _refuse(e)
        return _begin(jobs, request, lambda p: engine.interpolate(fields, uploads, p))

    async def invert(request: Request) -> Response:
        try:
            fields, uploads = await _form(request, ("face",))
            check_invert(fields, len(uploads), engine.catalog)
        except RequestError as e:
            return _refuse(e)
        return _begin(jobs, request, lambda p: engine.invert(fields, uploads[0], p))

    async def edit(request: Request) -> Response:
        try:
            fields, uploads = await _form(request, ("face",))
            check_edit(fields, len(uploads), engine.catalog)
        except RequestError as e:
            return _refuse(e)
        return _begin(jobs, request, lambda p: engine.edit(fields, uploads[0], p))

    async def job(request: Request) -> Response:
        """Follow a job again (a page reloaded mid-job): its lines from its current state."""
        try:
            found = jobs.find(request.query_params.get("id"))
        except RequestError as e:
            return _refuse(e)
        return follow(jobs, found)

    async def stop(request: Request) -> Response:
        """Stop a job at its next network evaluation (queued: before it starts); a finished
        one's kept result is dropped. `stopped`: whether it was still queued or running."""
        try:
            found = jobs.find((await _json_body(request)).get("job"))
        except RequestError as e:
            return _refuse(e)
        return JSONResponse({"job": found.id, "stopped": jobs.stop(found)})

    async def run(request: Request) -> Response:
        try:
            summary = await run_in_threadpool(
                run_summary, engine.catalog, request.query_params.get("id")
            )
        except RequestError as e:
            return _refuse(e)
        return JSONResponse(summary)

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/status", status),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/interpolate", interpolate, methods=["POST"]),
        Route("/api/invert", invert, methods=["POST"]),
        Route("/api/edit", edit, methods=["POST"]),
        Route("/api/job", job),
        Route("/api/stop", stop, methods=["POST"]),
        Route("/api/run", run),
    ]
    middleware = [Middleware(LocalNamesOnly, allowed_hosts=allowed)] if local_names_only else []
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={404: _http_error, 405: _http_error},
    )
    app.state.queue = queue
    app.state.allowed_hosts = allowed
    app.state.body_timeout_s = body_timeout_s
    app.state.job_grace_s = job_grace_s
    app.state.jobs = jobs
    app.state.api = [r.path for r in routes if r.path.startswith("/api/")]
    app.state.stopping = lambda: False
    return app
