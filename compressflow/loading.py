"""Building what a run needs from its spec: models through their source plugins, data
through its dataset plugin, once per distinct spec. A failure here is the user's input:
a ConfigError (exit 2) naming the place, raised before any stage runs where it can be."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from compressflow.data import DataBundle, DataContext, DataInfo, Dataset, DataSpec
from compressflow.engine import Plan, data_key, source_context
from compressflow.errors import CompressflowError, ConfigError
from compressflow.stage import ModelSpec

if TYPE_CHECKING:
    from torch import nn


class Loader:
    """Builds models and data for one run of ``plan``; data bundles are cached by spec."""

    def __init__(self, plan: Plan, tracking_uri: str) -> None:
        self.plan, self.uri = plan, tracking_uri
        self.input_model: nn.Module | None = None
        self.bundles: dict[str, DataBundle] = {}

    def build_model(self, model_spec: ModelSpec, place: str = "model") -> nn.Module:
        """Load a model through its source plugin."""
        source = self.plan.plugins.model_sources.get(model_spec.scheme, place)
        load = source.load if hasattr(source, "load") else source
        context = source_context(self.plan.file, model_spec, place, self.uri,
                                 lambda inner: self.build_model(inner, place))
        try:
            model = load(model_spec.reference, model_spec.args, context)
        except CompressflowError:
            raise
        except Exception as error:
            raise ConfigError(
                f"{place}: model source '{model_spec.source}' failed: {type(error).__name__}: {error}",
                "check the reference and args; COMPRESSFLOW_DEBUG=1 shows the traceback",
            ) from error
        from torch import nn

        # an import: factory may return anything; every stage and measure needs a Module
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"{place}: model source '{model_spec.source}' returned a "
                f"{type(model).__module__}.{type(model).__qualname__}, not a torch nn.Module",
                "the source must build a model: for import:, a factory (or class) whose call "
                "returns an nn.Module")
        return model

    def data_for(self, data_spec: DataSpec) -> DataBundle:
        """The loaders for ``data_spec``, built once per distinct spec."""
        key = data_key(data_spec)
        if key not in self.bundles:
            try:
                bundle = self._load(data_spec, key)
            except CompressflowError:
                raise
            except Exception as error:
                raise ConfigError(
                    f"dataset '{data_spec.dataset}' failed: {type(error).__name__}: {error}",
                    "check the data settings; COMPRESSFLOW_DEBUG=1 shows the traceback",
                ) from error
            if bundle.info is None:
                bundle.info = describe(data_spec, bundle)
            self.bundles[key] = bundle
        return self.bundles[key]

    def _load(self, data_spec: DataSpec, key: str) -> DataBundle:
        plan, spec = self.plan, self.plan.spec
        dataset = plan.plugins.datasets.get(data_spec.dataset)
        input_shape = getattr(self.input_model, "input_shape", None)
        if not isinstance(dataset, Dataset):  # a factory from before datasets had params
            return dataset(data_spec, spec.seed, input_shape)
        context = DataContext(data_spec, spec.seed, plan.file.path.resolve().parent,
                              plan.file.place(("data",)), plan.task.name, input_shape,
                              self.input_model)
        return dataset.load(plan.data_params[key], context)


def split_sizes(bundle: DataBundle) -> dict[str, int]:
    """Samples in each split whose dataset has a length, named as :class:`DataInfo` names
    them (the evaluated split is ``eval``)."""
    sizes = {}
    for split, name in (("train", "train"), ("val", "eval"), ("calibration", "calibration"),
                        ("holdout", "holdout")):
        dataset = getattr(getattr(bundle, split), "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__"):
            sizes[name] = len(dataset)
    return sizes


def describe(data_spec: DataSpec, bundle: DataBundle) -> DataInfo:
    """What MLflow records of data whose dataset gave no :class:`DataInfo`: the spec's digest."""
    digest = hashlib.sha256(data_spec.model_dump_json().encode()).hexdigest()[:16]
    return DataInfo(name=data_spec.dataset, digest=digest,
                    source=f"compressflow dataset '{data_spec.dataset}' {data_spec.args or ''}".strip(),
                    splits=split_sizes(bundle))

