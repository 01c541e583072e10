"""Tests for model_zoo/forward.py: readouts (FinalState, EarlyState), the Sec. 3.2 input entropy
reduction and its segmented-solve control, per-state outputs, f-eval accounting and gradients."""
import math

import pytest
import torch

import model_zoo as mz
from model_zoo.forward import (EarlyState, EntropyReduction, FinalState, SegmentedSolve,
                               make_defense, prediction_entropy, unroll)

N = 8  # default solver steps


def _x(B=4, seed=0, shape=(1, 28, 28)):
    return torch.rand(B, *shape, generator=torch.Generator().manual_seed(seed))


def _same_trajectory(a, b, exact=True):
    assert a.num_states == b.num_states
    tol = dict(rtol=0, atol=0) if exact else {}
    for s, t in zip(a.states, b.states):
        torch.testing.assert_close(s, t, **tol)
    torch.testing.assert_close(a.rel_trace, b.rel_trace, **tol)
    torch.testing.assert_close(a.best, b.best, **tol)
    assert torch.equal(a.best_index, b.best_index)


# ---------------------------------------------------------------------------------------------
# f-eval accounting
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, first_full", [(9, True), (5, True), (3, False), (0, True)])
def test_final_state_f_counts(tiny_model, steps, first_full):
    B = 3
    rec = tiny_model.run(_x(B), defense=FinalState(steps=steps, first_full=first_full))
    assert torch.equal(rec.nfev_nograd, torch.full((B,), N + 1))
    assert torch.equal(rec.nfev_grad, torch.full((B,), steps + int(first_full)))
    assert torch.equal(rec.nfev, rec.nfev_nograd + rec.nfev_grad)
    assert torch.equal(rec.trajectory.nfev, torch.full((B,), N + 1))
    assert rec.readout == "final"
    torch.testing.assert_close(rec.final_logits, rec.logits)


def test_final_state_counts_with_early_stopping(tiny_model):
    # a loose eps stops some samples early: their no-grad count is nstep + 1, not N + 1
    tiny_model.solver = mz.make_solver("broyden", eps=0.7)
    rec = tiny_model.run(_x(6))
    traj = rec.trajectory
    assert (traj.nstep < N).any()
    assert torch.equal(rec.nfev_nograd, traj.nstep + 1)
    assert torch.equal(rec.nfev_grad, torch.full((6,), 10))


@pytest.mark.parametrize("i", [1, 4, 8])
def test_early_state_f_counts(tiny_model, i):
    rec = tiny_model.run(_x(3), defense=EarlyState(i))
    assert torch.equal(rec.nfev_grad, torch.zeros(3, dtype=torch.long))
    assert torch.equal(rec.nfev_nograd, torch.full((3,), N + 1))
    assert rec.readout == f"z[{i}]" and rec.final_logits is None


@pytest.mark.parametrize("R", [0, 1, 3])
def test_entropy_reduction_reference_f_counts(tiny_model, R):
    # Tf = 2, N = 8 -> 4 segments. Segment 1: g(z0) + 2 steps = 3 no-grad evals; segments 2..4:
    # the lift's g(z) (doubling as the segment start) + 2 steps = 3 each. Between segments
    # (not after the last): R entropy gradients with one f each; then f + 9 damped unroll steps.
    segs = N // 2
    rec = tiny_model.run(_x(3), defense=EntropyReduction(r=R, tf=2))
    assert torch.equal(rec.nfev_nograd, torch.full((3,), 3 + 3 * (segs - 1)))  # = 12
    assert torch.equal(rec.nfev_grad, torch.full((3,), R * (segs - 1) + 10))
    rec = tiny_model.run(_x(3), defense=EntropyReduction(r=R, tf=2, readout=EarlyState(7)))
    assert torch.equal(rec.nfev_nograd, torch.full((3,), 12))
    assert torch.equal(rec.nfev_grad, torch.full((3,), R * (segs - 1)))


@pytest.mark.parametrize("R", [0, 2])
def test_entropy_reduction_paper_f_counts(tiny_model, R):
    # One-step solves chained through the memory: g(z0) + N steps; with R > 0, at each of the
    # N / Tf update points the step is re-solved from z[t] under the new input (g + step = 2).
    rec = tiny_model.run(_x(2), defense=EntropyReduction(r=R, tf=2, preset="paper"))
    updates = (N // 2) if R else 0
    assert torch.equal(rec.nfev_nograd, torch.full((2,), N + 1 + 2 * updates))
    assert torch.equal(rec.nfev_grad, torch.full((2,), R * updates + 10))


# ---------------------------------------------------------------------------------------------
# per-state outputs
# ---------------------------------------------------------------------------------------------

def test_per_state_logits_and_entropies(calibrated_tiny_model):
    m = calibrated_tiny_model
    B = 5
    x = _x(B)
    rec = m.run(x, per_state=True)
    C = 10
    assert rec.state_logits.shape == (N, B, C)
    assert rec.entropies.shape == (N, B)
    ctx = m.context(x)
    with torch.no_grad():
        for t, z in enumerate(rec.trajectory.states):
            torch.testing.assert_close(rec.state_logits[t], ctx.head(z))
            torch.testing.assert_close(rec.entropies[t], prediction_entropy(ctx.head(z)))
    assert (rec.entropies >= 0).all() and (rec.entropies <= math.log(C) + 1e-5).all()
    assert not rec.state_logits.requires_grad
    for i in (1, 3, 8):
        early = m.run(x, defense=EarlyState(i))
        torch.testing.assert_close(early.logits, rec.state_logits[i - 1], rtol=1e-6, atol=1e-6)
        assert torch.equal(early.predictions, early.logits.argmax(-1))
    # without per_state nothing is computed
    plain = m.run(x)
    assert plain.state_logits is None and plain.entropies is None


def test_prediction_entropy_values():
    C = 7
    assert prediction_entropy(torch.zeros(3, C)).allclose(torch.full((3,), math.log(C)))
    peaked = torch.tensor([[100.0, 0, 0], [0, -50, 0]])
    H = prediction_entropy(peaked)
    assert H[0] < 1e-6 and abs(H[1] - math.log(2)) < 1e-6
    logits = torch.randn(4, 2, 5)
    p = logits.softmax(-1)
    torch.testing.assert_close(prediction_entropy(logits), -(p * p.log()).sum(-1))


def test_final_state_is_unroll_of_best(tiny_model):
    x = _x(3)
    rec = tiny_model.run(x)
    ctx = tiny_model.context(x)
    with torch.no_grad():
        u = unroll(ctx, rec.trajectory.best, 9, 0.5)
        torch.testing.assert_close(rec.logits, ctx.head(u))
        u_last = unroll(ctx, rec.trajectory.states[-1], 9, 0.5)
    last = tiny_model.run(x, defense=FinalState(from_state="last"))
    torch.testing.assert_close(last.logits, ctx.head(u_last))


# ---------------------------------------------------------------------------------------------
# Sec. 3.2 input entropy reduction
# ---------------------------------------------------------------------------------------------

def _inputs(rec):
    return rec.extra.get("segment_inputs", rec.extra.get("step_inputs"))


@pytest.mark.parametrize("kind", ["random", "zeros", "ones", "near_edges"])
@pytest.mark.parametrize("preset, beta", [("reference", 0.05), ("paper", 100.0)])
def test_entropy_reduction_stays_in_eps_ball(calibrated_tiny_model, kind, preset, beta):
    eps, R = 0.1, 3
    B = 3
    x = {"random": _x(B), "zeros": torch.zeros(B, 1, 28, 28), "ones": torch.ones(B, 1, 28, 28),
         "near_edges": _x(B).round() * 0.98 + 0.01}[kind]
    rec = calibrated_tiny_model.run(x, defense=EntropyReduction(r=R, beta=beta, eps=eps,
                                                                 preset=preset))
    ins = _inputs(rec)
    assert len(ins) == (N // 2 if preset == "reference" else N)
    assert torch.equal(ins[0], x)
    for xi in [rec.x_used] + ins:
        assert xi.shape == x.shape
        assert xi.min() >= 0 and xi.max() <= 1
        assert (xi - x).abs().max() <= eps + 1e-6
    # the ball is active: R * beta > eps, so some pixel ends exactly on its boundary (sign steps
    # move every pixel with a non-zero gradient by beta)
    dev = (rec.x_used - x).abs().flatten(1).max(1).values
    torch.testing.assert_close(dev, torch.full((B,), eps), rtol=0, atol=1e-6)
    assert torch.equal(rec.x_used, ins[-1])


def test_entropy_reduction_reference_sign_steps_are_on_the_grid(calibrated_tiny_model):
    # sign steps of beta from x, clipped to the eps-ball (x away from 0 and 1, so the [0, 1]
    # clamp never acts): with eps a multiple of beta, x_used - x is a multiple of beta
    beta, eps = 2 / 255, 8 / 255
    x = torch.randint(51, 205, (2, 1, 28, 28), generator=torch.Generator().manual_seed(1)) / 255
    rec = calibrated_tiny_model.run(x, defense=EntropyReduction(r=10, beta=beta, eps=eps))
    k = (rec.x_used - x) / beta
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-3)
    assert (k.abs() > 0.5).float().mean() > 0.9  # nearly every pixel moved
    assert (rec.x_used - x).abs().max() <= eps + 1e-6


def test_entropy_reduction_r0_equals_segmented_solve(tiny_model):
    x = _x(4)
    a = tiny_model.run(x, defense=EntropyReduction(r=0), per_state=True)
    b = tiny_model.run(x, defense=SegmentedSolve(tf=2), per_state=True)
    _same_trajectory(a.trajectory, b.trajectory)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.state_logits, b.state_logits, rtol=0, atol=0)
    assert torch.equal(a.nfev_nograd, b.nfev_nograd) and torch.equal(a.nfev_grad, b.nfev_grad)
    assert torch.equal(a.x_used, x)


def test_paper_preset_r0_equals_plain_solve(tiny_model):
    x = _x(4)
    plain = tiny_model.run(x, per_state=True)
    assert not plain.trajectory.converged.any()  # so the plain solve's early stop never fires
    paper = tiny_model.run(x, defense=EntropyReduction(r=0, preset="paper"), per_state=True)
    _same_trajectory(plain.trajectory, paper.trajectory)
    torch.testing.assert_close(plain.logits, paper.logits, rtol=0, atol=0)
    assert torch.equal(paper.nfev_nograd, plain.nfev_nograd)
    seg = tiny_model.run(x, defense=SegmentedSolve(tf=2, preset="paper"))
    _same_trajectory(plain.trajectory, seg.trajectory)


@pytest.mark.parametrize("decisions", ["sample", "batch"])
def test_paper_preset_best_and_converged_match_its_traces(decisions):
    # eps above the lowest residual: the chained solve (which never stops early) must still
    # report convergence and pick the lowest-residual state, for batch-level decisions too
    torch.manual_seed(0)
    m = mz.create("deq_tiny_fashion_mnist",
                  solver={"name": "broyden", "decisions": decisions, "eps": 0.7}).eval()
    x = _x(5)
    traj = m.run(x, defense=EntropyReduction(r=0, preset="paper")).trajectory
    low = traj.rel_trace.min(1)
    assert (low.values < 0.7).all()
    assert traj.converged.all()
    assert torch.equal(traj.best_index, low.indices + 1)
    torch.testing.assert_close(traj.best, traj.stacked()[low.indices, torch.arange(5)])
    if decisions == "batch":
        assert len(set(traj.best_index.tolist())) == 1
        plain = m.run(x).trajectory
        assert plain.converged.all()  # and agrees with the plain batch-level solve


def test_reference_segmented_solve_differs_from_plain_solve(tiny_model):
    # the reference resets the Broyden memory to Tf columns per segment (spec section 4)
    x = _x(4)
    plain = tiny_model.run(x).trajectory
    seg = tiny_model.run(x, defense=SegmentedSolve(tf=2)).trajectory
    for t in range(2):  # identical first segment
        torch.testing.assert_close(seg.states[t], plain.states[t], rtol=1e-5, atol=1e-6)
    diff = max((s - p).abs().max().item() for s, p in zip(seg.states[2:], plain.states[2:]))
    assert diff > 1e-3
    # Tf = N: a single segment is the plain solve
    one = tiny_model.run(x, defense=SegmentedSolve(tf=N)).trajectory
    _same_trajectory(one, plain, exact=False)


@pytest.mark.parametrize("preset", ["reference", "paper"])
def test_entropy_reduction_lowers_entropy(calibrated_tiny_model, preset):
    m = calibrated_tiny_model
    x = _x(16, seed=3)
    beta = 2 / 255 if preset == "reference" else 0.5
    r0 = m.run(x, defense=EntropyReduction(r=0, preset=preset, beta=beta), per_state=True)
    r10 = m.run(x, defense=EntropyReduction(r=10, preset=preset, beta=beta), per_state=True)
    # states before the first input update are unchanged: z[1], z[2] (reference: the first
    # segment) or z[1] (paper: z[Tf] is re-solved under the updated input)
    same = 2 if preset == "reference" else 1
    torch.testing.assert_close(r10.state_logits[:same], r0.state_logits[:same])
    assert not torch.allclose(r10.state_logits[same], r0.state_logits[same])
    assert r10.entropies[-1].mean() < r0.entropies[-1].mean() - 1e-3
    # H(h(f(z; x'))) at the last segment's state: lower with the purified input
    z = r10.trajectory.best
    with torch.no_grad():
        c_used, c_orig = m.context(r10.x_used), m.context(x)
        H_used = prediction_entropy(c_used.head(c_used.f(z)))
        H_orig = prediction_entropy(c_orig.head(c_orig.f(z)))
    assert H_used.mean() < H_orig.mean()


@pytest.mark.parametrize("preset, beta", [("reference", 2 / 255), ("paper", 0.5)])
def test_single_input_update_decreases_entropy_objective(calibrated_tiny_model, preset, beta):
    m = calibrated_tiny_model
    x = _x(8, seed=4)
    z = m.run(x).trajectory.best
    ctx = m.context(x)
    d = EntropyReduction(r=1, beta=beta, preset=preset)
    x_new = d._update_input(m, x, x, z, ctx, 0)
    assert not torch.equal(x_new, x)
    with torch.no_grad():
        c0, c1 = m.context(x), m.context(x_new)
        H0 = prediction_entropy(c0.head(c0.f(z)))
        H1 = prediction_entropy(c1.head(c1.f(z)))
    assert (H1 < H0).all(), (H0, H1)
    # the update's gradient costs one f eval with graph per sample
    assert torch.equal(ctx.counter.grad, torch.ones(8, dtype=torch.long))
    # sum over the batch: a sample's update does not depend on the rest of the batch
    # (up to float noise: batch 1 and batch 8 may run different convolution kernels, so a
    # gradient entry near 0 may flip its sign step; a mean over the batch would shrink the
    # paper preset's gradient step 8-fold)
    x_one = d._update_input(m, x[:1], x[:1], z[:1], m.context(x[:1]), 0)
    diff = (x_one - x_new[:1]).abs()
    if preset == "paper":
        assert diff.max() < 1e-3 * beta, diff.max()
    else:
        flipped = diff > 1e-6
        assert flipped.float().mean() < 0.01, flipped.float().mean()
        assert (diff[flipped] <= 2 * beta + 1e-6).all()


def test_entropy_reduction_unroll_input(calibrated_tiny_model):
    m = calibrated_tiny_model
    x = _x(3)
    ref = m.run(x, defense=EntropyReduction(r=2))
    ctx = m.context(x)  # reference: the final unroll sees the ORIGINAL input
    with torch.no_grad():
        torch.testing.assert_close(ref.logits, ctx.head(unroll(ctx, ref.trajectory.best, 9, 0.5)))
    pur = m.run(x, defense=EntropyReduction(r=2, unroll_input="purified"))
    cpu = m.context(pur.x_used)
    with torch.no_grad():
        torch.testing.assert_close(pur.logits, cpu.head(unroll(cpu, pur.trajectory.best, 9, 0.5)))


def test_entropy_reduction_argument_errors(tiny_model):
    with pytest.raises(ValueError, match="Tf=3 must divide"):
        tiny_model.run(_x(1), defense=EntropyReduction(tf=3))
    with pytest.raises(ValueError, match="Broyden"):
        m = mz.create("deq_tiny_fashion_mnist", solver={"name": "fixed_point"})
        m.run(_x(1), defense=EntropyReduction())
    for kw in (dict(r=-1), dict(beta=0), dict(eps=-0.1), dict(tf=0), dict(preset="x"),
               dict(unroll_input="x")):
        with pytest.raises(ValueError):
            EntropyReduction(**kw)
    with pytest.raises(TypeError, match="readout"):
        EntropyReduction(readout=SegmentedSolve())


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------

# float64 central differences with a step of 1e-7 (rather than 1e-6) so the perturbation does
# not cross ReLU kinks of the cell.
GC = dict(eps=1e-7, atol=1e-5, rtol=1e-3)


def _gx(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.1 + 0.8 * torch.rand(1, 1, *m.image_size, generator=g, dtype=torch.float64)
            ).requires_grad_()


def test_gradcheck_final_readout_with_fixed_trajectory(tiny_double_model):
    m = tiny_double_model
    x = _gx(m)
    z_star = m.run(x.detach()).trajectory.best.detach()

    def readout(x):
        ctx = m.context(x, check=False)
        return ctx.head(unroll(ctx, z_star, 9, 0.5))

    assert torch.autograd.gradcheck(readout, (x,), **GC)
    # and this is the gradient the model's FinalState forward provides (phantom gradient)
    out = m(x)
    (g_model,) = torch.autograd.grad(out[0, 3], x)
    (g_readout,) = torch.autograd.grad(readout(x)[0, 3], x)
    torch.testing.assert_close(g_model, g_readout)


def test_gradcheck_full_backprop_through_solve(tiny_double_model):
    m = tiny_double_model
    m.solver = mz.make_solver("broyden", keep_graph=True, eps=0, protect=None)
    m.set_defense(FinalState())
    x = _gx(m, seed=1)
    assert torch.autograd.gradcheck(lambda x: m(x), (x,), **GC)
    # a graph-keeping solve gives a different gradient from the phantom one
    g_full = torch.autograd.grad(m(x)[0, 0], x)[0]
    m.solver = mz.make_solver("broyden", eps=0, protect=None)
    g_phantom = torch.autograd.grad(m(x)[0, 0], x)[0]
    assert not torch.allclose(g_full, g_phantom)


def test_gradcheck_early_state_with_kept_graph(tiny_double_model):
    m = tiny_double_model
    m.solver = mz.make_solver("broyden", keep_graph=True, eps=0, protect=None)
    m.set_defense(EarlyState(5))
    assert torch.autograd.gradcheck(lambda x: m(x), (_gx(m, seed=2),), **GC)


def test_early_state_default_solver_not_differentiable_in_x(tiny_model):
    x = _x(2).requires_grad_()
    logits = tiny_model.run(x, defense=EarlyState(4)).logits
    (g,) = torch.autograd.grad(logits.sum(), x, allow_unused=True)
    assert g is None
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    assert not tiny_model.run(x, defense=EarlyState(4)).logits.requires_grad
    # whereas the FinalState readout is differentiable through its unroll
    assert tiny_model.run(x).logits.requires_grad


# ---------------------------------------------------------------------------------------------
# make_defense, errors
# ---------------------------------------------------------------------------------------------

def test_make_defense_parsing():
    d = make_defense("final")
    assert isinstance(d, FinalState) and d.steps == 9 and d.lam == 0.5
    d = make_defense("early:7")
    assert isinstance(d, EarlyState) and d.index == 7
    d = make_defense("early:select")
    assert isinstance(d, EarlyState) and d.index == "select"
    d = make_defense({"name": "entropy_reduction", "r": 3, "tf": 4,
                      "readout": {"name": "early", "index": 6}})
    assert isinstance(d, EntropyReduction) and d.r == 3 and d.tf == 4
    assert isinstance(d.inner, EarlyState) and d.inner.index == 6
    d2 = make_defense({"name": "segmented", "readout": "final"})
    assert isinstance(d2, SegmentedSolve) and isinstance(d2.inner, FinalState)
    assert make_defense(d) is d
    # config() round-trips
    again = make_defense(d.config())
    assert again.config() == d.config()
    fs = FinalState(steps=5, lam=0.25, first_full=False, from_state="last")
    assert make_defense(fs.config()).config() == fs.config()


@pytest.mark.parametrize("spec, name", [
    ("bogus", "bogus"),
    ({"name": "bogus"}, "bogus"),
    ({"name": "final", "foo": 1}, "final"),
    ({"name": "final", "steps": -1}, "final"),
    ({"name": "final", "lam": 2.0}, "final"),
    ({"name": "early", "index": 0}, "early"),
    ("early:abc", "early"),
    ("final:3", "final"),
    ({"name": "entropy_reduction", "r": -2}, "entropy_reduction"),
    ({"name": "entropy_reduction", "readout": {"name": "bogus"}}, "bogus"),
])
def test_make_defense_errors_name_the_defense(spec, name):
    with pytest.raises(ValueError, match=name):
        make_defense(spec)


def test_make_defense_rejects_non_specs():
    with pytest.raises(ValueError, match="defense spec"):
        make_defense(3)
    with pytest.raises(ValueError, match="defense spec"):
        make_defense({"index": 3})


def test_unresolved_select_raises(tiny_model):
    with pytest.raises(RuntimeError, match="select_early_state"):
        tiny_model.run(_x(1), defense=EarlyState("select"))
    d = EarlyState("select").resolve(6, {"accuracies": [0.1] * 8})
    rec = tiny_model.run(_x(1), defense=d)
    assert rec.readout == "z[6]" and d.config()["selection"] == {"accuracies": [0.1] * 8}


def test_early_state_beyond_solver_raises(tiny_model):
    with pytest.raises(ValueError, match="only 8 states"):
        tiny_model.run(_x(1), defense=EarlyState(9))


def test_not_converging_is_not_an_error(tiny_model):
    tiny_model.solver = mz.make_solver("broyden", max_iter=2)
    B = 3
    rec = tiny_model.run(_x(B), per_state=True)
    traj = rec.trajectory
    assert not traj.converged.any()
    assert traj.rel_trace.shape == (B, 2) and traj.abs_trace.shape == (B, 2)
    assert torch.isfinite(traj.rel_trace).all() and (traj.rel_trace > 1e-3).all()
    assert rec.logits.shape == (B, 10) and torch.isfinite(rec.logits).all()
    assert rec.state_logits.shape == (2, B, 10)
    assert torch.equal(rec.nfev_nograd, torch.full((B,), 3))


def test_model_lifetime_f_eval_totals_match_per_forward_counts():
    import model_zoo as mz
    torch.manual_seed(0)
    m = mz.create("deq_tiny_fashion_mnist").eval()
    x = torch.rand(3, 1, 28, 28)
    m.f_evals.reset()
    rec1 = m.run(x)
    rec2 = m.run(x, defense=mz.EntropyReduction(r=2))
    assert m.f_evals.nograd == int(rec1.nfev_nograd.sum() + rec2.nfev_nograd.sum())
    assert m.f_evals.grad == int(rec1.nfev_grad.sum() + rec2.nfev_grad.sum())
    # FinalState with grad enabled: 9 solver evals without graph, 10 unroll evals with graph
    assert int(rec1.nfev_nograd.sum()) == 3 * 9 and int(rec1.nfev_grad.sum()) == 3 * 10
