"""Sessions, their messages and their one review. Every method is scoped to one tenant:
another tenant's session id raises the same NotFound as an unknown one."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session as OrmSession

from onthejob.store import logprobs as kept
from onthejob.store.base import StoreBase, TenantRef, aware
from onthejob.store.schema import (
    AdapterRow,
    MessageLogprobsRow,
    MessageRow,
    ReviewRow,
    SessionRow,
    utcnow,
)
from onthejob.store.types import (
    KINDS,
    ROLES,
    VERDICTS,
    Conflict,
    Message,
    NewMessage,
    NotFound,
    Review,
    Session,
)

MAX_TITLE = 200


def _session_of(row: SessionRow, tenant: str, count: int = 0) -> Session:
    return Session(id=row.id, tenant=tenant, title=row.title, status=row.status,
                   created_at=aware(row.created_at), updated_at=aware(row.updated_at),
                   consolidated_adapter_id=row.consolidated_adapter_id, message_count=count)


def _message_of(row: MessageRow) -> Message:
    return Message(id=row.id, session_id=row.session_id, seq=row.seq, role=row.role,
                   content=row.content, kind=row.kind, meta=dict(row.meta or {}),
                   created_at=aware(row.created_at))


def _review_of(row: ReviewRow) -> Review:
    return Review(session_id=row.session_id, verdict=row.verdict, text=row.text,
                  created_at=aware(row.created_at), updated_at=aware(row.updated_at))


def _check(message: NewMessage) -> None:
    if message.role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {message.role!r}")
    if message.kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {message.kind!r}")
    if not isinstance(message.content, str):
        raise ValueError("content must be a string")
    if not isinstance(message.meta, dict):
        raise ValueError("meta must be a JSON object")
    if message.logprobs is not None:
        if message.role != "assistant":
            raise ValueError("only an assistant message keeps log-probs")
        kept.header(message.logprobs)  # a clear ValueError for bytes that are not kept log-probs


def _valid_id(session_id: Any) -> bool:
    try:
        return str(uuid.UUID(str(session_id))) == session_id
    except ValueError:
        return False


class SessionStore(StoreBase):
    def _session_row(self, orm: OrmSession, tenant_id: int, session_id: str, *,
                     lock: bool = False) -> SessionRow:
        if not _valid_id(session_id):
            raise NotFound(f"no session {session_id!r}")
        query = select(SessionRow).where(SessionRow.id == session_id,
                                         SessionRow.tenant_id == tenant_id)
        if lock:
            query = query.with_for_update()
        row = orm.scalar(query)
        if row is None:
            raise NotFound(f"no session {session_id!r}")
        return row

    def _append(self, orm: OrmSession, row: SessionRow,
                messages: Iterable[NewMessage]) -> list[Message]:
        if row.status != "open":
            raise Conflict(f"session {row.id} has ended; start a new session to go on")
        last = orm.scalar(select(func.max(MessageRow.seq)).where(MessageRow.session_id == row.id))
        seq = -1 if last is None else last
        rows, with_logprobs = [], []
        for message in messages:
            _check(message)
            seq += 1
            rows.append(MessageRow(session_id=row.id, seq=seq, role=message.role,
                                   content=message.content, kind=message.kind,
                                   meta=dict(message.meta)))
            if message.logprobs is not None:
                with_logprobs.append((rows[-1], message.logprobs))
        orm.add_all(rows)
        row.updated_at = utcnow()
        orm.flush()
        for message_row, data in with_logprobs:
            tokens, k, _ = kept.header(data)
            orm.add(MessageLogprobsRow(message_id=message_row.id, tokens=tokens, k=k,
                                       data=bytes(data)))
        orm.flush()
        return [_message_of(r) for r in rows]

    def create_session(self, tenant: TenantRef, title: str | None = None,
                       messages: Sequence[NewMessage] = ()) -> Session:
        """A new open session, with its first messages in the same transaction."""
        if title is not None and len(title) > MAX_TITLE:
            raise ValueError(f"title is longer than {MAX_TITLE} characters")
        with self.tx() as orm:
            owner = self._tenant_row(orm, tenant)
            row = SessionRow(id=str(uuid.uuid4()), tenant_id=owner.id, title=title)
            orm.add(row)
            orm.flush()
            added = self._append(orm, row, messages)
            return _session_of(row, owner.name, len(added))

    def get_session(self, tenant: TenantRef, session_id: str) -> Session:
        with self.tx() as orm:
            owner = self._tenant_row(orm, tenant)
            row = self._session_row(orm, owner.id, session_id)
            count = orm.scalar(select(func.count()).where(MessageRow.session_id == row.id))
            return _session_of(row, owner.name, int(count or 0))

    def list_sessions(self, tenant: TenantRef, status: str | None = None,
                      limit: int = 100, offset: int = 0,
                      reviewed: bool | None = None) -> list[Session]:
        """The tenant's sessions, most recently active first; `reviewed=False` keeps only those
        without a review (True: only those with one)."""
        counts = (select(MessageRow.session_id, func.count().label("n"))
                  .group_by(MessageRow.session_id).subquery())
        with self.tx() as orm:
            owner = self._tenant_row(orm, tenant)
            query = (select(SessionRow, func.coalesce(counts.c.n, 0))
                     .outerjoin(counts, counts.c.session_id == SessionRow.id)
                     .where(SessionRow.tenant_id == owner.id))
            if status is not None:
                query = query.where(SessionRow.status == status)
            if reviewed is not None:
                has_review = select(ReviewRow.id).where(ReviewRow.session_id == SessionRow.id)
                query = query.where(has_review.exists() if reviewed else ~has_review.exists())
            query = query.order_by(SessionRow.updated_at.desc(), SessionRow.id)
            query = query.limit(max(1, min(limit, 10_000))).offset(max(0, offset))
            return [_session_of(row, owner.name, int(n)) for row, n in orm.execute(query)]

    def add_message(self, tenant: TenantRef, session_id: str, role: str, content: str,
                    kind: str = "message", meta: dict[str, Any] | None = None) -> Message:
        """Append one message; it is committed when this returns."""
        return self.add_messages(tenant, session_id,
                                 [NewMessage(role, content, kind, dict(meta or {}))])[0]

    def add_messages(self, tenant: TenantRef, session_id: str,
                     messages: Sequence[NewMessage]) -> list[Message]:
        """Append messages in one transaction: all of them are stored, or none."""
        with self.tx() as orm:
            owner = self._tenant_row(orm, tenant)
            row = self._session_row(orm, owner.id, session_id, lock=True)
            return self._append(orm, row, messages)

    def messages(self, tenant: TenantRef, session_id: str) -> list[Message]:
        with self.tx() as orm:
            owner = self._tenant_row(orm, tenant)
            row = self._session_row(orm, owner.id, session_id)
            rows = orm.scalars(select(MessageRow).where(MessageRow.session_id == row.id)
                               .order_by(MessageRow.seq))
            return [_message_of(r) for r in rows]

    def kept_logprobs(self, tenant: TenantRef, session_id: str) -> dict[int, bytes]:
        """The kept log-probs of the session's answers that have them (store/logprobs.py's
        encoding), by message id."""
        with self.tx() as orm:
            owner = self._tenant_row(orm, tenant)
            row = self._session_row(orm, owner.id, session_id)
            found = orm.execute(select(MessageLogprobsRow.message_id, MessageLogprobsRow.data)
                                .join(MessageRow, MessageRow.id == MessageLogprobsRow.message_id)
                                .where(MessageRow.session_id == row.id))
            return {int(message_id): bytes(data) for message_id, data in found}

    def end_session(self, tenant: TenantRef, session_id: str) -> Session:
        """Mark the session ended (idempotent). Its review can still be given or changed."""
        with self.tx() as orm:
            owner = self._tenant_row(orm, tenant)
            row = self._session_row(orm, owner.id, session_id, lock=True)
            if row.status != "ended":
                row.status = "ended"
                row.updated_at = utcnow()
            count = orm.scalar(select(func.count()).where(MessageRow.session_id == row.id))
            return _session_of(row, owner.name, int(count or 0))

    def set_review(self, tenant: TenantRef, session_id: str, verdict: str,
                   text: str = "") -> Review:
        """Give or change the session's review; refused once the session is consolidated."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be 'up' or 'down', not {verdict!r}")
        if not isinstance(text, str):
            raise ValueError("review text must be a string")
        with self.tx() as orm:
            owner = self._tenant_row(orm, tenant)
            row = self._session_row(orm, owner.id, session_id, lock=True)
            if row.consolidated_adapter_id is not None:
                raise Conflict(f"session {row.id} was consolidated into adapter "
                               f"{row.consolidated_adapter_id}; its review can no longer change")
            review = orm.scalar(select(ReviewRow).where(ReviewRow.session_id == row.id))
            now = utcnow()
            if review is None:
                review = ReviewRow(session_id=row.id, verdict=verdict, text=text,
                                   created_at=now, updated_at=now)
                orm.add(review)
            else:
                review.verdict, review.text, review.updated_at = verdict, text, now
            orm.flush()
            return _review_of(review)

    def get_review(self, tenant: TenantRef, session_id: str) -> Review | None:
        with self.tx() as orm:
            owner = self._tenant_row(orm, tenant)
            row = self._session_row(orm, owner.id, session_id)
            review = orm.scalar(select(ReviewRow).where(ReviewRow.session_id == row.id))
            return _review_of(review) if review else None

    def reviews_of(self, tenant: TenantRef, session_ids: Sequence[str]) -> dict[str, Review]:
        """The reviews of those of `session_ids` that are the tenant's and have one, by id."""
        wanted = [s for s in session_ids if _valid_id(s)]
        if not wanted:
            return {}
        with self.tx() as orm:
            owner = self._tenant_row(orm, tenant)
            rows = orm.scalars(select(ReviewRow).join(SessionRow,
                                                      SessionRow.id == ReviewRow.session_id)
                               .where(SessionRow.tenant_id == owner.id,
                                      ReviewRow.session_id.in_(wanted)))
            return {r.session_id: _review_of(r) for r in rows}

    def sessions_to_consolidate(self, tenant: TenantRef) -> list[Session]:
        """Approved (thumbs-up), not yet consolidated sessions, ended or not, oldest first."""
        with self.tx() as orm:
            owner = self._tenant_row(orm, tenant)
            rows = orm.scalars(
                select(SessionRow).join(ReviewRow, ReviewRow.session_id == SessionRow.id)
                .where(SessionRow.tenant_id == owner.id, ReviewRow.verdict == "up",
                       SessionRow.consolidated_adapter_id.is_(None))
                .order_by(SessionRow.created_at, SessionRow.id))
            return [_session_of(r, owner.name) for r in rows]

    def mark_consolidated(self, tenant: TenantRef, session_ids: Sequence[str],
                          adapter_id: int) -> None:
        """Record that these sessions were learned into `adapter_id`: all or none.

        Idempotent: marking a session again with the same adapter is a no-op. A session of
        another tenant, one not approved, or one already marked with another adapter is refused.
        """
        with self.tx() as orm:
            self._mark_consolidated(orm, tenant, session_ids, adapter_id)

    def _mark_consolidated(self, orm: OrmSession, tenant: TenantRef,
                           session_ids: Sequence[str], adapter_id: int) -> None:
        owner = self._tenant_row(orm, tenant)
        adapter = orm.get(AdapterRow, adapter_id)
        if adapter is None or adapter.tenant_id not in (owner.id, None):
            raise NotFound(f"no adapter {adapter_id}")
        for session_id in session_ids:
            row = self._session_row(orm, owner.id, session_id, lock=True)
            if row.consolidated_adapter_id == adapter_id:
                continue
            if row.consolidated_adapter_id is not None:
                raise Conflict(f"session {row.id} is already consolidated into adapter "
                               f"{row.consolidated_adapter_id}")
            verdict = orm.scalar(select(ReviewRow.verdict)
                                 .where(ReviewRow.session_id == row.id))
            if verdict != "up":
                raise Conflict(f"session {row.id} is not approved (review: {verdict}); "
                               "only thumbs-up sessions are consolidated")
            row.consolidated_adapter_id = adapter_id
