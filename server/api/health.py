"""``/health`` (the process is up), ``/ready`` (the engine is loaded and healthy, the database usable) and
``/metrics`` (a metrics, frontend or admin key, once keys are in use or metrics keys are set). The probes stay open
for orchestrators, so they tell nothing but a status."""

from __future__ import annotations

import logging

from litestar import Controller, Response, get
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from prometheus_client import CONTENT_TYPE_LATEST

from alignd.api.openapi import documented
from alignd.auth import metrics_guard
from alignd.protocol import Health
from alignd.services import Services

log = logging.getLogger(__name__)


class HealthController(Controller):
    @get("/health")
    async def health(self) -> Health:
        return Health(status="ok")

    @get("/ready", responses={503: ResponseSpec(Health, description="Starting, stopping or unhealthy.",
                                                generate_examples=False)})
    async def ready(self, services: NamedDependency[Services]) -> Response[Health]:
        engine = services.engine
        if engine is None or services.stopping:
            return Response(Health(status="stopping" if services.stopping else "starting"), status_code=503)
        if services.registry.unavailable is not None:  # the promoted version's adapter is missing or corrupt
            return Response(Health(status="policy_unavailable", detail=services.registry.unavailable),
                            status_code=503)
        try:
            await engine.check_health()
        except Exception:
            log.warning("engine health check failed", exc_info=True)  # the reason goes to the log, not to anyone asking
            return Response(Health(status="unhealthy"), status_code=503)
        # A short, cached probe; its reason goes to the log. "database_full": writes fail for want of disk space.
        database = await services.store.check_health()
        services.metrics.database_up.set(database is None)
        if database is not None:
            return Response(Health(status="database_full" if database == "full" else "database_unavailable"),
                            status_code=503, headers={"Retry-After": "5"})
        return Response(Health(status="ready", policy_version=services.router.promoted))

    @get("/metrics", media_type=CONTENT_TYPE_LATEST, guards=[metrics_guard], **documented(errors=(401, 403)))
    async def metrics(self, services: NamedDependency[Services]) -> bytes:
        services.metrics.promoted_version.set(services.router.promoted)
        return services.metrics.render()
