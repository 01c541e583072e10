"""Configurable forward passes (defenses) of a DEQ classifier.

A forward pass = *dynamics* (how the states z[1..N] are produced: a plain solve, or the Sec. 3.2
input entropy reduction that updates the input along the way) + *readout* (which state the head
classifies: the final state after a damped unroll, or an early state z[i]).

* :class:`FinalState` - solve, then f and K damped steps z <- (1-lam) z + lam f(z) with gradient,
  head on the result (reference evaluation: 1 + 9 steps at lam = 0.5; training 1 + 5).
* :class:`EarlyState` - head on z[i] (Yang et al. 2022's early-state defense); ``'select'`` picks
  i by ready-made PGD-10 accuracy on a validation split (``attacks.select_early_state``).
* :class:`EntropyReduction` - Sec. 3.2 / Algorithm 1, presets ``reference`` and ``paper``, with a
  readout of its own (``FinalState`` or ``EarlyState``).
* :class:`SegmentedSolve` - the ablation control of Sec. 3.2: the reference's segmented,
  memory-resetting Broyden solve with R = 0 input updates.

Every forward returns a :class:`ForwardRecord` (``model.run(x, per_state=True)``) with per-state
logits, prediction entropies H(z[t]) (Eq. 6), residuals and per-sample f-eval counts.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .solvers import Broyden, Trajectory, lift_memory

__all__ = ["ForwardRecord", "FinalState", "EarlyState", "EntropyReduction", "SegmentedSolve",
           "RandomIntermediate", "implicit_step", "IMPLICIT_PRESETS", "unroll",
           "prediction_entropy", "make_defense", "DEFENSES", "KERNEL_LEVERS",
           "INEXACT_LEVERS", "FAST_INEXACT", "legacy_kernels"]


def prediction_entropy(logits: Tensor) -> Tensor:
    """H = -sum_j p_j log p_j with p = softmax(logits) (Eq. 6); (..., C) -> (...)."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class ForwardRecord:
    """Everything one forward pass produced, per sample.

    logits: (B, C) of the reported readout. ``readout``: which state produced them ('final' or
    'z[i]'). ``trajectory``: the dynamics (z[1..N], residual traces, lowest-residual state).
    ``state_logits``: (N, B, C) head on z[1..N] (only with ``per_state=True``); ``final_logits``:
    (B, C) the FinalState readout when it was computed. ``entropies``: (N, B) H(z[t]).
    ``nfev_nograd`` / ``nfev_grad``: (B,) f_theta evaluations without / with autograd graph.
    ``x_used``: (B, C, H, W) the input the dynamics ended with (differs from x only for
    EntropyReduction). ``extra``: defense-specific data (e.g. per-segment inputs).
    """
    logits: Tensor
    readout: str
    trajectory: Trajectory
    nfev_nograd: Tensor
    nfev_grad: Tensor
    x_used: Tensor
    state_logits: Optional[Tensor] = None
    final_logits: Optional[Tensor] = None
    extra: dict = field(default_factory=dict)

    @property
    def entropies(self) -> Optional[Tensor]:
        return None if self.state_logits is None else prediction_entropy(self.state_logits)

    @property
    def nfev(self) -> Tensor:
        return self.nfev_nograd + self.nfev_grad

    @property
    def predictions(self) -> Tensor:
        return self.logits.argmax(-1)


def _check_lam(lam):
    if not 0 < lam <= 1:
        raise ValueError(f"unroll step lam must be in (0, 1], got {lam}")


# ---------------------------------------------------------------------------------------------
# readouts
# ---------------------------------------------------------------------------------------------

class _Forward:
    """Base: dynamics = plain solve with the model's solver; subclasses define the readout."""
    name = "base"

    def config(self) -> dict:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items() if k != 'name')})"

    # dynamics
    def dynamics(self, model, x: Tensor, ctx) -> tuple:
        # ctx.f counts every evaluation (with or without graph) in ctx.counter.
        return model.solver.solve(ctx.f, model.zero_state(x)), ctx, {}

    def readout(self, model, traj: Trajectory, ctx, x_orig: Tensor) -> tuple:
        raise NotImplementedError

    def run(self, model, x: Tensor, per_state: bool = False) -> ForwardRecord:
        ctx = model.context(x)
        traj, ctx_end, extra = self.dynamics(model, x, ctx)
        logits, label, final_logits = self.readout(model, traj, ctx_end, x, ctx)
        state_logits = None
        if per_state:
            with torch.no_grad():
                state_logits = torch.stack([ctx.head(z) for z in traj.states], 0)
        return ForwardRecord(logits=logits, readout=label, trajectory=traj,
                             nfev_nograd=ctx.counter.nograd, nfev_grad=ctx.counter.grad,
                             x_used=ctx_end.x, state_logits=state_logits,
                             final_logits=final_logits, extra=extra)


def unroll(ctx, z: Tensor, steps: int, lam: float, first_full: bool = True) -> Tensor:
    """Phantom-gradient unroll with autograd: (f once if ``first_full``) then ``steps`` damped
    steps z <- (1 - lam) z + lam f(z; x) (Eq. 11's update; Geng et al. 2021)."""
    u = ctx.f(z) if first_full else z
    for _ in range(steps):
        u = (1 - lam) * u + lam * ctx.f(u)
    return u


class FinalState(_Forward):
    """Classify the final state: the solver's lowest-residual state z*, then ``first_full``
    f-step and ``steps`` damped steps at ``lam`` with gradient (spec 2.2).

    Defaults = the reference evaluation (f + 9 steps at 0.5, 10 f evals with graph). Training in
    the reference uses ``steps=5``. ``from_state='best'`` (lowest residual, reference) or
    ``'last'`` (z[N]). The solve itself is not differentiated (phantom gradient) unless the
    model's solver has ``keep_graph=True`` (full backpropagation through the solve).
    """
    name = "final"

    def __init__(self, steps: int = 9, lam: float = 0.5, first_full: bool = True,
                 from_state: str = "best", gradient: str = "phantom", backward_iter: int = 7,
                 backward: str = "reference", backward_eps: Optional[float] = None):
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        _check_lam(lam)
        if from_state not in ("best", "last"):
            raise ValueError(f"from_state must be 'best' or 'last', got {from_state!r}")
        if gradient not in ("phantom", "implicit"):
            raise ValueError(f"gradient must be 'phantom' or 'implicit', got {gradient!r}")
        if backward_iter < 1:
            raise ValueError(f"backward_iter must be >= 1, got {backward_iter}")
        _check_backward(backward, backward_eps)
        self.steps, self.lam, self.first_full, self.from_state = int(steps), float(lam), bool(first_full), from_state
        self.gradient, self.backward_iter = gradient, int(backward_iter)
        self.backward, self.backward_eps = backward, backward_eps

    def config(self):
        c = {"name": self.name, "steps": self.steps, "lam": self.lam,
             "first_full": self.first_full, "from_state": self.from_state}
        if self.gradient != "phantom":
            c.update(gradient=self.gradient, backward_iter=self.backward_iter,
                     backward=self.backward)
            if self.backward_eps is not None:
                c["backward_eps"] = self.backward_eps
        return c

    def readout(self, model, traj, ctx_end, x_orig, ctx_orig=None, unroll_ctx=None):
        z = traj.best if self.from_state == "best" else traj.states[-1]
        if not model.solver.keep_graph:
            z = z.detach()
        uctx = unroll_ctx or ctx_end
        if self.gradient == "implicit":
            u = implicit_step(uctx, z, self.backward_iter, self.backward, self.backward_eps)
        else:
            u = unroll(uctx, z, self.steps, self.lam, self.first_full)
        logits = uctx.head(u)
        return logits, "final", logits


# The backward solver of the implicit gradient. ``reference``: the released code's b_solver
# (Broyden, B_THRES steps, its fixed eps 1e-3, stop mode 'rel', the protective break, stopping
# and lowest-residual choice on Frobenius norms over the whole batch); ``sample``: the same
# solver with every decision on the sample's own residual, so a sample's gradient does not
# depend on the rest of its batch.
IMPLICIT_PRESETS = {
    "reference": {"eps": 1e-3, "decisions": "batch", "protect": 1e3},
    "sample": {"eps": 1e-3, "decisions": "sample", "protect": 1e3},
}


def _check_backward(backward: str, backward_eps) -> None:
    if backward not in IMPLICIT_PRESETS:
        raise ValueError(f"backward must be one of {sorted(IMPLICIT_PRESETS)}, got {backward!r}")
    if backward_eps is not None and not backward_eps >= 0:
        raise ValueError(f"backward_eps must be >= 0 (None: the preset's), got {backward_eps!r}")


def implicit_step(ctx, z_star: Tensor, backward_iter: int = 7, backward: str = "reference",
                  backward_eps: Optional[float] = None) -> Tensor:
    """u = f(z*) whose backward applies the implicit-function-theorem gradient: the incoming
    g = dL/du (B, D) is replaced by w = (I - J_f(z*)^T)^{-1} g, the fixed point of
    w = J_f(z*)^T w + g, found with Broyden for ``backward_iter`` steps from w = 0 (the
    reference's ``AttackGrad='real'`` / exact-gradient training, B_THRES = 7); autograd then
    carries w^T df/d(x, theta). ``backward``: the solver's decisions (:data:`IMPLICIT_PRESETS`);
    ``backward_eps`` overrides its stopping threshold.

    J is taken at z* (the solver's state), as in the released code's ``autograd.grad(new_z1,
    z1, y)``, through the graph of u itself: at the fixed point f(z*) = z*, but z* of a
    finite solve is not one, and linearizing at f(z*) instead gave a different gradient."""
    _check_backward(backward, backward_eps)
    z_star = z_star.detach().requires_grad_(torch.is_grad_enabled())
    out = ctx.f(z_star)
    if not out.requires_grad:
        return out
    opts = dict(IMPLICIT_PRESETS[backward])
    if backward_eps is not None:
        opts["eps"] = float(backward_eps)

    solving = []

    def hook(grad):
        if solving:  # the solve's own vjps start at ``out``: pass them through unchanged
            return None
        solving.append(True)  # (the released code removes its hook instead; this one stays
        try:                  # valid for a second backward through a retained graph)
            solver = Broyden(max_iter=backward_iter, **opts)
            vjp = lambda y, idx=None: _vjp(out, z_star, y, idx) + (grad if idx is None
                                                                   else grad[idx])
            return solver.solve(vjp, torch.zeros_like(grad)).best
        finally:
            solving.pop()

    out.register_hook(hook)
    return out


def _vjp(out, z, y, idx):
    """J_f(z)^T y through the graph out = f(z) (kept for the outer backward)."""
    if idx is not None:  # per-sample stopping: vjp of the full batch, then keep the active rows
        full = torch.zeros_like(z)
        full[idx] = y
        return torch.autograd.grad(out, z, full, retain_graph=True)[0][idx]
    return torch.autograd.grad(out, z, y, retain_graph=True)[0]


class EarlyState(_Forward):
    """Classify the raw solver iterate z[i] (1 <= i <= N): h(z[i]).

    ``EarlyState('select')`` is unresolved until ``attacks.select_early_state`` (ready-made
    PGD-10 accuracy on a validation split, the paper's protocol) sets ``index`` and
    ``selection`` (the per-state accuracies it chose from). The output is not differentiable
    w.r.t. the input unless the solver keeps its graph: attacks use a surrogate gradient.
    """
    name = "early"

    def __init__(self, index: Union[int, str] = "select", selection: Optional[dict] = None):
        if index != "select" and (not isinstance(index, int) or index < 1):
            raise ValueError(f"EarlyState index must be an integer >= 1 or 'select', got {index!r}")
        self.index = index
        self.selection = selection

    def config(self):
        c = {"name": self.name, "index": self.index}
        if self.selection is not None:
            c["selection"] = self.selection
        return c

    def resolve(self, index: int, selection: dict) -> "EarlyState":
        self.index, self.selection = int(index), selection
        return self

    def readout(self, model, traj, ctx_end, x_orig, ctx_orig=None, unroll_ctx=None):
        if self.index == "select":
            raise RuntimeError("EarlyState('select') has not chosen its state yet: run "
                               "attacks.select_early_state(model, x_val, y_val) first")
        if self.index > traj.num_states:
            raise ValueError(f"EarlyState({self.index}) but the solver produced only "
                             f"{traj.num_states} states")
        z = traj.state(self.index)
        logits = ctx_end.head(z)
        return logits, f"z[{self.index}]", None


# ---------------------------------------------------------------------------------------------
# Sec. 3.2 dynamics
# ---------------------------------------------------------------------------------------------

class _SegmentedDynamics(_Forward):
    """Shared machinery: the dynamics run in segments of ``tf`` solver steps; between segments
    ``_update_input`` may change the input (R = 0: never)."""

    def __init__(self, tf: int, preset: str, readout=None, unroll_input: Optional[str] = None):
        if int(tf) != tf or tf < 1:
            raise ValueError(f"Tf must be a positive integer, got {tf!r}")
        if preset not in ("reference", "paper"):
            raise ValueError(f"preset must be 'reference' or 'paper', got {preset!r}")
        self.tf, self.preset = int(tf), preset
        self.inner = readout if readout is not None else FinalState()
        if not isinstance(self.inner, (FinalState, EarlyState)):
            raise TypeError("readout must be a FinalState or EarlyState")
        # Which input the final unroll sees: the reference uses the ORIGINAL input (spec 4);
        # Algorithm 1 ends on the purified input.
        self.unroll_input = unroll_input or ("original" if preset == "reference" else "purified")
        if self.unroll_input not in ("original", "purified"):
            raise ValueError(f"unroll_input must be 'original' or 'purified', got {unroll_input!r}")

    def _update_input(self, model, x0, x_cur, z, ctx, seg, f_of_inj=None):
        return x_cur

    def r_updates(self) -> int:
        return 0

    def readout(self, model, traj, ctx_end, x_orig, ctx_orig=None):
        uctx = ctx_orig if self.unroll_input == "original" else ctx_end
        return self.inner.readout(model, traj, ctx_end, x_orig, unroll_ctx=uctx)

    def dynamics(self, model, x, ctx):
        if not isinstance(model.solver, Broyden):
            raise ValueError(f"{type(self).__name__} needs a Broyden solver (got {model.solver!r})")
        N = model.solver.max_iter
        if N % self.tf:
            raise ValueError(f"Tf={self.tf} must divide the number of solver steps N={N}")
        if self.preset == "reference":
            return self._reference(model, x, ctx, N)
        return self._paper(model, x, ctx, N)

    # The released code (spec section 4): Broyden in segments of Tf steps whose memory holds Tf
    # columns, segment start = lowest-residual iterate of the previous segment, and a secant
    # "lift" after each input change instead of a re-solve.
    def _reference(self, model, x, ctx_orig, N):
        solver = model.solver.with_options(max_iter=self.tf, memory_size=self.tf,
                                           resume="reference", keep_graph=False)
        ctx = copy.copy(ctx_orig)  # same masks and counter; its injection follows x_cur
        x_cur = x.detach()
        z = model.zero_state(x)
        memory, gx0 = None, None
        parts, inputs, update_states = [], [], []
        nseg = N // self.tf
        for seg in range(nseg):
            r = solver.solve(ctx.f, z, gx0=gx0, memory=memory)
            parts.append(r)
            inputs.append(x_cur)
            z, memory = r.best, r.memory
            if seg == nseg - 1:
                break  # the reference's R-loop after the last segment changes nothing reported
            update_states.append(z)
            f_of_inj = None
            if ("lift" in getattr(self, "levers", ()) and self.r_updates() > 0
                    and _is_mdeq(model)):
                with torch.no_grad():  # shared by the updates and the lift
                    f_of_inj = model.cell.with_fixed_state(model.unflatten(z.detach()),
                                                           ctx.masks)
            x_new = self._update_input(model, x, x_cur, z, ctx, seg, f_of_inj)
            if x_new is not x_cur:
                # The lift needs g at z under the old input: memory.gx is g at the LAST iterate,
                # which is what the reference subtracts (z is the lowest of the segment).
                x_cur = x_new
                ctx.set_input(x_cur)
            with torch.no_grad():
                if f_of_inj is not None:  # = ctx.f(z) bitwise, without redoing the block convs
                    ctx.counter.add(None, False)
                    gx0 = model.flatten(f_of_inj(ctx.inj)) - z
                else:
                    gx0 = ctx.f(z) - z  # g_new(z): the lift's f-eval doubles as segment start
            memory = lift_memory(memory, gx0, memory.gx)
        # update_states[k]: the state the k-th input update held fixed (for the differentiable
        # replay of attacks.adaptive.ThroughDefense)
        return _concat(parts, model.solver.decisions), ctx, {"segment_inputs": inputs,
                                                             "update_states": update_states}

    # Algorithm 1: one solver step at a time; every Tf steps update the input R times with
    # Eq. (8) and re-solve z[t+1] from z[t] under the new input.
    def _paper(self, model, x, ctx_orig, N):
        # One-step Broyden solves chained through a continued memory (= a plain Broyden-N solve
        # when R = 0). No early stop: all N states are produced.
        solver = model.solver.with_options(max_iter=1, memory_size=N, resume="continue",
                                           keep_graph=False, protect=None, eps=0.0)
        ctx = copy.copy(ctx_orig)
        x_cur = x.detach()
        z = model.zero_state(x)
        memory, gx, parts, inputs, update_states = None, None, [], [], []
        for t in range(N):
            r = solver.solve(ctx.f, z, gx0=gx, memory=memory)
            if (t + 1) % self.tf == 0 and self.r_updates() > 0:
                update_states.append(r.states[0])
                x_cur = self._update_input(model, x, x_cur, r.states[0], ctx, t // self.tf)
                ctx.set_input(x_cur)
                r = solver.solve(ctx.f, z, memory=memory)  # re-solve z[t+1] from z[<=t]
            parts.append(r)
            inputs.append(x_cur)
            z, memory, gx = r.states[0], r.memory, r.memory.gx
        traj = _concat(parts, model.solver.decisions)
        _stop_check(traj, model.solver)
        return traj, ctx, {"step_inputs": inputs, "update_states": update_states}


def _stop_check(traj, solver):
    """Recompute the lowest-residual state over the whole chained trajectory."""
    # With decisions='batch' every sample's trace already holds the batch-level residual.
    crit = traj.rel_trace if solver.stop_mode == "rel" else traj.abs_trace
    best_t = crit.argmin(1)
    stacked = traj.stacked()
    traj.best = stacked[best_t, torch.arange(stacked.shape[1], device=best_t.device)]
    traj.best_index = best_t + 1
    traj.converged = crit.min(1).values < solver.eps


def _concat(parts, decisions) -> Trajectory:
    """One trajectory from consecutive segment solves (states z[1..N] in order)."""
    states = [s for p in parts for s in p.states]
    abs_tr = torch.cat([p.abs_trace for p in parts], 1)
    rel_tr = torch.cat([p.rel_trace for p in parts], 1)
    last = parts[-1]
    # The reference's final unroll starts from the lowest-residual iterate of the LAST segment.
    offset = sum(p.num_states for p in parts[:-1])
    return Trajectory(states=states, abs_trace=abs_tr, rel_trace=rel_tr, best=last.best,
                      best_index=last.best_index + offset,
                      nstep=sum(p.nstep for p in parts), converged=last.converged,
                      nfev=sum(p.nfev for p in parts), memory=last.memory)


class SegmentedSolve(_SegmentedDynamics):
    """Control for Sec. 3.2 (Table 5 ablation): the reference's segmented Broyden solve with
    R = 0 input updates. With the ``reference`` preset it differs from a plain Broyden-N solve
    because the memory is reset to Tf columns per segment (spec section 4)."""
    name = "segmented"

    def __init__(self, tf: int = 2, readout=None, preset: str = "reference",
                 unroll_input: Optional[str] = None):
        super().__init__(tf, preset, readout, unroll_input)

    def config(self):
        return {"name": self.name, "tf": self.tf, "preset": self.preset,
                "unroll_input": self.unroll_input, "readout": self.inner.config()}


class EntropyReduction(_SegmentedDynamics):
    """Input entropy reduction along the neural dynamics (Sec. 3.2, Algorithm 1, Eq. 8).

    Every ``tf`` solver steps, the input is updated ``r`` times to reduce the prediction entropy
    of h(f(z; x')) at the current state z, within the l_inf ball of radius ``eps`` around the
    given input and within [0, 1].

    Presets:
      * ``reference`` (the released code; defaults beta=2/255, R=10, Tf=2, eps=8/255): sign
        steps x' <- clip(x' - beta sign(grad H)); the state is not re-solved: Broyden's secant
        memory is "lifted"; segment memory of Tf columns; final unroll on the ORIGINAL input.
      * ``paper`` (Algorithm 1 / Eq. 8): gradient steps x' <- Proj(x' - beta grad H), then z[t+1]
        is re-solved from z[t] under the new input; final unroll on the purified input.

    The gradient of H goes through the stem, one f step and the head, with z fixed (spec 4).
    ``readout``: ``FinalState()`` (default) or ``EarlyState(i)``.
    """
    name = "entropy_reduction"

    def __init__(self, beta: float = 2 / 255, r: int = 10, tf: int = 2, eps: float = 8 / 255,
                 preset: str = "reference", readout=None, unroll_input: Optional[str] = None,
                 kernels="fast"):
        super().__init__(tf, preset, readout, unroll_input)
        if int(r) != r or r < 0:
            raise ValueError(f"R must be a non-negative integer, got {r!r}")
        if not beta > 0 or not eps >= 0:
            raise ValueError(f"beta must be > 0 and eps >= 0 (got beta={beta}, eps={eps})")
        self.beta, self.r, self.eps = float(beta), int(r), float(eps)
        # A cost option (config() records it only when an inexact lever is on, since only then
        # do the numbers differ from the old code's): which
        # kernel-level levers of issue 16 the input updates use ('fast': KERNEL_LEVERS,
        # 'reference': none, the pre-issue-16 code; 'fast+inexact': FAST_INEXACT, the same
        # numbers to float tolerance only; or a subset of the levers' names).
        self.kernels = kernels
        self.levers = _levers(kernels)

    def config(self):
        cfg = {"name": self.name, "beta": self.beta, "r": self.r, "tf": self.tf, "eps": self.eps,
               "preset": self.preset, "unroll_input": self.unroll_input,
               "readout": self.inner.config()}
        if self.levers & set(INEXACT_LEVERS):
            # not bitwise the old numbers: part of the identity, recorded with every result
            cfg["kernels"] = ("fast+inexact" if self.levers == frozenset(FAST_INEXACT)
                              else sorted(self.levers))
        return cfg

    def r_updates(self):
        return self.r

    def _update_input(self, model, x0, x_cur, z, ctx, seg, f_of_inj=None):
        if self.r == 0:
            return x_cur
        x0 = x0.detach()
        xc = x_cur.detach()
        if f_of_inj is None:
            with torch.no_grad():  # z is fixed: the x-independent part of f is computed once
                f_of_inj = model.cell.with_fixed_state(model.unflatten(z.detach()), ctx.masks)
        if getattr(self, "levers", frozenset()) & _UPDATE_LEVERS and _is_mdeq(model):
            return self._update_input_fast(model, x0, xc, ctx, f_of_inj)
        for _ in range(self.r):
            with torch.enable_grad():
                xv = xc.clone().requires_grad_(True)
                ctx.counter.add(None, True)
                fz = model.flatten(f_of_inj(model.inject(xv)))
                # Sum, not mean, over the batch: the per-sample gradient must not depend on
                # the batch size (the reference's mean only rescales, sign() hides it).
                h = prediction_entropy(ctx.head(fz)).sum()
                (g,) = torch.autograd.grad(h, xv)
            step = g.sign() if self.preset == "reference" else g
            xc = xc - self.beta * step
            xc = torch.min(torch.max(xc, x0 - self.eps), x0 + self.eps).clamp_(0, 1)
        return xc

    def _update_input_fast(self, model, x0, xc, ctx, f_of_inj):
        """The same R steps as the loop above with the kernel levers of ``self.levers``
        (MDEQClassifier only). The exact levers (KERNEL_LEVERS) leave every value bitwise
        unchanged; the INEXACT_LEVERS change the input gradient in the last bits (other conv
        kernels, another order of products), and the sign steps of the reference preset turn
        the components within rounding of 0 into inputs that differ by beta."""
        lv = self.levers
        fmt = torch.channels_last if "channels_last" in lv else torch.contiguous_format
        with _frozen_params(model if "frozen_params" in lv else None), \
                _bn_as_affine(model if "bn_affine" in lv and "bn_fold" not in lv else None), \
                _patched_convs(model, fold_bn="bn_fold" in lv, im2col_input="stem_im2col" in lv):
            for _ in range(self.r):
                with torch.enable_grad():
                    xv = xc.detach().requires_grad_(True)
                    ctx.counter.add(None, True)
                    out = f_of_inj(model.inject(xv.contiguous(memory_format=fmt)))
                    if "channels_last" in lv:  # + a layout-safe last ReLU (bitwise the same)
                        logits = model.head.forward_layout_safe(
                            [_ToFormat.apply(t, fmt) for t in out])
                    elif "list_head" in lv:  # the head takes the branch list: no flat round trip
                        logits = model.head([t.contiguous(memory_format=fmt) for t in out])
                    else:
                        logits = ctx.head(model.flatten(out))
                    h = prediction_entropy(logits).sum()
                    (g,) = torch.autograd.grad(h, xv)
                step = g.sign() if self.preset == "reference" else g
                xc = xc - self.beta * step
                xc = torch.min(torch.max(xc, x0 - self.eps), x0 + self.eps).clamp_(0, 1)
        return xc


# Kernel-level levers of the Sec. 3.2 input updates (issue 16), each measured by
# ``deqbench bench forward --compare-old`` (benchmark/bench_forward.py):
#   list_head      the head reads f's branch list directly (no flatten + unflatten copies);
#   channels_last  stem and head of the updates in channels-last layout (faster 1x1 convs);
#   bn_affine      eval-mode BatchNorm as one addcmul with folded per-channel scale and shift
#                  (the same map, values equal to ~1 ulp; a cheaper backward than native's);
#   lift           the lift's f(z; x_new) after the updates reuses the fixed-state part of f
#                  the updates computed (bitwise the same value; the block convs are not redone).
#   frozen_params  the model's parameters do not require grad during the updates (only dH/dx
#                  is taken): autograd records and saves less; bitwise the same gradient.
#   bn_fold        every eval-mode BatchNorm2d that directly follows a conv (stem, stage 0, the
#                  head) is folded into that conv's weight and bias for the updates: the BN's
#                  forward and backward passes disappear (supersedes bn_affine);
#   stem_im2col    the input gradient of the convs that read the image (<= 4 channels) as one
#                  matmul + col2im (F.fold) instead of oneDNN's backward-data, which is slow for
#                  one input channel (0.2 vs 1.1 ms at batch 64 on 1x28x28).
# 'fast' (the default) = KERNEL_LEVERS, each bitwise the same numbers as the old code. The
# INEXACT_LEVERS are off by default: their input gradients differ in the last bits, and the
# sign steps of the reference preset turn that into different inputs (on 64 Fashion-MNIST
# images at (Tf, R) = (2, 10), 'fast+inexact': 322 of 50,176 pixels moved by beta, logits up
# to 1.6e-3 apart), so they are NOT bitwise the same numbers. They are the same to float
# tolerance: the old float32 code is itself 175 pixels (and 1.46e-3 in the logits) away from
# the float64 computation of the defense, 'fast+inexact' 137 (1.60e-3), with the same
# predictions (benchmark.bench_forward.within_float_tolerance). Opt in with
# kernels='fast+inexact' (or a subset, e.g. kernels=('list_head', 'channels_last')).
# With channels_last the head's last ReLU + mean (ClassificationHead.forward_layout_safe) and
# the gradient handed back to the NCHW cell (_ToFormat) keep one layout per op: both exact.
KERNEL_LEVERS = ("list_head", "frozen_params", "lift")
INEXACT_LEVERS = ("channels_last", "bn_affine", "bn_fold", "stem_im2col")
# 'fast+inexact': every lever; the BN levers overlap, bn_fold is the one used
FAST_INEXACT = KERNEL_LEVERS + ("channels_last", "bn_fold", "stem_im2col")
_UPDATE_LEVERS = frozenset(("list_head", "frozen_params") + INEXACT_LEVERS)


def _levers(kernels) -> frozenset:
    if kernels == "fast":
        return frozenset(KERNEL_LEVERS)
    if kernels == "reference":
        return frozenset()
    if kernels == "fast+inexact":
        return frozenset(FAST_INEXACT)
    if isinstance(kernels, str):
        kernels = [k for k in kernels.split(",") if k]
    bad = sorted(set(kernels) - set(KERNEL_LEVERS) - set(INEXACT_LEVERS))
    if bad:
        raise ValueError(f"unknown kernel lever(s) {bad}; kernels must be 'fast', 'reference', "
                         f"'fast+inexact' or a subset of {list(KERNEL_LEVERS + INEXACT_LEVERS)}")
    out = frozenset(kernels)
    if "channels_last" in out:  # the layout is applied to the head's branch inputs
        out = out | {"list_head"}
    return out


def _is_mdeq(model) -> bool:
    from .mdeq import MDEQClassifier
    return isinstance(model, MDEQClassifier)


@contextlib.contextmanager
def _frozen_params(model):
    """Within the block the parameters of ``model`` that required grad do not (restored on
    exit, also after an error). ``None``: no change."""
    if model is None:
        yield
        return
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def legacy_kernels():
    """Within the block: Broyden copies its memory each step and MDEQ cells recompute constant
    fusion terms (the pre-issue-16 kernels; with ``EntropyReduction(kernels='reference')``
    the whole old Sec. 3.2 path), for A/B benchmarks in one process. Same numbers."""
    from . import mdeq
    from .solvers import legacy_broyden_memory
    old = mdeq.CACHE_CONSTANT_FUSION
    mdeq.CACHE_CONSTANT_FUSION = False
    try:
        with legacy_broyden_memory():
            yield
    finally:
        mdeq.CACHE_CONSTANT_FUSION = old


def _bn_scale_shift(bn):
    """Eval-mode BatchNorm2d as the per-channel affine map it applies: (scale, shift) with
    scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale."""
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = bn.bias + shift
    return scale, shift


@contextlib.contextmanager
def _bn_as_affine(model):
    """Within the block every eval-mode BatchNorm2d of ``model`` computes
    ``shift.addcmul(x, scale)`` with scale = weight / sqrt(running_var + eps) and
    shift = bias - running_mean * scale: the per-channel affine map native batch norm applies in
    eval mode (values equal to ~1 ulp, not bitwise: tests/test_forward_speed.py), with the
    backward of a multiply instead of native batch norm's. ``None``: no change."""
    if model is None:
        yield
        return
    patched = []
    try:
        for mod in model.modules():
            if (isinstance(mod, torch.nn.BatchNorm2d) and not mod.training
                    and mod.running_mean is not None and "forward" not in mod.__dict__):
                scale, shift = _bn_scale_shift(mod)
                sc, sh = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
                mod.forward = (lambda sc, sh: lambda inp: sh.addcmul(inp, sc))(sc, sh)
                patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward


class _ToFormat(torch.autograd.Function):
    """``t.contiguous(memory_format=fmt)`` whose backward returns the gradient in t's own
    layout. Autograd's passes the gradient on in ``fmt``, and the NCHW ops before it (the
    cell's GroupNorms and adds) then run mixed-layout strided loops (up to 8x slower here)."""

    @staticmethod
    def forward(ctx, t, fmt):
        ctx.src = (torch.channels_last if t.dim() == 4 and not t.is_contiguous()
                   and t.is_contiguous(memory_format=torch.channels_last)
                   else torch.contiguous_format)
        return t.contiguous(memory_format=fmt)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous(memory_format=ctx.src), None


def _conv_bn_pairs(model):
    """(conv, bn) pairs of ``model`` in which an eval-mode BatchNorm2d with running statistics
    directly follows a zero-padded Conv2d: consecutive children of an nn.Sequential, and the
    pairs a module names in its ``conv_bn_pairs`` attribute (the head's Bottleneck)."""
    def ok(c, b):
        return (isinstance(c, torch.nn.Conv2d) and isinstance(b, torch.nn.BatchNorm2d)
                and not b.training and b.running_mean is not None and c.padding_mode == "zeros"
                and c.out_channels == b.num_features)
    pairs = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Sequential):
            kids = list(mod)
            pairs += [(a, b) for a, b in zip(kids, kids[1:]) if ok(a, b)]
        for cn, bn in getattr(mod, "conv_bn_pairs", ()):
            a, b = getattr(mod, cn), getattr(mod, bn)
            if ok(a, b):
                pairs.append((a, b))
    return pairs


class _Im2colInputGrad(torch.autograd.Function):
    """conv2d whose input gradient is one matmul + col2im (F.fold): for a conv that reads the
    image (1-3 channels), oneDNN's backward-data is 5x slower than this at batch 64 on this CPU
    (torch has no switch to pick another backward algorithm, hence our own). The forward is
    F.conv2d itself (the same values); the gradient is the same sum in another order (float
    rounding). Only the input gradient: weight and bias must not require grad."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(weight)
        ctx.geom = (x.shape[-2:], weight.shape[-2:], stride, padding, dilation)
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        size, k, stride, padding, dilation = ctx.geom
        cols = torch.matmul(w.reshape(w.shape[0], -1).t(), g.reshape(g.shape[0], g.shape[1], -1))
        gx = F.fold(cols, tuple(size), tuple(k), dilation=dilation, padding=padding, stride=stride)
        return gx, None, None, None, None, None


@contextlib.contextmanager
def _patched_convs(model, fold_bn: bool = False, im2col_input: bool = False):
    """Within the block (eval mode, parameters frozen): ``fold_bn`` folds every eval-mode BN
    that follows a conv into the conv (weight * scale, bias * scale + shift; the BN becomes the
    identity): the same map to float rounding, with no BN pass forward or backward.
    ``im2col_input``: convs with <= 4 input channels and groups = 1 (the ones reading the image)
    take their input gradient from :class:`_Im2colInputGrad`. Restored on exit."""
    if not (fold_bn or im2col_input):
        yield
        return
    patched = []
    try:
        folded = {}
        if fold_bn:
            for conv, bn in _conv_bn_pairs(model):
                if conv in folded:
                    continue
                scale, shift = _bn_scale_shift(bn)
                with torch.no_grad():
                    w = conv.weight * scale.view(-1, 1, 1, 1)
                    b = shift if conv.bias is None else conv.bias * scale + shift
                folded[conv] = (w, b)
                bn.forward = lambda inp: inp
                patched.append(bn)
        for conv in [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]:
            im2col = (im2col_input and conv.in_channels <= 4 and conv.groups == 1
                      and conv.padding_mode == "zeros" and not conv.weight.requires_grad)
            if conv not in folded and not im2col:
                continue
            w, b = folded.get(conv, (None, None))

            def fwd(inp, conv=conv, w=w, b=b, im2col=im2col):
                wt = conv.weight if w is None else w
                bs = conv.bias if w is None else b
                if im2col and torch.is_grad_enabled() and inp.requires_grad:
                    return _Im2colInputGrad.apply(inp, wt, bs, conv.stride, conv.padding,
                                                  conv.dilation)
                return F.conv2d(inp, wt, bs, conv.stride, conv.padding, conv.dilation, conv.groups)
            conv.forward = fwd
            patched.append(conv)
        yield
    finally:
        for mod in patched:
            del mod.forward


class RandomIntermediate(_Forward):
    """Sec. 3.3 training forward: the loss is computed from a RANDOM intermediate state.

    Presets:
      * ``reference`` (the released code, spec 3.6): one k ~ U{1..N} per forward call, shared by
        the batch; the solver really stops after k steps; the head sees the lowest-residual of
        z[1..k] after the training unroll (f + ``steps`` damped steps at ``lam``).
      * ``paper`` (Eq. 10): i ~ U{1..N} per sample and h(z[i]) directly, with the gradient
        backpropagated through the i solver steps (the only way h(z[i]) trains f).
    Draws use torch's global generator (seed it for reproducibility). ``last_draw`` holds the
    draw of the latest call ((1,) for reference, (B,) for paper).
    """
    name = "random_intermediate"

    def __init__(self, preset: str = "reference", steps: int = 5, lam: float = 0.5):
        if preset not in ("reference", "paper"):
            raise ValueError(f"preset must be 'reference' or 'paper', got {preset!r}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        _check_lam(lam)
        self.preset, self.steps, self.lam = preset, int(steps), float(lam)
        self.last_draw = None

    def config(self):
        return {"name": self.name, "preset": self.preset, "steps": self.steps, "lam": self.lam}

    def dynamics(self, model, x, ctx):
        N = model.solver.max_iter
        if self.preset == "reference":
            k = int(torch.randint(1, N + 1, (1,)))
            self.last_draw = torch.tensor([k])
            solver = model.solver.with_options(max_iter=k)
            return solver.solve(ctx.f, model.zero_state(x)), ctx, {"k": k}
        draw = torch.randint(1, N + 1, (x.shape[0],))
        self.last_draw = draw
        solver = model.solver.with_options(max_iter=int(draw.max()), keep_graph=True,
                                           protect=None)
        return solver.solve(ctx.f, model.zero_state(x)), ctx, {"i": draw}

    def readout(self, model, traj, ctx_end, x_orig, ctx_orig=None, unroll_ctx=None):
        if self.preset == "reference":
            u = unroll(ctx_end, traj.best.detach(), self.steps, self.lam, True)
            return ctx_end.head(u), f"random z[<= {int(self.last_draw[0])}]", None
        idx = (self.last_draw - 1).to(traj.best.device)
        stacked = traj.stacked()
        z = stacked[idx, torch.arange(stacked.shape[1], device=idx.device)]
        return ctx_end.head(z), "random z[i] per sample", None


DEFENSES = {"final": FinalState, "early": EarlyState, "entropy_reduction": EntropyReduction,
            "segmented": SegmentedSolve, "random_intermediate": RandomIntermediate}


def make_defense(spec) -> _Forward:
    """Build a forward pass from a config dict (``{'name': 'early', 'index': 7}``), a string
    (``'final'``, ``'early:7'``, ``'entropy_reduction'``) or an existing object."""
    if isinstance(spec, _Forward):
        return spec
    if isinstance(spec, str):
        name, _, arg = spec.partition(":")
        spec = {"name": name}
        if arg:
            if name != "early":
                raise ValueError(f"only 'early:<i>' takes an argument, got {spec!r}")
            try:
                spec["index"] = int(arg) if arg != "select" else "select"
            except ValueError:
                raise ValueError(f"bad parameters for defense 'early': index must be an integer "
                                 f"or 'select', got {arg!r}") from None
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"defense spec must be a name, 'early:<i>' or a dict with 'name': {spec!r}")
    spec = dict(spec)
    name = spec.pop("name")
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; choose one of {sorted(DEFENSES)}")
    if "readout" in spec and not isinstance(spec["readout"], _Forward):
        spec["readout"] = make_defense(spec["readout"])
    try:
        return DEFENSES[name](**spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad parameters for defense {name!r}: {e}") from None
