"""The FastAPI app factory and runner every service uses.

    ctx = ServiceContext("risk", settings, needs=("nats", "redis", "postgres"))
    app = create_app(ctx, routers=[router], on_startup=[start], on_shutdown=[stop])
    run_service(app, settings)

Every app serves `/healthz`, `/readyz`, `/metrics` and OpenAPI at `/docs`; errors are `{"code",
"message"}`; links reconnect by themselves; SIGTERM/SIGINT drain and stop it cleanly.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import structlog
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import ORJSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from papertrade.service.errors import ApiError, ErrorCode, install_error_handlers
from papertrade.service.http import CoalescingHttpToolsProtocol
from papertrade.service.links import LINK_NAMES, Links
from papertrade.service.logs import configure_logging
from papertrade.settings import ServiceSettings, Settings
from papertrade.stack.procs import settle_heap

Hook = Callable[["ServiceContext"], Awaitable[None]]

HTTP_REQUESTS = Counter(
    "papertrade_http_requests_total", "HTTP requests answered", ["service", "method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "papertrade_http_request_seconds",
    "HTTP request latency",
    ["service", "method", "route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class ServiceContext:
    """What a running service holds: settings, links, background tasks, and its own state."""

    def __init__(self, name: str, settings: Settings, needs: Iterable[str] = LINK_NAMES) -> None:
        self.name = name
        self.settings = settings
        self.links = Links(settings, name, needs)
        self.log = structlog.get_logger(name)
        self.state: dict[str, Any] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = asyncio.Event()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run `coro` in the background until shutdown; a crash is logged, never silent."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    async def cancel_tasks(self, timeout: float = 5.0) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.log.error("background task crashed", task=task.get_name(), error=repr(exc), exc_info=exc)


def get_ctx(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


def require_admin(request: Request) -> None:
    """Dependency for admin routes: `Authorization: Bearer <PAPERTRADE_ADMIN_TOKEN>`."""
    token = get_ctx(request).settings.admin_token_value
    if not token:
        raise ApiError(401, "admin routes are disabled: no PAPERTRADE_ADMIN_TOKEN is configured")
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "admin route: send Authorization: Bearer <admin token>")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "admin route: the admin token is not valid")


AdminDep = Depends(require_admin)


def create_app(
    ctx: ServiceContext,
    *,
    routers: Sequence[APIRouter] = (),
    on_startup: Sequence[Hook] = (),
    on_shutdown: Sequence[Hook] = (),
    title: str | None = None,
    description: str = "",
    version: str = "0.1.0",
) -> FastAPI:
    """A FastAPI app with the common endpoints, error bodies, metrics and a clean lifecycle."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ctx.links.open()
        for hook in on_startup:
            await hook(ctx)
        settle_heap()
        ctx.log.info("service started")
        try:
            yield
        finally:
            ctx.stopping.set()
            ctx.log.info("service stopping")
            for hook in reversed(on_shutdown):
                try:
                    await hook(ctx)
                except Exception as exc:
                    ctx.log.error(
                        "shutdown hook failed", hook=getattr(hook, "__name__", "?"), error=repr(exc)
                    )
            await ctx.cancel_tasks()
            await ctx.links.close()
            ctx.log.info("service stopped")

    app = FastAPI(
        title=title or f"papertrade {ctx.name}",
        description=description,
        version=version,
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
        redirect_slashes=False,
        # Metrics are Prometheus' (below); FastAPI's OpenTelemetry hooks would otherwise look up the
        # global providers (and the environment) on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(_MetricsMiddleware, service=ctx.name)
    app.include_router(_common_router())
    for router in routers:
        app.include_router(router)
    return app


def run_service(app: FastAPI, settings: ServiceSettings) -> None:
    """Serve `app` on the settings' host and port until SIGTERM/SIGINT, then shut down gracefully."""
    configure_logging(type(settings).service_name, settings.log_level, settings.log_format)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=CoalescingHttpToolsProtocol,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )
    uvicorn.Server(config).run()


def _common_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", summary="Alive")
    async def healthz(request: Request) -> dict[str, str]:
        return {"status": "ok", "service": get_ctx(request).name}

    @router.get("/readyz", summary="Ready: its NATS, Postgres and Redis links work")
    async def readyz(request: Request) -> ORJSONResponse:
        ctx = get_ctx(request)
        checks = await ctx.links.check()
        extra = ctx.state.get("readiness")
        if callable(extra):
            checks.update(await extra())
        down = {k: v for k, v in checks.items() if v != "ok"}
        if down:
            message = "not ready: " + "; ".join(f"{k}: {v}" for k, v in down.items())
            return ORJSONResponse(
                {"code": int(ErrorCode.UNAVAILABLE), "message": message, "checks": checks}, status_code=503
            )
        return ORJSONResponse({"status": "ready", "service": ctx.name, "checks": checks})

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


class _MetricsMiddleware:
    """Counts and times every request by its route template (pure ASGI: no per-request task)."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            key = (method, path, status)
            children = self._children.get(key)
            if children is None:  # `labels()` takes a lock and builds its key on every call: once per key
                children = self._children[key] = (
                    HTTP_REQUESTS.labels(self.service, method, path, str(status)),
                    HTTP_LATENCY.labels(self.service, method, path),
                )
            children[0].inc()
            children[1].observe(time.perf_counter() - start)
