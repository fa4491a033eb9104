"""The probes' head modules; imported by the ``build`` functions, so that
importing the plugin does not import torch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import clipft
from clipft.errors import ClipftUsageError


class TaskResHead(nn.Module):
    """``scale · f · norm(base + alpha · residual)ᵀ``; buffer ``base`` ``[C, D]``
    (frozen), parameter ``residual`` (zero at the start)."""

    def __init__(self, base, alpha: float, scale: float):
        super().__init__()
        self.register_buffer("base", base.detach().clone().float())
        self.residual = nn.Parameter(torch.zeros_like(self.base))
        self.alpha = float(alpha)
        self.scale = float(scale)

    def classifier(self):
        return F.normalize(self.base + self.alpha * self.residual, dim=-1)

    def forward(self, f):
        return self.scale * (f @ self.classifier().t().to(f.dtype))

    def extra_repr(self) -> str:
        return f"classes={self.base.shape[0]}, alpha={self.alpha:g}, scale={self.scale:g}"


class ClapHead(clipft.FitsTrainFeatures, clipft.AddsLossTerms, clipft.UpdatesPerEpoch, nn.Module):
    """``scale · f · norm(weight)ᵀ`` with ``weight`` starting at the buffer
    ``prototypes`` ``[C, D]``; the buffer ``multipliers`` ``[C]`` (lambda_c) is
    fitted to the training features before training and weighs the penalty
    ``mean_c lambda_c ‖w_c − w0_c‖²`` added to every step's loss. With
    ``constraint="alm"`` the buffer ``rho`` ``[C]`` (the penalty parameters)
    joins it and both move at every epoch's end (:meth:`end_epoch`)."""

    def __init__(self, prototypes, constraint: str, scale: float):
        super().__init__()
        self.register_buffer("prototypes", prototypes.detach().clone().float())
        self.weight = nn.Parameter(self.prototypes.clone())
        n_classes = self.prototypes.shape[0]
        self.register_buffer("multipliers", torch.zeros(n_classes, device=prototypes.device))
        if constraint == "alm":
            # only in this mode, so that the other modes' checkpoints and exports keep their keys
            self.register_buffer("rho", torch.zeros(n_classes, device=prototypes.device))
        self.constraint = constraint
        self.scale = float(scale)

    def forward(self, f):
        return self.scale * (f @ F.normalize(self.weight, dim=-1).t().to(f.dtype))

    def distances(self):
        """``[C]``: ``‖w_c − w0_c‖²``, the constraint ``w_c = w0_c``'s violation."""
        return (self.weight - self.prototypes).pow(2).sum(-1)

    def penalty(self):
        return (self.multipliers * self.distances()).mean()

    def loss_terms(self, record) -> dict:
        return {} if self.constraint == "none" else {"clap": self.penalty()}

    def end_epoch(self, epoch: int) -> None:
        if self.constraint != "alm":
            return
        multipliers, rho = alm_outer_step(self.distances().float(), self.multipliers, self.rho)
        self.multipliers.copy_(multipliers)
        self.rho.copy_(rho)

    @torch.no_grad()
    def fit_train_features(self, data) -> dict:
        n_classes = self.prototypes.shape[0]
        labels = data.labels
        if len(labels) == 0 or bool((labels < 0).any()) or bool((labels >= n_classes).any()):
            raise ClipftUsageError(
                "head 'clap' sets each class's penalty from the zero-shot model's accuracy on that "
                f"class's training images, so every training image needs a class among the head's "
                f"{n_classes}; this data has unlabelled images")
        counts = torch.bincount(labels.cpu(), minlength=n_classes)
        if self.constraint in ("adaptive", "alm"):
            self.multipliers.copy_(initial_multipliers(
                self.forward(data.features.to(self.weight.device, torch.float32)), labels.to(self.weight.device)))
        elif self.constraint == "balanced":
            self.multipliers.fill_(1.0)
        if self.constraint == "alm":
            self.rho.zero_()
        missing = [data.classnames[c] if data.classnames else str(c) for c in range(n_classes) if counts[c] == 0]
        record = {"constraint": self.constraint, "classes": n_classes,
                  "shots_min": int(counts.min()), "shots_max": int(counts.max())}
        if self.constraint != "none":
            m = self.multipliers
            record["multipliers"] = {"min": float(m.min()), "mean": float(m.mean()), "max": float(m.max())}
        if missing:
            record["classes_without_images"] = missing[:20]
        return record

    def extra_repr(self) -> str:
        return f"classes={self.prototypes.shape[0]}, constraint={self.constraint}, scale={self.scale:g}"


def alm_outer_step(distances, multipliers, rho):
    """One outer step of the augmented-Lagrangian scheme of CLAP's released
    code, per class: ``(multipliers', rho')``.

    The constraint ``h_c = ‖w_c − w0_c‖²`` enters a PHR penalty whose
    derivative in ``h`` at the current point, ``max(0, lambda_c + rho_c·h_c)``,
    becomes the new multiplier; the penalty parameter then takes the value of
    the constraint itself (``rho_c' = h_c``). ``rho`` starts at 0, so the
    first epoch leaves the zero-shot multipliers unchanged, and since ``h ≥ 0``
    the multipliers never decrease: a class whose prototype drifts further is
    held more firmly."""
    return (multipliers + rho * distances).clamp(min=0), distances.clone()


def initial_multipliers(zero_shot_logits, labels):
    """lambda_c = the mean zero-shot softmax probability of class c over the
    training images labelled c (0 for a class without images)."""
    n_classes = zero_shot_logits.shape[-1]
    prob = zero_shot_logits.float().softmax(-1)                           # [N, C]
    one_hot = F.one_hot(labels, n_classes).to(prob.dtype)                # [N, C]
    return (prob * one_hot).sum(0) / one_hot.sum(0).clamp(min=1)
