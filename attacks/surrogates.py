"""Gradient sources (surrogates) for attacking DEQs, and the straight-through wrapper that judges
success on the reported forward.

A DEQ's reported forward is often not differentiable w.r.t. its input (``EarlyState(i)`` reads a
detached solver iterate; ``EntropyReduction`` purifies the input with inner gradient steps). An
attack therefore takes its gradient from a *surrogate* and its success criterion from the
*reported* forward. :class:`JudgedModule` fuses the two into one module:
``reported.detach() + surrogate - surrogate.detach()`` -- its output equals the reported logits
exactly, its input-gradient is the surrogate's -- so AutoAttack, torchattacks and our PGD all
select, early-stop and count successes on the model being reported (spec section 8 item 3).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from model_zoo.forward import EarlyState, EntropyReduction, FinalState, _Forward, unroll

__all__ = ["GradientSource", "UnrolledIntermediate", "StackedUnrolled", "PhantomFinal", "ImplicitFinal",
           "FullBackprop", "BPDAPurification", "DefendedTrajectory", "Undefended",
           "JudgedModule", "make_surrogate", "grid_settings"]


class GradientSource:
    """Produces logits whose input-gradient drives an attack. ``logits(model, x)``: (B, C)."""
    name = "base"

    def logits(self, model, x: Tensor) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        return {"name": self.name}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items() if k != 'name')})"


class UnrolledIntermediate(GradientSource):
    """Eq. (11): solve without gradient to z[i], unroll ``ka`` damped steps
    z <- (1 - lam) z + lam f(z; x) with gradient, logits h(z[i + ka]).

    ``preset='reference'`` adds the released code's extra full f step before the unroll (spec
    5.1; the code's 0-based k is our i - 1); ``'paper'`` follows Eq. (11) exactly.
    """
    name = "unrolled_intermediate"

    def __init__(self, i: int, ka: int, lam: float, preset: str = "reference",
                 skip_last_f: bool = False):
        if not isinstance(i, int) or i < 1:
            raise ValueError(f"i must be an integer >= 1, got {i!r}")
        if not isinstance(ka, int) or ka < 1:
            raise ValueError(f"ka must be an integer >= 1, got {ka!r}")
        if not 0 < lam <= 1:
            raise ValueError(f"lam must be in (0, 1], got {lam!r}")
        if preset not in ("reference", "paper"):
            raise ValueError(f"preset must be 'reference' or 'paper', got {preset!r}")
        self.i, self.ka, self.lam, self.preset = i, ka, float(lam), preset
        # skip the solver's unused f(z[i]) (see _solve_to): same z[i], one f eval less per row;
        # a cost option, not part of the setting's identity (config/name unchanged)
        self.skip_last_f = bool(skip_last_f)

    def config(self):
        return {"name": self.name, "i": self.i, "ka": self.ka, "lam": self.lam, "preset": self.preset}

    def check(self, model):
        if self.i > model.solver.max_iter:
            raise ValueError(f"i={self.i} exceeds the solver's N={model.solver.max_iter}")

    def logits(self, model, x):
        self.check(model)
        ctx = model.context(x)
        z = _solve_to(model, ctx, x, self.i, getattr(self, "skip_last_f", False))
        u = unroll(ctx, z, self.ka, self.lam, first_full=self.preset == "reference")
        return ctx.head(u)


def _solve_to(model, ctx, x: Tensor, i: int, skip_last_f: bool) -> Tensor:
    """z[i] of the model's solver (no gradient), detached, (B, D).

    ``skip_last_f=True`` skips the solver's evaluation of f at z[i] itself: it only feeds
    z[i]'s residual (and the stop/protect decision for iteration i + 1, which never runs),
    while the unroll recomputes f(z[i]) with gradient -- so z[i] is bit-identical and each row
    active at iteration i costs one f evaluation less. Every solver here calls f once in its
    start (f(z0)) and once per iteration with active rows, and an iteration with no active row
    is followed only by such iterations, so the (i + 1)-th call is iteration i's. The wrapper
    returns z for that call (a zero residual nobody reads) and the call is not counted,
    because it is not made. Kept here rather than in the solver because only this caller
    knows the last iterate's f is wasted."""
    solver = model.solver.with_options(max_iter=i, keep_graph=False)
    f = ctx.f
    if skip_last_f:
        calls = [0]

        def f(z, idx=None):
            calls[0] += 1
            return z if calls[0] == i + 1 else ctx.f(z, idx)
    traj = solver.solve(f, model.zero_state(x))
    return traj.state(i).detach()


def _solve_to_rows(model, ctx, x: Tensor, i_rows: Tensor, skip_last_f: bool) -> Tensor:
    """z[i_r] for every row r (no gradient), detached, (B, D): ONE solve to max(i_rows) in
    which a row leaves at its own i. The f handed to the solver evaluates f_theta only on rows
    that still need it (rows before their last iterate, plus the last iterate itself unless
    ``skip_last_f``, exactly the evaluations of a solve to i_r alone) and returns g = 0 for a
    row at (or past) its last iterate, so the solver's per-sample stop freezes it there
    (Broyden's state is per sample); its z[i_r] is read from the trajectory's iterates either
    way. The call count maps to the iteration as in :func:`_solve_to`."""
    n_max = int(i_rows.max())
    i_dev = i_rows.to(x.device)
    calls = [0]

    def f(z, idx=None):
        t = calls[0]  # 0: the solver's start f(z0); t >= 1: iteration t
        calls[0] += 1
        if t == 0:
            return ctx.f(z, idx)
        it = i_dev if idx is None else i_dev.index_select(0, idx)
        need = it > t if skip_last_f else it >= t
        if bool(need.all()):
            out = ctx.f(z, idx)
        else:
            out = z.clone()
            if bool(need.any()):
                sub = need.nonzero().flatten()
                out[sub] = ctx.f(z.index_select(0, sub),
                                 sub if idx is None else idx.index_select(0, sub))
        done = it <= t
        return torch.where(done[:, None], z, out) if bool(done.any()) else out

    traj = model.solver.with_options(max_iter=n_max, keep_graph=False).solve(
        f, model.zero_state(x))
    z = traj.state(n_max).clone()
    for t in torch.unique(i_rows).tolist():
        if t != n_max:
            rows = (i_dev == t).nonzero().flatten()
            z[rows] = traj.state(t).index_select(0, rows)
    return z.detach()


class StackedUnrolled(GradientSource):
    """Eq. (11) for a stack of grid settings, one row per (setting, example): ONE no-grad solve
    to z[i] for all rows (``i`` an int, or a LongTensor (R,) of per-row i: see
    :func:`_solve_to_rows`), then the unroll with a per-row ``ka`` (LongTensor
    (R,)) and ``lam`` (float tensor (R,)) -- a row stops unrolling after its own ka steps (the
    rows still unrolling are an index subset; f is evaluated only on them). Row r's logits equal
    ``UnrolledIntermediate(i, ka[r], lam[r], preset).logits`` on that row alone (up to the last
    bits of batched kernels): the model's per-sample operations (convs, group norm, eval-mode
    batch norm) and per-sample solver decisions make rows independent.

    After ``logits``, ``last_counts`` = (nograd, grad): (R,) LongTensor f_theta evaluations of
    each row in that call, so callers can attribute the cost per setting."""
    name = "stacked_unrolled"

    def __init__(self, i, ka: Tensor, lam: Tensor, preset: str = "reference",
                 skip_last_f: bool = False):
        if torch.is_tensor(i):  # per-row i: one solve, each row leaves at its own z[i]
            i = i.detach().cpu().long().flatten()
            if len(i) != len(torch.as_tensor(ka).flatten()) or (len(i) and int(i.min()) < 1):
                raise ValueError("per-row i needs one integer >= 1 per row")
            if len(i) and int(i.min()) == int(i.max()):
                i = int(i[0])
        elif not isinstance(i, int) or i < 1:
            raise ValueError(f"i must be an integer >= 1, got {i!r}")
        if preset not in ("reference", "paper"):
            raise ValueError(f"preset must be 'reference' or 'paper', got {preset!r}")
        ka = torch.as_tensor(ka, dtype=torch.long).flatten()
        lam = torch.as_tensor(lam, dtype=torch.float64).flatten()
        if len(ka) != len(lam):
            raise ValueError(f"ka and lam need one entry per row, got {len(ka)} and {len(lam)}")
        if len(ka) and (int(ka.min()) < 1 or not bool(((lam > 0) & (lam <= 1)).all())):
            raise ValueError("every ka must be >= 1 and every lam in (0, 1]")
        self.i, self.ka, self.lam, self.preset = i, ka, lam, preset
        self.skip_last_f = bool(skip_last_f)
        self.last_counts = None

    def config(self):
        return {"name": self.name, "i": self.i if isinstance(self.i, int) else self.i.tolist(),
                "ka": self.ka.tolist(), "lam": self.lam.tolist(), "preset": self.preset}

    def check(self, model):
        top = self.i if isinstance(self.i, int) else int(self.i.max()) if len(self.i) else 1
        if top > model.solver.max_iter:
            raise ValueError(f"i={top} exceeds the solver's N={model.solver.max_iter}")

    def logits(self, model, x):
        self.check(model)
        if len(x) != len(self.ka):
            raise ValueError(f"{len(self.ka)} (ka, lam) rows for a batch of {len(x)}")
        ctx = model.context(x)
        z = (_solve_to(model, ctx, x, self.i, self.skip_last_f) if isinstance(self.i, int)
             else _solve_to_rows(model, ctx, x, self.i, self.skip_last_f))
        ka = self.ka.to(x.device)
        # per-row lam as a column in the state's dtype: the same float32 products as the
        # scalar lam of UnrolledIntermediate (0.5 and 1 are exact; 1 - lam computed in float64)
        lam = self.lam.to(x.device, z.dtype)[:, None]
        one_m = (1 - self.lam).to(x.device, z.dtype)[:, None]
        u = ctx.f(z) if self.preset == "reference" else z
        for t in range(1, int(ka.max()) + 1 if len(ka) else 1):
            live = ka >= t
            if bool(live.all()):
                u = one_m * u + lam * ctx.f(u)
            else:
                idx = live.nonzero().flatten()
                ua = u.index_select(0, idx)
                step = one_m[idx] * ua + lam[idx] * ctx.f(ua, idx)
                u = u.index_copy(0, idx, step)
        counter = getattr(ctx, "counter", None)
        self.last_counts = (None if counter is None else
                            (counter.nograd.detach().cpu(), counter.grad.detach().cpu()))
        return ctx.head(u)


class _ForwardSource(GradientSource):
    def __init__(self, forward: _Forward):
        self.forward = forward

    def config(self):
        return {"name": self.name, "forward": self.forward.config()}

    def logits(self, model, x):
        return model.run(x, defense=self.forward).logits


class PhantomFinal(_ForwardSource):
    """The ready-made phantom gradient at the final state (Table 2's "FINAL"): f + 9 damped
    steps at 0.5 after the solve (the reference's ``AttackGrad='unroll'``)."""
    name = "phantom_final"

    def __init__(self, steps: int = 9, lam: float = 0.5):
        super().__init__(FinalState(steps=steps, lam=lam))


class ImplicitFinal(_ForwardSource):
    """The implicit (IFT) gradient at the final state (``AttackGrad='real'``): head(f(z*)) with
    the adjoint (I - J_f(z*)^T)^{-1} g solved by Broyden. Defaults = the released code:
    B_THRES = 7 steps, batch-level decisions (``backward='reference'``); ``backward='sample'``
    decides per sample (see :func:`model_zoo.forward.implicit_step`)."""
    name = "implicit_final"

    def __init__(self, backward_iter: int = 7, backward: str = "reference",
                 backward_eps: Optional[float] = None):
        super().__init__(FinalState(steps=0, gradient="implicit", backward_iter=backward_iter,
                                    backward=backward, backward_eps=backward_eps))


class FullBackprop(GradientSource):
    """Backpropagation through the whole unrolled solve (the solver keeps its graph), read out
    at ``readout`` (default: the raw last iterate z[N] via ``EarlyState(N)``)."""
    name = "full_backprop"

    def __init__(self, readout: Optional[_Forward] = None):
        self.readout = readout

    def config(self):
        return {"name": self.name, "readout": None if self.readout is None else self.readout.config()}

    def logits(self, model, x):
        saved = model.solver
        model.solver = saved.with_options(keep_graph=True, protect=None)
        try:
            fwd = self.readout or EarlyState(saved.max_iter)
            return model.run(x, defense=fwd).logits
        finally:
            model.solver = saved


def _defended_unroll(model, x, defense: EntropyReduction, i: Optional[int], ka: int, lam: float,
                     bpda: bool):
    with torch.no_grad():
        rec = model.run(x.detach(), defense=defense)
    traj = rec.trajectory
    z = (traj.best if i is None else traj.state(i)).detach()
    # BPDA: the purified input is used forward, the purification counts as identity backward.
    x_in = x + (rec.x_used - x).detach() if bpda else x
    ctx = model.context(x_in, check=False)
    return ctx.head(unroll(ctx, z, ka, lam, first_full=True))


class BPDAPurification(GradientSource):
    """For ``EntropyReduction``: the defended trajectory forward, the input purification treated
    as the identity backward (Athalye et al. 2018); gradient through an unroll from the defended
    state z[i] (``i=None``: its final state) injected with the purified input."""
    name = "bpda_purification"

    def __init__(self, defense: EntropyReduction, i: Optional[int] = None, ka: int = 9,
                 lam: float = 0.5):
        self.defense, self.i, self.ka, self.lam = defense, i, ka, lam

    def config(self):
        return {"name": self.name, "defense": self.defense.config(), "i": self.i, "ka": self.ka,
                "lam": self.lam}

    def logits(self, model, x):
        return _defended_unroll(model, x, self.defense, self.i, self.ka, self.lam, bpda=True)


class DefendedTrajectory(BPDAPurification):
    """For ``EntropyReduction``: the unrolled surrogate evaluated on the DEFENDED trajectory
    (the state is the defended iterate, the injection the attacked input; what the reference's
    AutoAttack wiring did, spec 5.3)."""
    name = "defended_trajectory"

    def logits(self, model, x):
        return _defended_unroll(model, x, self.defense, self.i, self.ka, self.lam, bpda=False)


class Undefended(GradientSource):
    """Transfer from the undefended model: any surrogate computed with the plain solve."""
    name = "undefended"

    def __init__(self, inner: GradientSource):
        self.inner = inner

    def config(self):
        return {"name": self.name, "inner": self.inner.config()}

    def logits(self, model, x):
        return self.inner.logits(model, x)


class JudgedModule(nn.Module):
    """The module every attack sees: output = the REPORTED forward's logits (exactly), input
    gradient = the surrogate's (straight-through). For non-DEQ models both are the model.

    ``fused=True`` (default): when the reported forward is a plain solve (``FinalState`` /
    ``EarlyState``) and the surrogate is :class:`UnrolledIntermediate` or a final-state gradient
    (:class:`PhantomFinal`, :class:`ImplicitFinal`), ONE no-grad solve to N serves both -- the
    reported readout and the surrogate's z[i] or z* (spec section 8 item 1) -- saving i (or N)
    f_theta evaluations per call; a surrogate whose forward is the reported one (PGD's phantom
    gradient on a final-state entry) also shares the readout, saving the reported forward
    altogether (19 of 38 no-grad f evaluations per PGD step on the tiny DEQ). The numbers are
    the same as unfused, bitwise.
    """

    def __init__(self, model, reported: Optional[_Forward] = None,
                 surrogate: Optional[GradientSource] = None, fused: bool = True):
        super().__init__()
        self.model = model
        self.is_deq = getattr(model, "is_deq", False)
        self.reported = reported if reported is not None else getattr(model, "defense", None)
        self.surrogate = surrogate
        self.fused = bool(fused)
        self.rows = 0  # input rows seen by forward(): library attacks' query counts
        if isinstance(surrogate, UnrolledIntermediate) and self.is_deq:
            surrogate.check(model)

    def reported_logits(self, x: Tensor) -> Tensor:
        if not self.is_deq:
            with torch.no_grad():
                return self.model(x.detach())
        with torch.no_grad():
            return self.model.run(x.detach(), defense=self.reported).logits

    def _can_fuse(self) -> bool:
        src = self.surrogate
        return (self.fused and type(self.reported) in (FinalState, EarlyState)
                and getattr(self.reported, "gradient", "phantom") == "phantom"
                and not self.model.solver.keep_graph
                and (isinstance(src, UnrolledIntermediate)
                     or (isinstance(src, _ForwardSource) and type(src.forward) is FinalState)))

    def _fused(self, x: Tensor) -> Tensor:
        model, src = self.model, self.surrogate
        ctx = model.context(x)
        with torch.no_grad():
            traj = model.solver.solve(ctx.f, model.zero_state(x))
        if isinstance(src, UnrolledIntermediate):
            with torch.no_grad():
                r = self.reported.readout(model, traj, ctx, x)[0]
            z = traj.state(src.i).detach()
            s = ctx.head(unroll(ctx, z, src.ka, src.lam, first_full=src.preset == "reference"))
            return r + (s - s.detach())
        # a ready-made final-state gradient (PhantomFinal, ImplicitFinal): its own forward is a
        # plain solve too, so the same solve serves it; when it IS the reported forward
        # (PGD's phantom gradient on a final-state entry) its readout's value is the reported
        # logits (bitwise: tests/test_attack_evaluation.py), so the readout runs once, with its graph
        s = src.forward.readout(model, traj, ctx, x, ctx)[0]
        if src.forward.config() == self.reported.config():
            r = s.detach()
        else:
            with torch.no_grad():
                r = self.reported.readout(model, traj, ctx, x, ctx)[0]
        return r + (s - s.detach())

    def forward(self, x: Tensor) -> Tensor:
        self.rows += x.shape[0]
        if not self.is_deq:
            return self.model(x)
        if self.surrogate is None or not (torch.is_grad_enabled() and x.requires_grad):
            return self.reported_logits(x)
        if self._can_fuse():
            return self._fused(x)
        r = self.reported_logits(x)
        s = self.surrogate.logits(self.model, x)
        return r + (s - s.detach())

    def config(self) -> dict:
        return {"reported": None if self.reported is None else self.reported.config(),
                "surrogate": None if self.surrogate is None else self.surrogate.config()}


def grid_settings(n: int = 8, kas=range(1, 10), lams=(0.5, 1.0), preset: str = "reference"):
    """The (i, Ka, lambda) grid of the paper: i in 1..N, Ka in 1..9, lambda in {0.5, 1}
    (144 settings for N = 8)."""
    return [UnrolledIntermediate(i, ka, lam, preset) for lam in lams for i in range(1, n + 1)
            for ka in kas]


def make_surrogate(spec) -> GradientSource:
    """'phantom_final', 'implicit_final', 'full_backprop', or 'ui:i,ka,lam[,preset]'."""
    if isinstance(spec, GradientSource):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"surrogate spec must be a string, got {spec!r}")
    if spec.startswith("ui:"):
        parts = spec[3:].split(",")
        if len(parts) not in (3, 4):
            raise ValueError(f"'ui:i,ka,lam[,preset]' expected, got {spec!r}")
        return UnrolledIntermediate(int(parts[0]), int(parts[1]), float(parts[2]),
                                    *(parts[3:] or []))
    table = {"phantom_final": PhantomFinal, "implicit_final": ImplicitFinal,
             "full_backprop": FullBackprop}
    if spec not in table:
        raise ValueError(f"unknown surrogate {spec!r}; choose one of {sorted(table)} or 'ui:i,ka,lam'")
    return table[spec]()
