"""Runs: long jobs (consolidate, dream, grind) with progress and a heartbeat, so that a run
whose process died can be found and marked interrupted, then resumed or failed."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from onthejob.store.base import StoreBase, TenantRef, aware
from onthejob.store.schema import RunRow, TenantRow, utcnow
from onthejob.store.types import RUN_STATUSES, NotFound, Run


class RunStore(StoreBase):
    def _run_of(self, orm, row: RunRow) -> Run:
        name = orm.scalar(select(TenantRow.name).where(TenantRow.id == row.tenant_id)) \
            if row.tenant_id is not None else None
        return Run(id=row.id, kind=row.kind, tenant=name, status=row.status,
                   params=dict(row.params or {}), progress=dict(row.progress or {}),
                   error=row.error, started_at=aware(row.started_at),
                   ended_at=aware(row.ended_at), heartbeat_at=aware(row.heartbeat_at))

    def create_run(self, kind: str, tenant: TenantRef | None = None,
                   params: dict[str, Any] | None = None) -> Run:
        with self.tx() as orm:
            tenant_id = self._tenant_row(orm, tenant).id if tenant is not None else None
            row = RunRow(kind=kind, tenant_id=tenant_id, params=dict(params or {}))
            orm.add(row)
            orm.flush()
            return self._run_of(orm, row)

    def update_run(self, run_id: int, *, progress: dict[str, Any] | None = None,
                   status: str | None = None, error: str | None = None) -> Run:
        """Merge `progress`, set status/error, and beat the heartbeat, in one transaction."""
        if status is not None and status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}")
        with self.tx() as orm:
            row = orm.get(RunRow, run_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no run {run_id}")
            now = utcnow()
            if progress:
                row.progress = {**(row.progress or {}), **progress}
            if status is not None:
                row.status = status
                row.ended_at = None if status == "running" else now
            if error is not None:
                row.error = error
            row.heartbeat_at = now
            orm.flush()
            return self._run_of(orm, row)

    def get_run(self, run_id: int) -> Run:
        with self.tx() as orm:
            row = orm.get(RunRow, run_id)
            if row is None:
                raise NotFound(f"no run {run_id}")
            return self._run_of(orm, row)

    def list_runs(self, kind: str | None = None, tenant: TenantRef | None = None,
                  status: str | None = None, limit: int = 100) -> list[Run]:
        with self.tx() as orm:
            query = select(RunRow)
            if kind is not None:
                query = query.where(RunRow.kind == kind)
            if tenant is not None:
                query = query.where(RunRow.tenant_id == self._tenant_row(orm, tenant).id)
            if status is not None:
                query = query.where(RunRow.status == status)
            rows = orm.scalars(query.order_by(RunRow.id.desc()).limit(limit))
            return [self._run_of(orm, r) for r in rows]

    def interrupt_stale_runs(self, older_than: timedelta,
                             now: datetime | None = None) -> list[Run]:
        """Mark running runs whose heartbeat is older than `older_than` as interrupted."""
        cutoff = (now or utcnow()) - older_than
        with self.tx() as orm:
            rows = list(orm.scalars(select(RunRow).where(RunRow.status == "running")
                                    .with_for_update()))
            stale = [r for r in rows if aware(r.heartbeat_at) < cutoff]
            for row in stale:
                row.status, row.ended_at = "interrupted", utcnow()
                row.error = row.error or "no heartbeat: the process running it stopped"
            orm.flush()
            return [self._run_of(orm, r) for r in stale]
