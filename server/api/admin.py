"""Key administration (admin key): list, add and revoke API keys at run time, without a restart. Thin handlers over
the key ring (:mod:`alignd.keys`); the keys live in the database, so every replica sees the same ones."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from alignd.api.body import read_body
from alignd.api.openapi import ADMIN, documented
from alignd.auth import admin_guard, principal_of
from alignd.config import Settings
from alignd.decoding import decode
from alignd.errors import Unprocessable
from alignd.protocol import ApiKey, ApiKeyCreated, ApiKeyList, ApiKeyRequest
from alignd.services import Services


class KeyController(Controller):
    path = "/v1/admin/keys"
    guards = (admin_guard,)

    @get("/", **documented(errors=ADMIN))
    async def list_keys(self, services: NamedDependency[Services]) -> ApiKeyList:
        return ApiKeyList(data=await services.keys.list_keys())

    @post("/", status_code=201, **documented(body=ApiKeyRequest, errors=(*ADMIN, 409)))
    async def create_key(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], settings: NamedDependency[Settings]
    ) -> Response[ApiKeyCreated]:
        body = decode(await read_body(request, settings.server.max_body_bytes), ApiKeyRequest, invalid=Unprocessable)
        created = await services.keys.create_key(body.name, body.role, by=principal_of(request))
        # The answer holds the key itself, the only time it is sent: no cache may keep it.
        return Response(created, status_code=201, headers={"Cache-Control": "no-store"})

    @get("/{key_id:str}", **documented(errors=(*ADMIN, 404)))
    async def get_key(self, services: NamedDependency[Services], key_id: FromPath[str]) -> ApiKey:
        return await services.keys.get_key(key_id)

    @delete("/{key_id:str}", status_code=200, **documented(errors=(*ADMIN, 404, 409)))
    async def revoke_key(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], key_id: FromPath[str]
    ) -> ApiKey:
        return await services.keys.revoke_key(key_id, by=principal_of(request))
