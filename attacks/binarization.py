"""The binarization attack-strength test of Zimmermann, Brendel, Tramèr & Carlini, "Increasing
Confidence in Adversarial Robustness Evaluations" (NeurIPS 2022, Sec. 3-4): an attack unit test.

Idea. An attack that reports a point robust may simply be too weak to find the adversarial
example. The test builds, for one clean input x, a *binary* problem on the SAME network in which
an adversarial example inside the eps-ball is guaranteed to exist, and runs the SAME attack on it
(same loss, budget, gradient source). A strong attack finds it; the pass rate over many points
estimates how often the attack finds adversarial examples that exist.

Construction, per point x (C, H, W) in [0, 1], l_inf ball of radius eps:

1. Training inputs in pixel space: ``n_inner`` "inner" points = x itself plus ``n_inner - 1``
   points x + u, u ~ U[-(1 - gap) eps, (1 - gap) eps]^d, clipped to [0, 1] (label 0); and
   ``n_boundary`` "boundary" points at l_inf distance exactly eps from x after clipping to
   [0, 1] (label 1): ``boundary='surface'`` (the paper's default) draws u ~ U[-1, 1]^d and
   rescales it so the largest |clip(x + eps u) - x| is eps; ``'corners'`` draws u in {-1, +1}^d.
2. Features: phi(x') (D,) = the input of the network's final linear readout (logits = W phi + b),
   taken on the REPORTED forward of the model (for a DEQ: the pooled head features of the state
   its defense reports; ``FinalState``: after the phantom unroll; ``EarlyState(i)``: of z[i]).
3. A linear binary readout (w, c) on phi is fitted (logistic regression, class-balanced) until
   it separates the two sets: every inner point scores < every boundary point. Not separable
   (D too small for the sample) = setup failure, recorded, not counted (as in the paper).
4. The model's readout layer is REPLACED by the 2-logit layer [0, w phi + c] (as logits
   [-s/2, s/2]); the feature extractor is frozen and untouched. On this binarized model x is
   class 0 and the boundary point (inside the closed eps-ball) is class 1 -- verified on the
   binarized model's reported forward before attacking (else setup failure): an adversarial
   example exists.
5. The attack runs on the binarized model with label 0 -- through the same
   :class:`~attacks.surrogates.JudgedModule` (reported forward judges, surrogate gives the
   gradient): because the readout module itself is swapped, every path that computes logits
   (reported forward, surrogates, unrolls) computes binary logits. The point PASSES if the
   attack's output lies in the eps-ball and in [0, 1] and the binarized reported forward
   classifies it as class 1.

Optional validation (the paper's "random ASR"): ``n_validation`` fresh uniform points in the
full eps-ball; the fraction the binarized model classifies as class 1 says how easy the binary
problem is for random noise (near 0 = the test needs a real attack).

Differences from the released code (google-research/active-adversarial-tests), on purpose:
* the classifier is fitted in torch (class-balanced logistic regression with a tiny ridge,
  Newton's method on standardized features, float64) instead of
  scikit-learn (not a dependency here); its threshold is then placed at ``threshold_at`` of
  the gap between the highest inner and the lowest boundary score (0.5 = the middle, like the
  max-margin hyperplane that unpenalized logistic regression on separable data approaches in
  direction; the paper's code keeps the fitted bias, with an optional "closeness"
  shift towards the boundary points, which ``threshold_at`` close to 1 mimics: a harder test,
  the attack must then score at least about as high as the boundary point) and weights scaled
  so the training scores span unit range (the code's ``rescale_logits='fixed'``);
* the guarantee is checked on the binarized model itself (step 4): for a defense whose forward
  depends on the logits (the Sec. 3.2 input purification minimizes the entropy of the BINARY
  logits once the readout is swapped) the features can move, and the point is then a recorded
  setup failure instead of a silently invalid test;
* step 2 uses the reported forward's features; the attack's gradient source is whatever the
  protocol uses (a surrogate's features may differ from the reported ones -- that is the point
  of testing the surrogate).

Works for DEQs (``MDEQClassifier``: readout = ``head.classifier``) and for plain ``nn.Module``
classifiers (readout = the module named by ``readout=`` or the last ``nn.Linear`` in module
order; a ``num_classes`` attribute is set to 2 while binarized so wrappers that check the logit
count accept the binary model).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .pgd import check_linf_ball

__all__ = ["BinarizationSettings", "PointResult", "find_readout", "readout_features",
           "binarized", "sample_inner", "sample_boundary", "fit_binary_readout",
           "binarization_test", "strength_summary", "DEFAULT_THRESHOLD"]

# Default pass-rate threshold of the ``strength`` flag. The test is built so that an adversarial
# example EXISTS at every point; a sound evaluation's attack should find nearly all of them
# (Zimmermann et al. call an attack that misses them "weak"; the stronger attacks of their case
# studies reach >= 0.9 to 1.0). 0.9 tolerates two misses in 20 points but flags three: an
# attack that truly finds 99% of them is flagged on 20 points with probability 0.1%, one that
# finds 95% with 7.5%, one that finds 70% with 96% (binomial).
DEFAULT_THRESHOLD = 0.9


@dataclass
class BinarizationSettings:
    """Knobs of the construction (defaults: the paper's 999 inner + 1 boundary points, 5% gap).

    n_inner: inner points incl. x (>= 1); n_boundary: boundary points (>= 1); gap: inner points
    lie in the (1 - gap) eps ball, in [0, 1); boundary: 'surface' | 'corners'; threshold_at:
    where the decision threshold sits between the highest inner and the lowest boundary score,
    in (0, 1); n_validation: fresh points for the random-noise success rate (0 = skip);
    fit_steps: Newton iterations of the logistic regression."""
    n_inner: int = 999
    n_boundary: int = 1
    gap: float = 0.05
    boundary: str = "surface"
    threshold_at: float = 0.5
    n_validation: int = 0
    fit_steps: int = 30

    def __post_init__(self):
        if int(self.n_inner) != self.n_inner or self.n_inner < 1:
            raise ValueError(f"n_inner must be an integer >= 1, got {self.n_inner!r}")
        if int(self.n_boundary) != self.n_boundary or self.n_boundary < 1:
            raise ValueError(f"n_boundary must be an integer >= 1, got {self.n_boundary!r}")
        if not 0 <= self.gap < 1:
            raise ValueError(f"gap must be in [0, 1), got {self.gap!r}")
        if self.boundary not in ("surface", "corners"):
            raise ValueError(f"boundary must be 'surface' or 'corners', got {self.boundary!r}")
        if not 0 < self.threshold_at < 1:
            raise ValueError(f"threshold_at must be in (0, 1), got {self.threshold_at!r}")
        if int(self.n_validation) != self.n_validation or self.n_validation < 0:
            raise ValueError(f"n_validation must be an integer >= 0, got {self.n_validation!r}")

    def config(self) -> dict:
        return {"n_inner": int(self.n_inner), "n_boundary": int(self.n_boundary),
                "gap": float(self.gap), "boundary": self.boundary,
                "threshold_at": float(self.threshold_at), "n_validation": int(self.n_validation),
                "fit_steps": int(self.fit_steps)}


@dataclass
class PointResult:
    """One point of the test. ``setup``: 'ok' or why the binary problem could not be built
    ('not_separable', 'guarantee_not_verified'); ``passed``: the attack found an example the
    binarized reported forward puts in class 1 (None unless setup == 'ok'); ``margin``: binary
    logit_0 - logit_1 at the attack's output (negative = found); ``boundary_margin``: the same
    at the best boundary point (the guaranteed example); ``random_asr``: fraction of
    validation points already in class 1 (None without validation); ``x_adv`` (C, H, W)."""
    setup: str
    passed: Optional[bool] = None
    margin: Optional[float] = None
    boundary_margin: Optional[float] = None
    random_asr: Optional[float] = None
    n_features: int = 0
    x_adv: Optional[Tensor] = None
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The readout layer: find it, read its input, swap it
# ---------------------------------------------------------------------------------------------

def _get_path(model: nn.Module, path: str):
    parent = model
    *heads, last = path.split(".")
    for p in heads:
        parent = getattr(parent, p)
    return parent, last, getattr(parent, last)


def find_readout(model: nn.Module, readout: Optional[str] = None):
    """(parent module, attribute name, the final ``nn.Linear``) of ``model``'s readout.

    ``readout``: dotted attribute path (e.g. 'net.classifier.5'); default: ``head.classifier``
    for DEQs, else the last ``nn.Linear`` in ``named_modules()`` order."""
    if readout is None and getattr(model, "is_deq", False) and hasattr(model, "head"):
        readout = "head.classifier"
    if readout is None:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not names:
            raise ValueError(f"{type(model).__name__} has no nn.Linear readout; name it with "
                             "readout='path.to.layer'")
        readout = names[-1]
    parent, name, layer = _get_path(model, readout)
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"readout {readout!r} is a {type(layer).__name__}, not an nn.Linear")
    return parent, name, layer


def _forward(model, x: Tensor, reported):
    if getattr(model, "is_deq", False):
        return model.run(x, defense=reported).logits
    return model(x)


def readout_features(model, x: Tensor, reported=None, batch_size: int = 256,
                     readout: Optional[str] = None) -> Tensor:
    """phi(x) (B, D): the input of the readout layer on the reported forward (no gradient).
    If the forward calls the readout several times (e.g. entropies during an input
    purification), the LAST call of each batch is the reported one."""
    _, _, layer = find_readout(model, readout)
    seen = []
    hook = layer.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach()))
    out = []
    try:
        with torch.no_grad():
            for s in range(0, len(x), batch_size):
                seen.clear()
                xb = x[s:s + batch_size]
                _forward(model, xb, reported)
                feats = [f for f in seen if f.shape[0] == len(xb)]
                if not feats:
                    raise RuntimeError("the reported forward never called the readout layer "
                                       "with the whole batch")
                out.append(feats[-1].flatten(1))
    finally:
        hook.remove()
    return torch.cat(out)


@contextlib.contextmanager
def binarized(model: nn.Module, layer: nn.Linear, readout: Optional[str] = None):
    """Within the block ``model``'s readout is ``layer`` (D -> 2) and every ``num_classes``
    attribute equal to the old readout's width is 2; all restored on exit, also on errors."""
    parent, name, old = find_readout(model, readout)
    if layer.in_features != old.in_features:
        raise ValueError(f"binary readout takes {layer.in_features} features, the model's "
                         f"readout {old.in_features}")
    layer = layer.to(device=old.weight.device, dtype=old.weight.dtype)
    # every (sub)module that declares the logit count of this readout (e.g. a CheckedClassifier
    # inside a wrapper) must accept 2 logits while binarized
    counted = [m for m in model.modules() if getattr(m, "num_classes", None) == old.out_features]
    setattr(parent, name, layer)
    for m in counted:
        m.num_classes = 2
    try:
        yield model
    finally:
        setattr(parent, name, old)
        for m in counted:
            m.num_classes = old.out_features


# ---------------------------------------------------------------------------------------------
# Sampling and fitting
# ---------------------------------------------------------------------------------------------

def sample_inner(x: Tensor, n: int, eps: float, gap: float, gen: torch.Generator) -> Tensor:
    """(n, C, H, W): x itself first, then n - 1 uniform points of the (1 - gap) eps l_inf ball,
    clipped to [0, 1]."""
    r = (1 - gap) * eps
    u = torch.rand((n - 1,) + tuple(x.shape), generator=gen).to(x.device, x.dtype)
    pts = (x[None] + (2 * u - 1) * r).clamp(0, 1)
    return torch.cat([x[None], pts])


def sample_boundary(x: Tensor, n: int, eps: float, mode: str, gen: torch.Generator) -> Tensor:
    """(n, C, H, W) points at l_inf distance eps from x after clipping to [0, 1] (where no
    coordinate can move by eps inside [0, 1], the distance is the largest reachable one).

    'surface': u ~ U[-1, 1]^d rescaled (clipping-aware: the rescale uses the distance AFTER
    clipping) so its largest effective coordinate is eps; 'corners': u in {-1, +1}^d."""
    shape = (n,) + tuple(x.shape)
    if mode == "corners":
        u = torch.randint(0, 2, shape, generator=gen).to(x.device, x.dtype) * 2 - 1
        return (x[None] + eps * u).clamp(0, 1)
    u = (2 * torch.rand(shape, generator=gen) - 1).to(x.device, x.dtype)
    d = u * eps
    for _ in range(3):  # growing d can clip more coordinates: re-measure a few times
        eff = ((x[None] + d).clamp(0, 1) - x[None]).abs().flatten(1).max(1).values
        d = (d * (eps / eff.clamp_min(1e-12)).view(-1, *[1] * x.dim())).clamp(-eps, eps)
    return (x[None] + d).clamp(0, 1)


def fit_binary_readout(f_inner: Tensor, f_boundary: Tensor, threshold_at: float = 0.5,
                       steps: int = 30, ridge: float = 1e-4):
    """Linear readout separating boundary (class 1) from inner (class 0) features.

    f_inner (Ni, D), f_boundary (Nb, D). Class-balanced logistic regression (each class's mean
    loss weighs 1: one boundary point weighs as much as 999 inner ones) with a tiny ridge on
    standardized features, in float64, by Newton's method with backtracking (``steps``
    iterations; D x D solves, fast for readout widths up to a few thousand). Ours rather than
    scikit-learn's (not a dependency; this runs on the features' device). The ridge keeps w
    finite: unpenalized logistic regression on separable data diverges (|w| -> inf), and then
    float32 rounding of the features alone can "separate". Returns ``(layer, info)``: ``layer``
    an ``nn.Linear(D, 2)`` with logits [-s/2, s/2], s = w . phi - t, or None if the fitted
    hyperplane does not separate the sets; ``info``: the score gap (absolute and relative to the
    training scores' span), the scale and the threshold."""
    fi, fb = f_inner.double(), f_boundary.double()
    allf = torch.cat([fi, fb])
    mu, sd = allf.mean(0), allf.std(0).clamp_min(1e-8)
    X = torch.cat([(allf - mu) / sd, torch.ones(len(allf), 1, dtype=allf.dtype,
                                                device=allf.device)], 1)
    D = allf.shape[1]
    yv = torch.cat([torch.zeros(len(fi)), torch.ones(len(fb))]).to(X)
    c = torch.where(yv > 0, 1.0 / len(fb), 1.0 / len(fi)).to(X)
    reg = torch.full((D + 1,), float(ridge), dtype=X.dtype, device=X.device)
    reg[-1] = 0.0  # the bias is not penalized
    sp = torch.nn.functional.softplus

    def loss(th):
        s_ = X @ th
        return float((c * (sp(s_) - yv * s_)).sum() + 0.5 * (reg * th * th).sum())

    th = torch.zeros(D + 1, dtype=X.dtype, device=X.device)
    eye = torch.eye(D + 1, dtype=X.dtype, device=X.device)
    for _ in range(steps):
        p = torch.sigmoid(X @ th)
        g = X.T @ (c * (p - yv)) + reg * th
        if float(g.abs().max()) < 1e-12:
            break
        H = (X * (c * p * (1 - p))[:, None]).T @ X + torch.diag(reg) + 1e-12 * eye
        step = torch.linalg.solve(H, g)
        t, l0, dec = 1.0, loss(th), float(g @ step)
        while t > 1e-10 and loss(th - t * step) > l0 - 1e-4 * t * dec:
            t /= 2
        th = th - t * step
    w = th[:D]
    with torch.no_grad():
        w_raw = w / sd
        si, sb = fi @ w_raw, fb @ w_raw
        hi, lo = float(si.max()), float(sb.min())
        span = float(torch.cat([si, sb]).max() - torch.cat([si, sb]).min())
        info = {"score_gap": lo - hi, "relative_gap": (lo - hi) / max(span, 1e-300)}
        # a gap below float32 resolution of the scores is no separation the model can keep
        if not math.isfinite(lo - hi) or not lo - hi > 1e-5 * span:
            return None, info
        t = hi + threshold_at * (lo - hi)
        scale = 1.0 / max(span, 1e-12)  # training scores span unit range (released code: 'fixed')
        layer = nn.Linear(D, 2).to(f_inner.device)
        layer.weight.copy_(torch.stack([-w_raw, w_raw]).to(layer.weight.dtype) * scale / 2)
        layer.bias.copy_(torch.tensor([t, -t], dtype=layer.bias.dtype) * scale / 2)
        info.update(scale=scale, threshold=t)
    return layer, info


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------

def _binary_margin(logits: Tensor) -> Tensor:
    return (logits[:, 0] - logits[:, 1]).float()


def binarization_test(model, x: Tensor, eps: float, attack: Callable[[Tensor, Tensor], Tensor],
                      reported=None, settings: Optional[BinarizationSettings] = None,
                      seed: int = 0, batch_size: int = 256,
                      readout: Optional[str] = None) -> list:
    """Run the test on every point of ``x`` (B, C, H, W) in [0, 1]; one :class:`PointResult`
    each.

    ``attack(x1, y1) -> x_adv``: the attack under test, called INSIDE the binarized context on
    one point (1, C, H, W) with label ``y1 = [0]``; it must build its model wrapper on ``model``
    (e.g. ``JudgedModule(model, reported, surrogate)``) so that it sees the binarized model.
    ``reported``: the DEQ forward whose features are binarized (default: the model's own).
    Success is judged here on the binarized reported forward, after the eps-ball / [0, 1] check.
    """
    st = settings or BinarizationSettings()
    x = x.detach()
    dev = x.device
    if getattr(model, "is_deq", False) and reported is None:
        reported = model.defense
    results = []
    for k in range(len(x)):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + k) % (2 ** 63))
        xi = x[k]
        inner = sample_inner(xi, st.n_inner, eps, st.gap, gen)
        bound = sample_boundary(xi, st.n_boundary, eps, st.boundary, gen)
        feats = readout_features(model, torch.cat([inner, bound]), reported, batch_size, readout)
        layer, info = fit_binary_readout(feats[:st.n_inner], feats[st.n_inner:],
                                         st.threshold_at, st.fit_steps)
        res = PointResult(setup="not_separable", n_features=feats.shape[1], extra=info)
        if layer is not None:
            with binarized(model, layer, readout):
                with torch.no_grad():
                    lg = _forward(model, torch.cat([xi[None], bound]), reported)
                m = _binary_margin(lg)
                res.boundary_margin = float(m[1:].min())
                if not (m[0] > 0 and (m[1:] < 0).any()):
                    res.setup = "guarantee_not_verified"
                else:
                    res.setup = "ok"
                    if st.n_validation:
                        r = torch.rand((st.n_validation,) + tuple(xi.shape), generator=gen)
                        xv = (xi[None] + (2 * r.to(dev, x.dtype) - 1) * eps).clamp(0, 1)
                        with torch.no_grad():
                            mv = torch.cat([_binary_margin(_forward(model, xv[s:s + batch_size],
                                                                    reported))
                                            for s in range(0, len(xv), batch_size)])
                        res.random_asr = float((mv < 0).double().mean())
                    y1 = torch.zeros(1, dtype=torch.long, device=dev)
                    x_adv = attack(xi[None], y1).detach()
                    check_linf_ball(x_adv, xi[None], eps)
                    with torch.no_grad():
                        ma = _binary_margin(_forward(model, x_adv, reported))
                    res.margin = float(ma[0])
                    res.passed = bool(ma[0] < 0)
                    res.x_adv = x_adv[0].cpu()
        res.wall_s = time.perf_counter() - t0
        results.append(res)
    return results


def strength_summary(passed, threshold: float = DEFAULT_THRESHOLD, alpha: float = 0.05) -> dict:
    """Pass rate of a list of per-point outcomes (bools; None = setup failure, not counted):
    {n, passes, pass_rate, ci_low, ci_high (exact Clopper-Pearson, 1 - alpha), threshold,
    flag (pass_rate < threshold), setup_failures}. With no valid point: rate NaN, flag None
    (not checked, which is not "no flag")."""
    from scipy.stats import binomtest
    vals = [bool(p) for p in passed if p is not None]
    n, k = len(vals), sum(vals)
    out = {"n": n, "passes": k, "threshold": float(threshold),
           "setup_failures": sum(p is None for p in passed)}
    if n == 0:
        out.update(pass_rate=float("nan"), ci_low=float("nan"), ci_high=float("nan"), flag=None)
        return out
    ci = binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="exact")
    out.update(pass_rate=k / n, ci_low=float(ci.low), ci_high=float(ci.high),
               flag=bool(k / n < threshold))
    return out
