"""What a stage key knows of code and files: digests of what a result depends on.

A distribution's version alone says nothing while its code is edited in place (every
built-in reports one version), so reusing by version could hand back results of code that
has changed since. The digest covers every ``.py`` file of each top-level package that
defines the class or one of its bases, compressflow's own included.

Likewise a model source's reference (``file:w.pt``) or a dataset's paths name files, not
their bytes: :func:`files_digest`, :func:`tree_digest` and :func:`listing_digest` are what
``ModelSource.digest`` and ``Dataset.digest`` build on, so that a file replaced in place
changes the keys.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any, Iterable

from compressflow.data import file_digest

_NOT_CODE_OF_RESULTS = {"builtins", "pydantic", "pydantic_core", "typing_extensions"}


def code_digest(thing: Any) -> str:
    """A digest of the source of the packages that define ``thing`` (a class, an instance
    or a function) and its bases, plus compressflow's."""
    cls = thing if inspect.isclass(thing) else type(thing)
    # a function's (or bound method's) own module, and every module of its class's bases
    modules = [getattr(thing, "__module__", None), *(c.__module__ for c in cls.__mro__)]
    packages = {m.split(".")[0] for m in modules if m} | {"compressflow"}
    packages = {p for p in packages
                if p not in _NOT_CODE_OF_RESULTS and p not in sys.stdlib_module_names}
    digest = hashlib.sha256()
    for package in sorted(packages):
        digest.update(f"{package}:{package_digest(package)}\n".encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def package_digest(package: str) -> str:
    """A digest of every ``.py`` file of the top-level package or module ``package``
    (once per process: code does not change under a running pipeline)."""
    try:
        module = sys.modules.get(package) or importlib.import_module(package)
    except ImportError:
        return "?"
    roots = [Path(p) for p in getattr(module, "__path__", [])]
    if not roots and getattr(module, "__file__", None):  # a single-module plugin
        roots = [Path(module.__file__)]
    digest = hashlib.sha256()
    for root in roots:
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for path in files:
            # the relative name too: moving code between files can change what runs
            digest.update(str(path.relative_to(root) if root.is_dir() else path.name).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def files_digest(paths: Iterable[Path]) -> str | None:
    """A sha256 of each file's bytes, in order (None where one is missing: ``check`` says so).

    Each file is hashed on its own, so bytes moved from one file to the next still count."""
    paths = list(paths)
    if not all(Path(p).is_file() for p in paths):
        return None
    return _short("\n".join(file_digest([p], length=64) for p in paths))


def tree_files(root: Path) -> list[Path]:
    """Every file below ``root`` by sorted relative path, hidden entries and ``__pycache__``
    aside (a clone's ``.git``, compiled code: never what a loader reads)."""
    return sorted((p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") or part == "__pycache__" for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix())


def tree_digest(root: Path) -> str | None:
    """A sha256 of every file of :func:`tree_files`, names included (a renamed file can
    change what loads); None where ``root`` is no folder."""
    if not root.is_dir():
        return None
    return _short("\n".join(f"{p.relative_to(root).as_posix()}:{file_digest([p], length=64)}"
                             for p in tree_files(root)))


def listing_digest(paths: Iterable[Path], root: Path) -> str:
    """A sha256 of each path's name (relative to ``root``), size and ``mtime_ns``, no bytes
    read: for folders of too many files to hash at every validation. An edit that keeps a
    file's size and modification time goes unseen."""
    lines = []
    for path in paths:
        stat = path.stat()
        lines.append(f"{path.relative_to(root).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}")
    return _short("\n".join(lines))


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
