"""Distillation losses, in the training loop's ``loss_fn(outputs, targets, inputs)`` form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def logits_kd_loss(teacher: nn.Module, temperature: float, alpha: float):
    """Hinton's loss: T^2-scaled KL to the teacher's softened outputs, plus cross-entropy."""

    def loss(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        soft = F.kl_div(F.log_softmax(outputs / temperature, dim=1),
                        F.softmax(teacher_logits / temperature, dim=1),
                        reduction="batchmean") * temperature**2
        return alpha * soft + (1 - alpha) * F.cross_entropy(outputs, targets)

    return loss
