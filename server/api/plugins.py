"""``GET /v1/plugins`` (admin key): the plugins found at start, loaded or not, with their hooks and feedback kinds
(what ``alignd plugins`` prints), for the operator dashboard."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency

from alignd.api.openapi import ADMIN, documented
from alignd.auth import admin_guard
from alignd.feedback.manager import AlignPluginManager, describe_plugins
from alignd.protocol import PluginCard, PluginList


class PluginController(Controller):
    path = "/v1/plugins"
    guards = (admin_guard,)

    @get("/", **documented(errors=ADMIN))
    async def list_plugins(self, plugins: NamedDependency[AlignPluginManager]) -> PluginList:
        return PluginList(data=[PluginCard(name=p.name, origin=p.origin, status=p.status, hooks=list(p.hooks),
                                           kinds=list(p.kinds)) for p in describe_plugins(plugins)])
