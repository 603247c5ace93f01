"""File names a pipeline gives an export stage: inside the stage's work folder, nowhere else.

A pipeline is validated before anything runs, so a name that leaves the folder (an absolute
path, ``..``) is refused there, at its line; :func:`inside` checks again where the file is
written, after resolving symlinks. No torch here: validation stays light.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from compressflow import ConfigError

RULE = "a file name inside the stage's work folder (subfolders allowed: packed/model.cfpk)"


def check_name(value: str) -> str:
    """``value`` if it is a relative file name that stays inside its folder; else a
    validation error (a custom one: pydantic would prefix a ValueError with "Value error").

    Backslashes and drive letters are refused on every system, so that a pipeline means the
    same file wherever it runs.
    """
    posix = PurePosixPath(value)
    if not value.strip() or value.endswith("/") or posix.name in ("", "."):
        problem = "names no file"
    elif "\x00" in value:
        problem = "holds a NUL character"
    elif posix.is_absolute() or PureWindowsPath(value).drive:
        problem = "is an absolute path"
    elif "\\" in value:
        problem = "holds a backslash (use / between subfolders)"
    elif ".." in posix.parts:
        problem = "climbs out with '..'"
    elif value.startswith("~"):
        problem = "starts with '~' (a home folder is outside too)"
    else:
        return value
    raise PydanticCustomError("work_file", "{problem}: must be {rule}", {"problem": problem, "rule": RULE})


WorkFile = Annotated[str, AfterValidator(check_name)]
"""A str param validated by :func:`check_name`: the error is at the param's file:line."""


def inside(workdir: Path, name: str) -> Path:
    """The resolved path of ``name`` under ``workdir``, its folder created; a ConfigError
    where it would land outside (params built without validation, a symlinked subfolder)."""
    root = workdir.resolve()
    target = (root / name).resolve()
    if not target.is_relative_to(root) or target == root:
        raise ConfigError(f"export filename '{name}' is outside the stage's work folder {root}",
                          f"filename must be {RULE}")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target
