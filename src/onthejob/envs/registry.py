"""Find environments by name: the built-ins, ones registered at run time, and ones that other
installed packages declare in the entry-point group `onthejob.envs`.

A package adds an environment with, in its pyproject.toml:

    [project.entry-points."onthejob.envs"]
    mail = "my_package.mail:MailEnv"

where the object is an `Env` subclass or a zero-argument-or-options factory returning an Env.
Its keyword parameters are its options: `make` refuses any other name (a typo such as
`difficuly=2` would otherwise change nothing, silently), unless it takes `**options`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from onthejob.envs.base import Env, EnvError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onthejob.envs"
_BUILTINS = {
    "arith": "onthejob.envs.arith:ArithEnv",
    "code": "onthejob.envs.code_env:CodeEnv",
    "shop": "onthejob.envs.shop:ShopEnv",
}
_registry: dict[str, Callable[..., Env]] = {}
_discovered = False


def register(name: str, factory: Callable[..., Env]) -> None:
    """Make `factory(**options)` available as `make(name, **options)`."""
    if not name or not isinstance(name, str):
        raise EnvError("an environment name must be a non-empty string")
    _registry[name] = factory


def unregister(name: str) -> None:
    """Forget an environment registered at run time (a no-op for an unknown name)."""
    _registry.pop(name, None)


def _load(target: str) -> Callable[..., Env]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for name, target in _BUILTINS.items():
        _registry.setdefault(name, _lazy(target))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _registry:
            log.warning("entry point %s=%s ignored: the name is taken", ep.name, ep.value)
            continue
        _registry[ep.name] = _lazy(ep.value)


def _lazy(target: str) -> Callable[..., Env]:
    def factory(**options: Any) -> Env:
        return _load(target)(**options)

    factory.target = target  # type: ignore[attr-defined]
    return factory


def list_envs() -> list[str]:
    _discover()
    return sorted(_registry)


def make(name: str, **options: Any) -> Env:
    """A fresh environment (call `reset(seed)` before stepping it)."""
    _discover()
    if name not in _registry:
        raise EnvError(
            f"unknown environment {name!r}: known are {', '.join(sorted(_registry))} "
            f"(others come from packages declaring the entry-point group {ENTRY_POINT_GROUP!r})"
        )
    _check_options(name, options)
    env = _registry[name](**options)
    if not isinstance(env, Env):
        raise EnvError(f"the factory for {name!r} returned {type(env).__name__}, not an Env")
    return env


def options_of(name: str) -> list[str] | None:
    """The option names environment `name` takes (None: it takes any, via **options)."""
    _discover()
    if name not in _registry:
        make(name)  # the error that lists the known names
    factory = _registry[name]
    target = getattr(factory, "target", None)
    try:
        params = inspect.signature(_load(target) if target else factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _check_options(name: str, options: dict[str, Any]) -> None:
    valid = options_of(name)
    unknown = [key for key in options if valid is not None and key not in valid]
    if not unknown:
        return
    hints = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(
        key, valid, n=1)) else repr(key) for key in unknown]
    raise EnvError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(hints)} for "
                   f"environment {name!r}: its options are {', '.join(valid) or '(none)'}")


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """Options from `KEY=VALUE` strings (`--option`): each value read as JSON, else kept as text."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise EnvError(f"--option {pair!r} must look like KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
