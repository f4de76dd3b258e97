"""Operator endpoints for policy versions (admin key): list, promote, roll back, evaluate, and the canary's live
test (start or change its share, stop, promote, reject)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import Parameter

from alignd.api.body import read_body
from alignd.api.openapi import ADMIN, documented
from alignd.auth import admin_guard
from alignd.config import Settings
from alignd.decoding import decode
from alignd.policies.canary import CanaryExperiment
from alignd.policies.registry import PolicyRegistry
from alignd.protocol import CanaryRequest, Policy, PolicyEvaluation, PolicyList, RollbackRequest

# Path versions in the store's range (a 400 beyond it, which the schema states), as the bodies' PolicyVersion.
Version = Annotated[int, Parameter(ge=0, le=2**31 - 1)]


class PolicyController(Controller):
    path = "/v1/policies"
    guards = (admin_guard,)

    @get("/", **documented(errors=ADMIN))
    async def list_policies(self, registry: NamedDependency[PolicyRegistry]) -> PolicyList:
        return await registry.list()

    @get("/{version:int}", **documented(errors=(*ADMIN, 400, 404)))
    async def get_policy(self, registry: NamedDependency[PolicyRegistry], version: Version) -> Policy:
        return await registry.get(version)

    @post("/{version:int}/promote", status_code=200, **documented(errors=(*ADMIN, 400, 404, 409, 422)))
    async def promote_policy(self, registry: NamedDependency[PolicyRegistry], version: Version) -> Policy:
        return await registry.promote(version, reason="promoted by an operator")

    @post("/rollback", status_code=200,
          **documented(body=RollbackRequest, body_optional=True, errors=(*ADMIN, 404, 409)))
    async def rollback_policy(self, request: Request[Any, Any, Any], registry: NamedDependency[PolicyRegistry],
                              settings: NamedDependency[Settings]) -> Policy:
        body = await read_body(request, settings.server.max_body_bytes)
        target = decode(body, RollbackRequest) if body.strip() else RollbackRequest()
        return await registry.rollback(target.version)

    @get("/{version:int}/evaluation", **documented(errors=(*ADMIN, 400, 404)))
    async def policy_evaluation(self, canary: NamedDependency[CanaryExperiment], version: Version
                                ) -> PolicyEvaluation:
        return await canary.evaluation(version)

    @post("/{version:int}/canary", status_code=200,
          **documented(body=CanaryRequest, body_optional=True, errors=(*ADMIN, 400, 404, 409, 422)))
    async def start_canary(self, request: Request[Any, Any, Any], canary: NamedDependency[CanaryExperiment],
                           settings: NamedDependency[Settings], version: Version) -> Policy:
        body = await read_body(request, settings.server.max_body_bytes)
        asked = decode(body, CanaryRequest) if body.strip() else CanaryRequest()
        return await canary.start(version, asked.share, side_by_side=asked.side_by_side)

    @post("/{version:int}/canary/promote", status_code=200, **documented(errors=(*ADMIN, 400, 404, 409, 422)))
    async def promote_canary(self, canary: NamedDependency[CanaryExperiment], version: Version) -> Policy:
        return await canary.promote(version)

    @post("/{version:int}/canary/reject", status_code=200, **documented(errors=(*ADMIN, 400, 404, 409)))
    async def reject_canary(self, canary: NamedDependency[CanaryExperiment], version: Version) -> Policy:
        return await canary.reject(version)

    @post("/{version:int}/canary/stop", status_code=200, **documented(errors=(*ADMIN, 400, 404, 409)))
    async def stop_canary(self, canary: NamedDependency[CanaryExperiment], version: Version) -> Policy:
        return await canary.stop(version)
