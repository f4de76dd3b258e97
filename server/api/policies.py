"""Operator endpoints for policy versions (admin key): list, promote, roll back."""

from __future__ import annotations

from typing import Any

from litestar import Request, get, post
from litestar.params import FromPath

from alignd.api.body import read_body
from alignd.auth import admin_guard
from alignd.decoding import decode
from alignd.policies.registry import PolicyRegistry
from alignd.protocol import Policy, PolicyList, RollbackRequest


def _registry(request: Request[Any, Any, Any]) -> PolicyRegistry:
    return request.app.state.registry


@get("/v1/policies", guards=[admin_guard])
async def list_policies(request: Request[Any, Any, Any]) -> PolicyList:
    return await _registry(request).list()


@get("/v1/policies/{version:int}", guards=[admin_guard])
async def get_policy(request: Request[Any, Any, Any], version: FromPath[int]) -> Policy:
    return await _registry(request).get(version)


@post("/v1/policies/{version:int}/promote", status_code=200, guards=[admin_guard])
async def promote_policy(request: Request[Any, Any, Any], version: FromPath[int]) -> Policy:
    return await _registry(request).promote(version, reason="promoted by an operator")


@post("/v1/policies/rollback", status_code=200, guards=[admin_guard])
async def rollback_policy(request: Request[Any, Any, Any]) -> Policy:
    body = await read_body(request, request.app.state.settings.server.max_body_bytes)
    target = decode(body, RollbackRequest) if body.strip() else RollbackRequest()
    return await _registry(request).rollback(target.version)
