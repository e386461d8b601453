"""Benchmarks: commands that measure and write their figures to files (not timed tests)."""

from __future__ import annotations


def names(text: str) -> list[str]:
    """A comma-separated option as its non-empty items."""
    return [n.strip() for n in text.split(",") if n.strip()]


def finite(value):
    """NaN (an undefined ratio) as JSON null, in nested dicts and lists, so a report is strict
    JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
