"""Making an adapter version active by hand (`onthejob adapters activate` and the review page):
its files are checked against the checksum the registry recorded first, so a corrupt or
swapped adapter is never made active. Rolling back is `Store.rollback_adapter` as it is.

What activation by hand means (README "Adapters"): a person overrides the gate. The gate's
own verdict is kept beside the manual action (`metrics["gate"]`, and the reason says both),
so `adapters list/show` still say why the gate decided as it did. A candidate made active by
hand has learned its sessions as far as onthejob is concerned: those still approved are
marked consolidated in the same transaction, so the next consolidation does not train on
them again on top of an adapter that already holds them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from onthejob.model.adapters import AdapterError, verify
from onthejob.store import Adapter, Store

BY_HAND = "activated by hand"


def activate_checked(store: Store, adapter: Adapter, reason: str = BY_HAND) -> Adapter:
    """Verify the adapter's files, then activate it (the previous active one is retired)."""
    actual = verify(adapter.path)
    if actual != adapter.checksum:
        raise AdapterError(f"adapter v{adapter.version} at {adapter.path} does not match the "
                           f"registry (checksum {actual[:12]} != recorded {adapter.checksum[:12]}); "
                           "it was replaced on disk: activate another version")
    if adapter.status == "active":
        return adapter
    gate = (adapter.metrics or {}).get("gate") or {}
    verdict = gate.get("reason") or adapter.reason
    if verdict and adapter.status in ("rejected", "candidate"):
        reason = f"{reason} over the gate's verdict ({adapter.status}: {verdict})"
    elif verdict:
        reason = f"{reason} (the gate: {verdict})"
    sessions = _still_eligible(store, (adapter.metrics or {}).get("sessions_by_tenant") or {})
    if adapter.status == "retired":
        sessions = {}  # a version that was active before: its sessions are already marked
    manual = {"by_hand": {"at": datetime.now(UTC).isoformat(timespec="seconds"),
                          "status_before": adapter.status,
                          "sessions_marked": sorted(s for ids in sessions.values() for s in ids)}}
    return store.promote_adapter(adapter.id, sessions, reason=reason, metrics=manual)


def _still_eligible(store: Store, by_tenant: dict[str, list[str]]) -> dict[str, list[str]]:
    """Of the candidate's sessions, those still approved and not consolidated (a review may have
    turned thumbs-down since; such a session is left as it is)."""
    out = {}
    for tenant, ids in by_tenant.items():
        open_ids = {s.id for s in store.sessions_to_consolidate(tenant)}
        kept = [s for s in ids if s in open_ids]
        if kept:
            out[tenant] = kept
    return out
