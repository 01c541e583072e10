"""Fixed-point solvers that expose the whole neural dynamics z[1..N] of a DEQ.

Every solver finds z* = f(z*) for a batch of flattened states ``z`` of shape (B, D) and returns a
:class:`Trajectory` holding every iterate, per-sample residual traces, the lowest-residual state and
the number of f evaluations each sample took part in.

Why our own solvers instead of ``torchdeq.solver``: torchdeq's monitored solvers return only the
states at requested indices (off by one for Broyden), record nothing for Anderson's first two
steps, make stopping decisions on the batch maximum, evaluate f on converged samples, and cannot
resume a Broyden memory across calls (which the reference's Sec. 3.2 code needs). The Broyden
update below is the same "good Broyden" rank-1 update as torchdeq's and the reference's
(``tests/test_solvers.py`` checks the iterates against ``torchdeq.solver.broyden_solver``).

Conventions
-----------
* ``f(z, idx)`` maps (b, D) -> (b, D); ``idx`` is ``None`` (the whole batch) or a LongTensor of the
  sample indices ``z`` belongs to, so that per-sample context (input injection, dropout masks) can
  be sliced. Each call counts one f evaluation for each of those samples.
* z[0] = z0 (zeros by default); z[t] for t = 1..N are the iterates; z[1] = f(z0) for every solver.
* residuals of z[t]: abs = ||f(z[t]) - z[t]||_2, rel = abs / (||f(z[t])||_2 + 1e-9) (the reference's
  ``stop_mode='rel'``).
* ``decisions='sample'`` (default): each sample stops (rel < eps), and selects its lowest-residual
  iterate, on its own residual, so its result does not depend on the rest of the batch.
  ``decisions='batch'`` reproduces the reference: Frobenius norms over the whole batch decide.
* A sample that has stopped keeps its last iterate: z[t] for later t repeats it, f is not evaluated
  on it any more, and its residual trace repeats its last value.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = [
    "Trajectory", "BroydenMemory", "Solver", "Broyden", "FixedPoint", "Anderson",
    "make_solver", "SOLVERS", "legacy_broyden_memory",
]

F = Callable[[Tensor, Optional[Tensor]], Tensor]
_TINY = 1e-9

# Broyden writes its low-rank memory in place (no autograd graph only); False restores the
# copy-per-step version, kept so that benchmarks can compare both in one process
# (``with legacy_broyden_memory(): ...``). Both give bitwise the same iterates.
INPLACE_MEMORY = True


@contextlib.contextmanager
def legacy_broyden_memory():
    """Within the block, Broyden copies U, VT at every step (the pre-issue-16 code path)."""
    global INPLACE_MEMORY
    old, INPLACE_MEMORY = INPLACE_MEMORY, False
    try:
        yield
    finally:
        INPLACE_MEMORY = old


@dataclass
class BroydenMemory:
    """Low-rank inverse-Jacobian memory of Broyden's method, resumable across calls.

    The approximation of the inverse Jacobian of g(z) = f(z) - z is ``-I + U^T @ VT`` in
    this layout: ``U`` (B, M, D) holds the M columns of the reference's U as rows, ``VT``
    (B, M, D). Issue 16: with the columns as contiguous rows, the matrix-vector products with
    a few columns read contiguous memory (the reference's (B, D, M) layout made them strided
    gemv calls: 1.5-2.5x slower, ~20% of a reported forward on the tiny DEQ); the sums then
    run in another order, so iterates agree with the (B, D, M) layout to float rounding, not
    bitwise. ``n``: number of columns written by the last call;
    ``dx``, ``dg``: (B, D) last secant pair; ``z``, ``gx``: (B, D) last iterate and g there.
    """
    U: Tensor
    VT: Tensor
    n: int
    dx: Tensor
    dg: Tensor
    z: Tensor
    gx: Tensor


@dataclass
class Trajectory:
    """The neural dynamics of one solve.

    Attributes:
        states: list of N tensors (B, D): z[1..N] (``states[t-1]`` is z[t]).
        abs_trace, rel_trace: (B, N) residuals of z[1..N].
        best: (B, D) lowest-residual iterate (by ``stop_mode``); ``best_index``: (B,) its t in 1..N.
        nstep: (B,) iterations a sample actually took (< N when it converged early).
        converged: (B,) whether rel (or abs) residual fell below eps.
        nfev: (B,) f evaluations each sample took part in during this solve (no gradient).
        memory: Broyden memory at the end (Broyden only), for resuming.
    """
    states: list
    abs_trace: Tensor
    rel_trace: Tensor
    best: Tensor
    best_index: Tensor
    nstep: Tensor
    converged: Tensor
    nfev: Tensor
    memory: Optional[BroydenMemory] = None
    extra: dict = field(default_factory=dict)

    @property
    def num_states(self) -> int:
        return len(self.states)

    def state(self, t: int) -> Tensor:
        """z[t] for 1 <= t <= N, shape (B, D)."""
        if not 1 <= t <= len(self.states):
            raise IndexError(f"state index {t} outside 1..{len(self.states)}")
        return self.states[t - 1]

    def stacked(self) -> Tensor:
        """(N, B, D) tensor of all iterates."""
        return torch.stack(self.states, 0)

    def residual(self, t: int, mode: str = "rel") -> Tensor:
        trace = self.rel_trace if mode == "rel" else self.abs_trace
        return trace[:, t - 1]


def _residuals(gx: Tensor, z: Tensor, batch: bool):
    """abs/rel residual of iterate z with g(z) = gx; per sample (b,) or batch-level scalars
    broadcast to (b,)."""
    if batch:
        a = gx.norm()
        r = a / ((gx + z).norm() + _TINY)
        return a.expand(gx.shape[0]), r.expand(gx.shape[0])
    a = gx.norm(dim=1)
    return a, a / ((gx + z).norm(dim=1) + _TINY)


class Solver:
    """Base class: the bookkeeping shared by all solvers (per-sample stop, lowest-residual
    selection, traces, f-eval counts). Subclasses implement ``_start`` and ``_propose``.

    Args:
        max_iter: N, number of iterates z[1..N] (the reference's ``F_THRES`` = 8).
        eps: convergence threshold on the residual chosen by ``stop_mode`` (reference 1e-3).
        stop_mode: 'rel' (reference) or 'abs'.
        decisions: 'sample' (default, batch-invariant) or 'batch' (the reference's).
        protect: stop a sample whose residual exceeds 1e3 x its first residual (the reference's
            ``prot_break``); ``None`` disables it.
        keep_graph: keep the autograd graph through the iterations (full backpropagation through
            the solve); by default states are detached and f runs under ``no_grad``.
    """
    name = "base"

    def __init__(self, max_iter: int = 8, eps: float = 1e-3, stop_mode: str = "rel",
                 decisions: str = "sample", protect: Optional[float] = 1e3,
                 keep_graph: bool = False):
        if int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if stop_mode not in ("rel", "abs"):
            raise ValueError(f"stop_mode must be 'rel' or 'abs', got {stop_mode!r}")
        if decisions not in ("sample", "batch"):
            raise ValueError(f"decisions must be 'sample' or 'batch', got {decisions!r}")
        self.max_iter, self.eps, self.stop_mode = int(max_iter), float(eps), stop_mode
        self.decisions, self.protect, self.keep_graph = decisions, protect, keep_graph

    def config(self) -> dict:
        return dict(name=self.name, max_iter=self.max_iter, eps=self.eps, stop_mode=self.stop_mode,
                    decisions=self.decisions, protect=self.protect, keep_graph=self.keep_graph)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def with_options(self, **kw) -> "Solver":
        cfg = self.config()
        cfg.pop("name")
        cfg.update(kw)
        return type(self)(**cfg)

    def _extra_config(self) -> dict:
        return {}

    # -- subclass interface -------------------------------------------------------------------
    def _start(self, f: F, z0: Tensor, gx0: Optional[Tensor], memory) -> dict:
        raise NotImplementedError

    def _propose(self, st: dict, idx: Optional[Tensor]) -> Tensor:
        """Next iterate for the samples ``idx`` (None = all) from solver state ``st``."""
        raise NotImplementedError

    def _accept(self, st: dict, idx, z_new: Tensor, gx_new: Tensor) -> None:
        """Update the solver state after evaluating g at the new iterate."""
        raise NotImplementedError

    def _finish(self, st: dict):
        return None

    # -- the loop ------------------------------------------------------------------------------
    def solve(self, f: F, z0: Tensor, *, gx0: Optional[Tensor] = None,
              memory: Optional[BroydenMemory] = None) -> Trajectory:
        """Run N iterations from z0 (B, D).

        ``gx0``: optional precomputed g(z0) = f(z0) - z0 (saves one f evaluation; its cost must
        have been counted by the caller). ``memory``: Broyden memory to resume from.
        """
        if z0.dim() != 2:
            raise ValueError(f"solvers work on flattened states (B, D), got shape {tuple(z0.shape)}")
        grad_ctx = torch.enable_grad() if self.keep_graph else torch.no_grad()
        with grad_ctx:
            return self._solve(f, z0 if self.keep_graph else z0.detach(), gx0, memory)

    def _solve(self, f, z0, gx0, memory):
        B, N = z0.shape[0], self.max_iter
        dev = z0.device
        batch = self.decisions == "batch"
        nfev = torch.zeros(B, dtype=torch.long, device=dev)
        counted_f = _counting(f, nfev)
        st = self._start(counted_f, z0, gx0, memory)
        st["f"] = counted_f
        active = torch.ones(B, dtype=torch.bool, device=dev)
        nstep = torch.zeros(B, dtype=torch.long, device=dev)
        states, abs_tr, rel_tr = [], [], []
        lowest = torch.full((B,), float("inf"), dtype=z0.dtype, device=dev)
        best = z0
        best_index = torch.ones(B, dtype=torch.long, device=dev)
        first = None
        z_cur = z0
        for t in range(1, N + 1):
            if bool(active.all()):
                idx = None
            else:
                idx = active.nonzero().squeeze(1)
            if idx is not None and idx.numel() == 0:
                states.append(z_cur)
                abs_tr.append(abs_tr[-1])
                rel_tr.append(rel_tr[-1])
                continue
            z_new_a = self._propose(st, idx)
            gx_new_a = counted_f(z_new_a, idx) - z_new_a
            self._accept(st, idx, z_new_a, gx_new_a)
            a_res, r_res = _residuals(gx_new_a, z_new_a, batch)
            if idx is None:
                z_cur = z_new_a
                a_full, r_full = a_res, r_res
            else:
                z_cur = z_cur.index_copy(0, idx, z_new_a)
                a_full = abs_tr[-1].index_copy(0, idx, a_res.to(abs_tr[-1].dtype))
                r_full = rel_tr[-1].index_copy(0, idx, r_res.to(rel_tr[-1].dtype))
            a_full, r_full = a_full.detach(), r_full.detach()
            states.append(z_cur)
            abs_tr.append(a_full)
            rel_tr.append(r_full)
            nstep = nstep + active.long()
            crit = r_full if self.stop_mode == "rel" else a_full
            improved = (crit < lowest) & active
            if t == 1:  # z[1] is the first candidate even when its residual is NaN
                improved = active.clone()
            lowest = torch.where(improved, torch.nan_to_num(crit, nan=float("inf")), lowest)
            best = torch.where(improved[:, None], z_cur, best)
            best_index = torch.where(improved, torch.full_like(best_index, t), best_index)
            if first is None:
                first = crit.clone()
            stop = crit < self.eps
            if self.protect is not None:
                stop = stop | (crit > self.protect * first)
            active = active & ~stop
        traj = Trajectory(
            states=states,
            abs_trace=torch.stack(abs_tr, 1),
            rel_trace=torch.stack(rel_tr, 1),
            best=best,
            best_index=best_index,
            nstep=nstep,
            converged=(lowest < self.eps),
            nfev=nfev,
            memory=self._finish(st),
        )
        return traj


def _counting(f: F, nfev: Tensor) -> F:
    def g(z, idx=None):
        if idx is None:
            nfev.add_(1)
        else:
            nfev.index_add_(0, idx, torch.ones_like(idx))
        return f(z, idx)
    return g


def _take(t: Tensor, idx):
    return t if idx is None else t.index_select(0, idx)


def _put(t: Tensor, idx, v: Tensor) -> Tensor:
    return v if idx is None else t.index_copy(0, idx, v)


class FixedPoint(Solver):
    """Plain fixed-point iteration z[t+1] = f(z[t]) (Eq. 2 of the paper)."""
    name = "fixed_point"

    def _start(self, f, z0, gx0, memory):
        gx = f(z0, None) - z0 if gx0 is None else gx0
        return {"z": z0, "gx": gx}

    def _propose(self, st, idx):
        return _take(st["z"], idx) + _take(st["gx"], idx)

    def _accept(self, st, idx, z_new, gx_new):
        st["z"] = _put(st["z"], idx, z_new)
        st["gx"] = _put(st["gx"], idx, gx_new)


def _rmatvec(U, VT, x):
    """x^T(-I + U V^T): x (b, D), U (b, m, D) (the columns of U as rows), VT (b, m, D)."""
    if U.shape[1] == 0:
        return -x
    # The products with U and VT as (b, 1, D) x (b, D, m) on a transposed view, and the -x added
    # inside the second product (baddbmm, beta=-1): 1.5-15x faster on a CPU than
    # bmm(U, x[:, :, None]), whose (b, m, D) x (b, D, 1) shape MKL runs as slow gemvs, and the
    # same sums in another order (float rounding, issue 16).
    c = torch.bmm(x[:, None, :], U.transpose(1, 2))
    return torch.baddbmm(x[:, None, :], c, VT, beta=-1)[:, 0]


def _matvec(U, VT, x):
    """(-I + U V^T) x, U and VT (b, m, D)."""
    if U.shape[1] == 0:
        return -x
    c = torch.bmm(x[:, None, :], VT.transpose(1, 2))  # as in _rmatvec
    return torch.baddbmm(x[:, None, :], c, U, beta=-1)[:, 0]


def _rank1(U, VT, dx, dg):
    """Broyden's "good" rank-1 pair (u, vT) for the secant (dx, dg) given the columns U, VT."""
    vT = _rmatvec(U, VT, dx)
    # the row-wise dot as a product and a sum: einsum("bd,bd->b") runs it as b slow gemvs (10x
    # slower on a CPU); same sum in another order
    u = (dx - _matvec(U, VT, dg)) / torch.linalg.vecdot(vT, dg)[:, None]
    return torch.nan_to_num(u, nan=0.0), torch.nan_to_num(vT, nan=0.0)


class Broyden(Solver):
    """Broyden's method without line search, as in the reference (spec section 2.1).

    Args (beyond :class:`Solver`):
        memory_size: number of rank-1 columns kept (default: max_iter, i.e. never wraps).
        resume: how a memory passed to ``solve`` is continued: 'continue' (default) appends new
            columns after the stored ones, so N one-step solves chained through their memories
            equal one N-step solve; 'reference' uses the stored columns for the first update only
            and then overwrites them from column 0, as the reference's Sec. 3.2 code does.
    """
    name = "broyden"

    def __init__(self, *args, memory_size: Optional[int] = None, resume: str = "continue", **kw):
        super().__init__(*args, **kw)
        if resume not in ("continue", "reference"):
            raise ValueError(f"resume must be 'continue' or 'reference', got {resume!r}")
        self.memory_size, self.resume = memory_size, resume

    def _extra_config(self):
        return {"memory_size": self.memory_size, "resume": self.resume}

    def config(self):
        c = super().config()
        c.update(self._extra_config())
        return c

    def _start(self, f, z0, gx0, memory):
        B, D = z0.shape
        M = self.memory_size or self.max_iter
        gx = f(z0, None) - z0 if gx0 is None else gx0
        U = z0.new_zeros(B, M, D)
        VT = z0.new_zeros(B, M, D)
        n0 = 0
        if memory is not None:
            if memory.U.shape[0] != B or memory.U.shape[2] != D:
                raise ValueError("Broyden memory does not match the batch/state shape: "
                                 f"memory {(memory.U.shape[0], memory.U.shape[2])} vs z0 {(B, D)}")
            m = min(M, memory.U.shape[1])
            U[:, :m] = memory.U[:, :m]
            VT[:, :m] = memory.VT[:, :m]
            # The reference resumes with the stored columns for the FIRST update only; its step
            # counter then restarts at 0, so new columns overwrite from column 0 (spec 2.1).
            n_mem = min(memory.n, m)
            update = -_matvec(U[:, :n_mem], VT[:, :n_mem], gx)
            if self.resume == "continue":
                n0 = memory.n
        else:
            update = gx.clone()  # B_0 = -I
        zero = torch.zeros(B, dtype=torch.long, device=z0.device)
        return {"z": z0, "gx": gx, "U": U, "VT": VT, "update": update, "k": zero,
                "dx": torch.zeros_like(z0), "dg": torch.zeros_like(z0), "M": M, "n0": n0}

    def _propose(self, st, idx):
        return _take(st["z"], idx) + _take(st["update"], idx)

    def _accept(self, st, idx, z_new, gx_new):
        M = st["M"]
        z_old, gx_old = _take(st["z"], idx), _take(st["gx"], idx)
        dx, dg = z_new - z_old, gx_new - gx_old
        k = _take(st["k"], idx) + 1  # steps taken by each sample (in this call)
        U, VT = _take(st["U"], idx), _take(st["VT"], idx)
        # Per-sample step counts can differ only after some samples stopped; active samples all
        # share the same count because stopped samples never restart.
        kk = int(k.max())
        if (k != kk).any():
            raise RuntimeError("internal error: active samples with different step counts")
        total = st["n0"] + kk  # columns written so far, counting a continued memory
        part = min(total - 1, M)
        u, vT = _rank1(U[:, :part], VT[:, :part], dx, dg)
        col = (total - 1) % M
        # In place (issue 16): the buffers of _start belong to this solve, so the new column is
        # written into them instead of copying all of U, VT (B x D x M each) every step, and for
        # a subset of samples only their column is scattered back. Same values in the same
        # layout: the iterates are bitwise those of the copying version (tests/
        # test_forward_speed.py). Under autograd (keep_graph) the copies stay: earlier matvecs
        # saved U, VT for the backward.
        inplace = INPLACE_MEMORY and not torch.is_grad_enabled()
        if not inplace:
            U = U.clone()
            VT = VT.clone()
        U[:, col] = u
        VT[:, col] = vT
        update = -_matvec(U[:, :min(total, M)], VT[:, :min(total, M)], gx_new)
        if inplace:
            if idx is not None:  # U, VT are index_select copies: write the column back
                st["U"][idx, col] = u
                st["VT"][idx, col] = vT
            pairs = ()
        else:
            pairs = (("U", U), ("VT", VT))
        for key, val in (("z", z_new), ("gx", gx_new), *pairs, ("update", update),
                         ("k", k), ("dx", dx), ("dg", dg)):
            st[key] = _put(st[key], idx, val)

    def _finish(self, st):
        n = st["n0"] + (int(st["k"].max()) if st["k"].numel() else 0)
        return BroydenMemory(st["U"], st["VT"], min(n, st["M"]), st["dx"], st["dg"], st["z"], st["gx"])


def lift_memory(memory: BroydenMemory, gx_new_at_z: Tensor, gx_old_at_z: Tensor) -> BroydenMemory:
    """The reference's Sec. 3.2 "lift the orbit" (spec section 4): after the input changed, move
    the last secant difference by the change of g at the current state,
    dg' = dg + g_new(z) - g_old(z), and recompute the last rank-1 column with it."""
    n = memory.n
    if n < 1:
        return memory
    U, VT = memory.U.clone(), memory.VT.clone()
    dg = memory.dg + gx_new_at_z - gx_old_at_z
    col = (n - 1) % U.shape[1]
    part = min(n - 1, U.shape[1])
    u, vT = _rank1(U[:, :part], VT[:, :part], memory.dx, dg)
    U[:, col] = u
    VT[:, col] = vT
    return replace(memory, U=U, VT=VT, dg=dg)


class Anderson(Solver):
    """Anderson acceleration (type II) with memory ``m``, Tikhonov ``lam`` and mixing ``beta``.

    z[1] = f(z0); from then on z[t+1] is the least-squares mix of the last m (z, f(z)) pairs
    (the first mix uses (z0, f(z0)) and (z[1], f(z[1]))). Replaces the reference's unused ``anderson`` (which calls the removed ``torch.solve``).
    """
    name = "anderson"

    def __init__(self, *args, m: int = 5, lam: float = 1e-4, beta: float = 1.0, **kw):
        super().__init__(*args, **kw)
        if m < 1:
            raise ValueError(f"Anderson memory m must be >= 1, got {m}")
        self.m, self.lam, self.beta = int(m), float(lam), float(beta)

    def _extra_config(self):
        return {"m": self.m, "lam": self.lam, "beta": self.beta}

    def config(self):
        c = super().config()
        c.update(self._extra_config())
        return c

    def _start(self, f, z0, gx0, memory):
        fz = (f(z0, None) if gx0 is None else gx0 + z0)
        B, D = z0.shape
        X = z0.new_zeros(B, self.m, D)
        Fm = z0.new_zeros(B, self.m, D)
        X[:, 0], Fm[:, 0] = z0, fz
        return {"X": X, "F": Fm, "k": torch.ones(B, dtype=torch.long, device=z0.device)}

    def _propose(self, st, idx):
        X, Fm, k = _take(st["X"], idx), _take(st["F"], idx), _take(st["k"], idx)
        kk = int(k.max())
        n = min(kk, self.m)
        if kk < 2:  # first two iterates are plain fixed-point steps
            return Fm[:, (kk - 1) % self.m]
        G = Fm[:, :n] - X[:, :n]
        H = torch.bmm(G, G.transpose(1, 2))
        H = H + self.lam * torch.eye(n, dtype=G.dtype, device=G.device)[None]
        # Solve [[0, 1^T], [1, H]] [mu, alpha] = [1, 0] for the constrained least squares.
        A = G.new_zeros(G.shape[0], n + 1, n + 1)
        A[:, 0, 1:] = 1
        A[:, 1:, 0] = 1
        A[:, 1:, 1:] = H
        rhs = G.new_zeros(G.shape[0], n + 1)
        rhs[:, 0] = 1
        alpha = torch.linalg.solve(A, rhs)[:, 1:]
        mixF = torch.einsum("bn,bnd->bd", alpha, Fm[:, :n])
        mixX = torch.einsum("bn,bnd->bd", alpha, X[:, :n])
        return self.beta * mixF + (1 - self.beta) * mixX

    def _accept(self, st, idx, z_new, gx_new):
        X, Fm, k = _take(st["X"], idx).clone(), _take(st["F"], idx).clone(), _take(st["k"], idx)
        col = int(k.max()) % self.m
        X[:, col] = z_new
        Fm[:, col] = gx_new + z_new
        for key, val in (("X", X), ("F", Fm), ("k", k + 1)):
            st[key] = _put(st[key], idx, val)


SOLVERS = {"broyden": Broyden, "fixed_point": FixedPoint, "anderson": Anderson}


def make_solver(name: str = "broyden", **kw) -> Solver:
    """Build a solver by name ('broyden', 'fixed_point', 'anderson')."""
    try:
        cls = SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None
    return cls(**kw)
