"""The plugin manager: which plugins load, and the calls into their contribution hooks.

The manager is built per app by :func:`make_plugin_manager` from the settings, never at import. Every plugin, built-in
or not, goes through the same path: a name, an import target and where it came from (built-in, an installed
package's entry point in the group ``"alignd"``, or ``plugin_modules`` in the config), filtered by the allow and
block lists, loaded, registered under its name, and checked with ``check_pending()`` (a misspelt hook name is a
start-up error, not a silently dead plugin).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import pluggy
from litestar import Request, Router
from litestar.di import Provide

from alignd.auth import admin_guard, principal_of, user_guard
from alignd.feedback import hookspecs
from alignd.feedback.types import CallerFeedback, Converter, FeedbackKind
from alignd.protocol import FEEDBACK_COMMON_FIELDS

if TYPE_CHECKING:
    from alignd.config import Settings

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "AlignPluginManager",
    "PluginError",
    "PluginInfo",
    "collect_feedback_kinds",
    "collect_routes",
    "describe_plugins",
    "make_plugin_manager",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "alignd"

#: The built-in plugins, loaded exactly like a module named in ``plugin_modules`` (name: the module's last part).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "alignd.plugins.thumbs",
    "alignd.plugins.ranking",
    "alignd.plugins.pairwise",
    "alignd.plugins.side_by_side",
    "alignd.plugins.rating",
    "alignd.plugins.edit",
    "alignd.plugins.pii_redact",
    "alignd.plugins.quota",
    "alignd.plugins.jsonl_sink",
    "alignd.plugins.webhook",
)

_PLUGIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # it becomes a URL segment: /v1/plugins/<name>/
_KIND_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class PluginError(Exception):
    """A plugin cannot be loaded or contradicts another; the server does not start. The message names the plugins."""


# --- the manager -------------------------------------------------------------------------------------------------


class AlignPluginManager(pluggy.PluginManager):
    """pluggy's manager with alignd's hook specs, remembering where each plugin came from and which were skipped."""

    def __init__(self) -> None:
        super().__init__("alignd")
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, str] = {}
        """Loaded plugin name → where it came from."""
        self.skipped: dict[str, tuple[str, str]] = {}
        """Plugin name → (where it came from, why it was not loaded)."""


@dataclass(frozen=True)
class PluginInfo:
    """One line of ``alignd plugins``."""

    name: str
    origin: str
    status: str
    hooks: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Candidate:
    name: str
    origin: str
    load: Callable[[], object]


def make_plugin_manager(settings: Settings) -> AlignPluginManager:
    """Load the built-in, installed (entry points) and configured plugins that the allow and block lists let through.

    Raises :class:`PluginError` when a plugin cannot be imported, two plugins share a name, a plugin implements a
    hook that does not exist, or the allow list names a plugin that is nowhere to be found.
    """
    config = settings.plugins
    pm = AlignPluginManager()
    candidates = _candidates(config.plugin_modules, entry_points=config.load_entry_points)
    seen: dict[str, str] = {}
    for candidate in candidates:
        if not _PLUGIN_NAME.match(candidate.name):
            raise PluginError(f"plugin name {candidate.name!r} ({candidate.origin}) is not valid: use letters, "
                              "digits, '_', '-' or '.'")
        if candidate.name in seen:
            raise PluginError(f"two plugins are named {candidate.name!r}: {seen[candidate.name]} and "
                              f"{candidate.origin}; block one of them or rename it")
        seen[candidate.name] = candidate.origin
    if unknown := sorted(set(config.allow_plugins) - set(seen)):
        raise PluginError(f"allow_plugins names unknown plugin(s) {', '.join(unknown)}; known: {', '.join(seen)}")
    if unknown := sorted(set(config.block_plugins) - set(seen)):
        log.warning("block_plugins names plugin(s) that are not installed: %s", ", ".join(unknown))
    for candidate in candidates:
        if candidate.name in config.block_plugins:
            pm.set_blocked(candidate.name)
            pm.skipped[candidate.name] = (candidate.origin, "blocked")
            continue
        if config.allow_plugins and candidate.name not in config.allow_plugins:
            pm.skipped[candidate.name] = (candidate.origin, "not in allow_plugins")
            continue
        try:
            plugin = candidate.load()
        except Exception as exc:
            raise PluginError(f"plugin {candidate.name!r} ({candidate.origin}) failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc
        if inspect.isclass(plugin):
            plugin = plugin()  # a class: its instance carries the hook implementations
        try:
            pm.register(plugin, name=candidate.name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f"plugin {candidate.name!r} ({candidate.origin}) cannot be registered: {exc}") from exc
        pm.origins[candidate.name] = candidate.origin
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin)
        raise PluginError(f"plugin {name!r} ({pm.origins.get(name)}) implements a hook alignd does not have "
                          f"(misspelt?): {exc}") from exc
    return pm


def _candidates(modules: Iterable[str], *, entry_points: bool) -> list[_Candidate]:
    out = [_Candidate(target.rpartition(".")[2], "built-in", _loader(target)) for target in BUILTIN_PLUGINS]
    if entry_points:
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "an unknown package"
            out.append(_Candidate(ep.name, f"entry point {ep.value!r} of {dist}", ep.load))
    for target in modules:
        module, _, attribute = target.partition(":")
        out.append(_Candidate(attribute or module.rpartition(".")[2], f"plugin_modules {target!r}", _loader(target)))
    return out


def _loader(target: str) -> Callable[[], object]:
    """Import ``package.module`` or ``package.module:object`` (like an entry point's value) when called."""

    def load() -> object:
        module_name, _, attribute = target.partition(":")
        obj: object = importlib.import_module(module_name)
        for part in filter(None, attribute.split(".")):
            obj = getattr(obj, part)
        return obj

    return load


def call_impl(impl: pluggy.HookImpl, **kwargs: Any) -> Any:
    """Call one hook implementation with the arguments it asks for (pluggy passes them positionally)."""
    return impl.function(*(kwargs[name] for name in impl.argnames))


def hook_impls(hook: pluggy.HookCaller) -> list[pluggy.HookImpl]:
    """The implementations of ``hook`` in the order pluggy calls them (last registered first, tryfirst/trylast)."""
    return list(reversed(hook.get_hookimpls()))


def collect_feedback_kinds(pm: pluggy.PluginManager) -> dict[str, FeedbackKind]:
    """Call every ``register_feedback_kinds``; raise :class:`PluginError` for an invalid or duplicate kind."""
    kinds: dict[str, FeedbackKind] = {}
    for impl in hook_impls(pm.hook.register_feedback_kinds):
        plugin = impl.plugin_name

        def register(name: str, payload: type[msgspec.Struct], convert: Converter, *, description: str = "",
                     uses_history: bool = False, _plugin: str = plugin) -> None:
            if not isinstance(name, str) or not _KIND_NAME.match(name):
                raise PluginError(f"plugin {_plugin!r} registers feedback kind {name!r}: a kind name is lowercase "
                                  "letters, digits, '_' or '-', starting with a letter")
            if name in kinds:
                raise PluginError(f"feedback kind {name!r} is registered by both plugin {kinds[name].plugin!r} "
                                  f"and plugin {_plugin!r}; block one of them (block_plugins)")
            if not (inspect.isclass(payload) and issubclass(payload, msgspec.Struct)):
                raise PluginError(f"plugin {_plugin!r}: the payload of kind {name!r} must be a msgspec.Struct class")
            if clash := sorted(FEEDBACK_COMMON_FIELDS & set(payload.__struct_fields__)):
                raise PluginError(f"plugin {_plugin!r}: the payload of kind {name!r} reuses common feedback "
                                  f"field(s) {', '.join(clash)}")
            if not callable(convert):
                raise PluginError(f"plugin {_plugin!r}: the converter of kind {name!r} is not callable")
            kinds[name] = FeedbackKind(name, payload, convert, _plugin, description, uses_history)

        try:
            call_impl(impl, register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {plugin!r} failed in register_feedback_kinds: "
                              f"{type(exc).__name__}: {exc}") from exc
    return kinds


_GUARDS: dict[str, list[Any]] = {"user": [user_guard], "admin": [admin_guard], "none": []}


def _caller_feedback(request: Request[Any, Any, Any]) -> CallerFeedback:
    """A plugin route's ``feedback``: the service acting for the caller its guard found."""
    return CallerFeedback(request.app.state.services.feedback, principal_of(request))


def collect_routes(pm: pluggy.PluginManager) -> list[Router]:
    """Call every ``register_routes``: one router per plugin and access level, under ``/v1/plugins/<name>``."""
    routers: list[Router] = []
    for impl in hook_impls(pm.hook.register_routes):
        handlers: dict[str, list[Any]] = {auth: [] for auth in _GUARDS}

        def register(handler: Any, *, auth: str = "user", _plugin: str = impl.plugin_name,
                     _handlers: dict[str, list[Any]] = handlers) -> None:
            if auth not in _GUARDS:
                raise PluginError(f"plugin {_plugin!r} registers a route with auth={auth!r}; "
                                  "use 'user', 'admin' or 'none'")
            _handlers[auth].append(handler)

        try:
            call_impl(impl, register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {impl.plugin_name!r} failed in register_routes: "
                              f"{type(exc).__name__}: {exc}") from exc
        for auth, route_handlers in handlers.items():
            if route_handlers:
                routers.append(Router(f"/v1/plugins/{impl.plugin_name}", route_handlers=route_handlers,
                                      guards=_GUARDS[auth],
                                      dependencies={"feedback": Provide(_caller_feedback, sync_to_thread=False)}))
    return routers


def describe_plugins(pm: AlignPluginManager) -> list[PluginInfo]:
    """Every plugin found, loaded or not, with its hooks and feedback kinds (for ``alignd plugins``)."""
    kinds_by_plugin: dict[str, list[str]] = {}
    for kind in collect_feedback_kinds(pm).values():
        kinds_by_plugin.setdefault(kind.plugin, []).append(kind.name)
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or []))
        infos.append(PluginInfo(name, pm.origins.get(name, "registered at run time"), "loaded", hooks,
                                tuple(kinds_by_plugin.get(name, ()))))
    infos.extend(PluginInfo(name, origin, why) for name, (origin, why) in pm.skipped.items())
    return infos


async def maybe_await(value: Awaitable[Any] | Any) -> Any:
    """Await ``value`` if a hook implementation returned an awaitable (a coroutine function's result)."""
    return await value if inspect.isawaitable(value) else value
