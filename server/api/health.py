"""``/health`` (the process is up), ``/ready`` (the engine is loaded and healthy) and ``/metrics``."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST

from alignd.protocol import Health


@get("/health")
async def health(request: Request[Any, Any, Any]) -> Health:
    return Health(status="ok")


@get("/ready")
async def ready(request: Request[Any, Any, Any]) -> Response[Health]:
    state = request.app.state
    engine = getattr(state, "engine", None)
    if engine is None or getattr(state, "stopping", False):
        return Response(Health(status="starting" if engine is None else "stopping"), status_code=503)
    try:
        await engine.check_health()
    except Exception as e:
        return Response(Health(status="unhealthy", detail=f"{type(e).__name__}: {e}"), status_code=503)
    return Response(Health(status="ready", policy_version=state.router.promoted))


@get("/metrics", media_type=CONTENT_TYPE_LATEST)
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    state = request.app.state
    state.metrics.promoted_version.set(state.router.promoted)
    return state.metrics.render()
