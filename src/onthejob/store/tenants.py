"""Tenants and their API keys. A tenant's key reaches that tenant's sessions; its admin key
also manages that tenant's keys and consent. An operator key belongs to no tenant and manages
tenants (made only by the CLI: `onthejob keys add --operator`)."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as OrmSession

from onthejob.store import keys
from onthejob.store.base import StoreBase, TenantRef, aware, tenant_of
from onthejob.store.schema import ApiKeyRow, TenantRow
from onthejob.store.types import ApiKey, Conflict, NotFound, Tenant

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def _key_of(row: ApiKeyRow, tenant: str | None) -> ApiKey:
    return ApiKey(id=row.id, tenant=tenant, prefix=row.prefix, is_admin=row.is_admin,
                  revoked=row.revoked, created_at=aware(row.created_at))


class TenantStore(StoreBase):
    def create_tenant(self, name: str, allow_shared: bool = False) -> Tenant:
        if not TENANT_NAME.match(name):
            raise ValueError(f"tenant name {name!r} is not allowed: use 1-64 lowercase letters, "
                             "digits, '.', '_' or '-', starting with a letter or digit")
        try:
            with self.tx() as orm:
                row = TenantRow(name=name, allow_shared=allow_shared)
                orm.add(row)
                orm.flush()
                return tenant_of(row)
        except IntegrityError:
            raise Conflict(f"tenant {name!r} exists already") from None

    def get_tenant(self, name: str) -> Tenant:
        with self.tx() as orm:
            return tenant_of(self._tenant_row(orm, name))

    def list_tenants(self) -> list[Tenant]:
        with self.tx() as orm:
            return [tenant_of(r) for r in orm.scalars(select(TenantRow).order_by(TenantRow.name))]

    def set_allow_shared(self, tenant: TenantRef, allow: bool) -> Tenant:
        """Give or withdraw consent to shared learning. Withdrawn, the tenant's sessions stay
        out of every later shared consolidation (and it is no longer served the shared
        adapter); what a shared adapter already learned from it stays in that adapter."""
        with self.tx() as orm:
            row = self._tenant_row(orm, tenant)
            row.allow_shared = allow
            return tenant_of(row)

    def shared_tenants(self) -> list[Tenant]:
        """Tenants whose approved sessions may be learned into the shared adapter."""
        with self.tx() as orm:
            rows = orm.scalars(select(TenantRow).where(TenantRow.allow_shared.is_(True))
                               .order_by(TenantRow.name))
            return [tenant_of(r) for r in rows]

    def create_key(self, tenant_name: TenantRef, admin: bool = False) -> str:
        """A new key for the tenant. The plaintext is returned once and never stored."""
        with self.tx() as orm:
            return self._new_key(orm, self._tenant_row(orm, tenant_name).id, admin)

    def create_operator_key(self) -> str:
        """A new operator key (an admin key of no tenant): it lists and creates tenants and
        manages any tenant's keys and consent, and reaches no tenant's sessions."""
        with self.tx() as orm:
            return self._new_key(orm, None, True)

    def _new_key(self, orm: OrmSession, tenant_id: int | None, admin: bool) -> str:
        plaintext = keys.new_key()
        orm.add(ApiKeyRow(tenant_id=tenant_id, prefix=keys.display_prefix(plaintext),
                          key_hash=keys.key_hash(plaintext), is_admin=admin))
        return plaintext

    def list_keys(self, tenant: TenantRef) -> list[ApiKey]:
        with self.tx() as orm:
            row = self._tenant_row(orm, tenant)
            rows = orm.scalars(select(ApiKeyRow).where(ApiKeyRow.tenant_id == row.id)
                               .order_by(ApiKeyRow.id))
            return [_key_of(k, row.name) for k in rows]

    def list_operator_keys(self) -> list[ApiKey]:
        with self.tx() as orm:
            rows = orm.scalars(select(ApiKeyRow).where(ApiKeyRow.tenant_id.is_(None))
                               .order_by(ApiKeyRow.id))
            return [_key_of(k, None) for k in rows]

    def revoke_key(self, tenant: TenantRef, prefix: str) -> int:
        """Revoke the tenant's keys that start with `prefix`; return how many."""
        with self.tx() as orm:
            row = self._tenant_row(orm, tenant)
            return self._revoke(orm, ApiKeyRow.tenant_id == row.id, prefix,
                                f"tenant {row.name!r} has no key")

    def revoke_operator_key(self, prefix: str) -> int:
        with self.tx() as orm:
            return self._revoke(orm, ApiKeyRow.tenant_id.is_(None), prefix, "no operator key")

    def _revoke(self, orm: OrmSession, owner_clause: Any, prefix: str, missing: str) -> int:
        found = list(orm.scalars(select(ApiKeyRow).where(
            owner_clause, ApiKeyRow.prefix == prefix[:keys.PREFIX_LENGTH])))
        if not found:
            raise NotFound(f"{missing} starting with {prefix!r}")
        for key in found:
            key.revoked = True
        return len(found)

    def authenticate(self, key: str) -> tuple[Tenant | None, bool] | None:
        """(tenant, is_admin) for a valid, unrevoked key, (None, True) for an operator key;
        None otherwise."""
        if not isinstance(key, str) or not key.startswith(keys.KEY_PREFIX):
            return None
        with self.tx() as orm:
            candidates = orm.scalars(select(ApiKeyRow).where(
                ApiKeyRow.prefix == keys.display_prefix(key)))
            for candidate in candidates:
                if keys.matches(key, candidate.key_hash) and not candidate.revoked:
                    if candidate.tenant_id is None:
                        return None, True
                    tenant = orm.get(TenantRow, candidate.tenant_id)
                    return tenant_of(tenant), candidate.is_admin
        return None

    def tenant_for_key(self, key: str) -> Tenant | None:
        found = self.authenticate(key)
        return found[0] if found else None
