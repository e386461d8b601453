"""Store contents for the review page's tests (fast and browser): two tenants, sessions with
every kind of message and an XSS probe, a consolidation run, and adapter versions whose files
pass the checksum (written by hand: no training is needed to show or activate them)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from onthejob.model.adapters import CHECKSUM_FILE, checksum
from onthejob.store import NewMessage, Store

XSS_SCRIPT = "<script>document.title='pwned'</script>"
XSS_IMG = "<img src=x onerror=\"document.title='pwned'\">"
XSS_PROBE = f"Is this safe? {XSS_SCRIPT} {XSS_IMG}"


def fake_adapter(folder: Path) -> tuple[str, str]:
    """An adapter directory whose checksum file matches its files: (path, checksum)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(folder.name.encode() * 64)
    digest = checksum(folder)
    (folder / CHECKSUM_FILE).write_text(digest)
    return str(folder), digest


def gate_metrics(gain: float, kl: float, drop: float, before: float = 0.2) -> dict:
    return {"gain": gain, "kl_to_base": kl, "retention_drop": drop, "earlier_drop": 0.0,
            "probe_f1_before": before, "probe_f1_after": before + gain,
            "thresholds": {"min_gain": 0.02, "max_kl": 0.5, "max_retention_drop": 0.15,
                           "max_earlier_drop": 0.1}}


@dataclass
class World:
    store: Store
    keys: dict[str, str]
    bluefin: str  # acme: ended, with a tool call, an observation, a compaction
    probe: str  # acme: the XSS probe, open, not reviewed
    learned: str  # acme: approved and consolidated into v1
    other: str  # globex's one session
    adapters: dict[int, int]  # acme's version -> adapter id


def build_world(store: Store, adapters_dir: Path) -> World:
    store.create_tenant("acme")
    store.create_tenant("globex")
    keys = {"acme": store.create_key("acme"), "globex": store.create_key("globex")}
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "search_docs", "arguments": '{"query": "Bluefin launch"}'}}]
    bluefin = store.create_session("acme", "Project Bluefin launch plan", [
        NewMessage("user", "Please remember: our project is code-named **Bluefin** and it "
                   "launches on March 3 in Oslo."),
        NewMessage("assistant", "Got it. Bluefin launches on March 3 in Oslo."),
        NewMessage("assistant", json.dumps(calls), "tool_call", {"tool_calls": calls}),
        NewMessage("tool", "launch.md: Bluefin, Oslo, March 3; lead engineer Ada Lind",
                   "observation", {"tool_call_id": "call_1"}),
        NewMessage("assistant", "The user told me Bluefin launches on March 3 in Oslo; "
                   "the lead engineer is Ada Lind.", "compaction"),
        NewMessage("user", "Who leads it?"),
        NewMessage("assistant", "Ada Lind is the lead engineer of Bluefin."),
    ]).id
    store.end_session("acme", bluefin)
    learned = store.create_session("acme", "Release checklist", [
        NewMessage("user", "Our release checklist has five steps; the last is tagging."),
        NewMessage("assistant", "Noted: five steps, tagging last."),
    ]).id
    store.set_review("acme", learned, "up", "Right: tagging comes last.")
    store.end_session("acme", learned)
    probe = store.create_session("acme", f"XSS probe {XSS_SCRIPT}", [
        NewMessage("user", XSS_PROBE),
        NewMessage("assistant", "It is shown as text."),
    ]).id
    other = store.create_session("globex", "Globex secret plans", [
        NewMessage("user", "globex-only text: the merger closes in June"),
    ]).id

    ids = {}
    recipe = {1: (0.116, 0.214, 0.0), 2: (0.004, 0.31, 0.02), 3: (0.09, 0.26, -0.01)}
    parent = None
    for version, (gain, kl, drop) in recipe.items():
        path, digest = fake_adapter(adapters_dir / f"v{version}")
        promoted = gain >= 0.02
        reason = (f"learned (gain {gain:+.3f}) and did not forget (KL {kl:.3f}, retention drop "
                  f"{drop:+.3f})" if promoted else
                  f"did not learn: held-back probe F1 gain {gain:+.3f} < 0.02")
        adapter = store.add_adapter("tenant", "acme", method="opsd", path=path, checksum=digest,
                                    parent_id=parent, metrics=gate_metrics(gain, kl, drop),
                                    reason=reason, status="candidate")
        ids[version] = adapter.id
        if promoted:
            sessions = {"acme": [learned]} if version == 1 else {}
            store.promote_adapter(adapter.id, sessions, reason=reason)
            parent = adapter.id
        else:
            store.set_adapter_status(adapter.id, "rejected", reason)
    run = store.create_run("consolidate", "acme", params={"method": "opsd",
                                                          "train": {"steps": 16}})
    store.update_run(run.id, progress={"step": 16, "loss": 0.42, "kl_to_base": 0.26,
                                       "s_per_step": 3.1, "eta_s": 0.0})
    store.update_run(run.id, status="done", progress={"outcome": "promoted",
                                                      "adapter": ids[3]})
    return World(store, keys, bluefin, probe, learned, other, ids)


CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)
