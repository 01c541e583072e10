"""Scoring logits into per-example outcomes, the one place a prediction is made.

A non-finite logit (NaN or +-inf anywhere in an example's row) is never a prediction: NaN
logits ``argmax`` to class 0 in torch, so scoring them with a bare ``argmax`` silently counts
every label-0 example as correct -- and as *robust* under every attack. Every accuracy of the
benchmark (clean evaluation, each attack's re-scoring, early stopping, transfer, the early-state
selection) goes through :func:`score_logits`, which marks such examples wrong and says why.

Convergence: a DEQ's solve whose final relative residual ``||f(z) - z|| / ||f(z)||`` stays
above :data:`UNCONVERGED_REL_RESIDUAL` is flagged ``unconverged`` (it still gets a prediction:
the reported forward is what it is, but the entry is flagged when many examples are affected).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["finite_rows", "predict", "score_logits", "safe_margin", "record_status",
           "check_labels", "UNCONVERGED_REL_RESIDUAL", "UNCONVERGED_SHARE", "STATUSES",
           "resolve_device"]

#: Default threshold on the final relative residual above which a solve is ``unconverged``.
#: Measured on the shipped Fashion-MNIST zoo (N = 8 Broyden steps, 500 test images each): the
#: largest clean final residual of any of the five trained DEQs is 0.226 (medians 0.016-0.062),
#: while weights scaled by 1e6 settle on garbage at a median residual of 0.53. 0.3 separates
#: the two with margin on both sides. The solver's own tolerance (1e-3) is far stricter than
#: what N = 8 reaches on a trained model, so it cannot serve as the flag's threshold.
UNCONVERGED_REL_RESIDUAL = 0.3
#: Share of an entry's examples with an unconverged solve above which the entry is flagged:
#: one in twenty (5 %) -- none of the shipped models has a single one at 0.3.
UNCONVERGED_SHARE = 0.05
STATUSES = ("ok", "unconverged", "nonfinite")


def finite_rows(t: Tensor) -> Tensor:
    """(B,) bool: whether every entry of row b of ``t`` (B, ...) is finite."""
    if t.dim() == 1:
        return torch.isfinite(t)
    return torch.isfinite(t.detach().flatten(1)).all(1)


def predict(logits: Tensor) -> Tensor:
    """(B,) long predictions; -1 (no class) for rows with a non-finite logit."""
    logits = logits.detach()
    pred = logits.argmax(-1)
    return torch.where(finite_rows(logits), pred, torch.full_like(pred, -1))


def score_logits(logits: Tensor, y: Tensor):
    """(correct (B,) bool, nonfinite (B,) bool) of logits (B, C) against labels (B,): an example
    is correct only if all its logits are finite and their argmax is its label."""
    finite = finite_rows(logits)
    correct = (logits.detach().argmax(-1) == y) & finite
    return correct, ~finite


def safe_margin(logits: Tensor, y: Tensor) -> Tensor:
    """(B,) float64 margin logit_y - max_{j != y} logit_j (computed in float64 so that huge
    finite logits do not overflow); -inf for rows with a non-finite logit (they are wrong)."""
    lg = logits.detach().double()
    true = lg.gather(1, y[:, None].long()).squeeze(1)
    other = lg.clone()
    other.scatter_(1, y[:, None].long(), float("-inf"))
    m = true - other.max(1).values
    return torch.where(finite_rows(logits), m, torch.full_like(m, float("-inf")))


def record_status(margin=None, residuals=None, threshold: float = UNCONVERGED_REL_RESIDUAL,
                  nonfinite: Optional[bool] = None):
    """(status, final relative residual) of one per-example record: ``'nonfinite'`` when its
    logits (``nonfinite``, else a non-finite ``margin``), or its final residual, are not finite;
    ``'unconverged'`` when the final residual exceeds ``threshold``; else ``'ok'``."""
    final = None
    if residuals:
        try:
            final = float(residuals[-1])
        except (TypeError, ValueError):
            final = float("nan")
    if nonfinite is None:
        # safe_margin gives -inf for non-finite logits (NaN: an older unguarded margin);
        # +inf is no evidence (a worst case over no attack yet)
        nonfinite = margin is not None and (math.isnan(float(margin))
                                            or float(margin) == float("-inf"))
    if nonfinite or (final is not None and not math.isfinite(final)):
        return "nonfinite", final
    if final is not None and final > threshold:
        return "unconverged", final
    return "ok", final


def check_labels(y, n: int, num_classes: Optional[int] = None, what: str = "labels"):
    """Raise :class:`~model_zoo.InputError` unless ``y`` is an integer tensor of ``n`` labels in
    0..num_classes-1 (the messages name the problem, instead of torch's gather/broadcast errors
    deep inside an attack)."""
    from .mdeq import InputError
    if not torch.is_tensor(y):
        raise InputError(f"{what} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise InputError(f"{what} must be an integer tensor (class indices), got dtype {y.dtype} "
                         "(convert with y.long())")
    if y.dim() != 1:
        raise InputError(f"{what} must have shape (B,), got shape {tuple(y.shape)}")
    if len(y) != n:
        raise InputError(f"{what}: {len(y)} labels for {n} images")
    if len(y) and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)):
        hi = "" if num_classes is None else f"..{num_classes - 1}"
        raise InputError(f"{what} must lie in 0{hi}, got values in "
                         f"[{int(y.min())}, {int(y.max())}]")


def resolve_device(device) -> str:
    """'auto' (or None) -> 'cuda' when a GPU is available, else 'cpu'; anything else as given.
    The default device of every command and config is 'auto'; results record the resolved one."""
    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)
