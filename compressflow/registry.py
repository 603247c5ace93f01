"""Registrars handed to the ``register_*`` hooks, and the lookups the engine makes in them.

Every entry remembers the plugin that added it, so that a duplicate name can name both
providers and ``compressflow plugins`` can say which distribution a stage comes from. A
duplicate is a :class:`Conflict`: ``compressflow plugins`` lists it, every other command
refuses to run with it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

from compressflow.errors import ConfigError, PluginError

if TYPE_CHECKING:
    from compressflow.stage import Stage

T = TypeVar("T")


@dataclass(frozen=True)
class Provider:
    """Who registered an entry: the plugin's entry-point name and its distribution."""

    plugin: str
    distribution: str = "?"
    version: str = "?"

    def __str__(self) -> str:
        return f"plugin '{self.plugin}' ({self.distribution} {self.version})"


UNKNOWN_PROVIDER = Provider("<unknown>")


class Conflict(PluginError):
    """Two plugins registered the same name (or two default methods of one kind).

    Not a broken plugin: either of the two might be the one the user meant, so no command
    may pick one silently.
    """


def nearest(word: str, known: list[str]) -> str:
    """A ' (did you mean X?)' suffix when ``word`` is close to one of ``known``."""
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """Entries keyed by name; ``add`` refuses a name already taken."""

    what = "entry"

    def __init__(self) -> None:
        self.entries: dict[str, T] = {}
        self.providers: dict[str, Provider] = {}
        self.current_provider = UNKNOWN_PROVIDER
        # the loader names the plugins that failed: an unknown name may have been theirs
        self.broken_note = ""

    def add(self, name: str, value: T) -> None:
        """Register ``value`` under ``name``; a name taken by any plugin raises Conflict."""
        if name in self.entries:
            raise Conflict(
                f"{self.what} '{name}' is registered twice: by {self.providers[name]} "
                f"and by {self.current_provider}",
                "uninstall one of the two distributions, or rename the entry in one of them",
            )
        self.entries[name] = value
        self.providers[name] = self.current_provider

    def get(self, name: str, place: str = "") -> T:
        """The entry for ``name``, or a ConfigError listing the known names."""
        if name not in self.entries:
            known = sorted(self.entries)
            where = f"{place}: " if place else ""
            raise ConfigError(
                f"{where}unknown {self.what} '{name}'{nearest(name, known)}",
                f"known: {', '.join(known) or 'none'}; `compressflow plugins` lists them all"
                + (f"; {self.broken_note}" if self.broken_note else ""),
            )
        return self.entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self.entries)


class ModelSourceRegistry(Registry[Any]):
    """Model source schemes (``zoo``, ``file``, ``mlflow``, ...)."""

    what = "model source scheme"


class DatasetRegistry(Registry[Any]):
    """Datasets by name: :class:`compressflow.Dataset` subclasses (or instances).

    A plain factory ``(spec, seed, input_shape) -> DataBundle``, the form before datasets
    declared params, still registers; its ``data.args`` are then not validated.
    """

    what = "dataset"

    def add(self, name: str, value: Any) -> None:
        """Register a Dataset class (instantiated here), instance or legacy factory."""
        from compressflow.data import Dataset

        if isinstance(value, type) and issubclass(value, Dataset):
            value = value()
        elif not isinstance(value, Dataset) and not callable(value):
            raise PluginError(
                f"dataset '{name}' of {self.current_provider} is a {type(value).__name__}, "
                "not a Dataset subclass", "register a subclass of compressflow.Dataset")
        super().add(name, value)


class ExecutorRegistry(Registry[Any]):
    """Sweep executors (:class:`compressflow.executor.SweepExecutor` instances) by ``name``;
    ``local`` is built in."""

    what = "executor"

    def __init__(self) -> None:
        from compressflow.executor import LocalExecutor

        super().__init__()
        self.current_provider = Provider("compressflow", "compressflow")
        self.add(LocalExecutor())
        self.current_provider = UNKNOWN_PROVIDER

    def add(self, executor: Any) -> None:  # type: ignore[override]
        """Register a SweepExecutor instance (or subclass) under its ``name``."""
        from compressflow.executor import SweepExecutor

        if isinstance(executor, type) and issubclass(executor, SweepExecutor):
            executor = executor()
        if not isinstance(executor, SweepExecutor) or not executor.name:
            raise PluginError(
                f"{self.current_provider} registered {executor!r} as an executor",
                "register_executors takes SweepExecutor instances with a name")
        super().add(executor.name, executor)


class TaskRegistry(Registry[Any]):
    """Task classes (subclasses of :class:`compressflow.task.Task`) by their ``name``."""

    what = "task"

    def add(self, task_class: Any) -> None:  # type: ignore[override]
        """Register a Task subclass under its ``name``."""
        from compressflow.task import Task

        if not (isinstance(task_class, type) and issubclass(task_class, Task)):
            raise PluginError(
                f"{self.current_provider} registered {task_class!r} as a task",
                "register_tasks takes subclasses of compressflow.task.Task")
        super().add(task_class.name, task_class)


@dataclass(frozen=True)
class MetricEntry:
    """An extra metric: ``fn(model, loader) -> float``, its direction, the tasks it fits."""

    fn: Callable[..., float]
    higher_is_better: bool = True
    tasks: tuple[str, ...] | None = ("classification",)

    def fits(self, task: str) -> bool:
        """Whether the metric can judge a model of ``task``."""
        return self.tasks is None or task in self.tasks


class MetricRegistry(Registry[MetricEntry]):
    """Extra metrics by name, measured beside the task's own (``evaluation.extra``)."""

    what = "metric"

    def add(self, name: str, fn: Callable[..., float], higher_is_better: bool = True,  # type: ignore[override]
            tasks: tuple[str, ...] | None = ("classification",)) -> None:
        """Register ``fn(model, loader) -> float`` under ``name``.

        ``fn`` reads the loader's ``(inputs, targets)`` batches itself, so it declares the
        tasks whose batches it understands: by default classification, as metrics were
        before tasks existed; ``None`` for any task.
        """
        super().add(name, MetricEntry(fn, higher_is_better, tuple(tasks) if tasks else None))


class StageRegistry:
    """Stage classes keyed by ``(kind, method)``; each kind has a default method."""

    def __init__(self) -> None:
        self.stages: dict[tuple[str, str], type[Stage]] = {}
        self.providers: dict[tuple[str, str], Provider] = {}
        self.current_provider = UNKNOWN_PROVIDER

    def add(self, stage_class: type[Stage]) -> None:
        """Register a Stage subclass under its ``(kind, method)``."""
        key = (stage_class.kind, stage_class.method)
        if key in self.stages:
            raise Conflict(
                f"stage '{key[0]}/{key[1]}' is registered twice: by {self.providers[key]} "
                f"and by {self.current_provider}",
                "uninstall one of the two distributions, or rename the method in one of them",
            )
        if stage_class.default:
            taken = [m for (k, m), c in self.stages.items() if k == key[0] and c.default]
            if taken:
                other = self.providers[(key[0], taken[0])]
                raise Conflict(
                    f"kind '{key[0]}' has two default methods: '{taken[0]}' by {other} "
                    f"and '{key[1]}' by {self.current_provider}",
                    "only one method of a kind may set default = True",
                )
        self.stages[key] = stage_class
        self.providers[key] = self.current_provider

    def kinds(self) -> list[str]:
        """Every registered kind, sorted."""
        return sorted({kind for kind, _ in self.stages})

    def methods(self, kind: str) -> list[str]:
        """Every method of ``kind``, sorted."""
        return sorted(m for k, m in self.stages if k == kind)

    def default_method(self, kind: str) -> str | None:
        """The method used when a pipeline names none: the declared default, or the only one."""
        methods = self.methods(kind)
        declared = [m for m in methods if self.stages[(kind, m)].default]
        if declared:
            return declared[0]
        return methods[0] if len(methods) == 1 else None

    def get(self, kind: str, method: str | None, place: str) -> type[Stage]:
        """The stage class for ``kind``/``method``, or a ConfigError naming what exists."""
        if kind not in self.kinds():
            raise ConfigError(
                f"{place}: unknown stage kind '{kind}'{nearest(kind, self.kinds())}",
                f"known kinds: {', '.join(self.kinds())}; a stage entry holds exactly one kind key "
                "besides 'name' and 'data'",
            )
        methods = self.methods(kind)
        if method is None:
            method = self.default_method(kind)
            if method is None:
                raise ConfigError(
                    f"{place}: stage kind '{kind}' needs a method",
                    f"add `method:` with one of: {', '.join(methods)}",
                )
        if (kind, method) not in self.stages:
            raise ConfigError(
                f"{place}: unknown {kind} method '{method}'{nearest(method, methods)}",
                f"methods of '{kind}': {', '.join(methods)}; `compressflow plugins` lists them all",
            )
        return self.stages[(kind, method)]
