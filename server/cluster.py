"""Roles of processes on one database, and the start-up checks that keep a cluster consistent.

A process is one of three roles: ``all`` (``alignd serve``: chat, feedback and training on one box, the default),
``serve`` (``alignd serve --trainer off``: a serving replica that never trains) or ``trainer`` (``alignd trainer``:
training runs and no chat). Before a process changes anything in its database it checks that it belongs there, and
stops with a :class:`ClusterMisconfigured` naming the problem otherwise:

- a serving replica or a trainer process on SQLite: the file belongs to one process on one box (it fails every
  "running" run at start as that process's orphan, and follows no promotions), so the split roles need PostgreSQL;
- a base model other than the one the database records: adapters trained on one base are meaningless on another;
- a promoted version whose adapter, as the database holds it, does not match its SHA-256: every process would serve
  something else. A corrupt *local* copy is this process's disk, not the cluster's: the process starts, answers
  ``/ready`` 503 naming the version and serves what it can (the registry's check), so that the orchestrator sees it
  and the operator deletes the copy (fetched again) or rolls back. At run time the registry refuses a version that
  fails the check and serving goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

from alignd.config import ConfigError, Settings
from alignd.store import Store

__all__ = ["ClusterMisconfigured", "Role", "base_identity", "check_database", "check_role", "preflight", "role_of"]

log = logging.getLogger(__name__)

Role = Literal["all", "serve", "trainer"]

# What identifies a base model cheaply and stably: its configuration and tokenizer (small files, hashed whole) and
# its weight files' names and sizes (never read: they may be many gigabytes).
_HASHED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


class ClusterMisconfigured(ConfigError):
    """This process must not run against this database (the message names the problem); nothing was changed."""


def role_of(settings: Settings, trainer_process: bool = False) -> Role:
    """The role of ``alignd serve`` with these settings (``all`` or ``serve``), or ``trainer``."""
    if trainer_process:
        return "trainer"
    return "serve" if settings.server.trainer == "off" else "all"


def check_role(settings: Settings, role: Role) -> None:
    """Refuse a split role on SQLite, before anything is opened."""
    if role == "all" or not settings.database_url.startswith("sqlite"):
        return
    what = "a serving replica (--trainer off)" if role == "serve" else "a trainer process (alignd trainer)"
    raise ClusterMisconfigured(
        f"{what} needs a database that a trainer and replicas share: PostgreSQL (--database postgresql://...), not "
        f"SQLite ({settings.database_url}). On one box with SQLite, run `alignd serve` alone (--trainer on), which "
        "serves and trains in one process.")


def base_identity(model: str) -> dict[str, Any]:
    """``{"name", "sha256"}`` of a base model: the SHA-256 covers its configuration, tokenizer and weight files'
    names and sizes (None for a hub id with no local files: then the name alone identifies it)."""
    folder = Path(model)
    if not folder.is_dir():
        return {"name": model, "sha256": None}
    digest = hashlib.sha256()
    for name in _HASHED_FILES:
        if (folder / name).is_file():
            digest.update(f"{name}\n".encode())
            digest.update((folder / name).read_bytes())
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    for path in weights:
        digest.update(f"{path.name} {path.stat().st_size}\n".encode())
    return {"name": model, "sha256": digest.hexdigest()}


def _same_base(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("sha256") and b.get("sha256"):
        return bool(a["sha256"] == b["sha256"])
    return bool(a.get("name") == b.get("name"))


async def check_database(store: Store, model: str) -> None:
    """The checks against what the database records: the base model (recorded on the first start), then the
    promoted version's adapter. Raises :class:`ClusterMisconfigured`; writes only a first start's record."""
    identity = await asyncio.to_thread(base_identity, model)
    recorded = await store.record_base_model(identity)
    if not _same_base(recorded, identity):
        raise ClusterMisconfigured(
            f"this database belongs to another base model: it records {recorded['name']} (SHA-256 "
            f"{recorded.get('sha256') or 'n/a'}), and this process is configured with {identity['name']} (SHA-256 "
            f"{identity.get('sha256') or 'n/a'}). Every process on one database must serve and train the same base "
            "model (--model); adapters trained on one are meaningless on another.")
    await _check_promoted_adapter(store)


async def preflight(settings: Settings, model: str) -> None:
    """The database checks of :func:`check_database` on a store of their own, before a process starts serving (the
    CLI runs it so that a refusal is one line and exit status 2, not a failed server start)."""
    async with await Store.open(settings.database_url, batch_max=settings.store.batch_max) as store:
        await check_database(store, model)


async def _check_promoted_adapter(store: Store) -> None:
    """The promoted version's files, as the database holds them, must match the SHA-256s its row records (a corrupt
    local copy is the registry's to report: see the module's docstring)."""
    version = await store.promoted_version()
    row = await store.get_policy(version) if version else None
    if row is None or not row.adapter_files:
        return
    blobs = await store.fetch_blobs(row.adapter_files.values())
    problems = []
    for name, sha in sorted(row.adapter_files.items()):
        data = blobs.get(sha)
        if data is None:
            problems.append(f"{name} (SHA-256 {sha}) is missing from the database's adapter_blobs")
        elif hashlib.sha256(data).hexdigest() != sha:
            problems.append(f"the database's copy of {name} does not match its SHA-256 {sha}")
    if problems:
        raise ClusterMisconfigured(
            f"the promoted policy {version}'s adapter does not match its SHA-256: " + "; ".join(problems) + ". "
            "Serving it would serve something else: restore the blob, or promote another version "
            "(alignd policies promote VERSION).")
