"""Gradient surrogates and the straight-through wrapper that judges on the reported forward."""
import pytest
import torch

import model_zoo as mz
from attacks.surrogates import (BPDAPurification, DefendedTrajectory, FullBackprop,
                                JudgedModule, PhantomFinal, UnrolledIntermediate, grid_settings,
                                make_surrogate)
from model_zoo.forward import unroll


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = mz.create("deq_tiny_fashion_mnist", channels=(8, 8), head_channels=(4, 4),
                  final_channels=16, num_groups=4).double().eval()
    # make the injection matter (untrained BN running stats squash it): calibrate BN on data
    m.train()
    with torch.no_grad():
        m(torch.rand(16, 1, 28, 28, dtype=torch.float64))
    return m.eval()


@pytest.mark.parametrize("i,ka,lam,preset", [(1, 1, 0.5, "reference"), (3, 2, 1.0, "paper"),
                                             (8, 3, 0.5, "paper")])
def test_unrolled_intermediate_matches_definition_and_finite_differences(tiny, i, ka, lam, preset):
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    s = UnrolledIntermediate(i, ka, lam, preset)
    out = s.logits(tiny, x)
    # definition: z[i] from the plain solve, then (f once if reference) and ka damped steps
    ctx = tiny.context(x)
    traj = tiny.solver.solve(ctx.f, tiny.zero_state(x))
    u = traj.state(i)
    if preset == "reference":
        u = ctx.f(u)
    for _ in range(ka):
        u = (1 - lam) * u + lam * ctx.f(u)
    assert torch.allclose(out, ctx.head(u), atol=1e-10)

    # gradient = derivative of the surrogate with z[i] held fixed (finite differences, float64)
    z_i = traj.state(i).detach()

    def g(xx):
        c = tiny.context(xx, check=False)
        return c.head(unroll(c, z_i, ka, lam, first_full=preset == "reference"))
    assert torch.autograd.gradcheck(g, (x.clone().requires_grad_(),), eps=1e-7, atol=1e-5)


def test_judged_module_outputs_reported_and_differentiates_surrogate(tiny):
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    rep = mz.EarlyState(7)
    sur = UnrolledIntermediate(3, 2, 0.5)
    jm = JudgedModule(tiny, rep, sur)
    out = jm(x)
    assert torch.equal(out.detach(), tiny.run(x.detach(), defense=rep).logits.detach())
    w = torch.randn(3, 10, dtype=torch.float64)
    (g_wrapped,) = torch.autograd.grad((out * w).sum(), x)
    (g_sur,) = torch.autograd.grad((sur.logits(tiny, x) * w).sum(), x)
    assert torch.allclose(g_wrapped, g_sur, atol=1e-12)
    assert g_wrapped.abs().sum() > 0


def test_grid_and_bad_settings():
    g = grid_settings(8)
    assert len(g) == 144 and len({tuple(s.config().values()) for s in g}) == 144
    with pytest.raises(ValueError, match="ka must be"):
        UnrolledIntermediate(1, 0, 0.5)
    with pytest.raises(ValueError, match="lam must be"):
        UnrolledIntermediate(1, 1, 1.5)
    with pytest.raises(ValueError, match="i must be"):
        UnrolledIntermediate(0, 1, 0.5)
    m = mz.create("deq_tiny_fashion_mnist")
    with pytest.raises(ValueError, match="exceeds the solver's N=8"):
        UnrolledIntermediate(9, 1, 0.5).logits(m, torch.rand(1, 1, 28, 28))
    with pytest.raises(ValueError, match="unknown surrogate"):
        make_surrogate("nope")
    assert make_surrogate("ui:2,3,1.0").config()["ka"] == 3


def test_defense_surrogates_run_and_have_gradients(tiny):
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    er = mz.EntropyReduction(r=2, eps=0.05, beta=0.01)
    for s in (BPDAPurification(er, i=7), DefendedTrajectory(er), PhantomFinal(), FullBackprop()):
        out = s.logits(tiny, x)
        (g,) = torch.autograd.grad(out[:, 0].sum(), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0, s
