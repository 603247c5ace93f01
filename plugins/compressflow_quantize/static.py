"""torch.ao static int8 quantization (FX graph mode) and the QAT conversion it shares.

FX graph mode traces the model, so the zoo's MLP (flatten), CNN and ResNet (residual adds)
quantize without hand-inserted QuantStubs: Conv+BN(+ReLU) and Linear(+ReLU) are fused,
activations get int8 scales from calibration (static) or from training (QAT), and
``convert_fx`` swaps in fbgemm/x86 int8 kernels.

torch 2.13 marks ``torch.ao.quantization`` deprecated (its kernels still run, and are measured);
the warnings are kept out of the user's way here.

Pickling: torch's quantized Conv modules restore themselves from pickle with a
``__setstate__`` that never initialises ``nn.Module`` (no ``_modules``, no hooks), so a converted
CNN cannot be reloaded from MLflow (``'ConvReLU2d' object has no attribute '_modules'``).
:func:`make_picklable` swaps each such module's class for a subclass of it, defined here,
whose ``__setstate__`` initialises the module first; unpickling imports this module, so the
fix travels with the model.
"""

from __future__ import annotations

import copy
import io
import warnings
from contextlib import contextmanager
from fnmatch import fnmatch
from typing import Iterable, Iterator

import torch
from torch import nn

from compressflow import ConfigError


@contextmanager
def quiet() -> Iterator[None]:
    """torch.ao's deprecation and observer warnings, silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


with quiet():
    import torch.ao.nn.intrinsic.quantized as _nniq
    import torch.ao.nn.quantized as _nnq
    from torch.ao.nn.quantized.modules.conv import _ConvNd as _QuantConvNd


class _InitialisesModule:
    """Mixin: make ``__setstate__`` build a whole ``nn.Module`` before torch restores it."""

    def __setstate__(self, state):
        nn.Module.__init__(self)
        super().__setstate__(state)


def _picklable_classes() -> dict[type, type]:
    """A picklable subclass, bound in this module, for every quantized conv class of torch."""
    fixed = {}
    for namespace in (_nnq, _nniq):
        for name in sorted(dir(namespace)):
            cls = getattr(namespace, name)
            if isinstance(cls, type) and issubclass(cls, _QuantConvNd):
                sub_name = f"Picklable{cls.__name__}"
                if sub_name not in globals():
                    globals()[sub_name] = type(sub_name, (_InitialisesModule, cls),
                                               {"__module__": __name__, "__qualname__": sub_name})
                fixed[cls] = globals()[sub_name]
    return fixed


PICKLABLE = _picklable_classes()


def make_picklable(model: nn.Module) -> nn.Module:
    """Swap every torch quantized conv module's class for its picklable subclass (in place)."""
    for module in model.modules():
        if type(module) in PICKLABLE:
            module.__class__ = PICKLABLE[type(module)]
    return model


def set_engine(backend: str) -> None:
    """Select torch's quantized engine (process-wide), or say it is missing."""
    if backend not in torch.backends.quantized.supported_engines:
        raise ConfigError(f"quantized engine '{backend}' is not in this torch build",
                          f"available: {', '.join(torch.backends.quantized.supported_engines)}")
    torch.backends.quantized.engine = backend


def qconfig_mapping(model: nn.Module, backend: str, exclude: list[str], qat: bool = False):
    """The default mapping of ``backend``, with modules matching ``exclude`` kept fp32."""
    with quiet():
        from torch.ao.quantization import (
            get_default_qat_qconfig_mapping,
            get_default_qconfig_mapping,
        )

        mapping = (get_default_qat_qconfig_mapping if qat else get_default_qconfig_mapping)(backend)
    for name, _ in model.named_modules():
        if name and any(fnmatch(name, p) for p in exclude):
            mapping.set_module_name(name, None)
    return mapping


def _traced(prepare, model: nn.Module, *args):
    try:
        with quiet():
            return prepare(model, *args)
    except Exception as error:  # torch.fx raises many kinds when a forward does not trace
        raise ConfigError(
            f"the model could not be traced for FX quantization: {type(error).__name__}: {error}",
            "static-int8 and qat need a symbolically traceable forward (torch.fx); "
            "quantize/dynamic-int8 needs no tracing") from error


def prepare_static(model: nn.Module, example: torch.Tensor, backend: str = "x86",
                   exclude: Iterable[str] = ()) -> nn.Module:
    """Observers inserted into an eval-mode copy of ``model`` (Conv+BN+ReLU fused)."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    set_engine(backend)
    model = copy.deepcopy(model).eval()
    mapping = qconfig_mapping(model, backend, list(exclude))
    return _traced(prepare_fx, model, mapping, (example,))


def prepare_qat(model: nn.Module, example: torch.Tensor, backend: str = "x86",
                exclude: Iterable[str] = ()) -> nn.Module:
    """Fake quantization (straight-through estimator) inserted into a train-mode copy."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    set_engine(backend)
    model = copy.deepcopy(model).train()
    mapping = qconfig_mapping(model, backend, list(exclude), qat=True)
    return _traced(prepare_qat_fx, model, mapping, (example,))


def calibrate(prepared: nn.Module, loader, batches: int | None = None, task=None) -> int:
    """Run calibration batches (split and fed by ``task``) through the observers; returns
    the samples seen."""
    from compressflow.task import Task, batch_len

    task = task or Task()
    seen = 0
    prepared.eval()
    with torch.no_grad(), quiet():
        for index, batch in enumerate(loader):
            if batches is not None and index >= batches:
                break
            inputs, _targets = task.split(batch)
            task.feed(prepared, inputs)
            seen += batch_len(inputs)
    return seen


def convert(prepared: nn.Module) -> nn.Module:
    """The int8 model: observers and fake quantizers turned into quantized kernels."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with quiet():
        converted = convert_fx(prepared.eval())
    return make_picklable(converted).eval()


def quantize_static(model: nn.Module, calibration, example: torch.Tensor, backend: str = "x86",
                    exclude: Iterable[str] = (), batches: int | None = None,
                    task=None) -> tuple[nn.Module, int]:
    """Prepare, calibrate on ``calibration``, convert; returns the model and samples seen."""
    prepared = prepare_static(model, example, backend, exclude)
    seen = calibrate(prepared, calibration, batches, task)
    if not seen:
        raise ConfigError("static-int8: the calibration loader gave no batch",
                          "raise data.calibration_batches")
    return convert(prepared), seen


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the Linear and Conv modules running int8 kernels."""
    return [name for name, module in model.named_modules()
            if isinstance(module, (_nnq.Linear, _QuantConvNd))]


def reloads(model: nn.Module, example: torch.Tensor) -> tuple[bool, str]:
    """Whether ``model`` survives what MLflow does to it (torch.save with MLflow's pickle module,
    torch.load) and computes the same; (False, why) where it does not."""
    try:
        from mlflow.pytorch import pickle_module
    except ImportError:  # pragma: no cover - mlflow is a dependency
        import pickle as pickle_module
    try:
        buffer = io.BytesIO()
        torch.save(model, buffer, pickle_module=pickle_module)
        buffer.seek(0)
        with quiet():
            loaded = torch.load(buffer, weights_only=False)
        with torch.inference_mode():
            same = torch.equal(model.eval()(example), loaded.eval()(example))
        return (True, "") if same else (False, "reloaded model computes different outputs")
    except Exception as error:
        return False, f"{type(error).__name__}: {error}"
