"""The policy registry: versions, their adapter folders, their status, and the hot-swap between them.

The database is the source of truth (table ``policies``), adapters included: each version > 0 is a PEFT adapter
(safetensors only) whose files are rows of ``adapter_blobs`` keyed by their SHA-256, listed in the version's
``adapter_files``, written in the transaction that allocates the version. Each process keeps a local copy under
``<data dir>/policies/<version>/`` (the row keeps that path relative to the data dir), fetched from the database when
missing and verified against the SHA-256s before every load, with a ``manifest.json`` (parent, run, figures,
created, the files' SHA-256s) where it was registered. Versions registered before the blobs (no ``adapter_files``)
are read from their folder only. Promotion loads the adapter into the engine first, so a failed load changes
nothing; it then records the version as desired and routes new requests to it once every live replica has loaded
it (:mod:`alignd.policies.replicas`); requests already generating finish on the version they started with.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alignd.errors import Conflict, NotFound, Unprocessable
from alignd.faults import failpoint
from alignd.metrics import Metrics
from alignd.policies.replicas import ReplicaSet, lagging
from alignd.policies.router import Canary, PolicyRouter, Tally
from alignd.protocol import Policy, PolicyList, Promotion, Replica
from alignd.store import Fence, PolicyRow, Store
from alignd.store.replicas import ReplicaRow

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class AdapterError(Exception):
    """An adapter folder that must not be loaded (missing, pickled, corrupt, or too large a rank)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_adapter(folder: Path, max_rank: int, sha256: str | None = None, files: dict[str, str] | None = None) -> None:
    """Refuse an adapter folder before vLLM sees it: config readable, rank within the engine's limit, weights in
    safetensors (never pickle) that parse, and, when the registry recorded them, the same SHA-256s (``sha256`` of the
    weights, ``files``: of each file by name)."""
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    for name, expected in (files or {}).items():
        path = folder / _plain_name(name)
        if not path.is_file():
            raise AdapterError(f"{path} is missing")
        if file_sha256(path) != expected:
            raise AdapterError(f"{path} does not match the SHA-256 the registry recorded ({expected}): the file is "
                               "corrupt")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{folder / ADAPTER_CONFIG} is missing or not JSON: {e}") from e
    rank = config.get("r")
    if not isinstance(rank, int) or not 0 < rank <= max_rank:
        raise AdapterError(f"adapter rank {rank!r} is not within the engine's max_lora_rank {max_rank}")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{folder} has no {ADAPTER_WEIGHTS} (pickled weights are never loaded)")
    if sha256 is not None and file_sha256(weights) != sha256:
        raise AdapterError(f"{weights} does not match the SHA-256 its manifest recorded: the file is corrupt")
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="numpy") as f:
            for key in f.keys():
                f.get_slice(key).get_shape()
    except Exception as e:
        raise AdapterError(f"{weights} is not a readable safetensors file: {e}") from e


def _plain_name(name: str) -> str:
    """A file name of an adapter's manifest, refused when it would leave the folder."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise AdapterError(f"the adapter manifest names a file {name!r} that is not a plain file name")
    return name


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


class PolicyRegistry:
    """Registered versions, which one is promoted, and the engine's loaded adapters."""

    def __init__(self, store: Store, router: PolicyRouter, metrics: Metrics, policies_dir: Path, *,
                 max_rank: int, keep_loaded: int, replicas: ReplicaSet | None = None) -> None:
        self.store = store
        self.replicas = replicas or ReplicaSet(store)
        """This process among the replicas on the database: heartbeats, the flip of the served version."""
        self.load_error: str | None = None
        """Why the last load of the desired version failed here (reported in the heartbeat), None once one works."""
        self.router = router
        self.metrics = metrics
        self.policies_dir = policies_dir
        self.max_rank = max_rank
        self.keep_loaded = max(1, keep_loaded)
        self.engine: Any = None
        self.ready = False
        """True once the promoted version is loaded and routed (training may start from it)."""
        self.unavailable: str | None = None
        """Why the version the database says is promoted is not served (its adapter is missing or corrupt): the
        server is then not ready until an operator promotes or rolls back to a version that loads."""
        self._lock = asyncio.Lock()
        self._loaded: dict[int, float] = {}  # version -> last promoted (monotonic), for eviction

    # --- start ------------------------------------------------------------------------------------------------

    async def bootstrap(self, engine: Any) -> None:
        """Record the base as version 0 once, then load and route to the promoted version (after a restart, the
        version promoted before it). If its adapter cannot be loaded, the base answers pinned and unpinned requests
        (``system_fingerprint`` says so), ``unavailable`` says why and ``/ready`` is 503 until an operator
        promotes or rolls back: a silent fallback would serve the wrong policy behind a green probe."""
        async with self._lock:
            await self._bootstrap(engine)
        self.ready = True
        await self.heartbeat(announce=True)
        self.replicas.wake()  # a promotion pending meanwhile: load it now

    async def _bootstrap(self, engine: Any) -> None:
        self.engine = engine
        if await self.store.get_policy(0) is None:
            now = datetime.now(UTC)
            await self.store.insert_policy(PolicyRow(version=0, status="promoted", parent=None, run_id=None,
                                                     adapter_path=None, metrics={}, reason="the base model",
                                                     created=now, promoted_at=now))
        promoted = [p for p in await self.store.list_policies() if p.status == "promoted"]
        version = promoted[0].version if promoted else 0
        if version:
            try:
                await self._load(await self._row(version))
            except Unprocessable as e:
                log.error("cannot load the promoted policy %d: not ready until a version that loads is promoted "
                          "(POST /v1/policies/{version}/promote or /v1/policies/rollback): %s", version, e.message)
                self.unavailable = (f"the promoted policy {version} cannot be loaded (see the server log); promote "
                                    "or roll back to a version that loads")
                version = 0
        self.router.promoted = version
        self.metrics.promoted_version.set(version)
        await self._resume_canary()

    async def _resume_canary(self) -> None:
        """Route the canary the database records (after a restart, or another replica's), if it loads; one that does
        not is logged and left unrouted (its experiment resumes once it loads, e.g. after a restart)."""
        row = await self.store.canary_policy()
        if row is None or row.version == self.router.promoted:
            self.router.canary = None
            return
        record = row.metrics.get("canary") or {}
        share, side_by_side = float(record.get("share", 0.0)), bool(record.get("side_by_side", False))
        held_back = not await self.replicas.everywhere(row.version)
        if self.router.canary is not None and self.router.canary.version == row.version:
            canary = self.router.canary
            if canary.held_back and not held_back:
                log.info("canary %d is loaded on every live replica: it gets its share now", row.version)
            canary.share, canary.side_by_side, canary.held_back = share, side_by_side, held_back
            return
        try:
            if not self._holds(row.version):
                await self._load(row)
                await self.heartbeat(announce=True)
                held_back = not await self.replicas.everywhere(row.version)
        except Unprocessable as e:
            log.error("cannot load the canary policy %d, not routing to it: %s", row.version, e.message)
            return
        self._loaded[row.version] = time.monotonic()
        self.router.canary = Canary(row.version, share, side_by_side, held_back=held_back)
        self.router.tally = Tally()
        log.info("canary %d resumed at share %.3f%s", row.version, share,
                 " (held back until every live replica has loaded it)" if held_back else "")

    # --- reads ------------------------------------------------------------------------------------------------

    async def _row(self, version: int) -> PolicyRow:
        row = await self.store.get_policy(version)
        if row is None:
            raise NotFound(f"There is no policy version {version}; see GET /v1/policies.", param="version",
                           code="policy_not_found")
        return row

    def _holds(self, version: int) -> bool:
        """Whether this registry loaded ``version`` into the engine and the engine still has it (another app sharing
        the engine, as tests' apps do, may hold a version of the same number from its own database)."""
        return self.engine is not None and version in self._loaded and version in self.engine.loaded_versions

    def _wire(self, row: PolicyRow, live: list[ReplicaRow] | None = None) -> Policy:
        loaded = row.version == 0 or self._holds(row.version)
        loaded_on = None if live is None else [r.instance_id for r in live if row.version in r.loaded]
        return Policy(version=row.version, status=row.status, parent=row.parent, run_id=row.run_id,  # type: ignore[arg-type]
                      created=row.created.isoformat(), promoted_at=_iso(row.promoted_at), loaded=loaded,
                      metrics=row.metrics, reason=row.reason, loaded_on=loaded_on)

    async def list(self) -> PolicyList:
        """Every version (with the live replicas holding it), the live replicas, and the promotion's state."""
        live = await self.replicas.live()
        state = await self.store.promotion_state()
        waiting = [r.instance_id for r in lagging(state.desired, live)]
        promotion = Promotion(desired=state.desired, served=state.served, pending=state.desired != state.served,
                              desired_at=_iso(state.desired_at), served_at=_iso(state.served_at),
                              deadline=_iso(state.desired_at + timedelta(seconds=self.replicas.timeout_s))
                              if state.desired != state.served and state.desired_at is not None else None,
                              loaded_on=[r.instance_id for r in live if state.desired in r.loaded],
                              waiting_for=waiting if state.desired != state.served else [],
                              laggards=state.laggards, flipped_by=state.flipped_by, reason=state.reason)
        replicas = [Replica(instance_id=r.instance_id, host=r.host, pid=r.pid, role=r.role, ready=r.ready,
                            loaded=r.loaded, serving=r.serving, error=r.error, started_at=r.started_at.isoformat(),
                            last_seen=r.last_seen.isoformat(), this=r.instance_id == self.replicas.instance_id)
                    for r in live]
        return PolicyList(data=[self._wire(r, live) for r in await self.store.list_policies()],
                          promoted=self.router.promoted, promotion=promotion, replicas=replicas)

    async def get(self, version: int) -> Policy:
        return self._wire(await self._row(version), await self.replicas.live())

    # --- this replica in the database ------------------------------------------------------------------------

    def held(self) -> list[int]:
        """The versions this registry has loaded in the engine (0, the base, always)."""
        return [0, *(v for v in self._loaded if v and self._holds(v))]

    async def heartbeat(self, announce: bool = False) -> None:
        """Report this replica (ready, loaded versions, the one it serves, its last load error) to the database;
        ``announce`` when its loaded versions changed, so that the others may flip at once."""
        await self.replicas.beat(ready=self.ready and self.unavailable is None, loaded=self.held(),
                                 serving=self.router.promoted if self.ready else None, error=self.load_error,
                                 announce=announce)

    # --- registration -----------------------------------------------------------------------------------------

    async def register(self, staged: Path, *, parent: int, run_id: str, metrics: dict[str, Any], passed: bool,
                       reason: str, fence: Fence | None = None) -> PolicyRow:
        """Register a trained adapter folder as the next version (allocated by the database), ``candidate`` if it
        passed the gate and ``rejected`` otherwise: its files go into the database with the row, in one
        transaction, then the folder becomes this process's local copy, with a manifest next to it. With ``fence``
        (its run's): :class:`alignd.store.LeaseLost`, nothing registered, once the trainer lease is another's."""
        async with self._lock:
            files, blobs = await asyncio.to_thread(_read_adapter, staged)
            created = datetime.now(UTC)
            row = PolicyRow(version=0, status="candidate" if passed else "rejected", parent=parent, run_id=run_id,
                            adapter_path=None, metrics={**metrics, "sha256": files[ADAPTER_WEIGHTS]}, reason=reason,
                            created=created, promoted_at=None, adapter_files=files)
            row = await self.store.register_policy(
                row, blobs, lambda version: str((self.policies_dir / str(version)).relative_to(self.data_dir)), fence)
            await asyncio.to_thread(_install, staged, self.data_dir / (row.adapter_path or ""), {
                "version": row.version, "parent": parent, "run_id": run_id, "metrics": metrics,
                "created": created.isoformat(), "gate": {"passed": passed, "reason": reason}, "files": files,
                "sha256": files[ADAPTER_WEIGHTS]})
            return row

    # --- hot-swap ---------------------------------------------------------------------------------------------

    async def promote(self, version: int, reason: str | None = None, fence: Fence | None = None) -> Policy:
        """Load ``version`` if it is not loaded (a failed load changes nothing), record it as the desired version,
        and route ``alignd`` to it once every live replica has loaded it: at once when they all have (a single
        process), else when the last one reports it or after the promotion timeout (GET /v1/policies shows the
        promotion pending meanwhile). With ``fence`` (a trainer promoting its run's candidate):
        :class:`alignd.store.LeaseLost`, nothing recorded or routed, once the trainer lease is another's."""
        async with self._lock:
            row = await self._row(version)
            if self.engine is None:
                raise Conflict("The engine is still loading; retry shortly.", code="engine_not_ready")
            started = time.perf_counter()
            if version and not self._holds(version):
                await self._load(row)
            self.load_error = None
            failpoint("promote:loaded")  # tests: a crash with the adapter loaded, the database not yet written
            # The database first: if the write fails, nothing was switched (and replicas agree with us).
            await self.store.set_desired(version, datetime.now(UTC), reason, fence)
            await self.heartbeat(announce=True)
            state = await self.replicas.try_flip()
            failpoint("promote:written")  # tests: a crash with the database written, requests not yet routed
            canary = self.router.canary
            if canary is not None and canary.version != version:  # promoting another version ends the canary
                await self._stop_canary(canary.version, "candidate", f"stopped: version {version} was promoted "
                                        "meanwhile")
            if state.served == version:
                await self._serve(version)
            self.metrics.policy_swap_seconds.observe(time.perf_counter() - started)
            log.info("policy %d promoted (%s)%s", version, reason or "by request", "" if state.served == version
                     else ": served once every live replica has loaded it")
            return self._wire(await self._row(version), await self.replicas.live())

    async def _serve(self, version: int) -> None:
        """Route the served name to ``version``, the database's served one (loaded here), ending a canary of it."""
        if self.router.promoted != version:
            await self._route(version)
        self.unavailable = None
        canary = self.router.canary
        if canary is not None and canary.version == version:  # its test ends: it takes all traffic
            self.router.canary = None
            self.metrics.canary_version.set(0)
            self.metrics.canary_share.set(0)

    async def follow(self) -> bool:
        """Reconcile this replica with the database (see :meth:`reconcile`); True when it switched versions."""
        before = self.router.promoted
        await self.reconcile()
        return self.router.promoted != before

    async def reconcile(self) -> None:
        """Catch up with the database: load the desired version (and report it), flip the served version when
        every live replica has it or the timeout ran out, route ``alignd`` to the served version once it is loaded
        here (not ready, naming why, while it cannot be), and follow the canary."""
        async with self._lock:
            if not self.ready or self.engine is None:
                return
            state = await self.store.promotion_state()
            announce = False
            if state.desired and not self._holds(state.desired):
                announce = await self._try_load(state.desired, "promoted")
            if state.desired != state.served:
                await self.heartbeat(announce=announce)
                announce = False
                state = await self.replicas.try_flip()
            served = state.served
            if served != self.router.promoted or self.unavailable is not None:
                if served and not self._holds(served):
                    announce = await self._try_load(served, "served") or announce
                if served == 0 or self._holds(served):
                    switched = served != self.router.promoted
                    await self._serve(served)
                    if switched:
                        log.info("policy %d is served now (promoted on every live replica)", served)
                else:
                    why = self.load_error or state.laggards.get(self.replicas.instance_id) or "not loaded yet"
                    self.unavailable = f"version {served} is served by the other replicas but not here: {why}"
            await self._resume_canary()  # another replica's canary starts, changes share or ends here too
            await self.heartbeat(announce=announce)

    async def _try_load(self, version: int, what: str) -> bool:
        """Load ``version`` (the ``what`` one); True when it loaded, else ``load_error`` says why."""
        try:
            await self._load(await self._row(version))
        except (Unprocessable, NotFound) as e:
            if self.load_error != e.message:
                log.error("version %d was %s, but cannot be loaded here: %s", version, what, e.message)
            self.load_error = e.message
            return False
        self.load_error = None
        log.info("version %d (%s) loaded here", version, what)
        return True

    async def _route(self, version: int) -> None:
        """Send new requests to a loaded ``version`` (running ones finish on theirs), then free older slots."""
        self.router.promoted = version
        self.unavailable = None
        self.load_error = None
        self._loaded[version] = time.monotonic()
        self.metrics.promoted_version.set(version)
        self.metrics.policy_swaps.inc()
        await self._evict()

    # --- canary -----------------------------------------------------------------------------------------------

    async def start_canary(self, version: int, share: float, reason: str, figures: dict[str, Any],
                           side_by_side: bool = False, fence: Fence | None = None) -> Policy:
        """Send ``share`` of the served name's users to candidate ``version`` (loaded first: a failed load changes
        nothing), or change the share of the running canary. Another running canary is stopped first (back to
        ``candidate``). ``figures`` start the experiment's record (kept in the row's ``metrics.canary``);
        ``side_by_side`` makes requests for several choices blind comparisons of the two. With ``fence`` (a trainer
        putting its run's candidate on canary): :class:`alignd.store.LeaseLost` before anything changes, once the
        trainer lease is another's."""
        async with self._lock:
            row = await self._row(version)
            if row.status not in ("candidate", "canary"):
                raise Conflict(f"Policy {version} is {row.status}; only a candidate can go on canary.",
                               param="version", code="not_a_candidate")
            if self.engine is None:
                raise Conflict("The engine is still loading; retry shortly.", code="engine_not_ready")
            if not self._holds(version):
                await self._load(row)
                await self.heartbeat(announce=True)
            running = self.router.canary
            if running is not None and running.version != version:
                await self._stop_canary(running.version, "candidate", f"stopped: version {version} went on canary",
                                        fence)
            earlier = (row.metrics.get("canary") or {}) if row.status == "canary" else {}
            record = {**earlier, **figures, "share": share, "side_by_side": side_by_side}
            await self.store.update_policy(version, status="canary", metrics={**row.metrics, "canary": record},
                                           reason=reason, fence=fence)
            if running is None or running.version != version:
                self.router.tally = Tally()
            # Its share only once every live replica has it loaded (until then the promoted version answers).
            held_back = not await self.replicas.everywhere(version)
            self.router.canary = Canary(version, share, side_by_side, held_back=held_back)
            await self.store.announce(f"canary {version}")
            self._loaded[version] = time.monotonic()
            self.metrics.canary_version.set(version)
            self.metrics.canary_share.set(share)
            log.info("policy %d on canary at share %.3f (%s)", version, share, reason)
            return self._wire(await self._row(version))

    def canary_version(self, version: int) -> Canary:
        """The running canary, which must be ``version`` (an operator acting on the canary names it)."""
        canary = self.router.canary
        if canary is None:
            raise Conflict("No canary is running.", param="version", code="no_canary")
        if canary.version != version:
            raise Conflict(f"Policy {version} is not the canary; version {canary.version} is.", param="version",
                           code="not_the_canary")
        return canary

    async def end_canary(self, version: int, outcome: str, reason: str, figures: dict[str, Any]) -> Policy:
        """End the canary ``version``: ``promoted`` (it takes all traffic), ``rejected`` (it serves nothing more) or
        ``stopped`` (back to ``candidate``); ``figures`` are the experiment's final record."""
        async with self._lock:
            self.canary_version(version)
            row = await self._row(version)
            await self.store.update_policy(version, metrics={**row.metrics, "canary": {
                **(row.metrics.get("canary") or {}), **figures, "outcome": outcome}})
            if outcome != "promoted":
                await self._stop_canary(version, "rejected" if outcome == "rejected" else "candidate", reason)
        if outcome == "promoted":
            return await self.promote(version, reason=reason)
        return await self.get(version)

    async def _stop_canary(self, version: int, status: str, reason: str, fence: Fence | None = None) -> None:
        """No more requests to canary ``version``; its row becomes ``status`` (call under the lock; ``fence``: a
        trainer's, whose write is refused once it lost the lease)."""
        await self.store.update_policy(version, status=status, reason=reason, fence=fence)
        await self.store.announce(f"canary {version} ended")
        if self.router.canary is not None and self.router.canary.version == version:
            self.router.canary = None
        self.metrics.canary_version.set(0)
        self.metrics.canary_share.set(0)
        log.info("canary %d ended: %s", version, reason)

    async def rollback(self, version: int | None = None) -> Policy:
        """Promote ``version``, or without one the version promoted before the current one."""
        if version is None:
            earlier = [r for r in await self.store.list_policies()
                       if r.promoted_at is not None and r.version != self.router.promoted]
            if not earlier:
                raise Conflict("No earlier promoted version to roll back to.", code="nothing_to_roll_back")
            version = max(earlier, key=lambda r: r.promoted_at or datetime.min.replace(tzinfo=UTC)).version
        return await self.promote(version, reason=f"rollback from version {self.router.promoted}")

    async def _load(self, row: PolicyRow) -> None:
        from alignd.engine.vllm_engine import PolicyLoadError  # the engine package imports vLLM lazily

        if row.adapter_path is None:
            raise Unprocessable(f"Policy {row.version} has no adapter folder.", code="policy_load_failed")
        try:
            folder = await self.materialize(row)
            assert folder is not None
            await asyncio.to_thread(check_adapter, folder, self.max_rank, row.metrics.get("sha256"), row.adapter_files)
            await self.engine.load_policy(row.version, folder)
        except (AdapterError, PolicyLoadError) as e:
            self.metrics.policy_load_failures.inc()
            raise Unprocessable(f"Policy {row.version} could not be loaded, nothing changed: {e}",
                                param="version", code="policy_load_failed") from e
        self._loaded[row.version] = time.monotonic()

    @property
    def data_dir(self) -> Path:
        return self.policies_dir.parent

    def adapter_folder(self, row: PolicyRow) -> Path | None:
        """Where ``row``'s adapter is: its stored path, relative to the data dir (or absolute, as rows written before
        paths were relative are; one that no longer exists, as after moving the data dir, is looked for where this
        registry keeps version folders)."""
        if row.adapter_path is None:
            return None
        path = Path(row.adapter_path)
        if not path.is_absolute():
            return self.data_dir / path
        return path if path.exists() else self.policies_dir / str(row.version)

    async def materialize(self, row: PolicyRow) -> Path | None:
        """``row``'s adapter folder here, fetched from the database first when this process has no copy (each file
        checked against its SHA-256 before anything is written). Raises :class:`AdapterError` naming the version
        and file when the database lacks a file or holds different bytes; the caller still verifies the folder."""
        folder = self.adapter_folder(row)
        if folder is None or row.adapter_files is None or folder.is_dir():
            return folder
        blobs = await self.store.fetch_blobs(row.adapter_files.values())
        await asyncio.to_thread(_write_copy, folder, row, blobs)
        log.info("policy %d fetched from the database into %s", row.version, folder)
        return folder

    async def _evict(self) -> None:
        """Keep the promoted version and the most recently promoted others, ``keep_loaded`` in all."""
        loaded = [v for v in self.engine.loaded_versions if v in self._loaded and v not in (0, self.router.promoted)]
        loaded.sort(key=lambda v: self._loaded[v], reverse=True)
        for version in loaded[self.keep_loaded - 1:]:
            await self.engine.unload_policy(version)
            self._loaded.pop(version, None)


def _read_adapter(staged: Path) -> tuple[dict[str, str], dict[str, bytes]]:
    """The staged adapter's files (pickles dropped: peft writes safetensors, never keep a pickle next to it) as
    ``{name: SHA-256}`` and ``{SHA-256: bytes}``."""
    for pickled in staged.glob("*.bin"):
        pickled.unlink()
    if not (staged / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{staged} has no {ADAPTER_WEIGHTS}")
    files: dict[str, str] = {}
    blobs: dict[str, bytes] = {}
    for path in sorted(p for p in staged.iterdir() if p.is_file() and p.name != MANIFEST):
        data = path.read_bytes()
        files[path.name] = sha = hashlib.sha256(data).hexdigest()
        blobs[sha] = data
    return files, blobs


def _install(staged: Path, folder: Path, manifest: dict[str, Any]) -> None:
    """Move the staged adapter to its version's folder (this process's copy) and write the manifest."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():  # a copy of an earlier database's version of that number (the database allocated it to us)
        shutil.rmtree(folder)
    shutil.move(str(staged), str(folder))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _write_copy(folder: Path, row: PolicyRow, blobs: dict[str, bytes]) -> None:
    """Write ``row``'s files from the database's ``blobs`` into ``folder``, verified first; the folder appears whole
    (renamed into place) or not at all."""
    files = row.adapter_files or {}
    for name, sha in files.items():
        _plain_name(name)
        data = blobs.get(sha)
        if data is None:
            raise AdapterError(f"policy {row.version}: {name} (SHA-256 {sha}) is not in the database's adapter_blobs")
        if hashlib.sha256(data).hexdigest() != sha:
            raise AdapterError(f"policy {row.version}: the database's copy of {name} does not match its SHA-256 "
                               f"{sha}: the blob is corrupt")
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.partial"
    partial.mkdir()
    try:
        for name, sha in files.items():
            (partial / name).write_bytes(blobs[sha])
        (partial / MANIFEST).write_text(json.dumps({"version": row.version, "parent": row.parent,
                                                    "run_id": row.run_id, "files": files}, indent=2) + "\n")
        try:
            partial.rename(folder)
        except OSError:
            if not folder.is_dir():  # not another fetch of the same version that finished first
                raise
    finally:
        if partial.exists():
            shutil.rmtree(partial)
