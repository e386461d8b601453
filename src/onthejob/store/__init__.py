"""The experience store: tenants, API keys, sessions with their messages and reviews, the
adapter registry and runs, in one SQL database (SQLite in WAL mode by default, PostgreSQL by
URL), with Alembic migrations applied on open. Imports only onthejob.config.

    store = Store()                      # ONTHEJOB_DB, else SQLite under ONTHEJOB_HOME
    store = Store("postgresql://...")    # any SQLAlchemy URL
"""

from __future__ import annotations

from onthejob import config
from onthejob.store.adapters import AdapterStore
from onthejob.store.context import context_messages
from onthejob.store.runs import RunStore
from onthejob.store.sessions import SessionStore
from onthejob.store.tenants import TenantStore
from onthejob.store.types import (
    Adapter,
    ApiKey,
    Conflict,
    Message,
    NewMessage,
    NotFound,
    Review,
    Run,
    Session,
    StoreError,
    Tenant,
)


class Store(TenantStore, SessionStore, AdapterStore, RunStore):
    """One handle on the database; safe to share between threads. Every method is one
    transaction, so a process killed at any point leaves the database consistent."""

    def __init__(self, url: str | None = None, *, migrate: bool = True) -> None:
        super().__init__(url or config.database_url(), migrate=migrate)


__all__ = [
    "Adapter", "ApiKey", "Conflict", "Message", "NewMessage", "NotFound", "Review", "Run",
    "Session", "Store", "StoreError", "Tenant", "context_messages",
]
