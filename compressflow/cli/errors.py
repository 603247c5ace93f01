"""How every command ends on an error: one message, a hint, an exit code, no traceback."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

import typer

F = TypeVar("F", bound=Callable)


def reports_errors(command: F) -> F:
    """Turn a CompressflowError into ``error: ...`` / ``hint: ...`` on stderr and its exit code.

    COMPRESSFLOW_DEBUG=1 lets the exception through, traceback and all.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from compressflow.errors import CompressflowError

        try:
            return command(*args, **kwargs)
        except CompressflowError as error:
            if os.environ.get("COMPRESSFLOW_DEBUG") == "1":
                raise
            print(f"error: {error.message}", file=sys.stderr)
            if error.hint:
                print(f"  hint: {error.hint}", file=sys.stderr)
            raise typer.Exit(error.exit_code) from None

    return wrapper  # type: ignore[return-value]
