"""Where onthejob keeps its files. Owns paths and environment variables; imports nothing of ours."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The root of onthejob's files: ONTHEJOB_HOME, else ~/.cache/onthejob."""
    root = os.environ.get("ONTHEJOB_HOME") or os.path.join(Path.home(), ".cache", "onthejob")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """Converted models: ONTHEJOB_MODELS, else ~/.cache/onthejob/models. Not under
    ONTHEJOB_HOME: a new home (a demo, a test, a second tenant store) reuses the conversion."""
    default = Path.home() / ".cache" / "onthejob" / "models"
    path = Path(os.environ.get("ONTHEJOB_MODELS") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def adapters_dir() -> Path:
    path = home() / "adapters"
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str:
    """ONTHEJOB_DB (any SQLAlchemy URL), else an SQLite file under home()."""
    return os.environ.get("ONTHEJOB_DB") or f"sqlite:///{home() / 'onthejob.db'}"


def figures_dir() -> Path | None:
    """The benchmark plots the review page shows: ONTHEJOB_FIGURES, else the source tree's
    docs/results when the package runs from a checkout; None when neither exists."""
    configured = os.environ.get("ONTHEJOB_FIGURES")
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "docs" / "results"
    return path if path.is_dir() else None
