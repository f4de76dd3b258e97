"""Operator endpoints for end users (admin key): what is stored of one, deleting it, their trust states (list, set),
and a retention pass now. Thin handlers over the privacy service (:mod:`alignd.privacy`)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from alignd.api.body import read_body
from alignd.api.openapi import ADMIN, documented
from alignd.auth import admin_guard, principal_of
from alignd.config import Settings
from alignd.decoding import convert_query, decode
from alignd.errors import Unprocessable
from alignd.privacy import PrivacyService
from alignd.protocol import (
    RetentionRequest,
    RetentionRun,
    UserData,
    UserDeletion,
    UserListQuery,
    UserQuery,
    UserTrust,
    UserTrustList,
    UserTrustUpdate,
)


class UserController(Controller):
    # The user id is a path parameter of type "path": end-user ids are any string, "/" included (percent-encoded).
    path = "/v1/admin/users"
    guards = (admin_guard,)

    @get("/{user:path}", **documented(query=UserQuery, errors=(*ADMIN, 404, 422)))
    async def get_user(self, request: Request[Any, Any, Any], privacy: NamedDependency[PrivacyService],
                       user: FromPath[str]) -> UserData:
        return await privacy.user_data(_user(user), _query(request).principal)

    @delete("/{user:path}", status_code=200, **documented(query=UserQuery, errors=(*ADMIN, 422)))
    async def delete_user(self, request: Request[Any, Any, Any], privacy: NamedDependency[PrivacyService],
                          user: FromPath[str]) -> UserDeletion:
        return await privacy.delete_user(_user(user), _query(request).principal, by=principal_of(request))

    @get("/", **documented(query=UserListQuery, errors=(*ADMIN, 422)))
    async def list_users(self, request: Request[Any, Any, Any],
                         privacy: NamedDependency[PrivacyService]) -> UserTrustList:
        values = {name: values[-1] for name, values in request.query_params.dict().items()}
        return await privacy.list_users(convert_query(values, UserListQuery, invalid=Unprocessable))

    @patch("/{user:path}", **documented(body=UserTrustUpdate, errors=(*ADMIN, 422)))
    async def set_trust(self, request: Request[Any, Any, Any], privacy: NamedDependency[PrivacyService],
                        settings: NamedDependency[Settings], user: FromPath[str]) -> UserTrust:
        body = decode(await read_body(request, settings.server.max_body_bytes), UserTrustUpdate, invalid=Unprocessable)
        return await privacy.set_trust(_user(user), body, by=principal_of(request))


class RetentionController(Controller):
    path = "/v1/admin/retention"
    guards = (admin_guard,)

    @post("/", status_code=200,
          **documented(body=RetentionRequest, body_optional=True, errors=(*ADMIN, 422)))
    async def enforce_retention(self, request: Request[Any, Any, Any], privacy: NamedDependency[PrivacyService],
                                settings: NamedDependency[Settings]) -> RetentionRun:
        body = await read_body(request, settings.server.max_body_bytes)
        retention = decode(body, RetentionRequest, invalid=Unprocessable) if body.strip() else RetentionRequest()
        return await privacy.enforce_retention(retention.older_than_days)


def _user(path: str) -> str:
    return path.removeprefix("/")  # a "path" parameter keeps the slash before it


def _query(request: Request[Any, Any, Any]) -> UserQuery:
    values = {name: values[-1] for name, values in request.query_params.dict().items()}
    return convert_query(values, UserQuery, invalid=Unprocessable)
