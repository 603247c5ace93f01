"""How every command ends on an error: one message, a hint, an exit code, no traceback."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

import typer

F = TypeVar("F", bound=Callable)


def reports_errors(command: F) -> F:
    """Turn a CompressflowError into ``error: ...`` / ``hint: ...`` on stderr and its exit code,
    and Ctrl-C or SIGTERM into one line and exit 130 or 143.

    COMPRESSFLOW_DEBUG=1 lets the exception through, traceback and all.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from compressflow.errors import CompressflowError
        from compressflow.interrupts import exit_code, terminate_as_interrupt

        try:
            with terminate_as_interrupt():
                return command(*args, **kwargs)
        except KeyboardInterrupt as interrupt:
            if os.environ.get("COMPRESSFLOW_DEBUG") == "1":
                raise
            print("interrupted: the open runs are marked KILLED and everything logged before "
                  "stays; `compressflow run FILE --resume` continues", file=sys.stderr)
            raise typer.Exit(exit_code(interrupt)) from None
        except CompressflowError as error:
            if os.environ.get("COMPRESSFLOW_DEBUG") == "1":
                raise
            print(f"error: {error.message}", file=sys.stderr)
            if error.hint:
                print(f"  hint: {error.hint}", file=sys.stderr)
            raise typer.Exit(error.exit_code) from None

    return wrapper  # type: ignore[return-value]
