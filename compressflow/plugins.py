"""Loading plugins from the entry-point group ``compressflow``, and the only calls to pm.hook.

Every hook is called through a typed method of :class:`Plugins`. A plugin that fails to
import, implements a hook that does not exist (``register_stage``), or whose registrar
raises is recorded as broken (entry point, distribution, error) and the others still load.
Two plugins registering one name is a conflict: listed by ``compressflow plugins``, refused
by every other command. An observer (a lifecycle hook) that raises is a warning, never the
end of a run.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import pluggy

from compressflow import hookspecs
from compressflow.errors import PluginError
from compressflow.registry import (
    Conflict,
    DatasetRegistry,
    ExecutorRegistry,
    MetricRegistry,
    ModelSourceRegistry,
    Provider,
    StageRegistry,
    TaskRegistry,
    nearest,
)

if TYPE_CHECKING:
    from compressflow.hookspecs import PipelineStatus
    from compressflow.stage import PipelineContext, Stage, StageResult

ENTRY_POINT_GROUP = "compressflow"
REGISTRATION_HOOKS = ("register_stages", "register_model_sources", "register_datasets",
                      "register_metrics", "register_tasks", "register_executors")
LIFECYCLE_HOOKS = ("pipeline_start", "stage_start", "stage_progress", "stage_end",
                   "stage_error", "pipeline_end")
TRUSTED_ONLY_ENV = "COMPRESSFLOW_TRUSTED_ONLY"


def trusted_only() -> bool:
    """Whether the user asked (``COMPRESSFLOW_TRUSTED_ONLY=1``, ``--trusted-only``) that model
    sources refuse what runs code from the pipeline or a pickle; model sources read it."""
    return os.environ.get(TRUSTED_ONLY_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class BrokenPlugin:
    """A plugin that could not be imported or registered."""

    entry_point: str
    value: str
    distribution: str
    error: str

    def describe(self) -> str:
        """One line naming the entry point, its distribution and the error."""
        return (
            f"plugin '{self.entry_point}' = '{self.value}' from {self.distribution} "
            f"failed to load: {self.error}"
        )


@dataclass
class Plugins:
    """The loaded plugins, what they registered, and what went wrong while loading them."""

    pm: pluggy.PluginManager
    providers: dict[str, Provider]
    broken: list[BrokenPlugin] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    """Names that two plugins registered: the first registration stands, the later is dropped."""
    stages: StageRegistry = field(default_factory=StageRegistry)
    model_sources: ModelSourceRegistry = field(default_factory=ModelSourceRegistry)
    datasets: DatasetRegistry = field(default_factory=DatasetRegistry)
    metrics: MetricRegistry = field(default_factory=MetricRegistry)
    tasks: TaskRegistry = field(default_factory=TaskRegistry)
    executors: ExecutorRegistry = field(default_factory=ExecutorRegistry)
    _warned: set[tuple[str, str, str]] = field(default_factory=set, init=False, repr=False)

    def _drop_unknown_hooks(self, values: dict[str, str]) -> None:
        """Make each plugin with a hook no spec declares broken, as ``pm.check_pending`` finds them.

        A misspelt hook (``register_stage``) would otherwise never be called, silently.
        """
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as error:
                name = self.pm.get_name(error.plugin) or repr(error.plugin)
                message = _unknown_hooks_message(self.pm, error.plugin)
                self.pm.unregister(error.plugin)
                provider = self.providers.pop(name, Provider(name))
                self.broken.append(BrokenPlugin(name, values.get(name, name),
                                                provider.distribution, message))

    def _register_all(self) -> None:
        """Call each register_* hook plugin by plugin, so entries know their provider."""
        registries = (self.stages, self.model_sources, self.datasets, self.metrics, self.tasks,
                      self.executors)
        for hook_name, registry in zip(REGISTRATION_HOOKS, registries):
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():  # registration order
                provider = self.providers.get(impl.plugin_name, Provider(impl.plugin_name))
                registry.current_provider = provider
                try:
                    self._call_one(hook_name, impl.plugin, registry=registry)
                except Conflict as conflict:  # the registries would be ambiguous: told, not guessed
                    self.conflicts.append(conflict)
                except Exception as error:  # a broken plugin must not take the others down
                    self.broken.append(
                        BrokenPlugin(provider.plugin, hook_name, provider.distribution,
                                     _one_line(error))
                    )
        note = "some plugins failed to load: " + "; ".join(b.describe() for b in self.broken)
        for registry in registries[1:]:  # the engine adds the same note to an unknown stage
            registry.broken_note = note if self.broken else ""

    def _call_one(self, hook_name: str, plugin: object, **kwargs: Any) -> None:
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        self.pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)

    def conflict_error(self) -> Conflict:
        """The first conflict, its hint saying how many more there are and where to see them."""
        first, more = self.conflicts[0], len(self.conflicts) - 1
        also = f"{more} more conflict(s); " if more else ""
        return Conflict(first.message, f"{first.hint}; {also}`compressflow plugins` lists every "
                        "plugin and conflict")

    def _notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call each observer of ``hook_name`` on its own: one that raises is a warning.

        Observers see a run but change nothing, so a notifier's bug must not fail the
        pipeline, nor keep the other observers from being told.
        """
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):  # pluggy's order
            try:
                self._call_one(hook_name, impl.plugin, **kwargs)
            except Exception as error:  # Ctrl-C and SystemExit still end the run
                self._warn_observer(impl.plugin_name, hook_name, error)

    def _warn_observer(self, plugin: str, hook_name: str, error: Exception) -> None:
        what = _one_line(error)
        if (plugin, hook_name, what) in self._warned:
            return  # told once: a failing stage_progress would repeat every epoch
        self._warned.add((plugin, hook_name, what))
        provider = self.providers.get(plugin)
        who = str(provider) if provider and provider.version else f"plugin '{plugin}'"
        print(f"warning: {who} failed in {hook_name}: {what}; observers cannot stop a run, "
              "so it goes on", file=sys.stderr)
        if os.environ.get("COMPRESSFLOW_DEBUG") == "1":
            traceback.print_exception(error, file=sys.stderr)

    # lifecycle hooks: observers only, so their return values are ignored
    def pipeline_start(self, ctx: PipelineContext) -> None:
        """Fire ``pipeline_start``."""
        self._notify("pipeline_start", ctx=ctx)

    def stage_start(self, stage: Stage, ctx: PipelineContext) -> None:
        """Fire ``stage_start``."""
        self._notify("stage_start", stage=stage, ctx=ctx)

    def stage_progress(self, stage: Stage, step: int, total: int, metrics: dict) -> None:
        """Fire ``stage_progress``."""
        self._notify("stage_progress", stage=stage, step=step, total=total, metrics=metrics)

    def stage_end(self, stage: Stage, result: StageResult, ctx: PipelineContext) -> None:
        """Fire ``stage_end``."""
        self._notify("stage_end", stage=stage, result=result, ctx=ctx)

    def stage_error(self, stage: Stage, error: BaseException, ctx: PipelineContext) -> None:
        """Fire ``stage_error``."""
        self._notify("stage_error", stage=stage, error=error, ctx=ctx)

    def pipeline_end(self, ctx: PipelineContext, status: PipelineStatus) -> None:
        """Fire ``pipeline_end``."""
        self._notify("pipeline_end", ctx=ctx, status=status)

    def add_observer(self, observer: object, name: str) -> None:
        """Register an in-process object with lifecycle hookimpls (the CLI's progress bar).

        A hook it implements that no spec declares is a PluginError: it would never be called.
        """
        self.pm.register(observer, name=name)
        if _unknown_hooks(self.pm, observer):
            message = _unknown_hooks_message(self.pm, observer)
            self.pm.unregister(observer)
            raise PluginError(f"observer '{name}': {message}",
                              f"lifecycle hooks: {', '.join(LIFECYCLE_HOOKS)}")

    def remove_observer(self, name: str) -> None:
        """Unregister what :meth:`add_observer` registered under ``name``."""
        self.pm.unregister(name=name)


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """The hooks ``plugin`` implements that no spec declares (optional ones aside)."""
    return [name for name, caller in vars(pm.hook).items()
            if not name.startswith("_") and not caller.has_spec()
            and any(i.plugin is plugin and not i.optionalhook for i in caller.get_hookimpls())]


def _unknown_hooks_message(pm: pluggy.PluginManager, plugin: object) -> str:
    """``unknown hook 'x' (did you mean 'y'?)``, or the real hooks where none is near."""
    known = [name for name, caller in vars(pm.hook).items()
             if not name.startswith("_") and caller.has_spec()]
    parts = []
    for name in _unknown_hooks(pm, plugin):
        near = nearest(name, known)
        parts.append(f"unknown hook '{name}'" + (near or f" (hooks: {', '.join(known)})"))
    return "; ".join(parts) + "; see compressflow/hookspecs.py"


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def _provider(ep: metadata.EntryPoint) -> Provider:
    dist = ep.dist
    if dist is None:
        return Provider(ep.name)
    return Provider(ep.name, dist.metadata["Name"], dist.version)


def load_plugins(extra: Iterable[tuple[str, Any]] = (), *, strict: bool = True) -> Plugins:
    """Load every plugin of the entry-point group, plus ``extra`` ``(name, plugin)`` pairs.

    A plugin that fails to import, has an unknown hook or a registrar that raises is kept in
    ``broken``; the others load. A name registered twice is a conflict: with ``strict`` (what
    running and validating need) the first one raises, since the registries would be
    ambiguous; without it (``compressflow plugins``) they are kept in ``conflicts``.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins = Plugins(pm=pm, providers={})
    values: dict[str, str] = {}
    for ep in _entry_points():  # one entry per distribution, even if on sys.path twice
        provider = _provider(ep)
        if ep.name in plugins.providers:
            plugins.conflicts.append(Conflict(
                f"entry point name '{ep.name}' is used by {plugins.providers[ep.name]} and by "
                f"{provider}", "plugin names share one namespace: rename the entry point in "
                "one distribution"))
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as error:  # a broken plugin must not take the others down
            plugins.broken.append(BrokenPlugin(ep.name, ep.value, provider.distribution,
                                               _one_line(error)))
            continue
        plugins.providers[ep.name], values[ep.name] = provider, ep.value
    for name, plugin in extra:
        pm.register(plugin, name=name)
        plugins.providers[name] = Provider(name, "<in-process>", "")
    plugins._drop_unknown_hooks(values)
    plugins._register_all()
    if strict and plugins.conflicts:
        raise plugins.conflict_error()
    return plugins


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
