"""Loading plugins from the entry-point group ``compressflow``, and the only calls to pm.hook.

Every hook is called through a typed method of :class:`Plugins`; a plugin that fails to
import is recorded (entry point, distribution, error) and the others still load.
"""

from __future__ import annotations

import importlib.metadata as metadata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import pluggy

from compressflow import hookspecs
from compressflow.errors import PluginError
from compressflow.registry import (
    DatasetRegistry,
    MetricRegistry,
    ModelSourceRegistry,
    Provider,
    StageRegistry,
    TaskRegistry,
)

if TYPE_CHECKING:
    from compressflow.hookspecs import PipelineStatus
    from compressflow.stage import PipelineContext, Stage, StageResult

ENTRY_POINT_GROUP = "compressflow"


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
    """The loaded plugins and what they registered."""

    pm: pluggy.PluginManager
    providers: dict[str, Provider]
    broken: list[BrokenPlugin] = field(default_factory=list)
    stages: StageRegistry = field(default_factory=StageRegistry)
    model_sources: ModelSourceRegistry = field(default_factory=ModelSourceRegistry)
    datasets: DatasetRegistry = field(default_factory=DatasetRegistry)
    metrics: MetricRegistry = field(default_factory=MetricRegistry)
    tasks: TaskRegistry = field(default_factory=TaskRegistry)

    def _register_all(self) -> None:
        """Call each register_* hook plugin by plugin, so entries know their provider."""
        for hook_name, registry in (
            ("register_stages", self.stages),
            ("register_model_sources", self.model_sources),
            ("register_datasets", self.datasets),
            ("register_metrics", self.metrics),
            ("register_tasks", self.tasks),
        ):
            hook = getattr(self.pm.hook, hook_name)
            for impl in hook.get_hookimpls():  # registration order
                provider = self.providers.get(impl.plugin_name, Provider(impl.plugin_name))
                registry.current_provider = provider
                call_one = self.pm.subset_hook_caller(
                    hook_name, remove_plugins=self._others(impl.plugin)
                )
                try:
                    call_one(registry=registry)
                except PluginError:
                    raise  # a duplicate: the registries would be ambiguous
                except Exception as error:  # a broken plugin must not take the others down
                    self.broken.append(
                        BrokenPlugin(provider.plugin, hook_name, provider.distribution,
                                     _one_line(error))
                    )

    def _others(self, plugin: object) -> list[object]:
        return [p for p in self.pm.get_plugins() if p is not plugin]

    # lifecycle hooks: observers only, so their return values are ignored
    def pipeline_start(self, ctx: PipelineContext) -> None:
        """Fire ``pipeline_start``."""
        self.pm.hook.pipeline_start(ctx=ctx)

    def stage_start(self, stage: Stage, ctx: PipelineContext) -> None:
        """Fire ``stage_start``."""
        self.pm.hook.stage_start(stage=stage, ctx=ctx)

    def stage_progress(self, stage: Stage, step: int, total: int, metrics: dict) -> None:
        """Fire ``stage_progress``."""
        self.pm.hook.stage_progress(stage=stage, step=step, total=total, metrics=metrics)

    def stage_end(self, stage: Stage, result: StageResult, ctx: PipelineContext) -> None:
        """Fire ``stage_end``."""
        self.pm.hook.stage_end(stage=stage, result=result, ctx=ctx)

    def stage_error(self, stage: Stage, error: BaseException, ctx: PipelineContext) -> None:
        """Fire ``stage_error``."""
        self.pm.hook.stage_error(stage=stage, error=error, ctx=ctx)

    def pipeline_end(self, ctx: PipelineContext, status: PipelineStatus) -> None:
        """Fire ``pipeline_end``."""
        self.pm.hook.pipeline_end(ctx=ctx, status=status)

    def add_observer(self, observer: object, name: str) -> None:
        """Register an in-process object with lifecycle hookimpls (the CLI's progress bar)."""
        self.pm.register(observer, name=name)


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def _provider(ep: metadata.EntryPoint) -> Provider:
    dist = ep.dist
    if dist is None:
        return Provider(ep.name)
    return Provider(ep.name, dist.metadata["Name"], dist.version)


def load_plugins(extra: Iterable[tuple[str, Any]] = ()) -> Plugins:
    """Load every plugin of the entry-point group, plus ``extra`` ``(name, plugin)`` pairs.

    A plugin that fails to import is kept in ``broken``; the others load. A duplicate
    registration is not a broken plugin but an error: the registries would be ambiguous.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    providers: dict[str, Provider] = {}
    broken: list[BrokenPlugin] = []
    for ep in _entry_points():  # one entry per distribution, even if on sys.path twice
        provider = _provider(ep)
        if ep.name in providers:
            raise PluginError(
                f"entry point name '{ep.name}' is used by {providers[ep.name]} and by {provider}",
                "plugin names share one namespace: rename the entry point in one distribution",
            )
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as error:  # a broken plugin must not take the others down
            broken.append(BrokenPlugin(ep.name, ep.value, provider.distribution, _one_line(error)))
            continue
        providers[ep.name] = provider
    for name, plugin in extra:
        pm.register(plugin, name=name)
        providers[name] = Provider(name, "<in-process>", "")
    plugins = Plugins(pm=pm, providers=providers, broken=broken)
    plugins._register_all()
    return plugins


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
