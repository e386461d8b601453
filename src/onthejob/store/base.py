"""The store's plumbing: an engine, a transaction helper, tenant resolution, row converters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker

from onthejob.store import db
from onthejob.store.schema import TenantRow
from onthejob.store.types import NotFound, Tenant

TenantRef = Tenant | str


def aware(value: datetime | None) -> datetime | None:
    """SQLite drops the time zone; every time the store hands out is UTC and aware."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def tenant_of(row: TenantRow) -> Tenant:
    return Tenant(id=row.id, name=row.name, allow_shared=row.allow_shared,
                  created_at=aware(row.created_at))


class StoreBase:
    """Holds the engine; every public method runs in exactly one transaction."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self.engine: Engine = db.make_engine(url)
        if migrate:
            db.upgrade(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def tx(self) -> Iterator[OrmSession]:
        """One transaction: committed when the block ends, rolled back on any exception."""
        with self._sessions() as orm, orm.begin():
            yield orm

    def _tenant_row(self, orm: OrmSession, tenant: TenantRef) -> TenantRow:
        name = tenant.name if isinstance(tenant, Tenant) else tenant
        row = orm.scalar(select(TenantRow).where(TenantRow.name == name))
        if row is None:
            raise NotFound(f"no tenant named {name!r}: create it with `onthejob tenants add {name}`")
        return row
