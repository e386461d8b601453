"""Small inline SVGs of an adapter's gate metrics over its versions, drawn on the server (the
page needs no script to show them): one panel per metric, the gate's threshold dashed, each
version a dot colored by its status."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from onthejob.store import Adapter

# (metric key, panel title, threshold key in metrics["thresholds"], sign of the threshold)
PANELS = (("gain", "learned: probe F1 gain", "min_gain", 1.0),
          ("kl_to_base", "moved: KL to base", "max_kl", 1.0),
          ("reading_change", "reading change", "max_retention_drop", -1.0))
STATUS_COLORS = {"active": "#1a7f37", "rejected": "#cf222e", "retired": "#6e7781",
                 "candidate": "#0969da"}
PANEL_W, PANEL_H = 200, 150
PAD_L, PAD_R, PAD_T, PAD_B = 34, 8, 22, 22
MAX_VERSIONS = 24


def metric(adapter: Adapter, key: str) -> float | None:
    """A gate metric of the adapter; reading_change is minus the recorded retention drop."""
    m = adapter.metrics or {}
    value = -m["retention_drop"] if key == "reading_change" and "retention_drop" in m \
        else m.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _threshold(adapter: Adapter, key: str, sign: float) -> float | None:
    value = (adapter.metrics or {}).get("thresholds", {}).get(key)
    return sign * float(value) if isinstance(value, (int, float)) else None


def _fmt(value: float) -> str:
    return f"{value:+.2f}" if abs(value) < 10 else f"{value:+.0f}"


def _panel(adapters: Sequence[Adapter], key: str, title: str, threshold: float | None,
           left: float) -> list[str]:
    points = [(a, metric(a, key)) for a in adapters]
    values = [v for _, v in points if v is not None]
    lo = min([0.0, *values, *([threshold] if threshold is not None else [])])
    hi = max([0.0, *values, *([threshold] if threshold is not None else [])])
    if hi - lo < 1e-9:
        hi = lo + 1.0
    span = hi - lo
    lo, hi = lo - 0.08 * span, hi + 0.08 * span
    inner_w = PANEL_W - PAD_L - PAD_R
    inner_h = PANEL_H - PAD_T - PAD_B

    def x(i: int) -> float:
        return left + PAD_L + (inner_w * (i + 0.5) / len(adapters))

    def y(v: float) -> float:
        return PAD_T + inner_h * (hi - v) / (hi - lo)

    out = [f'<text x="{left + PAD_L}" y="14" class="ct">{escape(title)}</text>',
           f'<rect x="{left + PAD_L}" y="{PAD_T}" width="{inner_w}" height="{inner_h}" '
           'fill="none" stroke="#d0d7de"/>',
           f'<line x1="{left + PAD_L}" x2="{left + PAD_L + inner_w}" y1="{y(0):.1f}" '
           f'y2="{y(0):.1f}" stroke="#afb8c1"/>',
           f'<text x="{left + PAD_L - 3}" y="{y(hi) + 9:.1f}" class="cy">{_fmt(hi)}</text>',
           f'<text x="{left + PAD_L - 3}" y="{y(lo) - 2:.1f}" class="cy">{_fmt(lo)}</text>']
    if threshold is not None:
        out.append(f'<line x1="{left + PAD_L}" x2="{left + PAD_L + inner_w}" '
                   f'y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" stroke="#bf8700" '
                   'stroke-dasharray="4 3"><title>gate threshold '
                   f'{threshold:+.3f}</title></line>')
    line = [f"{x(i):.1f},{y(v):.1f}" for i, (_, v) in enumerate(points) if v is not None]
    if len(line) > 1:
        out.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="#8c959f"/>')
    for i, (adapter, value) in enumerate(points):
        out.append(f'<text x="{x(i):.1f}" y="{PANEL_H - 6}" class="cx">v{adapter.version}</text>')
        if value is None:
            continue
        color = STATUS_COLORS.get(adapter.status, "#57606a")
        label = escape(f"v{adapter.version} ({adapter.status}): {title} {value:+.3f}")
        out.append(f'<circle cx="{x(i):.1f}" cy="{y(value):.1f}" r="4" fill="{color}">'
                   f"<title>{label}</title></circle>")
    return out


def gate_chart(adapters: Sequence[Adapter], label: str) -> str:
    """The markup for these versions of one adapter, oldest first: one small SVG per metric
    (side by side on a wide window, stacked on a phone); '' when no version has gate metrics."""
    shown = sorted(adapters, key=lambda a: a.version)[-MAX_VERSIONS:]
    if not any(metric(a, key) is not None for a in shown for key, *_ in PANELS):
        return ""
    latest = shown[-1]
    parts = [f'<div class="charts" role="group" aria-label="{escape(label)}">']
    for key, title, threshold_key, sign in PANELS:
        threshold = _threshold(latest, threshold_key, sign)
        parts.append(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {PANEL_W} {PANEL_H}" '
                     f'role="img" aria-label="{escape(f"{label}: {title}")}">')
        parts += _panel(shown, key, title, threshold, 0)
        parts.append("</svg>")
    parts.append("</div>")
    return "\n".join(parts)
