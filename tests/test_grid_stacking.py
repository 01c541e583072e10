"""The (i, Ka, lambda) grid with settings stacked into batches (grid_attack(stack=True / 'i'))
gives the same records as the per-setting loop (stack=False), on a shipped tiny DEQ.

Tolerances: per-setting outcomes, worst-case correctness, broken_by and the f-eval counts per
example must be EQUAL (counts to a relative 1e-12: float64 sums of the same terms in another
order); adversarial examples and margins to 1e-6 / 1e-4 (batched convolutions may round the
last bits differently; a flipped gradient sign would move a pixel by 2 alpha = 0.1, far
outside 1e-6); entropies to 1e-3 (the 8-step Broyden solve amplifies last-bit differences).
"""
from pathlib import Path

import pytest
import torch

import model_zoo as mz
from attacks.evaluation import grid_attack
from attacks.pgd import check_linf_ball
from attacks.surrogates import StackedUnrolled, UnrolledIntermediate, grid_settings

pytestmark = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                                reason="Fashion-MNIST (dataset-fashion-mnist) not installed")

# eps 0.2: a budget at which some settings break a point and others do not
EPS, ALPHA, STEPS = 0.2, 0.05, 3


@pytest.fixture(scope="module")
def setup():
    from benchmark.data import load_dataset, subset
    model = mz.load("deq_tiny_fmnist_pgdat")
    ds = subset(load_dataset("fashion_mnist", "test"), 10, seed=3)
    # two i-groups, mixed Ka and lambda (rows of one stack stop unrolling at different steps);
    # settings deliberately interleaved across groups, so results arrive out of list order
    settings = [s for s in grid_settings(model.solver.max_iter, kas=[1, 3], lams=(0.5, 1.0))
                if s.i in (1, 3)]
    return model, ds.images, ds.labels, settings


_CACHE = {}


def _run(setup, mode, **kw):
    """grid_attack on the fixture, each distinct call run once per module (tests share runs)."""
    key = (id(setup[0]), mode, tuple(sorted(kw.items())))
    if key not in _CACHE:
        model, x, y, settings = setup
        _CACHE[key] = grid_attack(model, model.defense, x, y, EPS, ALPHA, STEPS,
                                  settings=settings, mode=mode, seed=5, batch_size=64, **kw)
    return _CACHE[key]


def _assert_same(a, b):
    assert torch.equal(a.per_setting, b.per_setting)
    assert torch.equal(a.worst.correct, b.worst.correct)
    assert a.worst.broken_by == b.worst.broken_by
    assert torch.allclose(a.worst.x_adv, b.worst.x_adv, atol=1e-6, rtol=0)
    assert torch.allclose(a.worst.margin, b.worst.margin, atol=1e-4, rtol=0)
    assert torch.allclose(a.entropy, b.entropy, atol=1e-3, rtol=0, equal_nan=True)
    for f in ("nfev_nograd", "nfev_grad", "queries"):
        assert torch.allclose(getattr(a.worst, f), getattr(b.worst, f), rtol=1e-12, atol=0), f


@pytest.mark.parametrize("mode,stack", [("full", "i"), ("naive", "i"), ("full", True),
                                        ("naive", True)])
def test_stacked_grid_equals_per_setting_loop(setup, mode, stack):
    model, x, y, settings = setup
    old = _run(setup, mode, stack=False)
    new = _run(setup, mode, stack=stack)
    assert new.stacked and not old.stacked
    _assert_same(old, new)
    # the comparison is not vacuous: some points broken, some robust; some settings break a
    # point that others do not
    assert 0 < float(old.worst.correct.double().mean()) < 1
    attacked = torch.tensor([bb != ["clean"] for bb in old.worst.broken_by])
    cols = old.per_setting[:, attacked]
    assert bool(((cols == 0).any(0) & (cols == 1).any(0)).any())
    check_linf_ball(new.worst.x_adv, x, EPS)  # the eps-ball and [0, 1]
    # a point robust at every setting ran every step of every setting: STEPS x (f(z[i]) + Ka)
    # evaluations with graph per setting; clean-misclassified points are not attacked
    full_cost = STEPS * sum(1 + s.ka for s in settings)
    robust = new.worst.correct
    assert bool(robust.any()) and bool((new.worst.nfev_grad[robust] == full_cost).all())
    assert bool((new.worst.nfev_grad[~attacked] == 0).all())


def test_stack_rows_bound_does_not_change_records(setup):
    # one unit per stack (stack_rows smaller than a chunk) vs everything of an i in one stack
    _assert_same(_run(setup, "full", stack=True, stack_rows=1),
                 _run(setup, "full", stack=True))  # default bound: one stack of everything here


def test_efficient_mode_is_never_stacked(setup):
    a, b = _run(setup, "efficient", stack=False), _run(setup, "efficient", stack=True)
    assert not b.stacked
    assert torch.equal(a.per_setting, b.per_setting) and torch.equal(a.worst.x_adv, b.worst.x_adv)
    assert torch.equal(a.worst.nfev_nograd, b.worst.nfev_nograd)


def test_skip_last_f_same_iterates_one_eval_less(setup):
    model, x, y, settings = setup
    base = _run(setup, "full", stack=True)
    for stack in (True, False):
        skip = _run(setup, "full", stack=stack, skip_last_f=True)
        assert torch.equal(skip.per_setting, base.per_setting)
        assert torch.allclose(skip.worst.x_adv, base.worst.x_adv, atol=1e-6, rtol=0)
        assert torch.allclose(skip.worst.nfev_grad, base.worst.nfev_grad, rtol=1e-12, atol=0)
        saved = base.worst.nfev_nograd - skip.worst.nfev_nograd
        # at most one per PGD step and setting, and something saved on every attacked point
        attacked = torch.tensor([bb != ["clean"] for bb in base.worst.broken_by])
        assert bool((saved[attacked] > 0).all()) and bool((saved[~attacked] == 0).all())
        assert bool((saved <= STEPS * len(settings) + 1e-9).all())


def test_stacked_unrolled_rows_equal_single_settings(setup):
    model, x, y, _ = setup
    xb = x[:4]
    specs = [(1, 0.5), (3, 1.0), (2, 0.5)]  # (ka, lam) per setting, i = 2
    xs = xb.repeat(len(specs), 1, 1, 1)
    ka = torch.tensor([k for k, _ in specs]).repeat_interleave(len(xb))
    lam = torch.tensor([l for _, l in specs], dtype=torch.float64).repeat_interleave(len(xb))
    src = StackedUnrolled(2, ka, lam)
    with torch.no_grad():
        out = src.logits(model, xs)
        for j, (k, l) in enumerate(specs):
            ref = UnrolledIntermediate(2, k, l).logits(model, xb)
            assert torch.allclose(out[j * 4:(j + 1) * 4], ref, atol=1e-5, rtol=0), (k, l)
    nograd, grad = src.last_counts
    # the tiny DEQ is not converged in 2 Broyden steps: f(z0) + 2 iterations without graph;
    # no_grad here, so the unroll's f(z[i]) + ka steps count as nograd too
    assert torch.equal(nograd, 3 + 1 + ka) and int(grad.sum()) == 0
    with pytest.raises(ValueError, match="rows"):
        src.logits(model, xb)
    with pytest.raises(ValueError, match="ka"):
        StackedUnrolled(2, torch.tensor([0]), torch.tensor([0.5]))


def test_stacked_unrolled_per_row_i_equals_single_settings(setup):
    model, x, y, _ = setup
    xb = x[:3]
    specs = [(3, 1, 0.5), (1, 2, 1.0), (2, 1, 0.5), (3, 3, 1.0)]  # (i, ka, lam)
    R = len(xb)
    xs = xb.repeat(len(specs), 1, 1, 1)
    col = lambda k, dt=torch.long: torch.tensor([s[k] for s in specs], dtype=dt)  # noqa: E731
    for skip in (False, True):
        src = StackedUnrolled(col(0).repeat_interleave(R), col(1).repeat_interleave(R),
                              col(2, torch.float64).repeat_interleave(R), skip_last_f=skip)
        with torch.no_grad():
            out = src.logits(model, xs)
            nograd, _ = src.last_counts
            for j, (i, k, l) in enumerate(specs):
                one = StackedUnrolled(i, torch.full((R,), k), torch.full((R,), l),
                                      skip_last_f=skip)
                ref = one.logits(model, xb)
                rows = slice(j * R, (j + 1) * R)
                assert torch.allclose(out[rows], ref, atol=1e-5, rtol=0), (i, k, l)
                # each row costs exactly what a solve to its own i costs
                assert torch.equal(nograd[rows], one.last_counts[0]), (i, k, l, skip)
        with pytest.raises(ValueError, match="exceeds"):
            StackedUnrolled(torch.tensor([1, 99]), torch.tensor([1, 1]),
                            torch.tensor([0.5, 0.5])).logits(model, x[:2])


def test_stack_options_are_checked_and_the_default_bound_follows_the_state_size(setup):
    from attacks.evaluation import GRID_STACK_ELEMENTS, _default_stack_rows
    model, x, y, settings = setup
    for kw, msg in (({"stack": "bogus"}, "stack must be"), ({"stack_rows": 0}, "stack_rows"),
                    ({"stack_rows": 2.5}, "stack_rows")):
        with pytest.raises(ValueError, match=msg):
            grid_attack(model, model.defense, x[:2], y[:2], EPS, ALPHA, 1,
                        settings=settings[:1], mode="full", **kw)
    assert model.state_dim == 3528
    assert _default_stack_rows(model, x, 64) == GRID_STACK_ELEMENTS // 3528 == 594
    assert _default_stack_rows(model, x, 1024) == 1024  # never below the per-setting batch


def test_only_independent_rows_with_a_plain_reported_forward_are_stacked(setup):
    from attacks.evaluation import _stackable
    from attacks.surrogates import PhantomFinal
    model, x, y, settings = setup
    assert _stackable(model, settings) and _stackable(model, settings, mz.EarlyState(4))
    assert not _stackable(model, settings, mz.EntropyReduction(eps=0.1, beta=0.025, r=2, tf=2))
    assert not _stackable(model, settings + [PhantomFinal()])
    saved = model.solver
    try:
        model.solver = saved.with_options(decisions="batch")
        assert not _stackable(model, settings)
    finally:
        model.solver = saved
