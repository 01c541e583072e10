"""Attacks judged on the reported forward, with per-example outcomes and costs.

Every attack here sees one :class:`~attacks.surrogates.JudgedModule` (output = the reported
forward's logits, input-gradient = the surrogate's) and returns an :class:`AttackOutcome`:
per example the final adversarial example (verified to lie in the eps-ball and in [0, 1]), whether
the REPORTED forward classifies it correctly (re-scored after the attack), the reported margin
logit_y - max_{j != y} logit_j, which attacks/settings broke it, and the f_theta evaluations spent.

* :func:`pgd_attack` -- l_inf PGD (Madry et al.) with per-example early stopping.
* :func:`grid_attack` -- the paper's (i, Ka, lambda) grid: per-setting accuracy ("min over means",
  Figs. 3a/5, Table 8) and the per-example worst case; ``mode='efficient'`` stops attacking a
  point once it is broken, ``'full'`` runs every setting on every point, ``'naive'`` mimics the
  reference protocol (separate surrogate and reported solves, no early stop).
* :func:`autoattack_attack` -- APGD-CE, APGD-T, FAB-T, Square from ``pyautoattack`` alone or as
  the standard ensemble (each attack only on the points still robust), per-attack outcomes.
* :func:`torchattacks_attack` -- any ``torchattacks`` attack through the same wrapper.
* :func:`transfer_matrix` -- adversarial examples of each source evaluated on every target.
* :func:`obfuscation_flags` -- the gradient-obfuscation indicators of Athalye/Carlini/Croce.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from model_zoo.forward import prediction_entropy
from model_zoo.scoring import check_labels, predict, safe_margin, score_logits

from .pgd import check_linf_ball
from .surrogates import (GradientSource, JudgedModule, StackedUnrolled, UnrolledIntermediate,
                         grid_settings)

__all__ = ["AttackOutcome", "GridOutcome", "FEvalMeter", "reported_margin", "rescore",
           "pgd_attack", "pgd_attack_steps", "grid_attack", "autoattack_attack", "torchattacks_attack",
           "transfer_matrix", "obfuscation_flags", "AUTOATTACK_NAMES", "AA_STANDARD_BUDGET",
           "setting_name", "derive_seed"]

# "apgd-t-ce": APGD-T with the targeted cross-entropy loss (pyautoattack's 'ce-targeted'),
# towards each of the top wrong classes -- a confident (low-entropy) wrong prediction, the
# adapted objective against the Sec. 3.2 entropy reduction (attacks.adaptive).
AUTOATTACK_NAMES = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab", "apgd-t-ce")
# pyautoattack's version='standard' knobs (Croce & Hein 2020) for l_inf.
AA_STANDARD_BUDGET = {"apgd_n_iter": 100, "apgd_n_restarts": 1, "apgd_t_n_target_classes": 9,
                      "fab_n_iter": 100, "fab_n_target_classes": 9, "square_n_queries": 5000}


def derive_seed(seed: int, *parts) -> int:
    """A stable 63-bit seed from ``seed`` and any labels (same across processes and runs)."""
    h = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2 ** 63 - 1)


def setting_name(source) -> str:
    """Short name of a gradient source, e.g. 'ui(i=3,ka=5,lam=0.5)'."""
    if isinstance(source, UnrolledIntermediate):
        tag = "" if source.preset == "reference" else ",paper"
        return f"ui(i={source.i},ka={source.ka},lam={source.lam:g}{tag})"
    return getattr(source, "name", type(source).__name__)


class FEvalMeter:
    """Attributes f_theta evaluations of a model (its lifetime ``f_evals`` totals, counted in
    samples) to the examples being processed: ``with meter.on(idx): ...`` adds the evaluations
    spent inside the block, split evenly over ``idx``. Non-DEQ models count forward queries
    only (``queries``: calls of the judged module per example)."""

    def __init__(self, model, n: int, device="cpu"):
        self.totals = getattr(model, "f_evals", None)
        self.nograd = torch.zeros(n, dtype=torch.float64)
        self.grad = torch.zeros(n, dtype=torch.float64)
        self.queries = torch.zeros(n, dtype=torch.float64)

    class _Block:
        def __init__(self, meter, idx, queries):
            self.meter, self.idx, self.q = meter, idx.detach().cpu(), queries

        def __enter__(self):
            t = self.meter.totals
            self.start = (t.nograd, t.grad) if t is not None else (0, 0)
            return self

        def __exit__(self, *exc):
            m, t = self.meter, self.meter.totals
            k = max(len(self.idx), 1)
            if t is not None:
                m.nograd[self.idx] += (t.nograd - self.start[0]) / k
                m.grad[self.idx] += (t.grad - self.start[1]) / k
            m.queries[self.idx] += self.q
            return False

    def on(self, idx: Tensor, queries: float = 1.0):
        return FEvalMeter._Block(self, idx, queries)

    def add_rows(self, idx: Tensor, unit: Tensor, nograd: Tensor, grad: Tensor,
                 queries: float = 1.0) -> None:
        """Attribute one call over stacked rows: rows of the same ``unit`` (one grid setting on
        one chunk of examples) share their unit's evaluations evenly, exactly as ``on(idx_unit)``
        around a call on those rows alone would (with per-sample solver decisions a unit's
        total does not depend on what else is in the batch). idx, unit, nograd, grad: (R,);
        within a unit the example indices are distinct."""
        idx, unit = idx.detach().cpu(), unit.detach().cpu()
        nograd, grad = nograd.detach().cpu(), grad.detach().cpu()
        for u in torch.unique(unit).tolist():
            sel = unit == u
            k = max(int(sel.sum()), 1)
            rows = idx[sel]
            if self.totals is not None:
                self.nograd[rows] += _exact_sum(nograd[sel]) / k
                self.grad[rows] += _exact_sum(grad[sel]) / k
            self.queries[rows] += queries

    @property
    def total(self) -> Tensor:
        return self.nograd + self.grad

    @property
    def f_equivalents(self) -> Tensor:
        """nograd + 3 x grad: a forward f with graph plus its backward (~2 F), the convention of
        the reference arithmetic (spec section 7 item 14)."""
        return self.nograd + 3 * self.grad


def _exact_sum(t: Tensor):
    """Sum of per-row counts as a Python number (int for integer counts), so that sum / k is
    the same float as FEvalMeter.on's (totals difference) / k."""
    v = t.sum().item()
    return int(v) if not t.is_floating_point() or float(v).is_integer() else v


def reported_margin(logits: Tensor, y: Tensor) -> Tensor:
    """logit_y - max_{j != y} logit_j (negative = misclassified), float64; -inf for an example
    with a non-finite logit (it is wrong, see :mod:`model_zoo.scoring`)."""
    return safe_margin(logits, y).float()


def _batched_reported(judged: JudgedModule, x: Tensor, batch_size: int) -> Tensor:
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            out.append(judged.reported_logits(x[s:s + batch_size]))
    return torch.cat(out) if out else x.new_zeros(0, 0)


def rescore(judged: JudgedModule, x_adv: Tensor, x: Tensor, y: Tensor, eps: float,
            meter: Optional[FEvalMeter] = None, idx: Optional[Tensor] = None,
            batch_size: int = 256, return_logits: bool = False):
    """Verify the eps-ball and [0, 1] (ValueError on any violation) and judge ``x_adv`` on the
    reported forward. Returns (correct (B,) bool, margin (B,) float[, reported logits])."""
    check_linf_ball(x_adv, x, eps)
    if len(x) == 0:
        empty = (torch.zeros(0, dtype=torch.bool, device=x.device), x.new_zeros(0))
        return empty + (x.new_zeros(0, 0),) if return_logits else empty
    idx = torch.arange(len(x)) if idx is None else idx
    if meter is not None:
        with meter.on(idx):
            logits = _batched_reported(judged, x_adv, batch_size)
    else:
        logits = _batched_reported(judged, x_adv, batch_size)
    out = (score_logits(logits, y)[0], reported_margin(logits, y))
    return out + (logits,) if return_logits else out


@dataclass
class AttackOutcome:
    """Per-example result of one attack (or of a worst case over several).

    x_adv (B, ...) final adversarial examples; correct (B,) bool judged on the reported forward
    at x_adv (clean-misclassified points are never robust); margin (B,) reported margin at x_adv;
    broken_by: per example, the names of the attacks/settings that broke it ('clean' for points
    misclassified without attack); nfev_nograd / nfev_grad (B,) f_theta evaluations spent on each
    example (for library attacks: the batch total split evenly); queries (B,) judged-module
    calls; config: the attack's full configuration (seed, budget label, surrogate, reported).
    """
    name: str
    x_adv: Tensor
    correct: Tensor
    margin: Tensor
    broken_by: list
    nfev_nograd: Tensor
    nfev_grad: Tensor
    queries: Tensor
    config: dict
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(self.correct.double().mean()) if len(self.correct) else float("nan")

    @property
    def nfev(self) -> Tensor:
        return self.nfev_nograd + self.nfev_grad

    @property
    def f_equivalents(self) -> Tensor:
        return self.nfev_nograd + 3 * self.nfev_grad

    def records(self, indices: Optional[Sequence[int]] = None) -> list:
        """One dict per example (the primary record; aggregates are derived from these)."""
        n = len(self.correct)
        indices = list(range(n)) if indices is None else list(indices)
        # margin -inf: the reported logits were non-finite (model_zoo.scoring): wrong, and said so
        return [{"example": int(indices[b]), "attack": self.name,
                 "correct": bool(self.correct[b]), "margin": float(self.margin[b]),
                 "nonfinite": float(self.margin[b]) == float("-inf"),
                 "broken_by": list(self.broken_by[b]),
                 "nfev_nograd": float(self.nfev_nograd[b]), "nfev_grad": float(self.nfev_grad[b]),
                 "queries": float(self.queries[b])} for b in range(n)]


def _outcome(name, x_adv, correct, margin, broken_by, meter, config, t0, extra=None):
    return AttackOutcome(name=name, x_adv=x_adv.detach(), correct=correct.detach().cpu(),
                         margin=margin.detach().float().cpu(), broken_by=broken_by,
                         nfev_nograd=meter.nograd.clone(), nfev_grad=meter.grad.clone(),
                         queries=meter.queries.clone(), config=config,
                         wall_s=time.perf_counter() - t0, extra=extra or {})


def _check_eps(eps, alpha=None, steps=None):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if alpha is not None and (not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"step size alpha must be > 0, got {alpha!r}")
    if steps is not None and (int(steps) != steps or steps < 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")


def _check_xy(model, x, y) -> None:
    """The attacks' input checks (InputError naming the problem): labels an integer tensor of
    one class index per image, in range of the model's classes; images are checked by the
    model itself (dtype, shape, range)."""
    from model_zoo.mdeq import InputError
    if not torch.is_tensor(x):
        raise InputError(f"images must be a torch.Tensor, got {type(x).__name__}")
    check_labels(y, len(x), getattr(model, "num_classes", None))


def _uniform_noise(shape, seed: int, device, dtype) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen).to(device, dtype)


def _clean_correct(judged, x, y, meter, batch_size):
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device), x.new_zeros(0, 1)
    with meter.on(torch.arange(len(x))):
        logits = _batched_reported(judged, x, batch_size)
    return score_logits(logits, y)[0], logits


# ---------------------------------------------------------------------------------------------
# PGD
# ---------------------------------------------------------------------------------------------

def _pgd_core(judged, x, y, eps, alpha, steps, start: Tensor, early_stop: bool,
              meter: FEvalMeter, idx_global: Tensor, surrogate_only: bool = False,
              max_checks: int = 1, on_step=None):
    """PGD iterations from ``start`` on every row; returns the final iterates and a (B,) bool
    of rows stopped early because the reported forward misclassified their current iterate.

    ``surrogate_only=False``: each step calls ``judged`` -- its output IS the reported forward,
    so early stopping is free. ``True`` (the grid): the surrogate runs ALONE (a solve to z[i]
    plus the unroll) instead of with the reported forward's full solve, the loss is CE on the
    surrogate's logits as in the reference, and the reported forward is asked only for rows the
    surrogate misclassifies (a filter deciding where to look; the judge is always the reported
    forward), at most ``max_checks`` times per row: where the surrogate is fooled and the
    reported forward is not (the obfuscation gap of early states), checking every step would
    cost a reported solve per step and undo the saving. Rows never frozen are judged on the
    reported forward at their last iterate by the caller, as the reference judges every row.

    ``on_step(s, x_adv)``, when given, is called after step s = 1..steps (also for the steps
    skipped because every row stopped: the iterates no longer change)."""
    x_adv = start.clone()
    stopped = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    checks = torch.zeros(len(x), dtype=torch.long, device=x.device)
    for s in range(1, steps + 1):
        act = (~stopped).nonzero().flatten()
        if len(act) == 0:
            if on_step is not None:
                for rest in range(s, steps + 1):
                    on_step(rest, x_adv)
            break
        xv = x_adv[act].clone().requires_grad_(True)
        with meter.on(idx_global[act.cpu()]):
            with torch.enable_grad():
                out = (judged.surrogate.logits(judged.model, xv) if surrogate_only
                       else judged(xv))
                loss = F.cross_entropy(out, y[act], reduction="sum")
                (g,) = torch.autograd.grad(loss, xv)
        # a non-finite surrogate gives a NaN gradient: no step for that row (sign(NaN) = NaN
        # would leave the eps-ball); a non-finite output counts as broken (never correct)
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        move = torch.ones(len(act), dtype=torch.bool, device=x.device)
        if early_stop and not surrogate_only:
            broken = ~score_logits(out, y[act])[0]
            stopped[act[broken]] = True
            move = ~broken
        elif early_stop:
            fooled = (~score_logits(out, y[act])[0]
                      & (checks[act] < max_checks)).nonzero().flatten()
            if len(fooled):
                rows = act[fooled]
                checks[rows] += 1
                with meter.on(idx_global[rows.cpu()]):
                    r = judged.reported_logits(x_adv[rows])
                broken = ~score_logits(r, y[rows])[0]
                stopped[rows[broken]] = True
                move[fooled[broken]] = False
        a = act[move]
        step = x_adv[a] + alpha * g[move].sign()
        x_adv[a] = torch.min(torch.max(step, x[a] - eps), x[a] + eps).clamp(0, 1)
        if on_step is not None:
            on_step(s, x_adv)
    return x_adv, stopped


def pgd_attack(judged: JudgedModule, x: Tensor, y: Tensor, eps: float, alpha: float,
               steps: int = 10, random_start: bool = True, seed: int = 0,
               early_stop: bool = True, clean_correct: Optional[Tensor] = None,
               batch_size: int = 256, name: str = "pgd", budget: str = "standard",
               check: str = "every_step") -> AttackOutcome:
    """l_inf PGD on ``judged``: ``steps`` steps x <- clip(Proj_eps(x + alpha sign(grad CE))) from a
    uniform random start (noise drawn for the whole of ``x`` from ``seed``, so internal batching
    and early stopping do not change any example's start; a different ``x`` gives other starts).

    ``early_stop``: a point whose current iterate the reported forward misclassifies is frozen
    there (its adversarial example); otherwise PGD returns the last iterate. Either way the
    returned examples are checked and re-scored on the reported forward.

    ``check``: 'every_step' -- the module's output (the reported forward) judges every iterate;
    'when_fooled' -- the surrogate runs alone and the reported forward is asked only where the
    surrogate misclassifies (the grid's cheaper policy, :func:`_pgd_core`).
    """
    return pgd_attack_steps(judged, x, y, eps, alpha, (steps,), random_start, seed, early_stop,
                            clean_correct, batch_size, name, budget, check)[steps]


def pgd_attack_steps(judged: JudgedModule, x: Tensor, y: Tensor, eps: float, alpha: float,
                     steps=(10, 20), random_start: bool = True, seed: int = 0,
                     early_stop: bool = True, clean_correct: Optional[Tensor] = None,
                     batch_size: int = 256, name: str = "pgd", budget: str = "standard",
                     check: str = "every_step") -> dict:
    """PGD with several step counts from ONE run: ``{k: outcome of pgd_attack(..., steps=k)}``
    for every k of ``steps``. PGD-k is PGD-K (K = max) stopped after k steps -- same seed, same
    start, same iterates -- so the run to K snapshots its iterates (and f-evaluation counts)
    after k steps and re-scores them on the reported forward, instead of re-running the first k
    steps (the obfuscation check "PGD-2k vs PGD-k" costs 2k steps instead of 3k). Each
    outcome's ``nfev_*`` and config are those of the k-step attack alone."""
    if not len(steps):
        raise ValueError("steps must name at least one step count")
    for k in steps:
        _check_eps(eps, alpha, k)
    ks = sorted(set(int(k) for k in steps))
    if check not in ("every_step", "when_fooled"):
        raise ValueError(f"check must be 'every_step' or 'when_fooled', got {check!r}")
    surrogate_only = check == "when_fooled" and judged.is_deq and judged.surrogate is not None
    _check_xy(judged.model, x, y)
    t0 = time.perf_counter()
    x, y = x.detach(), y.detach()
    n = len(x)
    meter = FEvalMeter(judged.model, n)
    if clean_correct is None:
        clean_correct, _ = _clean_correct(judged, x, y, meter, batch_size)
    noise = _uniform_noise(x.shape, seed, x.device, x.dtype)
    start = (x + (2 * noise - 1) * eps).clamp(0, 1) if random_start else x.clone()
    todo = clean_correct.nonzero().flatten()
    # per step count k: the iterates after k steps and each row's f-evaluations so far (rows
    # not attacked keep the clean forward's), filled batch by batch by _pgd_core's on_step
    wall0 = time.perf_counter() - t0
    snaps = {}
    for k in ks:
        m = FEvalMeter(judged.model, n)
        m.nograd, m.grad, m.queries = (meter.nograd.clone(), meter.grad.clone(),
                                       meter.queries.clone())
        snaps[k] = {"x": x.clone(), "meter": m, "wall": wall0}
        if k == 0:
            snaps[k]["x"][todo] = start[todo]
    for s0 in range(0, len(todo), batch_size):
        b = todo[s0:s0 + batch_size]
        tb = time.perf_counter()

        def on_step(s, xa, b=b, tb=tb):
            if s in snaps:
                snap, bc = snaps[s], b.cpu()
                snap["x"][b] = xa
                snap["wall"] += time.perf_counter() - tb
                for f in ("nograd", "grad", "queries"):
                    getattr(snap["meter"], f)[bc] = getattr(meter, f)[bc]

        xa, _ = _pgd_core(judged, x[b], y[b], eps, alpha, ks[-1], start[b], early_stop, meter,
                          b.cpu(), surrogate_only=surrogate_only, on_step=on_step)
        snaps[ks[-1]]["x"][b] = xa  # the final iterates as returned (== the last snapshot)
    out = {}
    for k in ks:
        snap, m = snaps[k], snaps[k]["meter"]
        t1 = time.perf_counter()
        correct, margin = rescore(judged, snap["x"], x, y, eps, m, batch_size=batch_size)
        correct &= clean_correct
        broken_by = [[] if c else (["clean"] if not cc else [name])
                     for c, cc in zip(correct.tolist(), clean_correct.tolist())]
        config = {"attack": "pgd", "norm": "Linf", "eps": eps, "alpha": alpha, "steps": k,
                  "random_start": random_start, "seed": seed, "early_stop": early_stop,
                  "check": check, "budget": budget, **judged.config()}
        o = _outcome(name, snap["x"], correct, margin, broken_by, m, config, t1)
        o.wall_s += snap["wall"]
        out[k] = o
    return out


# ---------------------------------------------------------------------------------------------
# The (i, Ka, lambda) grid
# ---------------------------------------------------------------------------------------------

@dataclass
class GridOutcome:
    """The grid: ``per_setting[s]`` (B,) int8: 1 robust, 0 broken, -1 not attacked (efficient
    mode skips points already broken); ``worst`` the per-example worst case over all settings
    (an AttackOutcome whose broken_by lists the settings that broke each point).

    ``entropy[s]`` (B,) float: the prediction entropy H (Eq. 6) of the reported forward at
    setting s's adversarial example (NaN where not attacked; the clean input's for
    clean-misclassified points, which are not attacked); ``clean_entropy`` (B,): at the clean
    input -- the two sides of the paper's Eqs. (12)-(13) per grid attack (Tables 6-7)."""
    settings: list
    per_setting: Tensor
    worst: AttackOutcome
    mode: str
    entropy: Optional[Tensor] = None
    clean_entropy: Optional[Tensor] = None
    stacked: bool = False  # settings sharing i ran as one batch (grid_attack's stack option)

    @property
    def setting_accuracy(self) -> Optional[list]:
        """Per-setting accuracy (the paper's figures/tables); None in efficient mode."""
        if (self.per_setting < 0).any():
            return None
        return self.per_setting.double().mean(1).tolist()

    @property
    def min_over_means(self) -> Optional[float]:
        acc = self.setting_accuracy
        return None if acc is None else min(acc)

    @property
    def worst_case_accuracy(self) -> float:
        return self.worst.accuracy


# Default bound on one stacked grid batch, in state elements (rows x the model's state size):
# the unroll's autograd graph grows with it. 2**21 = 594 rows of the tiny Fashion-MNIST DEQ
# (state 3,528), whose 18-setting i-groups at batch 64 then run as 2 stacks of 9 x 64 rows
# (peak RSS: benchmark/bench_grid_stack.py); a model with a large state falls back to stacks
# of one setting x ``batch_size`` rows, the per-setting loop's own batch (never more memory).
GRID_STACK_ELEMENTS = 2 ** 21


def _default_stack_rows(model, x: Tensor, batch_size: int) -> int:
    state = model.zero_state(x[:1]).numel() if len(x) else GRID_STACK_ELEMENTS
    return max(int(batch_size), GRID_STACK_ELEMENTS // max(int(state), 1))


def _stackable(model, settings, reported=None) -> bool:
    """Stacking settings into one batch leaves every row's numbers unchanged only when rows are
    independent: per-sample solver decisions and no dropout masks drawn per batch. The
    reported forward must be a plain solve (FinalState / EarlyState, whose records carry every
    f-evaluation per row): test-time defenses (Sec. 3.2) keep the per-setting loop, untested."""
    from model_zoo.forward import EarlyState, FinalState
    rep = reported if reported is not None else getattr(model, "defense", None)
    return (all(type(s) is UnrolledIntermediate for s in settings)
            and type(rep) in (FinalState, EarlyState)
            and getattr(model.solver, "decisions", "sample") == "sample"
            and not getattr(model, "training", False)
            and not getattr(model.solver, "keep_graph", False))


def _reported_counted(judged: JudgedModule, x: Tensor, batch_size: int):
    """The reported forward on x (no gradient) in batches of ``batch_size``: logits (B, C) and
    per-row f_theta evaluations (nograd (B,), grad (B,)) from its records. Evaluations the
    records do not show (the model's totals moved by more) are spread evenly over the rows."""
    model = judged.model
    t = model.f_evals
    n0, g0 = t.nograd, t.grad
    logits, ng, gr = [], [], []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            rec = model.run(x[s:s + batch_size].detach(), defense=judged.reported)
            logits.append(rec.logits)
            ng.append(rec.nfev_nograd.detach().cpu().long())
            gr.append(rec.nfev_grad.detach().cpu().long())
    ng, gr = torch.cat(ng), torch.cat(gr)
    dn, dg = (t.nograd - n0) - int(ng.sum()), (t.grad - g0) - int(gr.sum())
    if dn or dg:
        ng, gr = ng + dn / len(x), gr + dg / len(x)
    return torch.cat(logits), ng, gr


def _pgd_core_stacked(model, base: JudgedModule, i: int, preset: str, ka: Tensor, lam: Tensor,
                      unit: Tensor, x, y, eps, alpha, steps, start: Tensor, early_stop: bool,
                      meter: FEvalMeter, idx_global: Tensor, max_checks: int = 1,
                      skip_last_f: bool = False):
    """:func:`_pgd_core` with ``surrogate_only=True`` on stacked rows (setting x example) of
    settings that share i (``i`` an int; or a LongTensor (R,) of per-row i for stacks across
    i): row r attacks with ``UnrolledIntermediate(i[r], ka[r], lam[r])``.
    Every per-row rule is _pgd_core's -- its own iterate, early stop and ``max_checks`` --
    so each row takes the iterates it would take in its own setting's batch; one surrogate
    call (and one reported call for the fooled rows) per step serves all settings.
    ``unit`` (R,): the (setting, example chunk) of each row, for the f-eval attribution."""
    x_adv = start.clone()
    R = len(x)
    stopped = torch.zeros(R, dtype=torch.bool, device=x.device)
    checks = torch.zeros(R, dtype=torch.long, device=x.device)
    for _ in range(1, steps + 1):
        act = (~stopped).nonzero().flatten()
        if len(act) == 0:
            break
        ac = act.cpu()
        src = StackedUnrolled(i if isinstance(i, int) else i[ac], ka[ac], lam[ac], preset,
                              skip_last_f=skip_last_f)
        xv = x_adv[act].clone().requires_grad_(True)
        with torch.enable_grad():
            out = src.logits(model, xv)
            loss = F.cross_entropy(out, y[act], reduction="sum")
            (g,) = torch.autograd.grad(loss, xv)
        meter.add_rows(idx_global[ac], unit[ac], *src.last_counts)
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        move = torch.ones(len(act), dtype=torch.bool, device=x.device)
        if early_stop:
            fooled = (~score_logits(out, y[act])[0]
                      & (checks[act] < max_checks)).nonzero().flatten()
            if len(fooled):
                rows = act[fooled]
                checks[rows] += 1
                r, ng, gr = _reported_counted(base, x_adv[rows], max(len(rows), 1))
                meter.add_rows(idx_global[rows.cpu()], unit[rows.cpu()], ng, gr)
                broken = ~score_logits(r, y[rows])[0]
                stopped[rows[broken]] = True
                move[fooled[broken]] = False
        a = act[move]
        step = x_adv[a] + alpha * g[move].sign()
        x_adv[a] = torch.min(torch.max(step, x[a] - eps), x[a] + eps).clamp(0, 1)
    return x_adv, stopped


def _grid_stacked(model, base, settings, x, y, eps, alpha, steps, starts, mode, meter, todo,
                  batch_size, stack_rows, skip_last_f, on_result, bar, across_i=False):
    """Run the settings of ``settings`` that share (i, preset) -- with ``across_i``: that
    share the preset, sorted by (i, Ka) -- as stacked batches of whole (setting, example
    chunk) units -- the chunks of ``todo`` by ``batch_size`` that the per-setting loop uses --
    of at most ``stack_rows`` rows (at least one unit), and report each unit's results as
    ``on_result(si, b, x_adv, correct, margin, logits)``."""
    groups = {}
    for si, s in enumerate(settings):
        groups.setdefault((None if across_i else s.i, s.preset), []).append(si)
    if across_i:
        for key in groups:
            groups[key].sort(key=lambda si: (settings[si].i, settings[si].ka, si))
    chunks = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
    for (i, preset), members in groups.items():
        for b in chunks:
            per_stack = max(1, stack_rows // max(len(b), 1))
            n_stacks = -(-len(members) // per_stack)
            per_stack = -(-len(members) // n_stacks)  # equal stacks: 18 -> 9 + 9, not 16 + 2
            for k in range(0, len(members), per_stack):
                units = members[k:k + per_stack]
                bc = b.cpu()
                xs = x[b].repeat(len(units), *([1] * (x.dim() - 1)))
                ys = y[b].repeat(len(units))
                st = torch.cat([starts(si)[b] for si in units])
                ka = torch.tensor([settings[si].ka for si in units]).repeat_interleave(len(b))
                lam = torch.tensor([settings[si].lam for si in units],
                                   dtype=torch.float64).repeat_interleave(len(b))
                unit = torch.arange(len(units)).repeat_interleave(len(b))
                gidx = bc.repeat(len(units))
                iu = sorted({settings[si].i for si in units})
                i_rows = iu[0] if len(iu) == 1 else torch.tensor(
                    [settings[si].i for si in units]).repeat_interleave(len(b))
                xa, _ = _pgd_core_stacked(model, base, i_rows, preset, ka, lam, unit, xs, ys, eps,
                                          alpha, steps, st, mode != "naive", meter, gidx,
                                          skip_last_f=skip_last_f)
                check_linf_ball(xa, xs, eps)
                lg, ng, gr = _reported_counted(base, xa, batch_size)
                meter.add_rows(gidx, unit, ng, gr)
                c, m = score_logits(lg, ys)[0], reported_margin(lg, ys)
                if mode == "naive":  # the reference re-evaluates the clean inputs every setting
                    lc, ng, gr = _reported_counted(base, xs, max(len(xs), 1))
                    meter.add_rows(gidx, unit, ng, gr)
                    c = c & score_logits(lc, ys)[0]
                for u, si in enumerate(units):
                    r = slice(u * len(b), (u + 1) * len(b))
                    on_result(si, b, xa[r], c[r], m[r], lg[r])
                if bar is not None:
                    bar.update(len(units) / len(chunks))


def grid_attack(model, reported, x: Tensor, y: Tensor, eps: float, alpha: float,
                steps: int = 10, settings: Optional[Sequence[GradientSource]] = None,
                mode: str = "efficient", seed: int = 0, random_start: bool = True,
                batch_size: int = 256, progress: bool = False, budget: str = "standard",
                stack: bool = True, stack_rows: Optional[int] = None,
                skip_last_f: bool = False) -> GridOutcome:
    """PGD-``steps`` with every gradient source in ``settings`` (default: the paper's 144
    (i, Ka, lambda) settings for the model's N), judged on ``reported``.

    mode: 'efficient' -- stop attacking a point once any setting (or any PGD iterate) breaks it;
    'full' -- every setting on every clean-correct point (early stop within PGD only; per-setting
    tables); 'naive' -- the reference protocol (spec section 7 item 14): PGD on the surrogate
    alone with no early stop, then the reported forward on the clean and on the last adversarial
    input of every point, for every setting. Random starts depend only on (seed, setting,
    example), so all modes take the same iterates; 'efficient' and 'full' also ask the reported
    forward during PGD where the surrogate is fooled and freeze a point the reported forward
    misclassifies (see :func:`_pgd_core`) -- so every point the reference protocol
    breaks is broken here too. PGD's loss is cross-entropy on the SURROGATE's logits, as in
    the reference (the straight-through module of :func:`pgd_attack` weights the surrogate's
    gradient by the reported forward's softmax instead).

    ``stack='i'`` (modes 'full' and 'naive'): the settings sharing (i, preset) run as ONE
    batch of rows (setting x example, at most ``stack_rows`` rows; default
    ``GRID_STACK_ELEMENTS`` state elements, at least ``batch_size`` rows) through
    :class:`~attacks.surrogates.StackedUnrolled` -- one no-grad solve to z[i] and one unroll
    (each row stopping after its own Ka) per PGD step for all of them. Every row keeps its own
    random start, iterates, early stop and check budget, and each setting's f-evaluations are
    attributed to its examples as in the per-setting loop, so all records are the same
    (to the last bits of batched kernels; tests/test_grid_stacking.py). 'efficient' mode is
    never stacked: which points a setting attacks depends on every earlier setting's result.
    ``stack=True`` (default; alias ``'all'``): stacks across i too, units sorted by (i, Ka)
    -- one solve to the stack's largest i in which each row leaves at its own i, with the same
    f-evaluations (:func:`attacks.surrogates._solve_to_rows`); measured 1.51x the per-setting
    loop on the demo's 32 settings ('i' alone: 1.25x; benchmark/bench_grid_stack.py).
    ``stack=False``, or settings/models whose rows are not independent (see
    :func:`_stackable`), run the per-setting loop. ``skip_last_f=True``: skip the solver's
    unused f(z[i]) in every surrogate call (same iterates, fewer counted evaluations; see
    :func:`attacks.surrogates._solve_to`).
    """
    if mode not in ("efficient", "full", "naive"):
        raise ValueError(f"mode must be 'efficient', 'full' or 'naive', got {mode!r}")
    _check_eps(eps, alpha, steps)
    if settings is None:
        settings = grid_settings(model.solver.max_iter)
    settings = list(settings)
    if not settings:
        raise ValueError("empty settings list")
    for s in settings:
        if isinstance(s, UnrolledIntermediate):
            s.check(model)
    _check_xy(model, x, y)
    t0 = time.perf_counter()
    x, y = x.detach(), y.detach()
    n, S = len(x), len(settings)
    meter = FEvalMeter(model, n)
    base = JudgedModule(model, reported)
    clean_correct, clean_logits = _clean_correct(base, x, y, meter, batch_size)
    per = torch.full((S, n), -1, dtype=torch.int8)
    per[:, ~clean_correct.cpu()] = 0
    clean_h = _entropy(clean_logits)
    ent = torch.full((S, n), float("nan"))
    ent[:, ~clean_correct.cpu()] = clean_h[~clean_correct.cpu()]
    margin = torch.full((n,), float("inf"))
    x_adv = x.clone()
    robust = clean_correct.clone()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=S, desc=f"grid ({mode})", leave=False)
    if stack_rows is None:
        stack_rows = _default_stack_rows(model, x, batch_size)
    if isinstance(stack_rows, bool) or int(stack_rows) != stack_rows or stack_rows < 1:
        raise ValueError(f"stack_rows must be an integer >= 1, got {stack_rows!r}")
    if stack not in (True, False, "i", "all"):
        raise ValueError(f"stack must be True/'all' (stacks across i), 'i' (only settings "
                         f"sharing i) or False (per-setting loop), got {stack!r}")
    stacked = bool(stack) and mode != "efficient" and _stackable(model, settings, reported)
    if stacked:
        x_adv, robust = _grid_run_stacked(model, base, settings, x, y, eps, alpha, steps, seed,
                                          random_start, mode, meter, clean_correct, per, ent,
                                          batch_size, int(stack_rows), skip_last_f, bar,
                                          across_i=stack != "i")
    for si, src in enumerate(settings if not stacked else []):
        if skip_last_f and type(src) is UnrolledIntermediate:
            src = UnrolledIntermediate(src.i, src.ka, src.lam, src.preset, skip_last_f=True)
        judged = JudgedModule(model, reported, src, fused=mode != "naive")
        todo = (robust if mode == "efficient" else clean_correct).nonzero().flatten()
        # the random start depends on (seed, setting), not on the setting's position in the list
        noise = _uniform_noise(x.shape, derive_seed(seed, "grid", setting_name(src)), x.device,
                               x.dtype)
        start = (x + (2 * noise - 1) * eps).clamp(0, 1) if random_start else x.clone()
        for s in range(0, len(todo), batch_size):
            b = todo[s:s + batch_size]
            xa, _ = _pgd_core(judged, x[b], y[b], eps, alpha, steps, start[b],
                              mode != "naive", meter, b.cpu(), surrogate_only=True)
            c, m, lg = rescore(judged, xa, x[b], y[b], eps, meter, b.cpu(), batch_size,
                               return_logits=True)
            ent[si, b.cpu()] = _entropy(lg)
            if mode == "naive":  # the reference re-evaluates the clean inputs for every setting
                with meter.on(b.cpu()):
                    c &= score_logits(judged.reported_logits(x[b]), y[b])[0]
            per[si, b.cpu()] = c.to(torch.int8).cpu()
            bc = b.cpu()
            mc, mm = margin[bc], m.cpu().float()
            was = robust[b].cpu()
            # x_adv of a point: the first setting that broke it; while robust, its lowest margin
            upd = (was & ~c.cpu()) | (was & c.cpu() & (mm < mc))
            x_adv[b[upd.to(b.device)]] = xa[upd.to(xa.device)]
            margin[bc] = torch.where(upd, mm, mc)
            robust[b] &= c
        if bar is not None:
            bar.update(1)
            bar.set_postfix(robust=f"{float(robust.double().mean()):.3f}")
    if bar is not None:
        bar.close()
    # Re-score the per-example worst-case adversarial examples (the lowest-margin one for points
    # still robust, the first breaking one otherwise) on the reported forward.
    correct, final_margin = rescore(base, x_adv, x, y, eps, meter, batch_size=batch_size)
    if bool((correct & ~robust).any()):
        # A point broken during the grid but correct when re-scored: nondeterministic forward.
        raise RuntimeError("re-scoring the worst-case adversarial examples disagrees with the "
                           "grid's judgement: the reported forward is not deterministic")
    correct &= robust
    names = [setting_name(s) for s in settings]
    broken_by = []
    for b in range(n):
        if not bool(clean_correct[b]):
            broken_by.append(["clean"])
        else:
            broken_by.append([names[si] for si in range(S) if per[si, b] == 0])
    config = {"attack": "grid", "mode": mode, "norm": "Linf", "eps": eps, "alpha": alpha,
              "steps": steps, "random_start": random_start, "seed": seed, "budget": budget,
              "check": "last_iterate" if mode == "naive" else "when_fooled",
              "settings": [s.config() for s in settings], **base.config()}
    worst = _outcome(f"grid_{mode}", x_adv, correct, final_margin, broken_by, meter, config, t0)
    return GridOutcome(settings=names, per_setting=per, worst=worst, mode=mode, entropy=ent,
                       clean_entropy=clean_h, stacked=stacked)


def _grid_run_stacked(model, base, settings, x, y, eps, alpha, steps, seed, random_start, mode,
                      meter, clean_correct, per, ent, batch_size, stack_rows, skip_last_f, bar,
                      across_i=False):
    """The stacked path of :func:`grid_attack` (modes 'full' and 'naive'); fills ``per`` and
    ``ent`` and returns (x_adv, robust). Units finish in stacking order, not list order, so the
    per-example worst case is merged order-free into what the list-order loop keeps: the
    breaking example of the FIRST setting (in list order) that broke the point, else the
    lowest-margin example (the first setting on ties)."""
    n, S = len(x), len(settings)
    brk_si = torch.full((n,), S, dtype=torch.long)
    rob_si = torch.full((n,), S, dtype=torch.long)
    rob_m = torch.full((n,), float("inf"))
    x_brk, x_rob = x.clone(), x.clone()
    robust = clean_correct.clone()

    def starts(si):
        if not random_start:
            return x
        noise = _uniform_noise(x.shape, derive_seed(seed, "grid", setting_name(settings[si])),
                               x.device, x.dtype)
        return (x + (2 * noise - 1) * eps).clamp(0, 1)

    def on_result(si, b, xa, c, m, lg):
        bc = b.cpu()
        ent[si, bc] = _entropy(lg)
        per[si, bc] = c.to(torch.int8).cpu()
        cc, mm = c.cpu(), m.cpu().float()
        first = ~cc & (si < brk_si[bc])
        brk_si[bc[first]] = si
        x_brk[b[first.to(b.device)]] = xa[first.to(xa.device)]
        lower = cc & ((mm < rob_m[bc]) | ((mm == rob_m[bc]) & (si < rob_si[bc])))
        rob_si[bc[lower]] = si
        rob_m[bc[lower]] = mm[lower]
        x_rob[b[lower.to(b.device)]] = xa[lower.to(xa.device)]
        robust[b] &= c

    todo = clean_correct.nonzero().flatten()
    _grid_stacked(model, base, settings, x, y, eps, alpha, steps, _StartCache(starts), mode,
                  meter, todo, batch_size, stack_rows, skip_last_f, on_result, bar,
                  across_i=across_i)
    was_broken = (brk_si < S).to(x.device)
    x_adv = torch.where(was_broken.view(-1, *([1] * (x.dim() - 1))), x_brk, x_rob)
    return x_adv, robust


class _StartCache:
    """Per-setting random starts (built from the setting's seed over the whole batch, as the
    per-setting loop does), cached while a stack uses them."""

    def __init__(self, build, keep: int = 32):
        self.build, self.keep, self.store = build, keep, {}

    def __call__(self, si):
        if si not in self.store:
            if len(self.store) >= self.keep:
                self.store.pop(next(iter(self.store)))
            self.store[si] = self.build(si)
        return self.store[si]


def _entropy(logits: Tensor) -> Tensor:
    """Prediction entropy (Eq. 6) of logits, as float32 on the CPU."""
    return prediction_entropy(logits.float()).cpu()


# ---------------------------------------------------------------------------------------------
# AutoAttack (pyautoattack) and torchattacks
# ---------------------------------------------------------------------------------------------

def _autoattack_runner(judged, eps, seed, budget: dict, device):
    from pyautoattack import AutoAttack  # the maintained AutoAttack package (import name differs)

    aa = AutoAttack(judged, norm="Linf", eps=eps, version="standard", seed=seed, device=device)
    aa.apgd.n_iter = budget["apgd_n_iter"]
    aa.apgd.n_restarts = budget["apgd_n_restarts"]
    aa.apgd_targeted.n_iter = budget["apgd_n_iter"]
    aa.apgd_targeted.n_target_classes = budget["apgd_t_n_target_classes"]
    aa.fab.n_iter = budget["fab_n_iter"]
    aa.fab.n_target_classes = budget["fab_n_target_classes"]
    aa.square.n_queries = budget["square_n_queries"]
    aa.apgd.verbose = aa.apgd_targeted.verbose = aa.fab.verbose = aa.square.verbose = False

    def run(name, xb, yb):
        # The same dispatch as AutoAttack.run_standard_evaluation, without its input checks
        # (they cost 5+ forwards per call and trace the process) and with OUR success judgement.
        if name in ("apgd-ce", "apgd-dlr"):
            aa.apgd.loss = "ce" if name == "apgd-ce" else "dlr"
            aa.apgd.seed = seed
            return aa.apgd.perturb(xb, yb)
        if name == "apgd-t":
            aa.apgd_targeted.seed = seed
            return aa.apgd_targeted.perturb(xb, yb)
        if name == "apgd-t-ce":
            return _apgd_targeted_ce(aa.apgd_targeted, xb, yb, seed)
        if name in ("fab", "fab-t"):
            aa.fab.targeted = name == "fab-t"
            aa.fab.n_restarts = 1
            aa.fab.seed = seed
            return aa.fab.perturb(xb, yb)
        if name == "square":
            aa.square.seed = seed
            return aa.square.perturb(xb, yb)
        raise ValueError(name)
    return run


def _apgd_targeted_ce(atk, x: Tensor, y: Tensor, seed: int) -> Tensor:
    """APGD-T's loop (pyautoattack ``APGDAttack_targeted.perturb``: target = the k-th highest
    other logit, k = 2 .. n_target_classes + 1, each on the points still correct) with the
    library's 'ce-targeted' loss; its ``perturb`` accepts only 'dlr-targeted', so the loop is
    repeated here around the library's ``attack_single_run``."""
    atk.init_hyperparam(x)
    x = x.detach().clone().float()
    with torch.no_grad():
        acc = atk.model(x).argmax(1) == y
    adv = x.clone()
    saved = atk.loss
    atk.loss = "ce-targeted"
    torch.random.manual_seed(seed)
    try:
        for tc in range(2, atk.n_target_classes + 2):
            idx = acc.nonzero().flatten()
            if not len(idx):
                break
            with torch.no_grad():
                out = atk.model(x[idx])
            atk.y_target = out.sort(dim=1)[1][:, -tc]
            _, acc_c, _, adv_c = atk.attack_single_run(x[idx].clone(), y[idx].clone())
            hit = (acc_c == 0).nonzero().flatten()
            acc[idx[hit]] = False
            adv[idx[hit]] = adv_c[hit].clone()
    finally:
        atk.loss = saved
    return adv


def autoattack_attack(judged: JudgedModule, x: Tensor, y: Tensor, eps: float,
                      attacks: Sequence[str] = ("apgd-ce", "apgd-t", "fab-t", "square"),
                      budget: Optional[dict] = None, seed: int = 0, batch_size: int = 256,
                      ensemble: bool = True, progress: bool = False) -> AttackOutcome:
    """AutoAttack's attacks (pyautoattack) on ``judged``.

    ``ensemble=True``: the standard sequence -- each attack runs only on the points every earlier
    attack left robust (judged on the reported forward after each attack); ``False``: each attack
    on every clean-correct point (per-attack robust accuracy, ``extra['per_attack']``).
    ``budget``: knobs of :data:`AA_STANDARD_BUDGET`; any change labels the record 'reduced'.
    Returns the worst case over the attacks; ``broken_by`` names the attack(s) that broke a point;
    ``extra['members']`` {attack: {row: (correct, margin)}}: each attack's own result on the rows
    (positions in ``x``) it ran on, judged on the reported forward at that attack's output;
    ``extra['first_x_adv']``: the first attack's output on every row it ran on (every
    clean-correct point), the clean input elsewhere -- with ``ensemble`` it is that attack run
    alone (Table 4's APGD-CE at the same gradient reuses it: benchmark/suite/top_settings.py).
    """
    _check_eps(eps)
    attacks = list(attacks)
    bad = [a for a in attacks if a not in AUTOATTACK_NAMES]
    if bad or not attacks:
        raise ValueError(f"unknown AutoAttack attack(s) {bad}; choose from {list(AUTOATTACK_NAMES)}")
    full_budget = dict(AA_STANDARD_BUDGET)
    for k, v in (budget or {}).items():
        if k not in full_budget:
            raise ValueError(f"unknown AutoAttack budget key {k!r}; known: {sorted(full_budget)}")
        if int(v) != v or v < 1:
            raise ValueError(f"AutoAttack budget {k} must be a positive integer, got {v!r}")
        full_budget[k] = int(v)
    label = "standard" if full_budget == AA_STANDARD_BUDGET else "reduced"
    _check_xy(judged.model, x, y)
    t0 = time.perf_counter()
    x, y = x.detach(), y.detach()
    n = len(x)
    judged.eval()
    meter = FEvalMeter(judged.model, n)
    clean_correct, clean_logits = _clean_correct(judged, x, y, meter, batch_size)
    run = _autoattack_runner(judged, eps, seed, full_budget, x.device)
    robust = clean_correct.clone()
    x_adv = x.clone()
    margin = reported_margin(clean_logits.float(), y).cpu()
    broken_by = [[] if c else ["clean"] for c in clean_correct.tolist()]
    per_attack = {}
    # each member's own outcome on the points it ran on: {name: {row: (correct, margin)}} at
    # the member's output, judged on the reported forward (benchmark.suite.checks reuses the
    # ensemble's Square on those points instead of running Square there again)
    members = {}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(attacks), desc="autoattack", leave=False)
    first_x_adv = x.clone()
    for name in attacks:
        todo = (robust if ensemble else clean_correct).nonzero().flatten()
        acc_att = clean_correct.clone()
        mine = members.setdefault(name, {})
        for s in range(0, len(todo), batch_size):
            b = todo[s:s + batch_size]
            rows0 = judged.rows
            with meter.on(b.cpu(), queries=0.0):
                xa = run(name, x[b].clone(), y[b].clone()).detach()
            meter.queries[b.cpu()] += (judged.rows - rows0) / max(len(b), 1)
            c, m = rescore(judged, xa, x[b], y[b], eps, meter, b.cpu(), batch_size)
            if name == attacks[0]:
                first_x_adv[b] = xa
            acc_att[b] = c
            for j, (cj, mj) in enumerate(zip(c.tolist(), m.tolist())):
                mine[int(b[j])] = (bool(cj), float(mj))
            for j in (~c).nonzero().flatten().tolist():
                broken_by[int(b[j])].append(name)
            upd = robust[b] & (~c | (m.to(margin.device) < margin[b.cpu()]).to(c.device))
            x_adv[b[upd]] = xa[upd]
            margin[b.cpu()] = torch.where(upd.cpu(), m.cpu(), margin[b.cpu()])
            robust[b] &= c
        per_attack[name] = float(acc_att.double().mean()) if ensemble is False else \
            float(robust.double().mean())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    correct, final_margin = rescore(judged, x_adv, x, y, eps, meter, batch_size=batch_size)
    correct &= robust
    judged.eval()
    config = {"attack": "autoattack", "attacks": attacks, "ensemble": ensemble, "norm": "Linf",
              "eps": eps, "seed": seed, "budget": label, "budget_knobs": full_budget,
              "library": "pyautoattack", **judged.config()}
    key = "per_attack" if not ensemble else "cumulative"
    return _outcome("autoattack" if ensemble else "autoattack_individual", x_adv, correct,
                    final_margin, broken_by, meter, config, t0,
                    {key: per_attack, "members": members, "first_x_adv": first_x_adv})


def torchattacks_attack(judged: JudgedModule, x: Tensor, y: Tensor, eps: float, name: str,
                        seed: int = 0, batch_size: int = 256, **kwargs) -> AttackOutcome:
    """Any ``torchattacks`` attack class (e.g. 'PGD', 'APGD', 'Square', 'EOTPGD') built on
    ``judged`` with ``eps`` and ``kwargs``; outcomes judged on the reported forward."""
    import torchattacks

    _check_eps(eps)
    cls = getattr(torchattacks, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, torchattacks.attack.Attack):
        raise ValueError(f"unknown torchattacks attack {name!r}")
    _check_xy(judged.model, x, y)
    t0 = time.perf_counter()
    x, y = x.detach(), y.detach()
    judged.eval()
    meter = FEvalMeter(judged.model, len(x))
    clean_correct, _ = _clean_correct(judged, x, y, meter, batch_size)
    atk = cls(judged, eps=eps, **kwargs)
    atk.set_model_training_mode(model_training=False)
    x_adv = x.clone()
    todo = clean_correct.nonzero().flatten()
    torch.manual_seed(seed)  # torchattacks draws its random starts from the global generator
    for s in range(0, len(todo), batch_size):
        b = todo[s:s + batch_size]
        rows0 = judged.rows
        with meter.on(b.cpu(), queries=0.0):
            x_adv[b] = atk(x[b], y[b]).detach()
        meter.queries[b.cpu()] += (judged.rows - rows0) / max(len(b), 1)
        judged.eval()  # torchattacks 3.5.1 may leave the model in train mode (library-facts)
    correct, margin = rescore(judged, x_adv, x, y, eps, meter, batch_size=batch_size)
    correct &= clean_correct
    label = f"torchattacks.{name}"
    broken_by = [[] if c else (["clean"] if not cc else [label])
                 for c, cc in zip(correct.tolist(), clean_correct.tolist())]
    config = {"attack": label, "eps": eps, "seed": seed, "kwargs": dict(kwargs),
              "library": "torchattacks", **judged.config()}
    return _outcome(label, x_adv, correct, margin, broken_by, meter, config, t0)


# ---------------------------------------------------------------------------------------------
# Transfer
# ---------------------------------------------------------------------------------------------

def transfer_matrix(sources: dict, targets: dict, x: Tensor, y: Tensor, eps: float,
                    batch_size: int = 256):
    """Adversarial examples crafted on each source, evaluated on every target.

    sources: {name: AttackOutcome or callable(x, y) -> AttackOutcome}; targets: {name:
    JudgedModule} (only the reported forward is used). Returns (accuracy {src: {tgt: acc}},
    per-example {src: {tgt: (B,) bool}}). A target counts a point robust only if it classifies
    both the clean input and the source's adversarial example correctly, so when source and
    target are the same (model, defense), the entry equals the source's own attack accuracy.
    """
    _check_eps(eps)
    for judged in targets.values():
        _check_xy(judged.model, x, y)
    acc, per = {}, {}
    clean = {}
    for tname, judged in targets.items():
        clean[tname] = score_logits(_batched_reported(judged, x, batch_size), y)[0]
    for sname, src in sources.items():
        out = src if isinstance(src, AttackOutcome) else src(x, y)
        check_linf_ball(out.x_adv, x, eps)
        acc[sname], per[sname] = {}, {}
        for tname, judged in targets.items():
            c = score_logits(_batched_reported(judged, out.x_adv, batch_size), y)[0] & clean[tname]
            per[sname][tname] = c.cpu()
            acc[sname][tname] = float(c.double().mean())
    return acc, per


# ---------------------------------------------------------------------------------------------
# Gradient-obfuscation indicators
# ---------------------------------------------------------------------------------------------

def obfuscation_flags(white_box: dict, black_box: Optional[dict] = None,
                      iterations: Optional[dict] = None, large_eps: Optional[float] = None,
                      clean_agreement: Optional[float] = None, tol: float = 0.01) -> dict:
    """Indicators of gradient obfuscation (Athalye et al. 2018; Carlini et al. 2019), each a
    flag plus the numbers behind it.

    white_box / black_box: {attack name: robust accuracy}; iterations: {steps or restarts:
    robust accuracy} of one attack at growing budgets; large_eps: robust accuracy of a white-box
    attack at a large eps (should be ~0); clean_agreement: fraction of clean inputs on which the
    surrogate's and the reported forward's predictions agree.
    """
    flags = {}
    wb = min(white_box.values()) if white_box else None
    if black_box and wb is not None:
        bb = min(black_box.values())
        flags["black_box_stronger"] = {"flag": bb < wb - tol, "black_box": bb, "white_box": wb}
    if iterations and len(iterations) >= 2:
        ks = sorted(iterations)
        accs = [iterations[k] for k in ks]
        rising = any(b > a + tol for a, b in zip(accs, accs[1:]))
        flags["more_iterations_raise_accuracy"] = {"flag": rising,
                                                   "accuracy": dict(zip(map(str, ks), accs))}
    if large_eps is not None:
        flags["large_eps_not_zero"] = {"flag": large_eps > 0.05, "accuracy": large_eps}
    if clean_agreement is not None:
        flags["surrogate_disagrees_on_clean"] = {"flag": clean_agreement < 0.9,
                                                 "agreement": clean_agreement}
    flags["any"] = any(v["flag"] for v in flags.values() if isinstance(v, dict))
    return flags


def surrogate_agreement(judged: JudgedModule, x: Tensor, batch_size: int = 256) -> float:
    """Fraction of inputs where the surrogate's and the reported forward's predictions agree."""
    if judged.surrogate is None or not judged.is_deq:
        return 1.0
    agree = 0
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size]
            r = predict(judged.reported_logits(xb))  # -1 where non-finite: never agrees
            g = predict(judged.surrogate.logits(judged.model, xb))
            agree += int(((r == g) & (r >= 0)).sum())
    return agree / max(len(x), 1)


__all__.append("surrogate_agreement")


# ---------------------------------------------------------------------------------------------
# Adaptive attacks on the Sec. 3.2 test-time defense (Croce et al. 2022)
# ---------------------------------------------------------------------------------------------

def adaptive_attacks(model, reported, x: Tensor, y: Tensor, eps: float, alpha: float,
                     steps: int = 10, seed: int = 0, ka: int = 9, lam: float = 0.5,
                     i: Optional[int] = None, batch_size: int = 256, budget: str = "standard"
                     ) -> AttackOutcome:
    """The per-example worst case over the adaptive attacks on an ``EntropyReduction`` forward:
    (a) PGD with BPDA through the purification, (b) PGD with the unrolled surrogate on the
    defended trajectory, (c) transfer: PGD against the undefended model (the defense's readout
    on the plain solve, phantom gradient), judged on the defended forward. Every attack is
    judged on ``reported``; ``extra['per_attack']`` holds each one's accuracy."""
    from model_zoo.forward import EntropyReduction, FinalState
    from .surrogates import BPDAPurification, DefendedTrajectory, PhantomFinal, Undefended

    if not isinstance(reported, EntropyReduction):
        raise ValueError("adaptive_attacks is for EntropyReduction forwards; use pgd_attack or "
                         "grid_attack for plain forwards")
    t0 = time.perf_counter()
    parts = {
        "bpda": pgd_attack(JudgedModule(model, reported, BPDAPurification(reported, i, ka, lam)),
                           x, y, eps, alpha, steps, seed=derive_seed(seed, "bpda"),
                           batch_size=batch_size, name="pgd_bpda", budget=budget),
        "defended_trajectory": pgd_attack(
            JudgedModule(model, reported, DefendedTrajectory(reported, i, ka, lam)), x, y, eps,
            alpha, steps, seed=derive_seed(seed, "defended"), batch_size=batch_size,
            name="pgd_defended_trajectory", budget=budget),
    }
    plain = reported.inner if isinstance(reported.inner, FinalState) else FinalState()
    src = JudgedModule(model, plain, Undefended(PhantomFinal()))
    tr = pgd_attack(src, x, y, eps, alpha, steps, seed=derive_seed(seed, "transfer"),
                    batch_size=batch_size, name="transfer_undefended", budget=budget)
    target = JudgedModule(model, reported)
    meter = FEvalMeter(model, len(x))
    c, m = rescore(target, tr.x_adv, x, y, eps, meter, batch_size=batch_size)
    clean_ok, _ = _clean_correct(target, x, y, meter, batch_size)
    c &= clean_ok
    tr = AttackOutcome("transfer_undefended", tr.x_adv, c.cpu(), m.cpu(),
                       [[] if cc else ["transfer_undefended"] for cc in c.tolist()],
                       tr.nfev_nograd + meter.nograd, tr.nfev_grad + meter.grad,
                       tr.queries + meter.queries, {**tr.config, "judged_on": reported.config()},
                       tr.wall_s)
    parts["transfer_undefended"] = tr
    return worst_case(list(parts.values()), x, name="adaptive",
                      config={"attack": "adaptive", "eps": eps, "alpha": alpha, "steps": steps,
                              "seed": seed, "budget": budget, "reported": reported.config(),
                              "members": [p.config for p in parts.values()]}, t0=t0)


def worst_case(outcomes: Sequence[AttackOutcome], x: Tensor, name: str = "worst_case",
               config: Optional[dict] = None, t0: Optional[float] = None) -> AttackOutcome:
    """Per-example worst case over attacks on the SAME examples and reported forward: a point is
    robust only if every attack left it correctly classified; its x_adv is a breaking example if
    any, else the lowest-margin one. Costs add up."""
    if not outcomes:
        raise ValueError("worst_case needs at least one outcome")
    n = len(outcomes[0].correct)
    if any(len(o.correct) != n for o in outcomes):
        raise ValueError("outcomes cover different numbers of examples")
    correct = torch.ones(n, dtype=torch.bool)
    margin = torch.full((n,), float("inf"))
    x_adv = x.clone()
    broken = [[] for _ in range(n)]
    for o in outcomes:
        better = (o.margin < margin) & correct | (~o.correct & correct)
        x_adv[better.to(x.device)] = o.x_adv[better.to(o.x_adv.device)]
        margin = torch.where(better, o.margin, margin)
        correct &= o.correct
        for b in range(n):
            broken[b].extend(v for v in o.broken_by[b] if v not in broken[b])
    return AttackOutcome(name, x_adv, correct, margin, broken,
                         sum(o.nfev_nograd for o in outcomes), sum(o.nfev_grad for o in outcomes),
                         sum(o.queries for o in outcomes),
                         config or {"attack": name, "members": [o.config for o in outcomes]},
                         (time.perf_counter() - t0) if t0 else sum(o.wall_s for o in outcomes),
                         {"per_attack": {o.name: o.accuracy for o in outcomes}})


__all__ += ["adaptive_attacks", "worst_case"]


def run_obfuscation_checks(model, reported, surrogate, x: Tensor, y: Tensor, eps: float,
                           alpha: float, steps: int = 10, seed: int = 0,
                           square_queries: int = 1000, large_eps: Optional[float] = None,
                           batch_size: int = 256) -> dict:
    """Run the attacks behind :func:`obfuscation_flags` and return the flags with their numbers:
    PGD-``steps`` and PGD-``2 steps`` (more iterations must not help the defense), Square with
    ``square_queries`` (black-box must not beat white-box), PGD at ``large_eps`` (default
    min(1, 5 eps): accuracy should reach ~0), and surrogate/reported agreement on clean inputs."""
    judged = JudgedModule(model, reported, surrogate)
    large_eps = min(1.0, 5 * eps) if large_eps is None else large_eps
    pgd1 = pgd_attack(judged, x, y, eps, alpha, steps, seed=seed, batch_size=batch_size)
    pgd2 = pgd_attack(judged, x, y, eps, alpha, 2 * steps, seed=seed, batch_size=batch_size)
    sq = autoattack_attack(judged, x, y, eps, attacks=["square"],
                           budget={"square_n_queries": square_queries}, seed=seed,
                           batch_size=batch_size)
    big = pgd_attack(judged, x, y, large_eps, large_eps / 4, 2 * steps, seed=seed,
                     batch_size=batch_size)
    agree = surrogate_agreement(judged, x, batch_size)
    flags = obfuscation_flags({f"pgd{steps}": pgd1.accuracy, f"pgd{2 * steps}": pgd2.accuracy},
                              {f"square{square_queries}": sq.accuracy},
                              {steps: pgd1.accuracy, 2 * steps: pgd2.accuracy},
                              large_eps=big.accuracy, clean_agreement=agree)
    flags["settings"] = {"eps": eps, "alpha": alpha, "steps": steps, "seed": seed,
                         "square_queries": square_queries, "large_eps": large_eps,
                         "n": len(x), **judged.config()}
    return flags


__all__.append("run_obfuscation_checks")
