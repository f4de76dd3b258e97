"""Durable storage: SQLAlchemy Core tables, migrations and the :class:`Store` (SQLite WAL or PostgreSQL).

Importing this package touches no database; :meth:`Store.open` does.
"""

from server.store.migrations import LATEST_VERSION, MIGRATIONS, Migration, MigrationError
from server.store.records import (
    ChoiceRecord,
    CompletionRecord,
    FeedbackRecord,
    LabelRecord,
    PairRecord,
    StoredFeedback,
    StoredLabel,
    StoredPair,
)
from server.store.store import RecordRejectedError, Store, StoreClosedError, StoreError, StoreStats
from server.store.training import PolicyRow, RunRow

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "ChoiceRecord",
    "CompletionRecord",
    "FeedbackRecord",
    "LabelRecord",
    "Migration",
    "MigrationError",
    "PairRecord",
    "PolicyRow",
    "RecordRejectedError",
    "RunRow",
    "Store",
    "StoreClosedError",
    "StoreError",
    "StoreStats",
    "StoredFeedback",
    "StoredLabel",
    "StoredPair",
]
