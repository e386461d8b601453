"""The adapter registry: versions per scope (one tenant, or shared), a parent for each, a
status, and exactly one active adapter per scope (a partial unique index guarantees it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session as OrmSession

from onthejob.store.base import StoreBase, TenantRef, aware
from onthejob.store.schema import AdapterRow, TenantRow
from onthejob.store.types import ADAPTER_STATUSES, SCOPES, Adapter, Conflict, NotFound


def _owner_key(scope: str, tenant_id: int | None) -> str:
    return "shared" if scope == "shared" else f"tenant:{tenant_id}"


def _adapter_of(row: AdapterRow, tenant: str | None) -> Adapter:
    return Adapter(id=row.id, scope=row.scope, tenant=tenant, version=row.version,
                   parent_id=row.parent_id, status=row.status, method=row.method,
                   path=row.path, checksum=row.checksum, metrics=dict(row.metrics or {}),
                   reason=row.reason, created_at=aware(row.created_at))


class AdapterStore(StoreBase):
    def _owner(self, orm: OrmSession, scope: str, tenant: TenantRef | None) -> tuple[str, int | None]:
        if scope not in SCOPES:
            raise ValueError(f"scope must be 'tenant' or 'shared', not {scope!r}")
        if scope == "shared":
            return "shared", None
        if tenant is None:
            raise ValueError("a tenant-scope adapter needs a tenant")
        row = self._tenant_row(orm, tenant)
        return _owner_key(scope, row.id), row.id

    def _convert(self, orm: OrmSession, row: AdapterRow) -> Adapter:
        name = orm.scalar(select(TenantRow.name).where(TenantRow.id == row.tenant_id)) \
            if row.tenant_id is not None else None
        return _adapter_of(row, name)

    def _adapter_row(self, orm: OrmSession, adapter_id: int, tenant: TenantRef | None,
                     lock: bool = False) -> AdapterRow:
        query = select(AdapterRow).where(AdapterRow.id == adapter_id)
        if lock:
            query = query.with_for_update()
        row = orm.scalar(query)
        if row is not None and tenant is not None and row.tenant_id is not None:
            if row.tenant_id != self._tenant_row(orm, tenant).id:
                row = None  # another tenant's adapter looks exactly like a missing one
        if row is None:
            raise NotFound(f"no adapter {adapter_id}")
        return row

    def next_adapter_version(self, scope: str, tenant: TenantRef | None = None) -> int:
        with self.tx() as orm:
            key, _ = self._owner(orm, scope, tenant)
            last = orm.scalar(select(func.max(AdapterRow.version))
                              .where(AdapterRow.owner_key == key))
            return (last or 0) + 1

    def add_adapter(self, scope: str, tenant: TenantRef | None, *, method: str, path: str,
                    checksum: str, parent_id: int | None = None, version: int | None = None,
                    metrics: dict[str, Any] | None = None, status: str = "candidate",
                    reason: str = "") -> Adapter:
        """Register an adapter (written to `path` beforehand). `version` defaults to the next."""
        if status not in ("candidate", "rejected"):
            raise ValueError("a new adapter is a candidate (or rejected); activate it separately")
        with self.tx() as orm:
            key, tenant_id = self._owner(orm, scope, tenant)
            if version is None:
                last = orm.scalar(select(func.max(AdapterRow.version))
                                  .where(AdapterRow.owner_key == key))
                version = (last or 0) + 1
            elif orm.scalar(select(AdapterRow.id).where(AdapterRow.owner_key == key,
                                                        AdapterRow.version == version)):
                raise Conflict(f"version {version} exists already for {key}")
            if parent_id is not None:
                parent = orm.get(AdapterRow, parent_id)
                if parent is None or parent.tenant_id not in (tenant_id, None):
                    raise NotFound(f"no adapter {parent_id} to be the parent")
            row = AdapterRow(scope=scope, tenant_id=tenant_id, owner_key=key, version=version,
                             parent_id=parent_id, status=status, method=method, path=str(path),
                             checksum=checksum, metrics=dict(metrics or {}), reason=reason)
            orm.add(row)
            orm.flush()
            return self._convert(orm, row)

    def get_adapter(self, adapter_id: int, tenant: TenantRef | None = None) -> Adapter:
        """The adapter; with `tenant`, only if it is that tenant's or shared."""
        with self.tx() as orm:
            return self._convert(orm, self._adapter_row(orm, adapter_id, tenant))

    def list_adapters(self, scope: str = "tenant", tenant: TenantRef | None = None) -> list[Adapter]:
        with self.tx() as orm:
            key, _ = self._owner(orm, scope, tenant)
            rows = orm.scalars(select(AdapterRow).where(AdapterRow.owner_key == key)
                               .order_by(AdapterRow.version))
            return [self._convert(orm, r) for r in rows]

    def active_adapter(self, tenant: TenantRef | None, scope: str = "tenant") -> Adapter | None:
        with self.tx() as orm:
            key, _ = self._owner(orm, scope, tenant)
            row = orm.scalar(select(AdapterRow).where(AdapterRow.owner_key == key,
                                                      AdapterRow.status == "active"))
            return self._convert(orm, row) if row else None

    def activate_adapter(self, adapter_id: int, reason: str = "") -> Adapter:
        """Make this adapter its scope's active one; the previous active one is retired in the
        same transaction. Rolling back is activating an earlier version."""
        with self.tx() as orm:
            return self._activate(orm, adapter_id, reason)

    def promote_adapter(self, adapter_id: int, sessions: dict[str, Sequence[str]],
                        reason: str = "", metrics: dict[str, Any] | None = None) -> Adapter:
        """Activate a candidate and mark the sessions it learned (per tenant) consolidated, in
        one transaction: a crash or a refusal leaves neither. Refused (Conflict) if any session
        is no longer approved, e.g. its review was changed to thumbs-down during training.
        `metrics` are merged into the adapter's (e.g. who activated it and over what verdict)."""
        with self.tx() as orm:
            adapter = self._activate(orm, adapter_id, reason)
            for tenant, ids in sessions.items():
                self._mark_consolidated(orm, tenant, ids, adapter_id)
            if metrics:
                row = self._adapter_row(orm, adapter_id, None)
                row.metrics = {**(row.metrics or {}), **metrics}
                orm.flush()
                adapter = self._convert(orm, row)
            return adapter

    def _activate(self, orm: OrmSession, adapter_id: int, reason: str) -> Adapter:
        row = self._adapter_row(orm, adapter_id, None, lock=True)
        if row.status == "active":
            return self._convert(orm, row)
        current = orm.scalar(select(AdapterRow).where(AdapterRow.owner_key == row.owner_key,
                                                      AdapterRow.status == "active")
                             .with_for_update())
        if current is not None:
            current.status = "retired"
            current.reason = f"replaced by version {row.version}"
            orm.flush()  # the partial unique index must see the retirement first
        row.status = "active"
        if reason:
            row.reason = reason
        orm.flush()
        return self._convert(orm, row)

    def rollback_adapter(self, tenant: TenantRef | None, scope: str = "tenant",
                         reason: str = "rolled back") -> Adapter | None:
        """Retire the active adapter and activate its parent (None: back to no adapter)."""
        with self.tx() as orm:
            key, _ = self._owner(orm, scope, tenant)
            current = orm.scalar(select(AdapterRow).where(AdapterRow.owner_key == key,
                                                          AdapterRow.status == "active")
                                 .with_for_update())
            if current is None:
                raise NotFound(f"{key} has no active adapter to roll back")
            current.status, current.reason = "retired", reason
            orm.flush()
            if current.parent_id is None:
                return None
            parent = orm.get(AdapterRow, current.parent_id)
            parent.status, parent.reason = "active", f"restored: {reason}"
            orm.flush()
            return self._convert(orm, parent)

    def set_adapter_status(self, adapter_id: int, status: str, reason: str = "",
                           metrics: dict[str, Any] | None = None) -> Adapter:
        """Set a candidate's verdict (rejected/retired/candidate) and merge in metrics.
        Use activate_adapter to make one active."""
        if status not in ADAPTER_STATUSES:
            raise ValueError(f"status must be one of {', '.join(ADAPTER_STATUSES)}")
        if status == "active":
            raise ValueError("use activate_adapter(), which retires the previous one atomically")
        with self.tx() as orm:
            row = self._adapter_row(orm, adapter_id, None, lock=True)
            row.status = status
            if reason:
                row.reason = reason
            if metrics:
                row.metrics = {**(row.metrics or {}), **metrics}
            orm.flush()
            return self._convert(orm, row)
