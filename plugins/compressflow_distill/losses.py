"""Distillation losses, in the training loop's ``loss_fn(outputs, targets, inputs)`` form.

``soft_kl`` is the one implementation of Hinton's soft-target term; ``distill/logits``,
``distill/features`` and ``finetune`` with a ``teacher`` all use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` of the temperature-softened distributions.

    The ``T^2`` keeps its gradients on the scale of the cross-entropy's whatever ``T``
    (Hinton et al. 2015, section 2); averaged over the batch.
    """
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean") * temperature**2


def logits_kd_loss(teacher: nn.Module, temperature: float, alpha: float, task=None):
    """Hinton's loss: ``alpha * soft_kl + (1 - alpha) * cross-entropy``; the teacher is frozen.

    The teacher is put in eval mode and sees the student's inputs (fed by ``task``), without
    gradients. For a task whose outputs are not class logits (``embedding``), the loss is the
    task's own against the teacher's outputs: matching them is what distillation means there.
    """
    from compressflow.task import default_task

    task = task or default_task()
    teacher.eval()

    def loss(outputs: torch.Tensor, targets, inputs) -> torch.Tensor:
        with torch.no_grad():
            teacher_outputs = task.predict(teacher, inputs)
        if task.name != "classification":
            return task.loss(outputs, targets, teacher_outputs)
        soft = soft_kl(outputs, teacher_outputs, temperature)
        return alpha * soft + (1 - alpha) * F.cross_entropy(outputs, targets)

    return loss
