"""The one training loop: train, finetune, distill, gradual pruning and QAT use it.

A stage passes its model, the data, a :class:`TrainParams` and, where it needs one, its own
loss (distillation) or a hook after every optimizer step. Zeros can be frozen: a pruned
weight stays exactly zero through any optimizer. Batches are split, fed and scored by the
context's task (:mod:`compressflow.task`): any inputs, any loss.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

from pydantic import Field

from compressflow.distributed import DistributedSpec
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
    distributed: DistributedSpec | None = Field(
        None, description="train in nproc processes with DistributedDataParallel (torchrun's "
        "launcher, gloo on CPU); the pipeline's batch_size stays the global batch")


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
    ``step_offset`` + the epoch as step, and reports progress; the end logs
    ``train_samples_per_s`` and ``train_processes``. ``extra_modules`` are trained alongside
    (a distillation projection, say). ``freeze_zeros`` keeps every zero weight at zero.
    ``after_step(model)`` runs after every optimizer step (re-tying shared weights, say); a
    stage that trains several times passes ``step_offset`` so its curves continue. With
    ``params.distributed`` (more than one rank) the epochs run in that many processes,
    on one machine or several (:mod:`compressflow.distributed`), and this process logs
    the lead rank's figures.
    """
    import torch

    torch.manual_seed(ctx.seed)
    loss_fn = loss_fn or task_loss(ctx)
    masks = zero_masks(model) if freeze_zeros else {}
    loop = _Loop(model, list(extra_modules), params, ctx, loss_fn, lambda: _after(model, masks, after_step))
    history: list[dict[str, float]] = []

    def record(figures: dict[str, float]) -> None:
        history.append(figures)
        ctx.log_metrics(figures, step_offset + len(history))
        ctx.progress(len(history), params.epochs, figures)

    spec = params.distributed
    if spec is not None and spec.world > 1:  # logged once the ranks are done
        ranks_history, samples, seconds = _fit_ranks(loop, data, spec)
        for figures in ranks_history:
            record(figures)
    else:  # logged live, epoch by epoch
        samples, seconds = 0, 0.0
        for figures, count, took in loop.figures(data.train):
            record(figures)
            samples, seconds = samples + count, seconds + took
    if seconds > 0:
        ctx.log_metrics({"train_samples_per_s": samples / seconds,
                         "train_processes": spec.world if spec else 1})
    model.eval()
    return history


def _fit_ranks(loop: _Loop, data: DataBundle, spec) -> tuple[list[dict[str, float]], int, float]:
    """``loop``'s epochs in ``spec.world`` ranks; the lead's weights loaded here, its
    history, the samples trained on and the lead's training seconds returned."""
    import torch

    from compressflow import distributed

    def body(group) -> dict:
        torch.manual_seed(loop.seed + group.rank)  # each rank its own dropout draws
        history, samples, seconds = [], 0, 0.0
        for figures, count, took in loop.figures(group.loader(data.train, loop.seed), group):
            if figures is not None:
                history.append(figures)
            samples, seconds = samples + count, seconds + took
        modules = [loop.model, *loop.extra]
        weights = [m.state_dict() for m in modules] if group.leads else None
        return {"digest": distributed.digest(modules), "weights": weights, "history": history,
                "samples": samples, "seconds": seconds}

    results = distributed.launch(body, spec)
    distributed.check_identical(results)
    lead = next(r for r in results if r["weights"] is not None)  # on this machine
    for module, state in zip([loop.model, *loop.extra], lead["weights"]):
        module.load_state_dict(state)
    return lead["history"], lead["samples"], lead["seconds"]


def _after(model, masks, after_step) -> None:
    if masks:
        apply_masks(model, masks)
    if after_step is not None:
        after_step(model)


class _Loop:
    """The epochs of one :func:`fit`: the optimizer, the schedule and the steps, in this
    process or in one rank of several."""

    def __init__(self, model, extra, params: TrainParams, ctx, loss_fn, after) -> None:
        self.model, self.extra, self.params, self.ctx = model, extra, params, ctx
        self.task, self.seed = ctx.task, ctx.seed
        self.loss_fn, self.after = loss_fn, after

    def __getstate__(self) -> dict:
        # sent to other machines' ranks, which never evaluate: the stage's context (its
        # MLflow run, the runner) stays on the stage's machine
        return {**self.__dict__, "ctx": None}

    def validation(self) -> dict[str, float]:
        """The model's figures on the validation split, as ``val_<metric>``."""
        return {f"val_{k}": v for k, v in self.ctx.evaluate(self.model).items()}

    def figures(self, loader, group=None) -> Iterator[tuple[dict[str, float] | None, int, float]]:
        """Train epoch by epoch; yields each one's figures (``train_loss`` and the
        validation's), the samples it trained on and its seconds. With ``group``, only the
        lead rank evaluates (None elsewhere): the others go on and wait for it at the next
        step."""
        for loss, count, took in self.epochs(loader, group):
            leads = group is None or group.leads
            yield ({"train_loss": loss, **self.validation()} if leads else None), count, took

    def epochs(self, loader, group=None) -> Iterator[tuple[float, int, float]]:
        """Train epoch by epoch; yields each one's mean loss per sample, the samples it
        trained on and its seconds (over every rank with ``group``)."""
        import torch

        params = self.params
        trained = torch.nn.ModuleList([self.model, *self.extra])
        optimizer = _optimizer(trained, params)
        total_steps = params.epochs * max(1, len(loader))
        scheduler = None
        if params.schedule == "cosine" and total_steps:
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
        forward = group.wrap(self.model) if group else self.model
        with _dropout_off(trained, not params.dropout):
            for epoch in range(1, params.epochs + 1):
                if group is not None:
                    loader.sampler.set_epoch(epoch)
                trained.train()
                forward.train()
                started = time.perf_counter()
                running, seen = self._epoch(epoch, forward, loader, optimizer, scheduler, group)
                took = time.perf_counter() - started
                if group is not None:
                    running, seen = group.sum(running, seen)
                yield running / max(seen, 1), int(seen), took

    def _epoch(self, epoch, forward, loader, optimizer, scheduler, group) -> tuple[float, int]:
        """One pass over ``loader``: the loss summed over samples, and the samples."""
        from compressflow.task import batch_len

        task = self.task
        running, seen = 0.0, 0
        for step, batch in enumerate(loader, 1):
            inputs, targets = task.split(batch)
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(task.predict(forward, inputs), targets, inputs)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise Diverged(epoch, step, value, self.params)
            loss.backward()
            if group is not None:
                group.average_grads(self.extra)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            self.after()
            count = batch_len(inputs)
            running += value * count
            seen += count
        return running, seen


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
