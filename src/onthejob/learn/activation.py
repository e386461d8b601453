"""Making an adapter version active by hand (`onthejob adapters activate` and the review page):
its files are checked against the checksum the registry recorded first, so a corrupt or
swapped adapter is never made active. Rolling back is `Store.rollback_adapter` as it is."""

from __future__ import annotations

from onthejob.model.adapters import AdapterError, verify
from onthejob.store import Adapter, Store


def activate_checked(store: Store, adapter: Adapter, reason: str = "activated by hand") -> Adapter:
    """Verify the adapter's files, then activate it (the previous active one is retired)."""
    actual = verify(adapter.path)
    if actual != adapter.checksum:
        raise AdapterError(f"adapter v{adapter.version} at {adapter.path} does not match the "
                           f"registry (checksum {actual[:12]} != recorded {adapter.checksum[:12]}); "
                           "it was replaced on disk: activate another version")
    return store.activate_adapter(adapter.id, reason=reason)
