"""Durable storage: SQLAlchemy Core tables, Alembic migrations and the :class:`Store` (SQLite WAL or PostgreSQL).

Importing this package touches no database; :meth:`Store.open` does.
"""

from alignd.store.deletion import DeletedRows
from alignd.store.keys import KeyRow, RoleConflictError
from alignd.store.migrations import HEAD, MigrationError
from alignd.store.records import (
    ChoiceRecord,
    CompletionRecord,
    FeedbackRecord,
    Label,
    PreferencePair,
    StoredFeedback,
    StoredLabel,
    StoredPair,
)
from alignd.store.shared import Fence, LeaseLost
from alignd.store.store import RecordRejectedError, Store, StoreClosedError, StoreError, StoreStats
from alignd.store.training import PolicyRow, RunRow

__all__ = [
    "HEAD",
    "ChoiceRecord",
    "CompletionRecord",
    "DeletedRows",
    "FeedbackRecord",
    "Fence",
    "KeyRow",
    "Label",
    "LeaseLost",
    "MigrationError",
    "PolicyRow",
    "PreferencePair",
    "RecordRejectedError",
    "RoleConflictError",
    "RunRow",
    "Store",
    "StoreClosedError",
    "StoreError",
    "StoreStats",
    "StoredFeedback",
    "StoredLabel",
    "StoredPair",
]
