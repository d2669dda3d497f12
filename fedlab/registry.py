"""Named implementations of one interface, as papermill keeps its engines: a user adds one in a
file of their own and names it in the YAML config.

A `Registry` maps names to classes (or factories). fedlab's own entries are registered lazily, as
`"module:attribute"` text, so naming them costs no import. Besides a registered name, a config
value may point at the implementation directly:

- `"package.module:Name"`: an importable module (on `sys.path`) and the attribute in it;
- `"path/to/file.py:Name"`: a Python file, relative to the project root (the folder holding
  `configs/`) unless absolute; it is loaded once per process.

    from fedlab.flatten.engines import ENGINES
    ENGINES.register("mine", MyEngine)           # or name it in YAML: flatten.engine: my_engine.py:MyEngine
    engine_class = ENGINES.get("views")
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from fedlab.errors import FedlabError

T = TypeVar("T")


class RegistryError(FedlabError, ValueError):
    """A name that is neither registered nor a loadable `module:Name` / `file.py:Name`."""


class Registry(Generic[T]):
    """Names -> implementations of one kind (`kind` is used in messages, e.g. "flatten engine")."""

    def __init__(self, kind: str, builtins: dict[str, str] | None = None,
                 check: Callable[[Any], str | None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = dict(builtins or {})
        self._check = check  # a reason the loaded object is not of this kind, or None

    def register(self, name: str, implementation: T | None = None) -> Any:
        """Register `implementation` under `name`; without it, a decorator that does so."""
        if implementation is None:
            def decorate(found: T) -> T:
                self.register(name, found)
                return found
            return decorate
        self._entries[name] = implementation
        return implementation

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str, root: Path | None = None) -> T:
        """The implementation a config value names; RegistryError when there is none."""
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} must be a name, got {name!r}")
        entry = self._entries.get(name)
        if entry is None:
            if ":" not in name:
                raise RegistryError(f"unknown {self.kind} {name!r} (choose one of: {', '.join(self.names())}, "
                                    "or name your own as module:Name or path/to/file.py:Name)")
            entry = name
        found = _load(entry, root, self.kind) if isinstance(entry, str) else entry
        problem = self._check(found) if self._check is not None else None
        if problem:
            raise RegistryError(f"{self.kind} {name!r}: {problem}")
        if isinstance(entry, str) and name in self._entries:
            self._entries[name] = found  # a built-in entry, imported once
        return found

    def problem(self, name: str, root: Path | None = None) -> str | None:
        """Why `name` names no implementation, or None when it does (for config validation). A
        registered name is taken as it is, without importing it."""
        if isinstance(name, str) and name in self._entries:
            return None
        try:
            self.get(name, root)
        except RegistryError as error:
            return str(error)
        return None


_FILES: dict[Path, Any] = {}
USER_MODULE_PREFIX = "fedlab_user_"  # modules loaded from a user's file


def _load(spec: str, root: Path | None, kind: str) -> Any:
    target, _, attribute = spec.rpartition(":")
    if not target or not attribute:
        raise RegistryError(f"{kind} {spec!r}: expected module:Name or path/to/file.py:Name")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _load_file(Path(target) if Path(target).is_absolute() else (root or Path.cwd()) / target, spec, kind)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise RegistryError(f"{kind} {spec!r}: cannot import {target!r} ({error})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise RegistryError(f"{kind} {spec!r}: {target} has no {attribute!r}") from None


def _load_file(path: Path, spec: str, kind: str) -> Any:
    path = path.resolve()
    if path in _FILES:
        return _FILES[path]
    if not path.is_file():
        raise RegistryError(f"{kind} {spec!r}: file not found: {path}")
    name = f"{USER_MODULE_PREFIX}{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise RegistryError(f"{kind} {spec!r}: {path} is not a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # pickling (Spark executors) finds classes through their module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise RegistryError(f"{kind} {spec!r}: loading {path} failed: {type(error).__name__}: {error}") from None
    _FILES[path] = module
    return module
