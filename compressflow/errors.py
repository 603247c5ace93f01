"""The one error path: every user-facing failure is a CompressflowError with a hint.

The CLI prints ``message`` and ``hint`` and exits with ``exit_code``; nothing else is shown
unless COMPRESSFLOW_DEBUG=1 asks for the traceback.
"""

from __future__ import annotations


class CompressflowError(Exception):
    """A failure the user can act on: what went wrong (naming the place) and what to do.

    Attributes:
        message: one sentence naming the place (file:line, stage, plugin) and the problem.
        hint: what the user can do about it; empty when there is nothing useful to say.
        exit_code: 2 for bad input (the default), 1 for a stage that failed while running.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ConfigError(CompressflowError):
    """The pipeline file, an override or a stage's params are wrong."""


class PluginError(CompressflowError):
    """A plugin is broken, missing, or registers something twice."""


class StageFailed(CompressflowError):
    """A stage raised while running; earlier stages' results stay logged."""

    exit_code = 1


class StoreUnreachable(CompressflowError):
    """The tracking server stopped answering during a run: nothing more can be logged, what
    it holds stays, and ``--resume`` continues once it answers again."""

    exit_code = 1


class LoggingFailed(CompressflowError):
    """Writing a run's outcome to the store failed; what was logged before stays."""

    exit_code = 1
