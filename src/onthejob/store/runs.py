"""Runs: long jobs (consolidate, dream, grind) with progress and a heartbeat, so that a run
whose process died can be found and marked interrupted, then resumed or failed."""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from onthejob.store.base import StoreBase, TenantRef, aware
from onthejob.store.schema import RunRow, TenantRow, utcnow
from onthejob.store.types import RUN_STATUSES, NotFound, Run


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_process() -> dict[str, Any]:
    """Who runs a run: recorded in its params so a later process can tell if it died."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def process_alive(owner: dict[str, Any]) -> bool | None:
    """True/False for a run owned by a process on this host; None when that cannot be known."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return None
    start = _process_start(owner["pid"])
    if start is None:
        return False if os.path.isdir("/proc") else None
    return owner.get("start") in (None, start)


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
            row = RunRow(kind=kind, tenant_id=tenant_id,
                         params={**(params or {}), "process": this_process()})
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

    def interrupt_dead_runs(self, stale_after: timedelta = timedelta(minutes=30)) -> list[Run]:
        """Mark as interrupted the running runs whose process is gone: on this host, a run whose
        recorded process no longer exists (killed, crashed); elsewhere, a run without a
        heartbeat for `stale_after`. Call it before starting work that a dead run may block."""
        cutoff = utcnow() - stale_after
        with self.tx() as orm:
            rows = list(orm.scalars(select(RunRow).where(RunRow.status == "running")
                                    .with_for_update()))
            dead = []
            for row in rows:
                alive = process_alive((row.params or {}).get("process") or {})
                if alive is False or (alive is None and aware(row.heartbeat_at) < cutoff):
                    row.status, row.ended_at = "interrupted", utcnow()
                    row.error = row.error or "its process stopped (killed or crashed) mid-run"
                    dead.append(row)
            orm.flush()
            return [self._run_of(orm, r) for r in dead]
