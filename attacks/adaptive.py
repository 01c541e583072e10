"""The adaptive protocol for the Sec. 3.2 test-time defense (``EntropyReduction``), after Croce
et al., "Evaluating the Adversarial Robustness of Adaptive Test-time Defenses" (ICML 2022) and
Tramer et al., "On Adaptive Attacks to Adversarial Example Defenses" (NeurIPS 2020).

A test-time defense that optimizes its input during inference is evaluated by the per-example
worst case over attacks built for it; every one is judged on the DEFENDED forward (its output
is what :class:`~attacks.surrogates.JudgedModule` returns, so early stopping, APGD's best
iterate and Square's acceptance all see the defended logits):

1. ``transfer`` -- static -> transfer: the undefended model's protocol attacks (PGD with its
   strongest grid setting, APGD-CE and APGD-T with the same gradient), judged on the defended
   forward (Croce et al. attack the static model first).
2. ``through`` -- the full gradient through the defense: :class:`ThroughDefense` replays the
   defense differentiably -- the R inner entropy-minimizing input updates of every segment are
   differentiated (second order: the inner gradient is built with ``create_graph``), and each
   segment's solve gets the (i, Ka, lambda) unrolled surrogate. The ``reference`` preset's
   ``sign`` steps use a straight-through estimator. APGD-CE and APGD-T.
3. ``cheap`` -- a cheaper defense (fewer input updates R, optionally another Tf) replayed by
   :class:`ThroughDefense` as the gradient model, success judged on the full defense.
4. ``objectives`` -- objectives aimed at the mechanism, with the full gradient: APGD-DLR (the
   margin-type DLR loss) and APGD-T with a TARGETED CROSS-ENTROPY loss towards each of the top
   wrong classes: a confident wrong prediction has LOW entropy, so the defense's entropy
   minimization pushes further towards the wrong class instead of undoing the perturbation.
5. ``square`` -- Square (no gradient) on the defended forward.

BPDA is used nowhere: every step of the defense has a gradient once the solver gets the
unrolled surrogate and ``sign`` the straight-through estimator.

Memory of the full gradient (:func:`saved_tensor_bytes` counts what autograd keeps): the
replay holds, per inner update, the graph of one injection + f-tail + head evaluation and of
its input-gradient (double backward), i.e. it grows linearly in (N/Tf - 1) x R;
``checkpoint=True`` recomputes each segment's updates in the backward pass instead
(``torch.utils.checkpoint``, non-reentrant), keeping only the segment boundaries.
"""
from __future__ import annotations

import copy
import time
from typing import Optional, Sequence

import torch
from torch import Tensor

from model_zoo.forward import EarlyState, EntropyReduction, FinalState, prediction_entropy, unroll

from .evaluation import (AA_STANDARD_BUDGET, AttackOutcome, autoattack_attack, derive_seed,
                         pgd_attack, setting_name, worst_case)
from .surrogates import GradientSource, JudgedModule, PhantomFinal

__all__ = ["ThroughDefense", "DefenseJudged", "adaptive_protocol", "saved_tensor_bytes",
           "ADAPTIVE_VARIANTS", "ADAPTIVE_STANDARD_BUDGET", "cheaper_defense"]

ADAPTIVE_VARIANTS = ("transfer", "through", "cheap", "objectives", "square")
# The standard budget of every member: AutoAttack's (Croce & Hein 2020) APGD / Square knobs and
# the paper's PGD-10 for the transfer of the strongest grid setting.
ADAPTIVE_STANDARD_BUDGET = {"pgd_steps": 10, "apgd_n_iter": AA_STANDARD_BUDGET["apgd_n_iter"],
                            "apgd_n_restarts": AA_STANDARD_BUDGET["apgd_n_restarts"],
                            "apgd_t_n_target_classes":
                                AA_STANDARD_BUDGET["apgd_t_n_target_classes"],
                            "square_n_queries": AA_STANDARD_BUDGET["square_n_queries"]}


def _st(value: Tensor, g: Tensor) -> Tensor:
    """Straight-through: the exact ``value`` forward, the gradient of ``g`` backward."""
    return value.detach() + (g - g.detach())


def _ste_sign(g: Tensor) -> Tensor:
    """sign(g) forward; backward the derivative of g / s with s = mean |g| per example held
    fixed -- the identity straight-through estimator (Bengio et al. 2013) rescaled so that the
    linear stand-in has the sign step's mean magnitude (the raw gradient of the entropy w.r.t.
    the input is orders of magnitude smaller than 1, so the plain identity STE would all but
    drop the inner updates' Jacobian)."""
    s = g.detach().abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1))
    lin = g / s
    return g.sign().detach() + (lin - lin.detach())


def _with_input(ctx, x: Tensor):
    c = copy.copy(ctx)  # same masks and f-eval counter, injection of x
    c.set_input(x)
    return c


class ThroughDefense(GradientSource):
    """The full gradient through an ``EntropyReduction`` forward (both presets).

    ``logits(model, x)`` (x: (B, C, H, W) in [0, 1], requiring grad) runs the defense once
    without gradient, then REPLAYS it with autograd on the recorded values: per segment k,
    the state s_k that the k-th input update holds fixed becomes
    ``s_k + U(s_k; x_k) - U(s_k; x_k).detach()`` (the unrolled surrogate on the solve: ``ka``
    damped steps z <- (1 - lam) z + lam f(z; x_k), Eq. 11, from the detached state, under the
    segment's input x_k, which carries the gradient of all earlier updates), and the R updates
    x' <- Proj_{B(x, eps) cap [0,1]}(x' - beta step(grad_x' H(h(f(s_k; x'))))) (Eq. 8) are
    recomputed with ``create_graph=True`` -- gradient through the inner gradients, through the
    projection (whose centre is the attacked input) and through s_k. ``paper``: step = the
    gradient; ``reference``: step = sign(gradient) with the straight-through estimator of
    :func:`_ste_sign` (``sign='constant'`` treats the sign step as a constant instead, an
    ablation). The readout (``FinalState``'s f + damped unroll with gradient, or
    ``EarlyState(i)``) starts from its state's surrogate. Every replayed tensor is
    straight-through onto the recorded value, so the returned logits EQUAL the defended
    forward's (exactly) and only the gradient is the replay's; ``last_replay_error`` is the
    largest deviation of the replayed inputs from the recorded ones (float noise, ~1e-7).

    Costs (f_theta evaluations with graph per call): (number of updates) x (ka + R) + the
    readout's unroll; memory: see :func:`saved_tensor_bytes`; ``checkpoint=True`` recomputes
    each update block in the backward pass (``torch.utils.checkpoint``, non-reentrant).
    ``FinalState(gradient='implicit')`` readouts are replayed with the phantom unroll.
    """
    name = "through_defense"

    def __init__(self, defense: EntropyReduction, ka: int = 3, lam: float = 0.5,
                 sign: str = "ste", checkpoint: bool = False):
        if not isinstance(defense, EntropyReduction):
            raise ValueError("ThroughDefense replays an EntropyReduction forward, got "
                             f"{type(defense).__name__}")
        if isinstance(ka, bool) or not isinstance(ka, int) or ka < 1:
            raise ValueError(f"ka must be an integer >= 1, got {ka!r}")
        if not 0 < lam <= 1:
            raise ValueError(f"lam must be in (0, 1], got {lam!r}")
        if sign not in ("ste", "constant"):
            raise ValueError(f"sign must be 'ste' or 'constant', got {sign!r}")
        self.defense, self.ka, self.lam, self.sign = defense, int(ka), float(lam), sign
        self.checkpoint = bool(checkpoint)
        self.last_replay_error = 0.0

    def config(self):
        return {"name": self.name, "defense": self.defense.config(), "ka": self.ka,
                "lam": self.lam, "solves": "unrolled surrogate (Eq. 11) per segment",
                "sign": ("straight-through estimator (sign forward, g / mean|g| backward)"
                         if self.sign == "ste" else "constant (no gradient through the step)")
                if self.defense.preset == "reference" else "n/a (gradient steps)",
                "checkpoint": self.checkpoint}

    # -- pieces --------------------------------------------------------------------------------
    def _state(self, ctx, z: Tensor, xg: Tensor) -> Tensor:
        c = _with_input(ctx, xg)
        return _st(z, unroll(c, z.detach(), self.ka, self.lam, first_full=False))

    def _updates(self, model, ctx, x0g: Tensor, xcg: Tensor, zg: Tensor) -> Tensor:
        d = self.defense
        f_of_inj = model.cell.with_fixed_state(model.unflatten(zg), ctx.masks)
        for _ in range(d.r):
            ctx.counter.add(None, True)
            # Eq. 8's gradient is the PARTIAL derivative at fixed z; zg itself depends on the
            # segment input (its surrogate), so differentiate w.r.t. a fresh alias of x' (a
            # gradient w.r.t. an intermediate node counts only the paths through that node).
            xin = xcg.clone()
            fz = model.flatten(f_of_inj(model.inject(xin)))
            h = prediction_entropy(ctx.head(fz)).sum()  # sum: per-sample gradients (as forward)
            (g,) = torch.autograd.grad(h, xin, create_graph=True)
            if d.preset == "paper":
                step = g
            elif self.sign == "ste":
                step = _ste_sign(g)
            else:
                step = g.sign().detach()
            xcg = xcg - d.beta * step
            xcg = torch.min(torch.max(xcg, x0g - d.eps), x0g + d.eps).clamp(0, 1)
        return xcg

    def _block(self, model, ctx, x0g, xcg, z, x_next):
        """One input-update block: surrogate of the fixed state, R differentiable updates,
        straight-through onto the recorded next input."""
        def fn(x0g, xcg):
            zg = self._state(ctx, z, xcg)
            return self._updates(model, ctx, x0g, xcg, zg)
        if self.checkpoint:
            from torch.utils.checkpoint import checkpoint
            out = checkpoint(fn, x0g, xcg, use_reentrant=False)
        else:
            out = fn(x0g, xcg)
        self.last_replay_error = max(self.last_replay_error,
                                     float((out.detach() - x_next).abs().max()))
        return _st(x_next, out)

    # -- the replay ----------------------------------------------------------------------------
    def logits(self, model, x: Tensor) -> Tensor:
        d = self.defense
        with torch.no_grad():
            rec = model.run(x.detach(), defense=d)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return rec.logits
        self.last_replay_error = 0.0
        ctx = model.context(x)
        ups = rec.extra["update_states"]
        traj = rec.trajectory
        if d.preset == "reference":
            recorded = rec.extra["segment_inputs"]          # x_0 .. x_{nseg-1}
            xs = [x]
            for k, z in enumerate(ups):
                xs.append(self._block(model, ctx, x, xs[k], z, recorded[k + 1]))

            def input_of(t: int) -> Tensor:                 # solver step t (1-based)
                return xs[(t - 1) // d.tf]
            best_input = xs[-1]                             # the last segment's lowest residual
        else:
            steps = rec.extra["step_inputs"]                # x after step t (t = 0..N-1)
            xs = [x]
            for k, z in enumerate(ups):
                xs.append(self._block(model, ctx, x, xs[k], z, steps[(k + 1) * d.tf - 1]))

            def input_of(t: int) -> Tensor:                 # z[t] was solved under x_{t // Tf}
                return xs[min(t // d.tf, len(xs) - 1)]
            k_best = (traj.best_index // d.tf).clamp(max=len(xs) - 1).to(x.device)
            stacked = torch.stack(xs, 0)
            best_input = stacked[k_best, torch.arange(len(x), device=x.device)]
        inner = d.inner
        if isinstance(inner, EarlyState):
            i = int(inner.index)
            zg = self._state(ctx, traj.state(i), input_of(i))
            s = ctx.head(zg)
        else:
            zg = self._state(ctx, traj.best, best_input)
            uctx = _with_input(ctx, x if d.unroll_input == "original" else xs[-1])
            s = uctx.head(unroll(uctx, zg, inner.steps, inner.lam, inner.first_full))
        return _st(rec.logits, s)


class DefenseJudged(JudgedModule):
    """A :class:`JudgedModule` whose surrogate's logits already equal the reported forward's
    (a :class:`ThroughDefense` of the reported defense itself): one defended forward per call
    instead of two. Any other surrogate falls back to the JudgedModule behaviour."""

    def forward(self, x: Tensor) -> Tensor:
        s = self.surrogate
        if (self.is_deq and isinstance(s, ThroughDefense) and s.defense is self.reported
                and torch.is_grad_enabled() and x.requires_grad):
            self.rows += x.shape[0]
            return s.logits(self.model, x)
        return super().forward(x)


def saved_tensor_bytes(fn, *args):
    """Bytes autograd keeps for the backward pass while ``fn(*args)`` builds its graph (unique
    storages of the saved tensors; checkpointed regions count only what checkpoint keeps).
    Returns (fn's result, bytes)."""
    seen = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except RuntimeError:  # tensors without storage (e.g. sparse/meta)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, int(sum(seen.values()))


def cheaper_defense(defense: EntropyReduction, r: Optional[int] = None,
                    tf: Optional[int] = None) -> EntropyReduction:
    """The same defense with fewer input updates (default R // 5, at least 1) and the given Tf
    (default: unchanged)."""
    c = copy.copy(defense)
    c.r = max(1, defense.r // 5) if r is None else int(r)
    if tf is not None:
        c.tf = int(tf)
    if c.r < 0 or c.tf < 1:
        raise ValueError(f"cheaper defense needs R >= 0 and Tf >= 1, got R={c.r}, Tf={c.tf}")
    return c


def _budget(given: Optional[dict]) -> dict:
    b = dict(ADAPTIVE_STANDARD_BUDGET)
    for k, v in (given or {}).items():
        if k not in b:
            raise ValueError(f"unknown adaptive budget key {k!r}; known: {sorted(b)}")
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"adaptive budget {k} must be a positive integer, got {v!r}")
        b[k] = int(v)
    return b


def _aa_knobs(b: dict) -> dict:
    return {"apgd_n_iter": b["apgd_n_iter"], "apgd_n_restarts": b["apgd_n_restarts"],
            "apgd_t_n_target_classes": b["apgd_t_n_target_classes"],
            "square_n_queries": b["square_n_queries"]}


def _member_budget(kind: str, b: dict) -> str:
    keys = {"pgd": ("pgd_steps",), "square": ("square_n_queries",),
            "apgd": ("apgd_n_iter", "apgd_n_restarts"),
            "apgd-t": ("apgd_n_iter", "apgd_n_restarts", "apgd_t_n_target_classes")}[kind]
    return "standard" if all(b[k] == ADAPTIVE_STANDARD_BUDGET[k] for k in keys) else "reduced"


def _embed(out: AttackOutcome, todo: Tensor, n: int, x: Tensor) -> AttackOutcome:
    """A member outcome on the rows ``todo`` as an outcome over all n rows: rows it did not
    attack (already broken by an earlier member, ``ensemble=True``) are not robust and carry
    ``extra['attacked'] = False``."""
    if len(todo) == n:
        out.extra["attacked"] = torch.ones(n, dtype=torch.bool)
        return out
    tc = todo.cpu()
    correct = torch.zeros(n, dtype=torch.bool)
    correct[tc] = out.correct
    margin = torch.full((n,), float("-inf"))
    margin[tc] = out.margin
    x_adv = x.clone()
    x_adv[todo] = out.x_adv
    broken = [[] for _ in range(n)]
    for j, b in enumerate(tc.tolist()):
        broken[b] = out.broken_by[j]
    z = torch.zeros(n, dtype=torch.float64)
    nf0, nf1, q = z.clone(), z.clone(), z.clone()
    nf0[tc], nf1[tc], q[tc] = out.nfev_nograd, out.nfev_grad, out.queries
    attacked = torch.zeros(n, dtype=torch.bool)
    attacked[tc] = True
    return AttackOutcome(out.name, x_adv, correct, margin, broken, nf0, nf1, q, out.config,
                         out.wall_s, {**out.extra, "attacked": attacked})


def adaptive_protocol(model, defense: EntropyReduction, x: Tensor, y: Tensor, eps: float,
                      transfer_surrogate: Optional[GradientSource] = None,
                      alpha: Optional[float] = None, budget: Optional[dict] = None,
                      variants: Sequence[str] = ADAPTIVE_VARIANTS, ka: int = 3,
                      lam: float = 0.5, cheap: Optional[dict] = None, sign: str = "ste",
                      checkpoint: bool = False, seed: int = 0, batch_size: int = 256,
                      ensemble: bool = False, progress: bool = False) -> AttackOutcome:
    """The per-example worst case of the adaptive protocol (module docstring) on ``defense``.

    x (B, C, H, W) in [0, 1], y (B,). ``transfer_surrogate``: the undefended model's gradient
    (its strongest grid setting; default the phantom gradient at the final state, computed on
    the plain solve). ``budget``: keys of :data:`ADAPTIVE_STANDARD_BUDGET` (a change labels the
    members it touches 'reduced'). ``variants``: which of :data:`ADAPTIVE_VARIANTS` run.
    ``ka``, ``lam``: the unrolled surrogate on the segment solves of :class:`ThroughDefense`.
    ``cheap``: ``{'r': R', 'tf': Tf'}`` of the cheaper gradient model (default R // 5).
    ``ensemble=True``: each member attacks only the points every earlier member left robust
    (cheaper; members then have no accuracy of their own); ``False``: every member on every
    clean-correct point (per-member accuracies in ``extra['per_attack']``).

    Returns an :class:`AttackOutcome` (name 'adaptive') whose ``extra['members']`` holds each
    member's outcome (name 'VARIANT:ATTACK', config with its budget label) and whose config
    records the variants run, the budget and ``complete`` / ``standard`` (the entry is
    reliable only if every variant ran at the standard budget).
    """
    if not isinstance(defense, EntropyReduction):
        raise ValueError("adaptive_protocol evaluates EntropyReduction forwards (the Sec. 3.2 "
                         "test-time defense); use the protocol attacks for plain forwards")
    bad = [v for v in variants if v not in ADAPTIVE_VARIANTS]
    if bad or not variants:
        raise ValueError(f"unknown adaptive variant(s) {bad}; choose from {list(ADAPTIVE_VARIANTS)}")
    variants = [v for v in ADAPTIVE_VARIANTS if v in variants]
    b = _budget(budget)
    alpha = eps / 4 if alpha is None else alpha
    t0 = time.perf_counter()
    x, y = x.detach(), y.detach()
    n = len(x)
    transfer_surrogate = transfer_surrogate or PhantomFinal()
    through = ThroughDefense(defense, ka, lam, sign, checkpoint)
    cheap_def = cheaper_defense(defense, **(cheap or {}))
    cheap_src = ThroughDefense(cheap_def, ka, lam, sign, checkpoint)
    aa = _aa_knobs(b)
    # (name, variant, kind, judged module, attack)
    plan = []
    if "transfer" in variants:
        tj = JudgedModule(model, defense, transfer_surrogate)
        tname = setting_name(transfer_surrogate)
        plan += [(f"transfer:pgd@{tname}", "pgd", tj, None),
                 ("transfer:apgd-ce", "apgd", tj, "apgd-ce"),
                 ("transfer:apgd-t", "apgd-t", tj, "apgd-t")]
    if "through" in variants or "objectives" in variants:
        dj = DefenseJudged(model, defense, through)
        if "through" in variants:
            plan += [("through:apgd-ce", "apgd", dj, "apgd-ce"),
                     ("through:apgd-t", "apgd-t", dj, "apgd-t")]
        if "objectives" in variants:
            plan += [("objectives:apgd-dlr", "apgd", dj, "apgd-dlr"),
                     ("objectives:apgd-t-ce", "apgd-t", dj, "apgd-t-ce")]
    if "cheap" in variants:
        cj = JudgedModule(model, defense, cheap_src)
        plan += [("cheap:apgd-ce", "apgd", cj, "apgd-ce"), ("cheap:apgd-t", "apgd-t", cj, "apgd-t")]
    if "square" in variants:
        plan += [("square", "square", JudgedModule(model, defense), "square")]
    members = []
    robust = None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), desc="adaptive", leave=False)
    for name, kind, judged, aname in plan:
        if ensemble and robust is not None:
            todo = robust.nonzero().flatten().to(x.device)
        else:
            todo = torch.arange(n, device=x.device)
        mseed = derive_seed(seed, "adaptive", name)
        xs, ys = x[todo], y[todo]
        if kind == "pgd":
            out = pgd_attack(judged, xs, ys, eps, alpha, b["pgd_steps"], seed=mseed,
                             batch_size=batch_size, name=name)
        else:
            out = autoattack_attack(judged, xs, ys, eps, attacks=[aname], budget=aa, seed=mseed,
                                    batch_size=batch_size, ensemble=False)
            out.name = name
            out.broken_by = [[name if v == aname else v for v in bb] for bb in out.broken_by]
        out.config = {**out.config, "member": name, "budget": _member_budget(kind, b),
                      "variant": name.split(":")[0]}
        if isinstance(judged.surrogate, ThroughDefense):
            out.config["replay_error"] = judged.surrogate.last_replay_error
        out = _embed(out, todo, n, x)
        members.append(out)
        robust = out.correct.clone() if robust is None else robust & out.correct
        if bar is not None:
            bar.update(1)
            bar.set_postfix(robust=f"{float(robust.double().mean()):.3f}")
    if bar is not None:
        bar.close()
    complete = list(variants) == list(ADAPTIVE_VARIANTS)
    standard = b == ADAPTIVE_STANDARD_BUDGET
    config = {"attack": "adaptive", "protocol": "croce2022", "eps": eps, "alpha": alpha,
              "seed": seed, "variants": list(variants), "complete": complete,
              "budget": "standard" if standard else "reduced", "budget_knobs": b,
              "standard_budget": dict(ADAPTIVE_STANDARD_BUDGET), "ensemble": ensemble,
              "reliable": complete and standard, "reported": defense.config(),
              "transfer_surrogate": transfer_surrogate.config(), "through": through.config(),
              "cheap": cheap_src.config(),
              "members": {m.name: {"budget": m.config["budget"], "variant": m.config["variant"]}
                          for m in members}}
    out = worst_case(members, x, name="adaptive", config=config, t0=t0)
    out.extra["members"] = members
    if not ensemble:
        out.extra["per_attack"] = {m.name: m.accuracy for m in members}
    return out
