"""onnxruntime's own int8 quantization of an exported graph (onnxruntime.quantization).

- dynamic: weights int8 (per output channel or per tensor), activations quantized on the
  fly per batch; ``MatMul`` and ``Gather`` (embedding tables) by default, so the token
  embedding is int8 too.
- static: weights and activations int8 with activation ranges calibrated beforehand on the
  training split's batches (QDQ format, as onnxruntime recommends for CPU).

Both write a new ``.onnx`` file in the stage's work folder and return it as an
:class:`~compressflow_export.runtime.OnnxModel` carrying the tokenizer it had.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

from compressflow import StageFailed


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """The loggers ``names`` (none: the root logger) at ERROR, restored afterwards: the
    exporters' notices and onnxruntime.quantization's advice ("consider pre-processing",
    on the root logger) are not for the user; one line a stage is what the CLI prints."""
    loggers = [logging.getLogger(name) for name in names or ("",)]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def extra_options() -> dict[str, Any]:
    """Options both modes need: a float default type where shape inference leaves a tensor
    untyped (fused or contrib ops), instead of a refusal."""
    import onnx

    return {"DefaultTensorType": onnx.TensorProto.FLOAT}


def weight_type(name: str) -> Any:
    """``int8`` / ``uint8`` as onnxruntime's QuantType (for weights or activations)."""
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


def quantize_dynamic(source: Path, target: Path, *, per_channel: bool, weights: str,
                     op_types: list[str], exclude: list[str]) -> Path:
    """onnxruntime.quantization.quantize_dynamic from ``source`` to ``target``."""
    from onnxruntime.quantization import quantize_dynamic as ort_dynamic

    with quiet():
        ort_dynamic(str(source), str(target), per_channel=per_channel, weight_type=weight_type(weights),
                    op_types_to_quantize=op_types or None, nodes_to_exclude=exclude or None,
                    extra_options=extra_options())
    return target


class Calibration:
    """onnxruntime's CalibrationDataReader over the task's inputs of a loader's batches.

    ``same_length``: token inputs padded (with a zero mask) to one length across batches,
    as the histogram calibrators (entropy, percentile) need: they stack every batch.
    """

    def __init__(self, loader: Any, task: Any, names: list[str], batches: int,
                 same_length: bool = False) -> None:
        self.loader, self.task, self.names, self.batches = loader, task, names, batches
        self.same_length = same_length
        self._batches: Iterator[dict[str, Any]] | None = None

    def _feeds(self) -> Iterator[dict[str, Any]]:
        feeds = []
        for index, batch in enumerate(self.loader):
            if index >= self.batches:
                break
            inputs, _ = self.task.split(batch)
            if not isinstance(inputs, dict):
                inputs = dict(zip(self.names, inputs if isinstance(inputs, (tuple, list)) else [inputs]))
            feeds.append({name: inputs[name].numpy() for name in self.names if name in inputs})
        if self.same_length:
            feeds = pad_tokens(feeds)
        yield from feeds

    def get_next(self) -> dict[str, Any] | None:
        """The next calibration feed, or None when done (onnxruntime's protocol)."""
        if self._batches is None:
            self._batches = self._feeds()
        return next(self._batches, None)

    def rewind(self) -> None:
        """Start over (onnxruntime may read the data twice)."""
        self._batches = None


def pad_tokens(feeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every 2-D integer input padded with zeros to the longest across ``feeds``."""
    import numpy as np

    def token(array: Any) -> bool:
        return array.ndim == 2 and np.issubdtype(array.dtype, np.integer)

    longest = max((a.shape[1] for f in feeds for a in f.values() if token(a)), default=0)
    return [{name: np.pad(a, ((0, 0), (0, longest - a.shape[1]))) if token(a) else a
             for name, a in feed.items()} for feed in feeds]


def quantize_static(source: Path, target: Path, calibration: Calibration, *, per_channel: bool,
                    method: str, activations: str, op_types: list[str], exclude: list[str]) -> Path:
    """onnxruntime.quantization.quantize_static (QDQ) from ``source`` to ``target``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with quiet():
        ort_static(str(source), str(target), calibration, quant_format=QuantFormat.QDQ,
                   per_channel=per_channel, activation_type=weight_type(activations),
                   weight_type=QuantType.QInt8, calibrate_method=methods[method],
                   op_types_to_quantize=op_types or None, nodes_to_exclude=exclude or None,
                   extra_options=extra_options())
    return target


def require_onnx(model: Any, stage: str) -> None:
    """Refuse a torch model: these stages quantize an exported graph."""
    from compressflow_export.runtime import OnnxModel

    if not isinstance(model, OnnxModel):
        raise StageFailed(f"{stage}: the model is a torch module ({type(model).__name__}), "
                          "not an ONNX graph",
                          "put `export: {method: onnx, pass_on: onnxruntime}` before this stage")
