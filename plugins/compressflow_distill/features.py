"""Hidden-state distillation (FitNets, Romero et al. 2015): the mechanics of ``distill/features``.

Named modules' outputs are captured with forward hooks, on the student while the training loop
runs it and on the teacher inside the loss. Where a student layer is narrower (or wider) than
the teacher layer it learns from, a projection maps the student's width to the teacher's: an
``nn.Linear`` on the last dimension, or a 1x1 ``nn.Conv2d`` on the channels of a 4-D (N, C, H,
W) feature. The projections train alongside the student and are not part of it.

A transformer block's output may be a tuple (hidden states first) or the hidden states
alone (transformers 5's BertLayer); either way the hidden states are what is matched, over
the attended positions only where the inputs carry an ``attention_mask`` (padding positions
hold no token, and poolings skip them).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from compressflow import ConfigError
from compressflow.registry import nearest
from compressflow.task import Inputs, batch_len, call
from compressflow_distill.losses import soft_kl

SHOWN = 40
"""At most this many module names are listed in an error."""


def named_layers(model: nn.Module) -> list[str]:
    """Every module name a layer map may use (the root, named ``""``, excluded)."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layers(model: nn.Module, names: list[str], role: str) -> dict[str, nn.Module]:
    """``{name: module}`` for each name; an unknown name is a ConfigError listing the real ones."""
    modules = dict(model.named_modules())
    known = named_layers(model)
    for name in names:
        if not name or name not in modules:
            shown = ", ".join(known[:SHOWN]) + (f", ... ({len(known) - SHOWN} more)"
                                                if len(known) > SHOWN else "")
            raise ConfigError(
                f"{role} layer '{name}' is not a module of the {role} "
                f"({type(model).__name__}){nearest(name, known)}",
                f"{role} modules: {shown or '(none)'}",
            )
    return {name: modules[name] for name in names}


class FeatureCapture:
    """Forward hooks keeping the latest output of each named module; ``close`` removes them."""

    def __init__(self, modules: Mapping[str, nn.Module], role: str) -> None:
        self.role = role
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [module.register_forward_hook(self._keeper(name))
                        for name, module in modules.items()]

    def _keeper(self, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)) and output:
                output = output[0]  # (output, state) pairs: an RNN, an attention block
            elif hasattr(output, "to_tuple"):  # a transformers ModelOutput: its first field
                fields = output.to_tuple()
                output = fields[0] if fields else None
            self.outputs[name] = output
        return hook

    def get(self, name: str) -> torch.Tensor:
        """The captured output of ``name``; a clear error when the forward never called it."""
        output = self.outputs.get(name)
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"{self.role} layer '{name}' "
                             + ("was not called by the forward pass" if output is None else
                                f"returned {type(output).__name__}, not a tensor"))
        return output

    def clear(self) -> None:
        self.outputs.clear()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.outputs.clear()


def make_projection(student: torch.Tensor, teacher: torch.Tensor, pair: str) -> nn.Module | None:
    """A learned map from the student feature's width to the teacher's; None when equal.

    Raises ValueError when the shapes cannot be matched by a width change alone.
    """
    if student.dim() != teacher.dim():
        raise ValueError(f"{pair}: the student feature is {tuple(student.shape[1:])} a sample, "
                         f"the teacher's {tuple(teacher.shape[1:])}; map layers of the same kind")
    if student.dim() == 4:  # (N, C, H, W): channels are the width
        if student.shape[2:] != teacher.shape[2:]:
            raise ValueError(f"{pair}: spatial sizes differ ({tuple(student.shape[2:])} vs "
                             f"{tuple(teacher.shape[2:])}); map layers of the same resolution")
        s_width, t_width = student.shape[1], teacher.shape[1]
        layer = nn.Conv2d(s_width, t_width, 1) if s_width != t_width else None
    else:
        if student.shape[1:-1] != teacher.shape[1:-1]:
            raise ValueError(f"{pair}: shapes {tuple(student.shape[1:])} and "
                             f"{tuple(teacher.shape[1:])} differ in more than the last dimension")
        s_width, t_width = student.shape[-1], teacher.shape[-1]
        layer = nn.Linear(s_width, t_width) if s_width != t_width else None
    return layer.to(device=student.device, dtype=student.dtype) if layer is not None else None


def feature_mse(student: torch.Tensor, teacher: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """MSE between two features; a token feature ``[batch, seq, dim]`` is compared at the
    positions the inputs' ``attention_mask`` attends only."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if mask is None or student.dim() != 3 or tuple(mask.shape) != tuple(student.shape[:2]):
        return F.mse_loss(student, teacher)
    weights = mask.unsqueeze(-1).to(student.dtype)
    squared = (student - teacher).pow(2) * weights
    return squared.sum() / torch.clamp(weights.sum() * student.shape[-1], min=1)


class FeatureKD:
    """The ``distill/features`` loss: weighted feature MSE, soft-logits KL and the task's loss.

    ``loss = feature_weight * mean over pairs of MSE(project(student_feature), teacher_feature)
    + logits_weight * soft_kl(student, teacher, T) + label_weight * task loss``. The task
    loss is the cross-entropy on the labels (classification, or no ``task``: term
    ``label_loss``), or, for a task that learns to match a model (embedding), the task's loss
    against the *teacher's* prediction: ``1 - cosine`` to its embedding (term ``task_loss``).
    The logits term is for classification only.

    Build it with the student and the teacher, call :meth:`probe` with a real batch (it checks
    the layers run and builds the projections), pass it as ``loss_fn`` and
    ``self.projections`` as ``extra_modules`` to ``fit``, and :meth:`close` it afterwards.
    Every call adds its terms to running sums; :meth:`epoch_terms` returns their means.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: Mapping[str, str], *,
                 feature_weight: float, logits_weight: float, label_weight: float,
                 temperature: float, task=None) -> None:
        if logits_weight and task is not None and task.name != "classification":
            raise ConfigError(f"distill/features: logits_weight is for classification (softened "
                              f"class logits), and the task is '{task.name}'",
                              "set logits_weight: 0; label_weight weighs the task's own loss "
                              "against the teacher")
        self.task = task
        self.teacher = teacher.eval()
        self.layers = dict(layers)
        self.weights = (feature_weight, logits_weight, label_weight)
        self.temperature = temperature
        student_modules = resolve_layers(student, list(self.layers), "student")
        teacher_modules = resolve_layers(teacher, list(self.layers.values()), "teacher")
        self.student_capture = FeatureCapture(student_modules, "student")
        self.teacher_capture = FeatureCapture(teacher_modules, "teacher")
        self.projections = nn.ModuleDict()
        self._keys: dict[str, str] = {}
        self._sums: dict[str, float] = {}
        self._seen = 0

    def probe(self, student: nn.Module, inputs: Inputs) -> dict[str, tuple[int, int]]:
        """Run both models once; build a projection per pair whose widths differ.

        Returns ``{student_layer: (student_width, teacher_width)}`` for the projected pairs.
        """
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad():
                self._feed(student, inputs)
                self._feed(self.teacher, inputs)
            widths = {}
            for index, (s_name, t_name) in enumerate(self.layers.items()):
                pair = f"layers: student '{s_name}' -> teacher '{t_name}'"
                try:
                    s_out, t_out = self.student_capture.get(s_name), self.teacher_capture.get(t_name)
                    projection = make_projection(s_out, t_out, pair)
                except ValueError as error:
                    raise ConfigError(str(error), "layers maps student module -> teacher module; "
                                      "both must run in forward and return tensors") from error
                key = f"p{index}"  # ModuleDict keys may not hold dots
                self._keys[s_name] = key
                if projection is not None:
                    self.projections[key] = projection
                    channel = 1 if s_out.dim() == 4 else -1
                    widths[s_name] = (int(s_out.shape[channel]), int(t_out.shape[channel]))
        finally:
            self.student_capture.clear()
            self.teacher_capture.clear()
            student.train(was_training)
        return widths

    def _feed(self, model: nn.Module, inputs: Inputs):
        return self.task.feed(model, inputs) if self.task is not None else call(model, inputs)

    def _predict(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        return self.task.predict(model, inputs) if self.task is not None else call(model, inputs)

    def feature_loss(self, inputs: Inputs = None) -> torch.Tensor:
        """Mean over the mapped pairs of the MSE between projected student and teacher
        features (at the attended positions, where ``inputs`` has an attention mask)."""
        losses = []
        for s_name, t_name in self.layers.items():
            student = self.student_capture.get(s_name)
            teacher = self.teacher_capture.get(t_name).detach()
            key = self._keys[s_name]
            if key in self.projections:
                student = self.projections[key](student)
            losses.append(feature_mse(student, teacher, inputs))
        return torch.stack(losses).mean()

    def task_term(self, outputs: torch.Tensor, targets, teacher: torch.Tensor
                  ) -> tuple[str, torch.Tensor]:
        """``(term name, value)`` of the task's loss: see the class docstring."""
        task = self.task
        if task is None or task.name == "classification":
            return "label_loss", F.cross_entropy(outputs, targets)
        if task.uses_reference:  # the teacher is the reference the student learns to match
            return "task_loss", task.loss(outputs, targets, teacher)
        return "task_loss", task.loss(outputs, targets)

    def __call__(self, outputs: torch.Tensor, targets, inputs: Inputs) -> torch.Tensor:
        feature_weight, logits_weight, label_weight = self.weights
        # the loop ran the student on ``inputs`` just before: its features are captured
        with torch.no_grad():
            teacher_outputs = self._predict(self.teacher, inputs)
        task_name, task_loss = self.task_term(outputs, targets, teacher_outputs)
        terms = {"feature_loss": self.feature_loss(inputs), task_name: task_loss}
        if logits_weight:
            terms["logits_loss"] = soft_kl(outputs, teacher_outputs, self.temperature)
        loss = (feature_weight * terms["feature_loss"] + label_weight * task_loss
                + logits_weight * terms.get("logits_loss", 0.0))
        count = batch_len(inputs)
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value.detach()) * count
        self._seen += count
        self.student_capture.clear()
        self.teacher_capture.clear()
        return loss

    def epoch_terms(self) -> dict[str, float]:
        """Each term's mean over the samples since the last call (unweighted); resets."""
        terms = {name: total / max(self._seen, 1) for name, total in self._sums.items()}
        self._sums, self._seen = {}, 0
        return terms

    def close(self) -> None:
        """Remove every hook: the returned student carries none (and pickles)."""
        self.student_capture.close()
        self.teacher_capture.close()
