"""Tests for model_zoo/solvers.py: Broyden / FixedPoint / Anderson and their Trajectory.

Checks the iterates against torchdeq's Broyden, convergence to analytic fixed points, the
per-sample (batch-invariant) bookkeeping, early stopping, resumable memories and exact f-eval
counts.
"""
import pytest
import torch
from torchdeq.solver import broyden_solver

import model_zoo as mz
from model_zoo.solvers import Anderson, Broyden, FixedPoint, make_solver

DT = torch.float64


def _contractive(D, norm, seed, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=dtype)
    return norm * W / torch.linalg.matrix_norm(W, 2)


class Tanh:
    """f(z) = tanh(z W^T + b_k), a contractive nonlinear map with a per-sample bias; counts its
    evaluations per sample independently of the solver."""

    def __init__(self, B=4, D=12, norm=0.9, seed=0, scale=None):
        g = torch.Generator().manual_seed(seed + 1)
        self.W = _contractive(D, norm, seed)
        self.b = torch.randn(B, D, generator=g, dtype=DT)
        # optional per-sample contraction factor: small factors converge in a few steps
        self.scale = torch.ones(B, dtype=DT) if scale is None else torch.as_tensor(scale, dtype=DT)
        self.calls = torch.zeros(B, dtype=torch.long)
        self.B, self.D = B, D

    def __call__(self, z, idx=None):
        b = self.b if idx is None else self.b[idx]
        s = self.scale if idx is None else self.scale[idx]
        if idx is None:
            self.calls += 1
        else:
            self.calls[idx] += 1
        return torch.tanh(s[:, None] * (z @ self.W.T) + b)

    def subset(self, k):
        """The same map restricted to sample k (a batch of one)."""
        f = Tanh.__new__(Tanh)
        f.W, f.b, f.scale = self.W, self.b[k:k + 1], self.scale[k:k + 1]
        f.calls, f.B, f.D = torch.zeros(1, dtype=torch.long), 1, self.D
        return f


class Linear:
    """f(z) = z A^T + b with ||A|| < 1; analytic fixed point (I - A)^{-1} b."""

    def __init__(self, B=3, D=16, norm=0.8, seed=0, spectrum=None):
        if spectrum is None:
            self.A = _contractive(D, norm, seed)
        else:  # symmetric with the given eigenvalues (a slow problem for fixed-point iteration)
            g = torch.Generator().manual_seed(seed)
            Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=DT))
            self.A = Q @ torch.diag(torch.as_tensor(spectrum, dtype=DT)) @ Q.T
        self.b = torch.randn(B, D, generator=torch.Generator().manual_seed(seed + 7), dtype=DT)
        self.B, self.D = B, D

    def __call__(self, z, idx=None):
        return z @ self.A.T + (self.b if idx is None else self.b[idx])

    def fixed_point(self):
        I = torch.eye(self.D, dtype=DT)
        return torch.linalg.solve(I - self.A, self.b.T).T


def _torchdeq_states(func, z0, N):
    # torchdeq stores the state after step k under index k + 1 (its `indexing` counts z0 as 1).
    _, states, info = broyden_solver(func, z0, max_iter=N, tol=-1, stop_mode="rel",
                                     indexing=list(range(2, N + 2)), return_final=True)
    return states, info


# ---------------------------------------------------------------------------------------------
# cross-check with torchdeq
# ---------------------------------------------------------------------------------------------

def test_broyden_matches_torchdeq_on_contractive_map():
    N = 7
    f = Tanh(B=4, D=12, norm=0.9, seed=3)
    z0 = torch.zeros(4, 12, dtype=DT)
    traj = Broyden(max_iter=N, eps=0, protect=None).solve(f, z0)
    ref, info = _torchdeq_states(lambda z: f(z), z0, N)
    assert traj.num_states == N and len(ref) == N
    for k in range(N):
        torch.testing.assert_close(traj.states[k], ref[k], rtol=1e-10, atol=1e-12)
    # torchdeq's traces carry an extra initial (1e8) entry for z0
    assert info["rel_trace"].shape == (4, N + 1)
    torch.testing.assert_close(traj.rel_trace, info["rel_trace"][:, 1:].to(DT), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(traj.abs_trace, info["abs_trace"][:, 1:].to(DT), rtol=1e-9, atol=1e-12)
    # The Broyden steps are not plain fixed-point steps (else the check above would be vacuous).
    fp = FixedPoint(max_iter=N, eps=0, protect=None).solve(f, z0)
    assert (fp.states[-1] - traj.states[-1]).abs().max() > 1e-6


def _mdeq_broyden_vs_torchdeq(m, x, N=6):
    """Our Broyden and torchdeq's on the MDEQ cell of ``m`` for input ``x``, N steps."""
    ctx = m.context(x)
    z0 = m.zero_state(x)
    traj = Broyden(max_iter=N, eps=0, protect=None).solve(ctx.f, z0)
    with torch.no_grad():
        ref, info = _torchdeq_states(lambda z: ctx.f(z), z0, N)
    return traj, ref, info


def test_broyden_matches_torchdeq_on_mdeq_cell(tiny_model):
    torch.manual_seed(0)
    m = tiny_model
    traj, ref, info = _mdeq_broyden_vs_torchdeq(m, torch.rand(3, 1, 28, 28))
    # float32: our products sum in another order than torchdeq's (issue 16's bmm/baddbmm shapes),
    # so rounding drifts by ~1e-5 over 6 steps; the float64 test below pins the algorithm itself.
    for k in range(6):
        torch.testing.assert_close(traj.states[k], ref[k], rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(traj.rel_trace, info["rel_trace"][:, 1:], rtol=1e-4, atol=1e-6)
    assert traj.states[0].shape == (3, m.state_dim)


def test_broyden_matches_torchdeq_on_mdeq_cell_float64():
    import model_zoo as mz
    torch.manual_seed(0)
    m = mz.create("deq_tiny_fashion_mnist").eval().double()
    traj, ref, _ = _mdeq_broyden_vs_torchdeq(m, torch.rand(3, 1, 28, 28, dtype=DT))
    assert traj.states[0].dtype == DT
    for k in range(6):
        torch.testing.assert_close(traj.states[k], ref[k], rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# analytic fixed points
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", [
    Broyden(max_iter=200, eps=1e-12, protect=None),
    FixedPoint(max_iter=400, eps=1e-12, protect=None),
    Anderson(max_iter=400, eps=1e-12, protect=None, m=5, lam=1e-12),
], ids=["broyden", "fixed_point", "anderson"])
def test_converges_to_analytic_fixed_point_of_linear_map(solver):
    f = Linear(B=3, D=16, norm=0.8, seed=1)
    traj = solver.solve(f, torch.zeros(3, 16, dtype=DT))
    z_star = f.fixed_point()
    assert traj.converged.all()
    torch.testing.assert_close(traj.best, z_star, rtol=0, atol=1e-9)
    assert (traj.rel_trace.min(1).values < 1e-12).all()
    # best is the lowest-residual iterate
    idx = traj.best_index - 1
    torch.testing.assert_close(traj.best, traj.stacked()[idx, torch.arange(3)])
    torch.testing.assert_close(traj.rel_trace.gather(1, idx[:, None])[:, 0],
                               traj.rel_trace.min(1).values)


def test_broyden_needs_far_fewer_steps_than_fixed_point():
    f = Linear(B=3, D=16, seed=2, spectrum=torch.linspace(-0.9, 0.9, 16))
    z0 = torch.zeros(3, 16, dtype=DT)
    br = Broyden(max_iter=300, eps=1e-6, protect=None).solve(f, z0)
    fp = FixedPoint(max_iter=300, eps=1e-6, protect=None).solve(f, z0)
    assert br.converged.all() and fp.converged.all()
    assert (br.nstep * 4 <= fp.nstep).all(), (br.nstep, fp.nstep)
    torch.testing.assert_close(br.best, f.fixed_point(), rtol=0, atol=1e-4)
    # on a linear map of dimension D good Broyden terminates within 2D steps
    assert (br.nstep <= 32).all()


@pytest.mark.parametrize("cls", [Broyden, FixedPoint, Anderson])
def test_first_iterate_is_f_of_z0(cls):
    f = Tanh(B=3, D=10, seed=4)
    traj0 = cls(max_iter=2, eps=0, protect=None).solve(f, torch.zeros(3, 10, dtype=DT))
    assert torch.equal(traj0.states[0], f(torch.zeros(3, 10, dtype=DT)))
    z0 = torch.randn(3, 10, dtype=DT, generator=torch.Generator().manual_seed(9))
    traj = cls(max_iter=4, eps=0, protect=None).solve(f, z0)
    torch.testing.assert_close(traj.states[0], f(z0), rtol=0, atol=1e-14)
    assert traj.rel_trace.shape == (3, 4) and traj.abs_trace.shape == (3, 4)
    # the traces are the residuals of the stored states
    for t in range(4):
        g = f(traj.states[t]) - traj.states[t]
        torch.testing.assert_close(traj.abs_trace[:, t], g.norm(dim=1))
        torch.testing.assert_close(traj.rel_trace[:, t],
                                   g.norm(dim=1) / (f(traj.states[t]).norm(dim=1) + 1e-9))


# ---------------------------------------------------------------------------------------------
# per-sample decisions
# ---------------------------------------------------------------------------------------------

SCALES = [1.0, 0.02, 0.9, 0.05, 1.0, 0.3, 0.01, 0.8]


def _mixed_problem():
    # per-sample contraction: samples 1, 3, 6 converge below eps within a few steps
    return Tanh(B=8, D=12, norm=0.95, seed=5, scale=SCALES)


@pytest.mark.parametrize("cls", [Broyden, FixedPoint, Anderson])
def test_sample_decisions_are_batch_invariant(cls):
    N, eps = 10, 1e-6
    f = _mixed_problem()
    solver = cls(max_iter=N, eps=eps)
    full = solver.solve(f, torch.zeros(8, 12, dtype=DT))
    # the problem really mixes early-stopping and running samples
    assert (full.nstep < N).any() and (full.nstep == N).any(), full.nstep
    for k in range(8):
        fk = f.subset(k)
        one = solver.solve(fk, torch.zeros(1, 12, dtype=DT))
        for t in range(N):
            torch.testing.assert_close(one.states[t][0], full.states[t][k], rtol=0, atol=1e-5)
        torch.testing.assert_close(one.best[0], full.best[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(one.rel_trace[0], full.rel_trace[k], rtol=0, atol=1e-5)
        assert one.best_index.item() == full.best_index[k].item()
        assert one.nstep.item() == full.nstep[k].item()
        assert one.nfev.item() == full.nfev[k].item()
        assert one.converged.item() == full.converged[k].item()


def test_batch_decisions_depend_on_the_batch():
    N, eps = 10, 1e-6
    f = _mixed_problem()
    solver = Broyden(max_iter=N, eps=eps, decisions="batch")
    full = solver.solve(f, torch.zeros(8, 12, dtype=DT))
    # batch-level norms: every sample shares one decision
    assert len(set(full.nstep.tolist())) == 1 and len(set(full.best_index.tolist())) == 1
    k = SCALES.index(0.01)
    one = solver.solve(f.subset(k), torch.zeros(1, 12, dtype=DT))
    assert one.nstep.item() < full.nstep[k].item()
    assert one.nfev.item() != full.nfev[k].item()


# ---------------------------------------------------------------------------------------------
# early stopping
# ---------------------------------------------------------------------------------------------

def test_early_stopped_samples_are_not_evaluated_and_repeat():
    N, eps = 10, 1e-6
    f = _mixed_problem()
    traj = Broyden(max_iter=N, eps=eps).solve(f, torch.zeros(8, 12, dtype=DT))
    # one f eval for g(z0), one per step taken, none after stopping
    assert torch.equal(traj.nfev, traj.nstep + 1)
    assert torch.equal(f.calls, traj.nfev)
    stopped = (traj.nstep < N).nonzero().squeeze(1).tolist()
    assert stopped, "the problem must contain early-stopped samples"
    for k in stopped:
        n = traj.nstep[k].item()
        assert traj.converged[k] and traj.rel_trace[k, n - 1] < eps
        assert (traj.rel_trace[k, :n - 1] >= eps).all()  # it stopped at the first crossing
        for t in range(n, N):
            assert torch.equal(traj.states[t][k], traj.states[n - 1][k])
            assert traj.rel_trace[k, t] == traj.rel_trace[k, n - 1]
            assert traj.abs_trace[k, t] == traj.abs_trace[k, n - 1]
    running = (traj.nstep == N).nonzero().squeeze(1)
    assert torch.equal(traj.nfev[running], torch.full_like(running, N + 1))


def test_all_samples_stopped_ends_evaluations():
    f = Tanh(B=3, D=6, seed=6, scale=[0.01, 0.01, 0.01])
    traj = Broyden(max_iter=12, eps=1e-3).solve(f, torch.zeros(3, 6, dtype=DT))
    assert (traj.nstep < 12).all() and traj.num_states == 12
    assert torch.equal(f.calls, traj.nstep + 1)


# ---------------------------------------------------------------------------------------------
# resuming a Broyden memory
# ---------------------------------------------------------------------------------------------

def _chain(f, z0, N, resume):
    solver = Broyden(max_iter=1, eps=0, protect=None, memory_size=N, resume=resume)
    z, memory, gx, states = z0, None, None, []
    for _ in range(N):
        r = solver.solve(f, z, gx0=gx, memory=memory)
        states.append(r.states[0])
        z, memory, gx = r.states[0], r.memory, r.memory.gx
    return states


def test_chained_one_step_solves_equal_one_solve():
    N = 6
    f = Tanh(B=4, D=12, norm=0.95, seed=7)
    z0 = torch.zeros(4, 12, dtype=DT)
    whole = Broyden(max_iter=N, eps=0, protect=None).solve(f, z0)
    f.calls.zero_()
    chained = _chain(f, z0, N, "continue")
    for t in range(N):
        torch.testing.assert_close(chained[t], whole.states[t], rtol=1e-10, atol=1e-12)
    # gx0 = memory.gx saves the re-evaluation of g at the resumed state
    assert torch.equal(f.calls, torch.full((4,), N + 1))
    ref = _chain(f, z0, N, "reference")
    torch.testing.assert_close(ref[1], whole.states[1])  # identical until the overwrite
    assert max((ref[t] - whole.states[t]).abs().max().item() for t in range(N)) > 1e-6


def test_memory_shape_mismatch_raises():
    f = Tanh(B=4, D=12, seed=8)
    r = Broyden(max_iter=2, eps=0, protect=None).solve(f, torch.zeros(4, 12, dtype=DT))
    with pytest.raises(ValueError, match="memory"):
        Broyden(max_iter=2).solve(f.subset(0), torch.zeros(1, 12, dtype=DT), memory=r.memory)


# ---------------------------------------------------------------------------------------------
# f-eval counts, arguments
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Broyden, FixedPoint, Anderson])
@pytest.mark.parametrize("N", [1, 5])
def test_exact_f_eval_counts(cls, N):
    f = Tanh(B=3, D=8, seed=9)
    z0 = torch.zeros(3, 8, dtype=DT)
    traj = cls(max_iter=N, eps=0, protect=None).solve(f, z0)
    assert torch.equal(traj.nfev, torch.full((3,), N + 1))
    assert torch.equal(f.calls, traj.nfev)
    assert torch.equal(traj.nstep, torch.full((3,), N))
    f.calls.zero_()
    gx0 = f(z0) - z0
    f.calls.zero_()
    traj2 = cls(max_iter=N, eps=0, protect=None).solve(f, z0, gx0=gx0)
    assert torch.equal(traj2.nfev, torch.full((3,), N))
    assert torch.equal(f.calls, traj2.nfev)
    for a, b in zip(traj.states, traj2.states):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_states_are_detached_unless_keep_graph():
    f = Tanh(B=2, D=5, seed=10)
    z0 = torch.zeros(2, 5, dtype=DT, requires_grad=True)
    traj = Broyden(max_iter=3).solve(f, z0)
    assert not any(s.requires_grad for s in traj.states)
    traj = Broyden(max_iter=3, keep_graph=True).solve(f, z0)
    assert traj.states[-1].requires_grad


@pytest.mark.parametrize("kw, msg", [
    (dict(max_iter=0), "max_iter"),
    (dict(max_iter=2.5), "max_iter"),
    (dict(stop_mode="x"), "stop_mode"),
    (dict(decisions="x"), "decisions"),
    (dict(eps=-1.0), "eps"),
])
@pytest.mark.parametrize("name", ["broyden", "fixed_point", "anderson"])
def test_bad_arguments_raise(name, kw, msg):
    with pytest.raises(ValueError, match=msg):
        make_solver(name, **kw)


def test_bad_solver_specific_arguments():
    with pytest.raises(ValueError, match="resume"):
        Broyden(resume="x")
    with pytest.raises(ValueError, match="memory m"):
        Anderson(m=0)
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        make_solver("newton")
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        Broyden().solve(lambda z, idx=None: z, torch.zeros(2, 3, 4))


def test_make_solver_and_with_options():
    s = make_solver("broyden", max_iter=5, eps=1e-4, memory_size=3)
    assert isinstance(s, mz.Broyden) and s.max_iter == 5 and s.memory_size == 3
    t = s.with_options(max_iter=2)
    assert isinstance(t, Broyden) and t.max_iter == 2 and t.eps == 1e-4 and t.memory_size == 3
    assert s.max_iter == 5
    a = make_solver("anderson", m=3).with_options(eps=0.0)
    assert a.m == 3 and a.eps == 0.0
    assert make_solver("fixed_point").config()["name"] == "fixed_point"
