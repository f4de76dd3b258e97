"""What one alignd app is made of, and their lifetime: :func:`open_services` builds them in order, starts the engine
in the background and tears everything down in reverse; handlers receive them through Litestar dependencies.

One composition for the three roles (:mod:`alignd.cluster`): ``all`` (one box), ``serve`` (a replica that never
trains: its training-run service is the database queue, :class:`alignd.trainer.queue.RunQueue`) and ``trainer``
(``alignd trainer``: the supervisor holds the trainer lease and takes queued runs; the canary's live test is judged
by the replicas that serve its traffic).

Start-up order: plugins first (a broken or conflicting plugin stops the start before anything is opened), the role's
database checked (a split role on SQLite is refused before it is opened), the store (schema migrated), the cluster
checks (the base model the database records, the promoted adapter's SHA-256: a mismatch stops the start before
anything is written), the feedback service with every plugin's ``startup``, the key ring (configured keys checked
against the stored ones), the router and registry, the trainer's supervisor, retention (with ``--retain-days``, a
background pass now and every ``--retention-interval-s``), then the engine, in the background: the HTTP server
answers as soon as this returns, with ``/ready`` and chat answering 503 until the engine is up, so that orchestrators
can tell "alive" from "ready".
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from alignd.auth import AllowedHosts
from alignd.chat import ChatService
from alignd.cluster import Role, check_database, check_role, role_of
from alignd.config import ConfigError, Settings
from alignd.feedback.manager import AlignPluginManager, collect_feedback_kinds, make_plugin_manager
from alignd.feedback.service import FeedbackService
from alignd.keys import KeyRing
from alignd.limits import ChatLimits
from alignd.metrics import Metrics
from alignd.models import resolve_model
from alignd.policies.canary import CanaryConfig, CanaryExperiment
from alignd.policies.registry import PolicyRegistry
from alignd.policies.replicas import ReplicaSet
from alignd.policies.router import PolicyRouter
from alignd.privacy import PrivacyService
from alignd.store import Store
from alignd.trainer.config import check_trainer_settings, trainer_config
from alignd.trainer.queue import RunQueue, TrainingRuns
from alignd.trainer.supervisor import TrainerSupervisor, TriggerPolicy, default_threads

__all__ = ["Services", "open_services"]

log = logging.getLogger(__name__)


@dataclass
class Services:
    """One app's resources. ``engine`` and ``chat`` are None until the engine is up (or for good, when it failed:
    ``engine_error`` says why); ``stopping`` turns true when shutdown begins."""

    settings: Settings
    metrics: Metrics
    keys: KeyRing
    allowed_hosts: AllowedHosts
    chat_limits: ChatLimits
    plugins: AlignPluginManager
    store: Store
    feedback: FeedbackService
    router: PolicyRouter
    registry: PolicyRegistry
    trainer: TrainingRuns
    """Training runs: the supervisor (roles ``all`` and ``trainer``) or, on a serving replica, the queue."""
    canary: CanaryExperiment
    privacy: PrivacyService
    role: Role = "all"
    engine: Any = None
    """The serving engine (:class:`alignd.engine.vllm_engine.VLLMEngine`, or one a test passes in)."""
    chat: ChatService | None = None
    engine_error: str | None = None
    stopping: bool = False
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False, repr=False)  # engine start, policy sync

    async def attach_engine(self, engine: Any) -> None:
        """Serve chat from ``engine``: the promoted version is loaded before chat opens."""
        await self.registry.bootstrap(engine)
        self.engine = engine
        self.chat = ChatService(engine, self.router, self.store, self.metrics, max_n=self.settings.server.max_n)


@asynccontextmanager
async def open_services(settings: Settings, *, engine: Any = None, store: Store | None = None,
                        plugins: AlignPluginManager | None = None, role: Role | None = None) -> AsyncIterator[Services]:
    """The app's services for its lifetime. An ``engine`` or ``store`` passed in is used as is and not closed here;
    ``plugins`` replaces the manager built from the settings; ``role`` defaults to ``--trainer``'s (all or serve)."""
    role = role or role_of(settings)
    pm = plugins if plugins is not None else make_plugin_manager(settings)
    kinds = collect_feedback_kinds(pm)
    check_role(settings, role)
    metrics = Metrics()
    opened = store or await Store.open(settings.database_url, batch_max=settings.store.batch_max)
    feedback: FeedbackService | None = None
    services: Services | None = None
    try:
        await check_database(opened, resolve_model(settings.model, settings.data_path))
        feedback = FeedbackService(opened, pm, metrics, settings, kinds=kinds)
        await feedback.start()
        services = _assemble(settings, metrics, pm, opened, feedback, role)
        await services.keys.check_store()
        await services.trainer.open()
        if role != "trainer":  # the replicas serving the canary's traffic judge it (they count its requests)
            services._tasks.append(asyncio.create_task(services.canary.run(), name="alignd-canary"))
        # Heartbeats, and promotions from other replicas on the database (LISTEN/NOTIFY, polling)
        services._tasks.append(asyncio.create_task(_replicate(services), name="alignd-replicas"))
        if settings.store.retain_days is not None:  # every replica may run it: deleting twice finds nothing
            services._tasks.append(asyncio.create_task(services.privacy.run_retention(), name="alignd-retention"))
        if engine is not None:
            await services.attach_engine(engine)
        else:
            services._tasks.append(asyncio.create_task(_start_engine(services), name="alignd-engine-start"))
        _settle_gc()
        yield services
    finally:
        if services is not None:
            services.stopping = True
            for task in services._tasks:  # an engine half started is shut down by its cancelled start
                task.cancel()
            await asyncio.gather(*services._tasks, return_exceptions=True)
            await services.trainer.close()
        if feedback is not None:
            await feedback.close()
        if store is None:
            await opened.close()
        if engine is None and services is not None and services.engine is not None:
            await asyncio.to_thread(services.engine.shutdown)


def _assemble(settings: Settings, metrics: Metrics, pm: AlignPluginManager, store: Store,
              feedback: FeedbackService, role: Role) -> Services:
    t = settings.trainer
    if t.lora_rank > settings.engine.max_lora_rank:
        raise ConfigError(f"trainer.lora_rank ({t.lora_rank}, --lora-rank) exceeds engine.max_lora_rank "
                          f"({settings.engine.max_lora_rank}, --max-lora-rank): the engine could not serve it")
    check_trainer_settings(t)
    services: Services | None = None

    def loaded_versions() -> list[int]:
        return services.engine.loaded_versions if services is not None and services.engine is not None else [0]

    router = PolicyRouter(settings.served_name, loaded_versions)
    registry = PolicyRegistry(store, router, metrics, settings.data_path / "policies",
                              max_rank=settings.engine.max_lora_rank,
                              keep_loaded=settings.engine.max_loras - 1,  # one slot for rollouts
                              replicas=ReplicaSet.from_settings(store, settings.store, role))
    trigger = TriggerPolicy(auto=t.training_trigger == "auto", min_new_pairs=t.min_new_pairs,
                            min_new_labels=t.min_new_labels, min_interval_s=t.min_interval_s)
    canary = CanaryExperiment(registry, store, metrics, CanaryConfig.from_settings(t))
    trainer: TrainerSupervisor | RunQueue
    if role == "serve":
        trainer = RunQueue(store, router, lambda request: trainer_config(t, request),
                           instance=f"{socket.gethostname()}-{os.getpid()}")
    else:
        trainer = TrainerSupervisor(store, registry, metrics,
                                    base_model=lambda: resolve_model(settings.model, settings.data_path),
                                    database_url=settings.database_url, runs_dir=settings.data_path / "runs",
                                    config=lambda request: trainer_config(t, request),
                                    threads=t.trainer_threads or default_threads(), trigger=trigger,
                                    run_timeout_s=t.run_timeout_s, hold_lease=role == "trainer")
        trainer.canary = canary
    server = settings.server
    if server.chat_max_concurrent and server.chat_max_concurrent * server.max_n >= settings.engine.max_num_seqs:
        log.warning("one caller may run %d chat requests of up to %d choices at once, as many sequences as the engine "
                    "schedules (--max-num-seqs %d): it can keep others waiting; lower --chat-max-concurrent",
                    server.chat_max_concurrent, server.max_n, settings.engine.max_num_seqs)
    services = Services(settings=settings, metrics=metrics,
                        keys=KeyRing(store, server),
                        allowed_hosts=AllowedHosts(server.allowed_hosts, server.host),
                        chat_limits=ChatLimits(server.chat_requests_per_minute, server.chat_max_concurrent),
                        plugins=pm, store=store, feedback=feedback, router=router, registry=registry, trainer=trainer,
                        canary=canary, privacy=PrivacyService(store, feedback, metrics, settings), role=role)
    return services


async def _start_engine(services: Services) -> None:
    from alignd.engine.vllm_engine import VLLMEngine

    model = resolve_model(services.settings.model, services.settings.data_path)
    try:
        await services.attach_engine(await VLLMEngine.start(model, services.settings.engine))
        log.info("engine ready: %s (context %d)", model, services.engine.max_model_len)
        _settle_gc()
    except Exception as e:
        services.engine_error = f"{type(e).__name__}: {e}"
        log.critical("the engine failed to start, stopping: %s", services.engine_error)
        os.kill(os.getpid(), signal.SIGTERM)


async def _replicate(services: Services) -> None:
    registry = services.registry
    await registry.replicas.run(registry.reconcile, registry.heartbeat)


def _settle_gc() -> None:
    """Take what start-up built (modules, the engine's objects, caches) out of the cyclic collector's view, and
    collect young objects less often: full collections over them paused requests for tens of milliseconds
    (feedback p99 70 ms -> 30 ms in bench/feedback.py)."""
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, 50_000), max(gen1, 50), max(gen2, 100))
