"""``quantize/qat``: quantization-aware training through the shared loop, then int8.

``prepare_qat_fx`` inserts fake quantizers (weights per channel, activations per tensor) whose
rounding passes gradients straight through (the straight-through estimator); their ranges are
first set on the calibration batches, then the model trains with
:func:`compressflow.training.fit`, and ``convert_fx`` turns it into the int8 model.

While the loop evaluates the model after every epoch the observers are switched off, so the
validation split never moves a quantization range. ``freeze_after`` epochs (if set), the
ranges and the BatchNorm statistics stop moving too (the usual end of a QAT recipe).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from compressflow_quantize.static import calibrate, convert, prepare_qat, quiet

if TYPE_CHECKING:
    from compressflow import StageContext


def set_observers(model: nn.Module, enabled: bool) -> None:
    """Turn every fake quantizer's observer on or off (fake quantization itself stays on)."""
    from torch.ao.quantization import disable_observer, enable_observer

    model.apply(enable_observer if enabled else disable_observer)


def freeze_bn_stats(model: nn.Module) -> None:
    """Stop the BatchNorm statistics of fused QAT Conv+BN modules from moving."""
    with quiet():
        from torch.ao.nn.intrinsic.qat import freeze_bn_stats as freeze

    model.apply(freeze)


class ObserversOffWhileEvaluating:
    """A stage context whose ``evaluate`` leaves the quantization ranges where they are."""

    def __init__(self, ctx: StageContext, prepared: nn.Module, observing: list[bool]) -> None:
        self._ctx, self._prepared, self._observing = ctx, prepared, observing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def evaluate(self, model: nn.Module, loader=None) -> dict[str, float]:
        set_observers(self._prepared, False)
        try:
            return self._ctx.evaluate(model, loader)
        finally:
            set_observers(self._prepared, self._observing[0])


def quantization_aware_training(model: nn.Module, ctx: StageContext, params, backend: str,
                                exclude: list[str], freeze_after: int | None):
    """Prepare, calibrate, train with fit, convert; returns (int8 model, metrics, notes)."""
    from compressflow.training import fit

    data = ctx.data
    prepared = prepare_qat(model, data.example_input(2, ctx.task), backend, exclude)
    calibrate(prepared, data.calibration, task=ctx.task)
    observing = [True]
    set_observers(prepared, False)
    metrics: dict[str, float] = {
        f"qat_start_{ctx.metric}": ctx.evaluate(prepared)[ctx.metric]}
    set_observers(prepared, True)

    steps_per_epoch = max(1, len(data.train))
    steps = [0]

    def after_step(trained: nn.Module) -> None:
        steps[0] += 1
        if freeze_after is not None and steps[0] == freeze_after * steps_per_epoch:
            observing[0] = False
            set_observers(trained, False)
            freeze_bn_stats(trained)

    with quiet():
        history = fit(prepared, data, params, ObserversOffWhileEvaluating(ctx, prepared, observing),
                      after_step=after_step)
    if history:
        metrics.update({f"final_{k}": v for k, v in history[-1].items()})
    converted = convert(prepared)
    notes = [f"QAT: {params.epochs} epochs with fake quantization (straight-through estimator)"
             + (f", ranges and BatchNorm frozen after epoch {freeze_after}"
                if freeze_after is not None and freeze_after < params.epochs else "")
             + ", then converted to torch.ao int8 kernels"]
    return converted, metrics, notes

