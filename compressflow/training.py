"""The one training loop: train, finetune, distill, gradual pruning and QAT use it.

A stage passes its model, the data, a :class:`TrainParams` and, where it needs one, its own
loss (distillation) or a hook after every optimizer step. Zeros can be frozen: a pruned
weight stays exactly zero through any optimizer. Batches are split, fed and scored by the
context's task (:mod:`compressflow.task`): any inputs, any loss.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import Field

from compressflow.errors import CompressflowError
from compressflow.stage import StageParams

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compressflow.stage import DataBundle, StageContext

LossFn = Callable[["torch.Tensor", Any, Any], "torch.Tensor"]
"""``loss_fn(outputs, targets, inputs) -> scalar loss``: ``outputs`` is the task's
prediction, ``inputs`` what the model was fed (a tensor, tuple or dict); a loss that runs
another model on them calls ``ctx.task.predict(other, inputs)``."""


class TrainParams(StageParams):
    """Settings of the training loop; a stage that trains subclasses these."""

    epochs: int = Field(10, ge=0, description="passes over the training split")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = Field("constant", description="lr over epochs")
    dropout: bool = Field(
        True, description="false: every dropout layer passes its input through while training "
        "(a student copying a teacher on little data learns the teacher's function faster)")


class Diverged(CompressflowError):
    """The training loss became NaN or infinite: the stage stops (exit 1) rather than log
    a model that learned nothing."""

    exit_code = 1

    def __init__(self, epoch: int, step: int, value: float, params: TrainParams) -> None:
        super().__init__(
            f"training diverged: the loss is {value} at epoch {epoch}, batch {step} "
            f"(lr {params.lr:g}, {params.optimizer})",
            "lower lr; check the stage's other settings (a temperature near zero, say) and "
            "the data for NaN or inf values")


def _optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    if params.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=params.lr, momentum=params.momentum,
                               weight_decay=params.weight_decay)
    return torch.optim.Adam(trainable, lr=params.lr, weight_decay=params.weight_decay)


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where each weight matrix/kernel is nonzero now (what freezing zeros preserves)."""
    return {n: p.detach() != 0 for n, p in model.named_parameters() if p.dim() > 1}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Set every masked-out weight back to exactly zero."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in masks:
                param.mul_(masks[name])


@contextlib.contextmanager
def _dropout_off(model: nn.Module, off: bool):
    """Every dropout layer's p at 0 inside, restored after. Setting p, not eval(), because
    some attention code reads ``self.dropout.p`` whenever its own module trains."""
    import torch

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)] if off else []
    saved = [m.p for m in layers]
    for layer in layers:
        layer.p = 0.0
    try:
        yield
    finally:
        for layer, p in zip(layers, saved):
            layer.p = p


def fit(
    model: nn.Module,
    data: DataBundle,
    params: TrainParams,
    ctx: StageContext,
    *,
    loss_fn: LossFn | None = None,
    freeze_zeros: bool = False,
    extra_modules: list[nn.Module] = (),
    after_step: Callable[[nn.Module], None] | None = None,
    step_offset: int = 0,
) -> list[dict[str, float]]:
    """Train ``model`` in place for ``params.epochs``; returns each epoch's figures.

    Every epoch logs ``train_loss`` and the validation figures (``val_<metric>``) with
    ``step_offset`` + the epoch as step, and reports progress. ``extra_modules`` are trained
    alongside (a distillation projection, say). ``freeze_zeros`` keeps every zero weight at
    zero. ``after_step(model)`` runs after every optimizer step (re-tying shared weights,
    say); a stage that trains several times passes ``step_offset`` so its curves continue.
    """
    import torch

    torch.manual_seed(ctx.seed)
    loss_fn = loss_fn or task_loss(ctx)
    trained = torch.nn.ModuleList([model, *extra_modules])
    optimizer = _optimizer(trained, params)
    steps_per_epoch = max(1, len(data.train))
    total_steps = params.epochs * steps_per_epoch
    scheduler = None
    if params.schedule == "cosine" and total_steps:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
        )
    masks = zero_masks(model) if freeze_zeros else {}
    history = []
    with _dropout_off(trained, not params.dropout):
        for epoch in range(1, params.epochs + 1):
            trained.train()
            figures = {"train_loss": _epoch(model, data, ctx, optimizer, scheduler, loss_fn,
                                            lambda: _after(model, masks, after_step),
                                            lambda step, value: Diverged(epoch, step, value, params))}
            figures.update({f"val_{k}": v for k, v in ctx.evaluate(model).items()})
            ctx.log_metrics(figures, step_offset + epoch)
            ctx.progress(epoch, params.epochs, figures)
            history.append(figures)
    model.eval()
    return history


def _after(model, masks, after_step) -> None:
    if masks:
        apply_masks(model, masks)
    if after_step is not None:
        after_step(model)


def _epoch(model, data, ctx, optimizer, scheduler, loss_fn, after, diverged) -> float:
    """One pass over the training split; the mean loss per sample."""
    from compressflow.task import batch_len

    task = ctx.task
    running, seen = 0.0, 0
    for step, batch in enumerate(data.train, 1):
        inputs, targets = task.split(batch)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(task.predict(model, inputs), targets, inputs)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise diverged(step, value)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        after()
        count = batch_len(inputs)
        running += value * count
        seen += count
    return running / max(seen, 1)


def task_loss(ctx: StageContext) -> LossFn:
    """The task's own loss; a task that learns to match the input model gets its outputs."""
    import torch

    task, reference = ctx.task, ctx.reference()
    if reference is None:
        return lambda outputs, targets, _inputs: task.loss(outputs, targets)
    reference.eval()

    def loss(outputs, targets, inputs):
        with torch.no_grad():
            expected = task.predict(reference, inputs)
        return task.loss(outputs, targets, expected)

    return loss
