"""What the review page shows, computed from the store's records: a message's safe HTML, the
gate's numbers in words, a run's progress. No request handling here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from markdown_it import MarkdownIt
from markupsafe import Markup, escape

from onthejob.store import Adapter, Message, Run

# CommonMark with raw HTML off: any tag a user typed is shown as text, never parsed, and
# markdown-it refuses javascript:, vbscript: and data: link targets itself.
_MARKDOWN = MarkdownIt("commonmark", {"html": False, "breaks": True})


def markdown(text: str) -> Markup:
    """Markdown to HTML in which no user text can become markup (raw HTML is escaped)."""
    return Markup(_MARKDOWN.render(text))


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


@dataclass(frozen=True)
class Turn:
    """One stored message as the transcript shows it."""

    seq: int
    kind: str
    role: str
    label: str
    body: Markup
    detail: str  # tool calls' names and arguments, pretty-printed; shown as escaped text


def turn_of(message: Message) -> Turn:
    detail = ""
    if message.kind == "tool_call":
        calls = message.meta.get("tool_calls") or []
        lines = []
        for call in calls if isinstance(calls, list) else []:
            function = call.get("function", {}) if isinstance(call, dict) else {}
            arguments = function.get("arguments", "")
            try:
                arguments = json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
            except (TypeError, ValueError):
                pass
            lines.append(f"{function.get('name', '?')}({arguments})")
        detail = "\n".join(lines)
        label = "tool call"
    elif message.kind == "observation":
        call_id = message.meta.get("tool_call_id")
        label = f"tool result{f' for {call_id}' if call_id else ''}"
    elif message.kind == "compaction":
        label = "compaction: the model's summary; later turns see it instead of the turns above"
    else:
        label = message.role
    body = markdown(message.content) if message.kind in ("message", "compaction") else \
        Markup("<pre>") + escape(message.content) + Markup("</pre>")
    calls = message.meta.get("tool_calls")
    if message.kind == "tool_call" and detail and \
            message.content == json.dumps(calls, ensure_ascii=False):
        body = Markup("")  # the content is the calls' JSON, already shown in `detail`
    return Turn(message.seq, message.kind, message.role, label, body, detail)


def _signed(value: float) -> str:
    return f"{value + 0.0:+.3f}" if round(value, 3) else "+0.000"  # never "-0.000"


def _num(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def gate_words(adapter: Adapter) -> str:
    """The gate's numbers in words: 'learned: +0.180 on held-back probes; forgot: KL 0.220, ...'."""
    m = adapter.metrics or {}
    gain, kl = _num(m, "gain"), _num(m, "kl_to_base")
    if gain is None and kl is None:
        return "no gate numbers recorded"
    limits = m.get("thresholds") or {}
    parts = []
    if gain is not None:
        before, after = _num(m, "probe_f1_before"), _num(m, "probe_f1_after")
        f1 = f" (F1 {before:.2f} → {after:.2f})" if before is not None and after is not None else ""
        need = f", needs ≥ {limits['min_gain']:+.2f}" if "min_gain" in limits else ""
        parts.append(f"learned: {gain:+.3f} on held-back probes{f1}{need}")
    forgot = []
    if kl is not None:
        bar = f" (≤ {limits['max_kl']:.2f})" if "max_kl" in limits else ""
        forgot.append(f"KL {kl:.3f} to the base{bar}")
    drop = _num(m, "retention_drop")
    if drop is not None:
        forgot.append(f"reading {_signed(-drop)}")
    earlier = _num(m, "earlier_drop")
    if earlier is not None:
        forgot.append(f"earlier sessions {_signed(-earlier)}")
    if forgot:
        parts.append("forgot: " + ", ".join(forgot))
    return "; ".join(parts)


DECISIONS = {"active": "serving now", "retired": "was active, replaced",
             "rejected": "rejected", "candidate": "candidate, not served"}


def decision_words(adapter: Adapter) -> str:
    """The decision and its reason: 'rejected: did not learn: ...' or 'serving now: learned ...'."""
    return f"{DECISIONS.get(adapter.status, adapter.status)}: {adapter.reason or 'no reason recorded'}"


@dataclass(frozen=True)
class RunView:
    run: Run
    step: int | None
    of: int | None
    phase: str
    numbers: str  # loss, KL, ETA as words

    @property
    def percent(self) -> int | None:
        if self.step is None or not self.of:
            return None
        return min(100, round(100 * self.step / self.of))


def run_view(run: Run) -> RunView:
    """A run's progress from its row: step of steps, phase, the last numbers it reported."""
    p = run.progress
    step = p.get("step") if isinstance(p.get("step"), int) else None
    train = run.params.get("train") if isinstance(run.params.get("train"), dict) else {}
    of = train.get("steps") if isinstance(train.get("steps"), int) else None
    phase = str(p.get("phase") or ("training" if step is not None else "starting"))
    if run.status != "running":
        outcome = p.get("outcome")
        phase = f"{run.status}{f': {outcome}' if outcome else ''}"
    numbers = []
    for key, name in (("loss", "loss"), ("kl_to_base", "KL to base")):
        if isinstance(p.get(key), (int, float)):
            numbers.append(f"{name} {p[key]:.3f}")
    if run.status == "running" and isinstance(p.get("eta_s"), (int, float)):
        numbers.append(f"about {p['eta_s']:.0f} s left")
    if isinstance(p.get("s_per_step"), (int, float)):
        numbers.append(f"{p['s_per_step']:.1f} s/step")
    return RunView(run, step, of, phase, ", ".join(numbers))
