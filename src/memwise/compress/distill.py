"""Knowledge distillation as the recovery step: the original model teaches the compressed one.

For classifiers (2-D logits and integer labels) the loss is Hinton's:
`alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)`.
For models whose output is an embedding (no labels) it is `1 - cosine(student, teacher)` plus the
mean squared error, so the student reproduces the teacher's vectors.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memwise.core.workload import call_model


def distill(
    student: nn.Module,
    teacher: nn.Module,
    make_labeled: Callable[[int], tuple[Any, torch.Tensor | None]],
    *,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 1e-3,
    temperature: float = 4.0,
    alpha: float = 0.7,
) -> list[float]:
    """Trains `student` in place for `steps` Adam steps to match `teacher`'s outputs.

    Args:
        student: the model to train (float weights; pruning masks, if any, stay applied).
        teacher: the original model (run in eval mode without gradients).
        make_labeled: `make_labeled(batch_size) -> (inputs, labels or None)`.
        steps: optimizer steps (the bound on the recovery's cost).
        batch_size: samples per step.
        lr: Adam learning rate.
        temperature: softening temperature T of the KL term.
        alpha: weight of the KL term against the hard-label cross-entropy.

    Returns:
        The loss of each step.
    """
    teacher.eval()
    student.train()
    optimizer = torch.optim.Adam([parameter for parameter in student.parameters() if parameter.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        inputs, labels = make_labeled(batch_size)
        with torch.no_grad():
            teacher_out = call_model(teacher, inputs)
        student_out = call_model(student, inputs)
        loss = distillation_loss(student_out, teacher_out, labels, temperature=temperature, alpha=alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    student.eval()
    return losses


def distillation_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """KL at `temperature` plus hard-label CE for logits; cosine plus MSE for embeddings."""
    if labels is not None and student_out.dim() == 2 and not labels.is_floating_point():
        soft = F.kl_div(
            F.log_softmax(student_out / temperature, dim=1),
            F.softmax(teacher_out / temperature, dim=1),
            reduction="batchmean",
        ) * temperature**2
        return alpha * soft + (1 - alpha) * F.cross_entropy(student_out, labels)
    cosine = F.cosine_similarity(student_out.flatten(1), teacher_out.flatten(1), dim=1).mean()
    return (1 - cosine) + F.mse_loss(student_out, teacher_out)
