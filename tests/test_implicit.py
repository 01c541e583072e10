"""The exact implicit (IFT) gradient: ``FinalState(gradient='implicit')``, ``ImplicitFinal`` and
the exact-gradient training path, against

* a brute-force implicit gradient: the dense Jacobian J = df/dz at z* of a tiny DEQ cell, the
  adjoint w = (I - J)^-T g solved exactly (float64), then w^T df/dx (or df/dtheta);
* a transcription of the paper's released backward (spec 3.2 / 4: ``new_z1 = f(z1)`` with a
  backward hook that solves y = J_f(z1)^T y + grad with the released Broyden, B_THRES = 7,
  eps 1e-3, batch-level Frobenius norms, lowest-residual iterate).
"""
import math

import pytest
import torch

from attacks.surrogates import ImplicitFinal, make_surrogate
from model_zoo.forward import IMPLICIT_PRESETS, FinalState, implicit_step
from model_zoo.mdeq import MDEQClassifier, MDEQConfig
from model_zoo.solvers import Broyden


# ------------------------------------------------------------------------------------------------
# the released code, transcribed (locuslab/mdeq lib/solvers.py::broyden without line search,
# and the backward hook of lib/models/mdeq_core.py), on flat (B, D) states
# ------------------------------------------------------------------------------------------------

def released_broyden(f, x0, threshold, eps=1e-3, stop_mode="rel"):
    """The released Broyden: batch-level ||g||_F decide stopping and the lowest iterate; the
    protective break at 1e3 x the first residual; returns the lowest-residual iterate."""
    bsz, d = x0.shape
    g = lambda y: f(y) - y
    x_est, gx = x0, g(x0)
    Us = x0.new_zeros(bsz, d, threshold)
    VTs = x0.new_zeros(bsz, threshold, d)

    def rmatvec(part_Us, part_VTs, x):   # x^T (-I + U V^T)
        if part_Us.shape[-1] == 0:
            return -x
        return -x + torch.einsum("bm,bmd->bd", torch.einsum("bd,bdm->bm", x, part_Us), part_VTs)

    def matvec(part_Us, part_VTs, x):    # (-I + U V^T) x
        if part_Us.shape[-1] == 0:
            return -x
        return -x + torch.einsum("bdm,bm->bd", part_Us, torch.einsum("bmd,bd->bm", part_VTs, x))

    update = gx
    trace, lowest, lowest_xest, nstep = [], 1e8, x_est, 0
    while nstep < threshold:
        delta_x = update
        x_est = x_est + update
        gx_new = g(x_est)
        delta_gx = gx_new - gx
        gx = gx_new
        nstep += 1
        abs_diff = torch.norm(gx).item()
        rel_diff = abs_diff / (torch.norm(gx + x_est).item() + 1e-9)
        obj = rel_diff if stop_mode == "rel" else abs_diff
        trace.append(obj)
        if obj < lowest:
            lowest, lowest_xest = obj, x_est.clone().detach()
        if obj < eps:
            break
        if obj > trace[0] * 1e3:
            break
        part_Us, part_VTs = Us[:, :, :nstep - 1], VTs[:, :nstep - 1]
        vT = rmatvec(part_Us, part_VTs, delta_x)
        u = (delta_x - matvec(part_Us, part_VTs, delta_gx)) / torch.einsum("bd,bd->b", vT, delta_gx)[:, None]
        vT[vT != vT] = 0
        u[u != u] = 0
        VTs[:, nstep - 1] = vT
        Us[:, :, nstep - 1] = u
        update = -matvec(Us[:, :, :nstep], VTs[:, :nstep], gx)
    return lowest_xest


def released_implicit_logits(ctx, z_star, b_thres=7):
    """``AttackGrad='real'``: head(f(z1)) with z1 = z* and the released backward hook."""
    z1 = z_star.detach().clone().requires_grad_()
    new_z1 = ctx.f(z1)

    def backward_hook(grad):
        handle.remove()  # the released hook removes itself (its vjps start at new_z1)
        return released_broyden(
            lambda y: torch.autograd.grad(new_z1, z1, y, retain_graph=True)[0] + grad,
            torch.zeros_like(grad), b_thres)

    handle = new_z1.register_hook(backward_hook)
    return ctx.head(new_z1)


# ------------------------------------------------------------------------------------------------
# a tiny DEQ (state dimension 24) and brute force
# ------------------------------------------------------------------------------------------------

def tiny_deq(seed=0, decisions="batch"):
    """A real MDEQ cell, small enough for a dense Jacobian: 1x8x8 inputs, two branches (4 x 2x2,
    8 x 1x1): D = 24; float64, eval mode, no dropout; the reference's forward solver (Broyden,
    N = 8, eps 1e-3, batch-level decisions unless ``decisions``)."""
    torch.manual_seed(seed)
    cfg = MDEQConfig(channels=(4, 8), head_channels=(4, 4), final_channels=8, num_groups=2,
                     expansion=1, dropout=0.0, downsample_times=2)
    m = MDEQClassifier(cfg, in_channels=1, image_size=(8, 8), num_classes=3,
                       solver=Broyden(max_iter=8, eps=1e-3, decisions=decisions))
    return m.double().eval()


def brute_force_grads(model, x, y, z_star):
    """Exact IFT gradients of sum CE(head(f(z*)), y) w.r.t. x and the cell's parameters, from the
    dense per-sample Jacobians J_b = df/dz at z*_b: w_b = (I - J_b)^-T g_b, then w^T df/d(x, theta)
    at (z*, x)."""
    x = x.detach().clone().requires_grad_()
    ctx = model.context(x)
    z = z_star.detach().clone().requires_grad_()
    u = ctx.f(z)
    loss = torch.nn.functional.cross_entropy(ctx.head(u), y, reduction="sum")
    g = torch.autograd.grad(loss, u, retain_graph=True)[0]
    B, D = z.shape
    w = torch.empty_like(g)
    for b in range(B):  # f acts per sample (GroupNorm, eval BatchNorm): J is block diagonal
        J = torch.stack([torch.autograd.grad(u[b, k], z, retain_graph=True)[0][b] for k in range(D)])
        w[b] = torch.linalg.solve((torch.eye(D, dtype=J.dtype) - J).T, g[b])
    params = list(model.cell.parameters())
    grads = torch.autograd.grad(u, [x] + params, w, allow_unused=True)
    head = torch.autograd.grad(loss, list(model.head.parameters()))
    return grads[0], grads[1:], head


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _ours(model, x, y, forward):
    x = x.detach().clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(model.run(x, defense=forward).logits, y,
                                             reduction="sum")
    grads = torch.autograd.grad(loss, [x] + list(model.cell.parameters())
                                + list(model.head.parameters()), allow_unused=True)
    n = len(list(model.cell.parameters()))
    return grads[0], grads[1:1 + n], grads[1 + n:]


@pytest.fixture(scope="module")
def case():
    """The tiny DEQ, 3 inputs, and z* from its 8-step forward solve (the reference's N). The
    untrained cell is not a contraction and z* is not a fixed point: nothing here relies on
    either (the adjoint system (I - J)^T w = g at z* is what both sides solve; Broyden
    terminates on a nonsingular linear system of dimension D in at most 2D steps)."""
    model = tiny_deq()
    torch.manual_seed(1)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    ctx = model.context(x)
    with torch.no_grad():
        z = model.solver.with_options(max_iter=8).solve(ctx.f, model.zero_state(x)).best
    return model, x, y, z


def test_the_case_is_not_trivial(case):
    """J is far from 0 (the adjoint solve matters) and f(z*) is far from z* (so is the
    linearization point)."""
    model, x, y, z = case
    ctx = model.context(x)
    J = torch.autograd.functional.jacobian(lambda v: ctx.f(v[None])[0], z[0])
    assert float(torch.linalg.matrix_norm(J, 2)) > 0.5
    with torch.no_grad():
        assert float((ctx.f(z) - z).norm() / z.norm()) > 0.1


def test_implicit_gradient_matches_brute_force(case):
    """A converged backward solve (per-sample decisions, tight eps, 2D + 12 steps) equals the
    dense-Jacobian IFT gradient w.r.t. the input and every parameter, in float64."""
    model, x, y, z = case
    gx, gp, gh = brute_force_grads(model, x, y, z)
    fwd = FinalState(steps=0, gradient="implicit", backward_iter=60, backward="sample",
                     backward_eps=1e-13)
    ox, op, oh = _ours(model, x, y, fwd)
    assert _rel(ox, gx) < 1e-8
    for a, b in zip(op, gp):
        assert _rel(a, b) < 1e-7
    for a, b in zip(oh, gh):
        assert _rel(a, b) < 1e-10


def test_linearizing_at_f_of_z_star_would_be_detected(case):
    """The test above has teeth: the adjoint of the Jacobian at f(z*) of an UNCONVERGED z* (two
    solver steps) is far from the one at z*, and the fixed code follows z* (the released code's
    linearization point), not f(z*)."""
    model, x, y, _ = case
    ctx = model.context(x)
    with torch.no_grad():
        z2 = model.solver.with_options(max_iter=2).solve(ctx.f, model.zero_state(x)).best
    gx, _, _ = brute_force_grads(model, x, y, z2)
    with torch.no_grad():
        fz2 = ctx.f(z2)
    # brute force linearized at f(z2) but with the output f(z2) of z2: what `z0 = out.detach()`
    # computed
    x_ = x.detach().clone().requires_grad_()
    c = model.context(x_)
    z = z2.clone().requires_grad_()
    u = c.f(z)
    loss = torch.nn.functional.cross_entropy(c.head(u), y, reduction="sum")
    g = torch.autograd.grad(loss, u, retain_graph=True)[0]
    zf = fz2.clone().requires_grad_()
    uf = c.f(zf)
    w = torch.empty_like(g)
    for b in range(len(x)):
        J = torch.stack([torch.autograd.grad(uf[b, k], zf, retain_graph=True)[0][b]
                         for k in range(z.shape[1])])
        w[b] = torch.linalg.solve((torch.eye(z.shape[1], dtype=J.dtype) - J).T, g[b])
    wrong = torch.autograd.grad(u, x_, w)[0]
    assert _rel(wrong, gx) > 1e-3  # the two linearization points differ measurably here

    def ours_at(z_star):
        xx = x.detach().clone().requires_grad_()
        cc = model.context(xx)
        out = implicit_step(cc, z_star, 60, backward="sample", backward_eps=1e-13)
        loss = torch.nn.functional.cross_entropy(cc.head(out), y, reduction="sum")
        return torch.autograd.grad(loss, xx)[0]
    assert _rel(ours_at(z2), gx) < 1e-8


def test_reference_preset_reproduces_the_released_backward(case):
    """``backward='reference'`` (7 Broyden steps, eps 1e-3, batch-level decisions) equals the
    transcribed released hook to float64 round-off (z* from the 8-step forward; the backward
    solve does not converge in 7 steps, so every decision matters)."""
    model, x, y, z = case
    xr = x.detach().clone().requires_grad_()
    ctx = model.context(xr)
    loss = torch.nn.functional.cross_entropy(released_implicit_logits(ctx, z), y, reduction="sum")
    want = torch.autograd.grad(loss, xr)[0]
    for fwd in (FinalState(steps=0, gradient="implicit"), ImplicitFinal().forward):
        assert fwd.backward == "reference" and fwd.backward_iter == 7
        got, _, _ = _ours(model, x, y, fwd)
        assert _rel(got, want) < 1e-10
    # and the released 7-step backward is not the exact gradient here (the presets matter)
    gx, _, _ = brute_force_grads(model, x, y, z)
    assert _rel(want, gx) > 1e-3


def test_sample_preset_is_batch_invariant(case):
    """Per-sample decisions: a sample's gradient does not depend on the rest of the batch."""
    model, x, y, _ = case
    fwd = FinalState(steps=0, gradient="implicit", backward="sample")
    model.solver = model.solver.with_options(decisions="sample")
    try:
        full, _, _ = _ours(model, x, y, fwd)
        one, _, _ = _ours(model, x[1:2], y[1:2], fwd)
    finally:
        model.solver = model.solver.with_options(decisions="batch")
    assert _rel(one[0], full[1]) < 1e-12


def test_presets_and_errors():
    assert set(IMPLICIT_PRESETS) == {"reference", "sample"}
    assert FinalState(gradient="implicit").config()["backward"] == "reference"
    assert ImplicitFinal().config()["forward"]["backward_iter"] == 7
    assert make_surrogate("implicit_final").forward.backward == "reference"
    with pytest.raises(ValueError, match="backward must be one of"):
        FinalState(gradient="implicit", backward="exact")
    with pytest.raises(ValueError, match="backward_eps"):
        FinalState(gradient="implicit", backward_eps=-1.0)


def test_exact_gradient_training_path_matches_brute_force(case):
    """The training forward of ``train.gradient: implicit`` (model_zoo.training.training_defense)
    is FinalState(gradient='implicit'): its parameter gradients are the IFT gradients."""
    from model_zoo.train_config import TrainConfig
    from model_zoo.training import training_defense
    model, x, y, z = case
    cfg = TrainConfig.from_dict({"train": {"gradient": "implicit", "backward_iter": 60}})
    fwd = training_defense(cfg)
    assert isinstance(fwd, FinalState) and fwd.gradient == "implicit"
    fwd.backward, fwd.backward_eps = "sample", 1e-13   # converge fully for the comparison
    _, gp, _ = brute_force_grads(model, x, y, z)
    _, op, _ = _ours(model, x, y, fwd)
    for a, b in zip(op, gp):
        assert _rel(a, b) < 1e-7
    assert math.isfinite(sum(float(a.norm()) for a in op))
