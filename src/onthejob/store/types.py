"""What the store returns: plain dataclasses (no ORM objects leave the store) and its errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

VERDICTS = ("up", "down")
KINDS = ("message", "tool_call", "observation", "compaction")
ROLES = ("system", "user", "assistant", "tool")
ADAPTER_STATUSES = ("candidate", "active", "rejected", "retired")
RUN_STATUSES = ("running", "done", "failed", "interrupted")
SCOPES = ("tenant", "shared")


class StoreError(Exception):
    """Base of the store's errors."""


class NotFound(StoreError):
    """Unknown id, or one that belongs to another tenant (the two are indistinguishable)."""


class Conflict(StoreError):
    """The request clashes with the stored state (e.g. a review after consolidation)."""


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    allow_shared: bool
    created_at: datetime


@dataclass(frozen=True)
class ApiKey:
    id: int
    tenant: str | None  # None: an operator key (manages tenants, belongs to none)
    prefix: str
    is_admin: bool
    revoked: bool
    created_at: datetime


@dataclass(frozen=True)
class Session:
    id: str
    tenant: str
    title: str | None
    status: str
    created_at: datetime
    updated_at: datetime
    consolidated_adapter_id: int | None
    message_count: int = 0


@dataclass(frozen=True)
class Message:
    id: int
    session_id: str
    seq: int
    role: str
    content: str
    kind: str
    meta: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class Review:
    session_id: str
    verdict: str
    text: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Adapter:
    id: int
    scope: str
    tenant: str | None
    version: int
    parent_id: int | None
    status: str
    method: str
    path: str
    checksum: str
    metrics: dict[str, Any]
    reason: str
    created_at: datetime


@dataclass(frozen=True)
class Run:
    id: int
    kind: str
    tenant: str | None
    status: str
    params: dict[str, Any]
    progress: dict[str, Any]
    error: str
    started_at: datetime
    ended_at: datetime | None
    heartbeat_at: datetime


@dataclass(frozen=True)
class NewMessage:
    """A message to append: role, content, and optionally its kind and meta; an assistant
    answer may carry `logprobs`, its kept token ids and top-k log-probs (store/logprobs.py's
    encoding), stored beside it and read back with `Store.kept_logprobs`."""

    role: str
    content: str
    kind: str = "message"
    meta: dict[str, Any] = field(default_factory=dict)
    logprobs: bytes | None = None
