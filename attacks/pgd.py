"""Ready-made l_inf PGD (Madry et al. 2018) and the paper's early-state selection protocol."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from model_zoo.scoring import score_logits

__all__ = ["PGDResult", "pgd_linf", "check_linf_ball", "select_early_state"]


def check_linf_ball(x_adv: Tensor, x: Tensor, eps: float, tol: float = 1e-6) -> None:
    """Raise ValueError unless every x_adv lies in [0, 1] and within eps (l_inf) of x."""
    if x_adv.shape != x.shape:
        raise ValueError(f"adversarial batch shape {tuple(x_adv.shape)} != clean {tuple(x.shape)}")
    if x_adv.numel() == 0:
        return
    if not torch.isfinite(x_adv).all():
        raise ValueError("adversarial examples contain NaN/inf")
    dist = (x_adv - x).abs().flatten(1).max(1).values
    if (dist > eps + tol).any():
        bad = (dist > eps + tol).nonzero().flatten().tolist()
        raise ValueError(f"adversarial examples {bad[:10]} leave the eps={eps} ball "
                         f"(max distance {float(dist.max()):.6g})")
    if float(x_adv.min()) < -tol or float(x_adv.max()) > 1 + tol:
        raise ValueError("adversarial examples leave [0, 1]")


@dataclass
class PGDResult:
    """x_adv: (B, C, H, W) last iterate; correct: (B,) bool, judged by ``judge`` on x_adv."""
    x_adv: Tensor
    correct: Tensor
    config: dict


def pgd_linf(grad_logits: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, eps: float,
             alpha: float, steps: int = 10, random_start: bool = True,
             generator: Optional[torch.Generator] = None,
             judge: Optional[Callable[[Tensor], Tensor]] = None) -> PGDResult:
    """l_inf PGD: x <- clip_[0,1](Proj_eps(x + alpha sign(grad CE))), ``steps`` times, from a
    uniform random start in the ball (clamped to [0, 1]); returns the last iterate.

    ``grad_logits(x)`` gives the logits whose cross-entropy gradient drives the attack;
    ``judge(x)`` the logits of the reported model (default: the same function).
    """
    if eps < 0 or alpha <= 0 or steps < 0:
        raise ValueError(f"bad PGD parameters eps={eps}, alpha={alpha}, steps={steps}")
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        x_adv = (x + (2 * noise - 1) * eps).clamp(0, 1)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        xv = x_adv.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(grad_logits(xv), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, xv)
        # a non-finite output has a NaN gradient: no step there (the example is wrong anyway)
        x_adv = x_adv + alpha * torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1).detach()
    check_linf_ball(x_adv, x, eps)
    with torch.no_grad():
        correct = score_logits((judge or grad_logits)(x_adv), y)[0]
    return PGDResult(x_adv, correct, {"attack": "pgd", "norm": "Linf", "eps": eps, "alpha": alpha,
                                      "steps": steps, "random_start": random_start})


def select_early_state(model, x_val: Tensor, y_val: Tensor, eps: float, alpha: float,
                       steps: int = 10, batch_size: int = 100, seed: int = 0, early=None):
    """Pick the early state by ready-made PGD accuracy on a validation split (the paper's Sec. 4
    protocol after Yang et al. 2022): PGD-``steps`` with the phantom gradient at the final state
    (``FinalState()``), then the accuracy of every raw state z[1..N] on those examples; the state
    with the highest accuracy wins (ties: the later state). Returns the resolved
    :class:`model_zoo.EarlyState` (``early`` if given) with the per-state accuracies recorded.
    """
    from model_zoo.forward import EarlyState, FinalState  # attacks sit below model_zoo

    if len(x_val) != len(y_val) or len(x_val) == 0:
        raise ValueError("x_val and y_val must be non-empty and of equal length")
    was_training = model.training
    model.eval()
    ready_made = FinalState()
    gen = torch.Generator().manual_seed(seed)
    correct = None
    for s in range(0, len(x_val), batch_size):
        xb, yb = x_val[s:s + batch_size], y_val[s:s + batch_size]
        res = pgd_linf(lambda v: model.run(v, defense=ready_made).logits, xb, yb, eps, alpha,
                       steps, generator=gen)
        with torch.no_grad():
            rec = model.run(res.x_adv, defense=ready_made, per_state=True)
        # (N, B): a state with a non-finite logit is wrong (model_zoo.scoring)
        sl = rec.state_logits
        c = ((sl.argmax(-1) == yb[None]) & torch.isfinite(sl).all(-1)).sum(1)
        correct = c if correct is None else correct + c
    model.train(was_training)
    acc = (correct.double() / len(x_val)).tolist()
    best = max(range(len(acc)), key=lambda i: (acc[i], i)) + 1
    early = early if early is not None else EarlyState("select")
    return early.resolve(best, {"accuracy_per_state": acc, "attack": "pgd", "eps": eps,
                                "alpha": alpha, "steps": steps, "n": len(x_val), "seed": seed,
                                "gradient": "phantom (FinalState)"})
