"""`onthejob tenants|keys|sessions|runs ...`: manage tenants and keys, inspect stored sessions
and the runs of long jobs (consolidation, dreaming, grinding) with their live progress."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from onthejob.store import Store, StoreError


def db_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--db", metavar="URL",
                        help="database URL (default: ONTHEJOB_DB, else SQLite under ONTHEJOB_HOME)")
    return parent


def plain(value: Any) -> Any:
    data = asdict(value) if hasattr(value, "__dataclass_fields__") else value
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [plain(v) for v in data]
    return data.isoformat() if hasattr(data, "isoformat") else data


def command(func: Callable[[Store, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Open the store, run, and turn store errors into one clear line on stderr."""
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            store = Store(args.db)
        except Exception as exc:  # noqa: BLE001 - any connection problem, said plainly
            print(f"error: cannot open the database {args.db or '(default)'}: {exc}",
                  file=sys.stderr)
            return 1
        try:
            return func(store, args)
        except (StoreError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            store.close()
    return run


def register(sub: argparse._SubParsersAction) -> None:
    db = db_option()
    tenants = sub.add_parser("tenants", help="add, list or change tenants",
                             description="Tenants own sessions, keys and adapters.")
    tsub = tenants.add_subparsers(dest="tenants_command", metavar="ACTION", required=True)
    add = tsub.add_parser("add", parents=[db], help="add a tenant and print its first API key",
                          description="Add a tenant and print a new API key (shown once).")
    add.add_argument("name", help="lowercase letters, digits, '.', '_', '-'")
    add.add_argument("--allow-shared", action="store_true",
                     help="let its approved sessions feed the shared adapter")
    add.set_defaults(func=command(_tenants_add))
    lst = tsub.add_parser("list", parents=[db], help="list tenants", description="List tenants.")
    lst.set_defaults(func=command(_tenants_list))
    tset = tsub.add_parser(
        "set", parents=[db], help="give or withdraw a tenant's consent to shared learning",
        description="Change a tenant's consent to shared learning. Withdrawn, its sessions stay "
        "out of every later `consolidate --scope shared` and it is no longer served the shared "
        "adapter; what a shared adapter learned from it before stays in that adapter.")
    tset.add_argument("name")
    tset.add_argument("--allow-shared", action=argparse.BooleanOptionalAction, required=True,
                      help="--allow-shared gives consent, --no-allow-shared withdraws it")
    tset.set_defaults(func=command(_tenants_set))

    keys = sub.add_parser("keys", help="add, list or revoke API keys",
                          description="API keys are stored hashed; a new key is shown once.")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    kadd = ksub.add_parser("add", parents=[db], help="print a new key for a tenant",
                           description="Create an API key for a tenant (or an operator key) and "
                           "print it once.")
    _owner_options(kadd)
    kadd.add_argument("--admin", action="store_true",
                      help="a tenant admin key: manages that tenant's keys and consent over HTTP")
    kadd.set_defaults(func=command(_keys_add))
    klist = ksub.add_parser("list", parents=[db], help="list a tenant's keys (prefixes only)",
                            description="List a tenant's (or the operator) keys by prefix.")
    _owner_options(klist)
    klist.set_defaults(func=command(_keys_list))
    krev = ksub.add_parser("revoke", parents=[db], help="revoke a key by its prefix",
                           description="Revoke a tenant's (or an operator) key, named by the "
                           "prefix `keys list` shows.")
    _owner_options(krev)
    krev.add_argument("prefix", help="the key's first 12 characters")
    krev.set_defaults(func=command(_keys_revoke))

    sessions = sub.add_parser("sessions", help="list, show or export a tenant's sessions",
                              description="Inspect what was stored: sessions, messages, reviews.")
    ssub = sessions.add_subparsers(dest="sessions_command", metavar="ACTION", required=True)
    slist = ssub.add_parser("list", parents=[db], help="list sessions, newest first",
                            description="List a tenant's sessions, most recently active first.")
    slist.add_argument("--tenant", required=True, metavar="NAME")
    slist.add_argument("--status", choices=("open", "ended"))
    slist.add_argument("--limit", type=int, default=50)
    slist.set_defaults(func=command(_sessions_list))
    show = ssub.add_parser("show", parents=[db], help="print one session's transcript",
                           description="Print one session: its messages and review.")
    show.add_argument("session_id", metavar="ID")
    show.add_argument("--tenant", required=True, metavar="NAME")
    show.set_defaults(func=command(_sessions_show))
    export = ssub.add_parser("export", parents=[db], help="write sessions as JSON lines",
                             description="Write the tenant's sessions (or one) as JSON lines: "
                             "one session per line with its messages and review.")
    export.add_argument("--tenant", required=True, metavar="NAME")
    export.add_argument("--session", metavar="ID", help="only this session")
    export.add_argument("--out", metavar="PATH", help="file to write (default: stdout)")
    export.set_defaults(func=command(_sessions_export))

    runs = sub.add_parser("runs", help="list long jobs or show one's live progress",
                          description="Consolidation, dreaming and grinding runs as the store "
                          "keeps them: status, phase, live progress and, when done, the seconds "
                          "of each phase.")
    rsub = runs.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    rlist = rsub.add_parser("list", parents=[db], help="list runs, newest first",
                            description="List runs, newest first.")
    rlist.add_argument("--tenant", metavar="NAME", help="only this tenant's runs")
    rlist.add_argument("--kind", choices=("consolidate", "dream", "grind"))
    rlist.add_argument("--limit", type=int, default=20)
    rlist.set_defaults(func=command(_runs_list))
    rshow = rsub.add_parser("show", parents=[db], help="one run in full, with its progress",
                            description="One run: status, phase, progress inside the phase "
                            "(done/total, rate, ETA) and the seconds of each phase so far.")
    rshow.add_argument("run_id", type=int, metavar="RUN")
    rshow.add_argument("--json", action="store_true", help="the whole row as JSON")
    rshow.set_defaults(func=command(_runs_show))


def _owner_options(p: argparse.ArgumentParser) -> None:
    owner = p.add_mutually_exclusive_group(required=True)
    owner.add_argument("--tenant", metavar="NAME", help="the tenant whose keys these are")
    owner.add_argument("--operator", action="store_true",
                       help="operator keys: bound to no tenant; they list and create tenants and "
                       "manage every tenant's keys over HTTP, and reach no sessions")


def _tenants_add(store: Store, args: argparse.Namespace) -> int:
    tenant = store.create_tenant(args.name, allow_shared=args.allow_shared)
    key = store.create_key(tenant)
    print(f"tenant {tenant.name} added (shared learning: {'yes' if tenant.allow_shared else 'no'})")
    print(f"API key (shown once, store it now): {key}")
    return 0


def _tenants_list(store: Store, args: argparse.Namespace) -> int:
    for tenant in store.list_tenants():
        shared = "shared" if tenant.allow_shared else "private"
        print(f"{tenant.name}\t{shared}\t{tenant.created_at:%Y-%m-%d %H:%M}")
    return 0


def _tenants_set(store: Store, args: argparse.Namespace) -> int:
    tenant = store.set_allow_shared(args.name, args.allow_shared)
    if tenant.allow_shared:
        print(f"tenant {tenant.name}: shared learning allowed (its approved sessions may feed "
              "the shared adapter)")
    else:
        print(f"tenant {tenant.name}: consent to shared learning withdrawn (its sessions stay "
              "out of later shared consolidations)")
    return 0


def _keys_add(store: Store, args: argparse.Namespace) -> int:
    if args.operator:
        key = store.create_operator_key()
        print(f"operator key (manages tenants; shown once, store it now): {key}")
        return 0
    key = store.create_key(args.tenant, admin=args.admin)
    kind = "admin key" if args.admin else "API key"
    print(f"{kind} for {args.tenant} (shown once, store it now): {key}")
    return 0


def _keys_list(store: Store, args: argparse.Namespace) -> int:
    found = store.list_operator_keys() if args.operator else store.list_keys(args.tenant)
    for key in found:
        flags = ", ".join(f for f, on in (("operator", key.tenant is None),
                                          ("admin", key.is_admin and key.tenant is not None),
                                          ("revoked", key.revoked)) if on)
        print(f"{key.prefix}...\t{key.created_at:%Y-%m-%d %H:%M}\t{flags}")
    return 0


def _keys_revoke(store: Store, args: argparse.Namespace) -> int:
    n = store.revoke_operator_key(args.prefix) if args.operator else \
        store.revoke_key(args.tenant, args.prefix)
    print(f"revoked {n} key(s)")
    return 0


def _sessions_list(store: Store, args: argparse.Namespace) -> int:
    for s in store.list_sessions(args.tenant, status=args.status, limit=args.limit):
        review = store.get_review(args.tenant, s.id)
        verdict = review.verdict if review else "-"
        print(f"{s.id}\t{s.status}\t{s.message_count} msgs\treview {verdict}\t"
              f"{s.updated_at:%Y-%m-%d %H:%M}\t{s.title or ''}")
    return 0


def _sessions_show(store: Store, args: argparse.Namespace) -> int:
    s = store.get_session(args.tenant, args.session_id)
    print(f"session {s.id} ({s.status}) of {s.tenant}: {s.title or ''}")
    for m in store.messages(args.tenant, s.id):
        label = m.role if m.kind == "message" else f"{m.role}/{m.kind}"
        print(f"[{m.seq}] {label}: {m.content}")
    review = store.get_review(args.tenant, s.id)
    print(f"review: {review.verdict} {review.text}" if review else "review: none")
    return 0


def export_record(store: Store, tenant: str, session_id: str) -> dict:
    """One session as a JSON-ready dict: the session, its messages, its review."""
    review = store.get_review(tenant, session_id)
    return {**plain(store.get_session(tenant, session_id)),
            "messages": plain(store.messages(tenant, session_id)),
            "review": plain(review) if review else None}


def _sessions_export(store: Store, args: argparse.Namespace) -> int:
    ids = [args.session] if args.session else \
        [s.id for s in reversed(store.list_sessions(args.tenant, limit=10_000))]
    records = [export_record(store, args.tenant, sid) for sid in ids]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(lines)
        print(f"wrote {len(records)} session(s) to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def _runs_list(store: Store, args: argparse.Namespace) -> int:
    rows = store.list_runs(args.kind, args.tenant, limit=args.limit)
    if not rows:
        print("no runs yet")
    for r in rows:
        phase = r.progress.get("phase", "")
        print(f"{r.id:<5} {r.kind:<11} {r.status:<11} {r.tenant or 'shared':<12} "
              f"{r.started_at:%Y-%m-%d %H:%M}  {phase}")
    return 0


def _runs_show(store: Store, args: argparse.Namespace) -> int:
    r = store.get_run(args.run_id)
    if args.json:
        print(json.dumps(plain(r), indent=2, default=str))
        return 0
    p = r.progress
    print(f"run {r.id} ({r.kind}) of {r.tenant or 'shared'}: {r.status}, started "
          f"{r.started_at:%Y-%m-%d %H:%M:%S}, last heartbeat {r.heartbeat_at:%H:%M:%S}"
          + (f", ended {r.ended_at:%H:%M:%S}" if r.ended_at else ""))
    if p.get("phase"):
        inner = p.get("phase_progress") or {}
        live = (f": {inner['done']}/{inner['total']} {inner.get('unit', '')}, ETA "
                f"{inner.get('eta_s', 0):.0f} s" if inner.get("total") else "")
        print(f"phase: {p['phase']}{live}")
    if "step" in p:
        print(f"training: step {p['step']}, {p.get('s_per_step', 0):.1f} s/step, ETA "
              f"{p.get('eta_s', 0):.0f} s, loss {p.get('loss', float('nan')):.4g}")
    for name, seconds in (p.get("phases") or {}).items():
        print(f"  {name}: {seconds:.0f} s")
    if p.get("outcome"):
        print(f"outcome: {p['outcome']}" + (f" (adapter id {p['adapter']})" if p.get("adapter") else ""))
    if r.error:
        print(f"error: {r.error.splitlines()[0]}")
    return 0
