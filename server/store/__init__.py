"""Durable storage: SQLAlchemy Core tables, migrations and the :class:`Store` (SQLite WAL or PostgreSQL).

Importing this package touches no database; :meth:`Store.open` does.
"""

from server.store.migrations import LATEST_VERSION, MIGRATIONS, Migration, MigrationError
from server.store.records import ChoiceRecord, CompletionRecord
from server.store.store import RecordRejectedError, Store, StoreClosedError, StoreError, StoreStats

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "ChoiceRecord",
    "CompletionRecord",
    "Migration",
    "MigrationError",
    "RecordRejectedError",
    "Store",
    "StoreClosedError",
    "StoreError",
    "StoreStats",
]
