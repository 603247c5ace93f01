"""What a stage key knows of code: a digest of the source a plugin's result depends on.

A distribution's version alone says nothing while its code is edited in place (every
built-in reports one version), so reusing by version could hand back results of code that
has changed since. The digest covers every ``.py`` file of each top-level package that
defines the class or one of its bases, compressflow's own included.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

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
