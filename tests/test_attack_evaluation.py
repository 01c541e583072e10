"""Attacks judged on the reported forward (attacks/evaluation.py): per-example outcomes and costs,
the (i, Ka, lambda) grid, the library wrappers, transfer matrices, the obfuscation indicators,
and the checks that catch a bad attack or a bad configuration."""
import dataclasses

import pytest
import torch
from torch import nn

import model_zoo as mz
from attacks import evaluation as ev
from attacks.evaluation import (AA_STANDARD_BUDGET, AttackOutcome, autoattack_attack,
                                derive_seed, grid_attack, obfuscation_flags, pgd_attack,
                                pgd_attack_steps,
                                reported_margin, rescore, surrogate_agreement,
                                setting_name, torchattacks_attack, transfer_matrix)
from attacks.surrogates import JudgedModule, UnrolledIntermediate, grid_settings
from model_zoo.baselines import CheckedClassifier

from .conftest import calibrate_batchnorm

EPS = 0.02  # breaks some, not all, of the tiny DEQ's clean-correct points with PGD-5


# ---------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------

def _tiny_deq():
    """The conftest ``tiny_double_model`` architecture (MDEQ on 1x8x8, channels (4, 4)) in
    float32 (pyautoattack casts inputs to float32), BatchNorm calibrated, Broyden N=8."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(mz.MDEQ_CONFIGS["deq_tiny"], channels=(4, 4), head_channels=(2, 2),
                              final_channels=8, num_groups=2, expansion=1, dropout=0.0)
    m = mz.MDEQClassifier(cfg, 1, (8, 8))
    return calibrate_batchnorm(m, torch.rand(32, 1, 8, 8))


@pytest.fixture
def deq():
    return _tiny_deq()


@pytest.fixture
def deq_data(deq):
    """8 images; labels = the model's clean predictions except the last (clean-misclassified)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = deq(x).argmax(-1)
    y[-1] = (y[-1] + 1) % 10
    return x, y


def _judged(model, reported=None, i=2, ka=2, lam=0.5, **kw):
    return JudgedModule(model, reported or mz.FinalState(), UnrolledIntermediate(i, ka, lam), **kw)


DELTA = 0.05  # half the distance between the two class centres (l_inf)


def _separable(n, gen, v):
    """Two classes at 0.5 +- DELTA * v (v a fixed +-1 pattern), tiny uniform jitter."""
    y = torch.arange(n) % 2
    s = (1 - 2 * y).float().view(-1, 1, 1, 1)
    x = 0.5 + DELTA * s * v + 0.01 * (2 * torch.rand(n, 1, 8, 8, generator=gen) - 1)
    return x, y


@pytest.fixture(scope="module")
def linear():
    """A standard-trained (undefended) logistic-regression classifier on 1x8x8 separable data,
    wrapped as a non-DEQ zoo model. Returns (model, x_test, y_test, max l_inf margin)."""
    g = torch.Generator().manual_seed(0)
    v = torch.where(torch.rand(1, 1, 8, 8, generator=g) < 0.5, -1.0, 1.0)
    xtr, ytr = _separable(256, g, v)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xtr), ytr).backward()
        opt.step()
    model = CheckedClassifier(net, 1, (8, 8), 2).eval()
    x, y = _separable(16, g, v)
    with torch.no_grad():
        logits = model(x)
        w = net[1].weight
        # exact l_inf distance of each point to the linear decision boundary
        dist = (logits[:, 1] - logits[:, 0]).abs() / (w[1] - w[0]).abs().sum()
    assert bool((logits.argmax(-1) == y).all()), "the linear model should fit the toy data"
    return model, x, y, float(dist.max())


def _in_bounds(x_adv, x, eps):
    return (float((x_adv - x).abs().max()) <= eps + 1e-6 and float(x_adv.min()) >= 0
            and float(x_adv.max()) <= 1)


# ---------------------------------------------------------------------------------------------
# 1. the fused JudgedModule
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reported", [mz.FinalState(), mz.EarlyState(5)], ids=["final", "early5"])
def test_fused_and_unfused_judged_module_agree_exactly(deq, reported):
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    w = torch.randn(5, 10, generator=torch.Generator().manual_seed(4))
    for i, ka, lam, preset in [(1, 1, 0.5, "reference"), (3, 2, 1.0, "paper"),
                               (8, 3, 0.5, "reference")]:
        res = {}
        for fused in (True, False):
            jm = JudgedModule(deq, reported, UnrolledIntermediate(i, ka, lam, preset), fused=fused)
            xv = x.clone().requires_grad_(True)
            before = (deq.f_evals.nograd, deq.f_evals.grad)
            out = jm(xv)
            (g,) = torch.autograd.grad((out * w).sum(), xv)
            cost = (deq.f_evals.nograd - before[0], deq.f_evals.grad - before[1])
            res[fused] = (out.detach(), g, cost)
        (o_f, g_f, c_f), (o_u, g_u, c_u) = res[True], res[False]
        assert torch.equal(o_f, o_u), (i, ka, lam)
        assert torch.equal(g_f, g_u), (i, ka, lam)
        assert g_f.abs().sum() > 0
        # the output is the reported forward, the gradient is the surrogate's
        assert torch.equal(o_f, deq.run(x, defense=reported).logits.detach())
        xs = x.clone().requires_grad_(True)
        (g_s,) = torch.autograd.grad((UnrolledIntermediate(i, ka, lam, preset).logits(deq, xs)
                                      * w).sum(), xs)
        assert torch.equal(g_f, g_s)
        # fusion really happened: one solve instead of two (same graph-carrying evaluations)
        assert c_f[1] == c_u[1] and c_f[0] < c_u[0], (c_f, c_u)


@pytest.mark.parametrize("reported", [mz.FinalState(), mz.EarlyState(5), mz.FinalState(steps=3)],
                         ids=["final", "early5", "final-steps3"])
@pytest.mark.parametrize("source", ["phantom_final", "implicit_final"])
def test_fused_final_state_gradients_agree_exactly(deq, reported, source):
    """PhantomFinal / ImplicitFinal share the reported forward's solve (and, when their forward
    IS the reported one, its readout): the same output, gradient and graph-carrying f
    evaluations as unfused, with fewer no-grad ones."""
    from attacks.surrogates import make_surrogate
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    w = torch.randn(5, 10, generator=torch.Generator().manual_seed(4))
    res = {}
    for fused in (True, False):
        jm = JudgedModule(deq, reported, make_surrogate(source), fused=fused)
        assert jm._can_fuse() is fused
        xv = x.clone().requires_grad_(True)
        before = (deq.f_evals.nograd, deq.f_evals.grad)
        out = jm(xv)
        (g,) = torch.autograd.grad((out * w).sum(), xv)
        res[fused] = (out.detach(), g, (deq.f_evals.nograd - before[0],
                                        deq.f_evals.grad - before[1]))
    (o_f, g_f, c_f), (o_u, g_u, c_u) = res[True], res[False]
    assert torch.equal(o_f, o_u) and torch.equal(g_f, g_u) and g_f.abs().sum() > 0
    assert torch.equal(o_f, deq.run(x, defense=reported).logits.detach())
    assert c_f[1] == c_u[1]
    solve = deq.solver.max_iter + 1          # the no-grad f evaluations of one solve
    # phantom_final IS the reported FinalState(): the whole reported forward is saved
    saved = (solve + 10 if source == "phantom_final" and type(reported) is mz.FinalState
             and reported.steps == 9 else solve)
    assert c_u[0] - c_f[0] == saved * len(x), (c_f, c_u)


# ---------------------------------------------------------------------------------------------
# 2. PGD
# ---------------------------------------------------------------------------------------------

def test_pgd_outcome_is_judged_on_the_reported_forward(deq, deq_data):
    x, y = deq_data
    jm = _judged(deq, mz.EarlyState(6))
    o = pgd_attack(jm, x, y, EPS, EPS / 4, steps=5, seed=0)
    assert _in_bounds(o.x_adv, x, EPS)
    clean_ok = jm.reported_logits(x).argmax(-1) == y
    rep = jm.reported_logits(o.x_adv)
    assert torch.equal(o.correct, (rep.argmax(-1) == y) & clean_ok)
    assert torch.allclose(o.margin, reported_margin(rep, y))
    assert torch.equal(o.correct, o.margin > 0)
    assert not bool(clean_ok[-1]) and not bool(o.correct[-1])
    assert torch.equal(o.x_adv[-1], x[-1])  # clean-misclassified points are not attacked
    # the attack does something: it breaks at least one clean-correct point
    assert int((clean_ok & ~o.correct).sum()) >= 1
    assert o.accuracy < float(clean_ok.double().mean())
    for b in range(len(x)):
        expect = [] if o.correct[b] else (["clean"] if not clean_ok[b] else ["pgd"])
        assert o.broken_by[b] == expect
    assert o.config["eps"] == EPS and o.config["surrogate"]["i"] == 2
    assert o.config["reported"] == {"name": "early", "index": 6}


def test_pgd_costs_determinism_and_batching(deq, deq_data, linear):
    x, y = deq_data
    jm = _judged(deq)
    before = deq.f_evals.total
    o = pgd_attack(jm, x, y, EPS, EPS / 4, steps=4, seed=7)
    spent = deq.f_evals.total - before
    assert bool((o.nfev_nograd > 0).all())
    clean_ok = jm.reported_logits(x).argmax(-1) == y
    assert bool((o.nfev_grad[clean_ok] > 0).all()) and bool((o.nfev_grad[~clean_ok] == 0).all())
    # per-example costs add up to what the model really spent; at most 4 steps x (1 + ka) each
    assert abs(float(o.nfev.sum()) - spent) < 1e-6
    assert float(o.nfev_grad.max()) <= 4 * (1 + 2)
    assert torch.equal(o.f_equivalents, o.nfev_nograd + 3 * o.nfev_grad)

    again = pgd_attack(jm, x, y, EPS, EPS / 4, steps=4, seed=7)
    assert torch.equal(o.x_adv, again.x_adv) and torch.equal(o.correct, again.correct)
    other = pgd_attack(jm, x, y, EPS, EPS / 4, steps=4, seed=8)
    assert not torch.equal(o.x_adv, other.x_adv)
    # internal batching does not change anything (start noise is drawn for the whole input)
    chunked = pgd_attack(jm, x, y, EPS, EPS / 4, steps=4, seed=7, batch_size=3)
    assert torch.allclose(o.x_adv, chunked.x_adv, atol=1e-6)
    assert torch.equal(o.correct, chunked.correct)

    # early stop freezes a broken point: cheaper than running every step on every point
    late = pgd_attack(jm, x, y, EPS, EPS / 4, steps=4, seed=7, early_stop=False)
    assert torch.equal(late.nfev_grad[clean_ok], torch.full((int(clean_ok.sum()),), 12.0,
                                                            dtype=late.nfev_grad.dtype))
    assert float(o.nfev_grad.sum()) < float(late.nfev_grad.sum())
    assert torch.equal(late.correct, (jm.reported_logits(late.x_adv).argmax(-1) == y) & clean_ok)

    model, xl, yl, _ = linear
    ol = pgd_attack(JudgedModule(model), xl, yl, 0.01, 0.005, steps=3)
    assert float(ol.nfev.abs().sum()) == 0  # no f_theta
    assert bool((ol.queries >= 2).all())  # clean forward + re-scoring at least


@pytest.mark.parametrize("batch_size", [256, 3])
def test_pgd_steps_snapshots_equal_separate_runs(deq, deq_data, batch_size):
    """One PGD-K run snapshotting after k steps gives exactly PGD-k's outcome (examples,
    verdicts, margins, per-example f-evaluations), for K itself too, also with internal
    batches; steps 0 is the random start."""
    x, y = deq_data
    jm = _judged(deq)
    before = deq.f_evals.total
    many = pgd_attack_steps(jm, x, y, EPS, EPS / 4, (0, 2, 5), seed=3, batch_size=batch_size)
    spent = deq.f_evals.total - before
    assert sorted(many) == [0, 2, 5]
    for k, o in many.items():
        alone = pgd_attack(jm, x, y, EPS, EPS / 4, steps=k, seed=3, batch_size=batch_size)
        assert torch.equal(o.x_adv, alone.x_adv), k
        assert torch.equal(o.correct, alone.correct), k
        assert torch.allclose(o.margin, alone.margin), k
        assert torch.allclose(o.nfev_nograd, alone.nfev_nograd), k
        assert torch.allclose(o.nfev_grad, alone.nfev_grad), k
        assert o.config["steps"] == k
    # the steps are paid once: the shared run costs less than the three runs it replaces
    assert spent < sum(float(o.nfev.sum()) for o in many.values())
    assert float(many[5].correct.float().mean()) <= float(many[2].correct.float().mean())
    with pytest.raises(ValueError, match="at least one"):
        pgd_attack_steps(jm, x, y, EPS, EPS / 4, ())
    with pytest.raises(ValueError, match="steps"):
        pgd_attack_steps(jm, x, y, EPS, EPS / 4, (2, -1))


def test_pgd_rejects_bad_parameters(deq, deq_data):
    x, y = deq_data
    jm = _judged(deq)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        pgd_attack(jm, x, y, -0.1, 0.01)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        pgd_attack(jm, x, y, float("nan"), 0.01)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        pgd_attack(jm, x, y, 0.1, 0.0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        pgd_attack(jm, x, y, 0.1, -0.01)
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        pgd_attack(jm, x, y, 0.1, 0.01, steps=-1)


# ---------------------------------------------------------------------------------------------
# 3. an undefended, standard-trained model is broken; eps = 0 changes nothing
# ---------------------------------------------------------------------------------------------

def test_undefended_model_is_broken_and_eps_zero_keeps_clean_accuracy(linear):
    model, x, y, margin = linear
    jm = JudgedModule(model)
    eps = 0.1
    assert margin < eps < 0.3  # every point is within eps of the boundary; x +- eps stays in [0, 1]
    clean_acc = float((model(x).argmax(-1) == y).double().mean())
    assert clean_acc == 1.0

    o = pgd_attack(jm, x, y, eps, eps / 4, steps=10)
    assert o.accuracy == 0.0 and _in_bounds(o.x_adv, x, eps)
    assert all(b == ["pgd"] for b in o.broken_by)
    aa = autoattack_attack(jm, x, y, eps, attacks=["apgd-ce"], budget={"apgd_n_iter": 10})
    assert aa.accuracy == 0.0 and _in_bounds(aa.x_adv, x, eps)
    assert all(b == ["apgd-ce"] for b in aa.broken_by)
    assert aa.extra["cumulative"] == {"apgd-ce": 0.0}
    assert set(aa.extra) == {"cumulative", "members", "first_x_adv"}
    # a single attack: its own output is the first member's, every row clean-correct here
    assert torch.equal(aa.extra["first_x_adv"], aa.x_adv)
    # every point ran APGD-CE and it broke each one (margin < 0 at its output)
    assert sorted(aa.extra["members"]["apgd-ce"]) == list(range(len(x)))
    assert all(not c and m < 0 for c, m in aa.extra["members"]["apgd-ce"].values())
    assert aa.config["budget"] == "reduced" and aa.config["budget_knobs"]["apgd_n_iter"] == 10
    assert torch.equal(aa.correct, model(aa.x_adv).argmax(-1) == y)

    assert pgd_attack(jm, x, y, 0.0, 0.01, steps=5).accuracy == clean_acc
    aa0 = autoattack_attack(jm, x, y, 0.0, attacks=["apgd-ce"], budget={"apgd_n_iter": 10})
    assert aa0.accuracy == clean_acc and torch.equal(aa0.x_adv, x)

    # the budget label: 'standard' for the standard knobs, given or not
    full = autoattack_attack(jm, x[:4], y[:4], 0.01, attacks=["apgd-ce"],
                             budget=dict(AA_STANDARD_BUDGET))
    assert full.config["budget"] == "standard"


def test_autoattack_individual_attacks_report_per_attack_accuracy(linear):
    model, x, y, _ = linear
    jm = JudgedModule(model)
    eps = 0.06  # near the margin: not every attack breaks every point
    out = autoattack_attack(jm, x, y, eps, attacks=["apgd-ce", "square"], ensemble=False,
                            budget={"apgd_n_iter": 5, "square_n_queries": 10})
    per = out.extra["per_attack"]
    assert set(per) == {"apgd-ce", "square"}
    # individually, each member ran on every clean-correct point; its own result there
    for name, rows in out.extra["members"].items():
        assert sorted(rows) == list(range(len(x)))
        assert [not c for c, _m in rows.values()] == [name in b for b in out.broken_by]
    assert out.name == "autoattack_individual"
    for name, acc in per.items():
        broken = torch.tensor([name in b for b in out.broken_by])
        assert acc == pytest.approx(1 - float(broken.double().mean()))
        assert out.accuracy <= acc
    assert torch.equal(out.correct, torch.tensor([not b for b in out.broken_by]))


# ---------------------------------------------------------------------------------------------
# 4. the (i, Ka, lambda) grid
# ---------------------------------------------------------------------------------------------

def test_grid_worst_case_modes_and_broken_by(deq, deq_data):
    x, y = deq_data
    settings = grid_settings(8, kas=[1, 2], lams=(0.5, 1.0))[::4]  # 8 settings
    eps, alpha, steps = 0.01, 0.0025, 5
    rep = mz.FinalState()
    full = grid_attack(deq, rep, x, y, eps, alpha, steps, settings=settings, mode="full", seed=0)
    eff = grid_attack(deq, rep, x, y, eps, alpha, steps, settings=settings, mode="efficient",
                      seed=0)
    S, n = len(settings), len(x)
    assert full.per_setting.shape == (S, n) and full.settings == eff.settings
    assert full.settings[0] == "ui(i=1,ka=1,lam=0.5)"

    # full mode: per-setting table, worst case <= every setting's accuracy
    assert not bool((full.per_setting < 0).any())
    accs = full.setting_accuracy
    assert len(accs) == S and full.min_over_means == min(accs)
    assert all(full.worst_case_accuracy <= a for a in accs)
    assert torch.equal(full.worst.correct, (full.per_setting == 1).all(0))
    clean_ok = full.worst.broken_by[-1] == ["clean"]
    assert clean_ok and bool((full.per_setting[:, -1] == 0).all())
    assert not bool(full.worst.correct.all()) and _in_bounds(full.worst.x_adv, x, eps)

    # each row is exactly PGD with that surrogate and the grid's seed for it; a robust point's
    # worst-case example is its lowest-margin one over the settings
    singles = [pgd_attack(JudgedModule(deq, rep, s), x, y, eps, alpha, steps,
                          seed=derive_seed(0, "grid", setting_name(s)), check="when_fooled")
               for s in settings]
    for si, single in enumerate(singles):
        assert torch.equal(full.per_setting[si].bool(), single.correct), si
    # per setting, the reported forward's prediction entropy at that setting's adversarial
    # example (Eqs. 12-13 per grid attack) and at the clean input; NaN where not attacked
    jm = JudgedModule(deq, rep)
    with torch.no_grad():
        h_clean = mz.prediction_entropy(jm.reported_logits(x))
    assert torch.allclose(full.clean_entropy, h_clean, atol=1e-5)
    for si, single in enumerate(singles):
        with torch.no_grad():
            h = mz.prediction_entropy(jm.reported_logits(single.x_adv))
        assert torch.allclose(full.entropy[si], h, atol=1e-4), si
    assert torch.allclose(full.entropy[:, -1], h_clean[-1].expand(S))  # clean-wrong: x~ = x
    assert bool(torch.isnan(eff.entropy[eff.per_setting < 0]).all())
    assert not bool(torch.isnan(eff.entropy[eff.per_setting >= 0]).any())
    robust = full.worst.correct
    lowest = torch.stack([o.margin for o in singles]).min(0).values
    assert torch.allclose(full.worst.margin[robust], lowest[robust])
    at_worst = JudgedModule(deq, rep).reported_logits(full.worst.x_adv)
    assert torch.allclose(full.worst.margin, reported_margin(at_worst, y))

    # broken_by lists exactly the settings that broke the point
    broken_points = 0
    for b in range(n - 1):
        hit = [full.settings[s] for s in range(S) if full.per_setting[s, b] == 0]
        assert full.worst.broken_by[b] == hit
        broken_points += bool(hit)
    assert broken_points >= 1

    # efficient mode: same worst case, -1 for points it skipped, fewer f-evaluations
    assert torch.equal(eff.worst.correct, full.worst.correct)
    assert torch.allclose(eff.worst.x_adv, full.worst.x_adv)
    assert bool((eff.per_setting < 0).any()) and eff.setting_accuracy is None
    assert eff.min_over_means is None
    assert float(eff.worst.nfev.sum()) <= float(full.worst.nfev.sum())
    for b in range(n - 1):
        col = eff.per_setting[:, b]
        if eff.worst.correct[b]:
            assert bool((col == 1).all()) and eff.worst.broken_by[b] == []
        else:  # attacked until the first break, then skipped
            first = int((col == 0).nonzero()[0])
            assert bool((col[:first] == 1).all()) and bool((col[first + 1:] == -1).all())
            assert eff.worst.broken_by[b] == [eff.settings[first]]

    # the reference protocol (same starts and iterates, judged at the last iterate only) never
    # breaks a point the full grid misses, and costs more f-evaluations per example
    naive = grid_attack(deq, rep, x, y, eps, alpha, steps, settings=settings, mode="naive", seed=0)
    assert not bool(((naive.per_setting == 0) & (full.per_setting == 1)).any())
    assert float(naive.worst.nfev.sum()) > float(full.worst.nfev.sum())
    assert naive.worst.config["check"] == "last_iterate" and full.worst.config["check"] == "when_fooled"


# ---------------------------------------------------------------------------------------------
# 5./6. transfer and injected violations
# ---------------------------------------------------------------------------------------------

def test_transfer_matrix_diagonal_is_each_sources_own_outcome(deq, deq_data):
    x, y = deq_data
    targets = {"final": _judged(deq, mz.FinalState()), "early": _judged(deq, mz.EarlyState(4))}
    outs = {k: pgd_attack(j, x, y, EPS, EPS / 4, steps=4, seed=1) for k, j in targets.items()}
    sources = dict(outs)
    sources["final_callable"] = lambda xx, yy: pgd_attack(targets["final"], xx, yy, EPS,
                                                          EPS / 4, steps=4, seed=1)
    acc, per = transfer_matrix(sources, targets, x, y, EPS)
    for k, o in outs.items():
        assert torch.equal(per[k][k], o.correct)
        assert acc[k][k] == pytest.approx(o.accuracy)
    assert torch.equal(per["final_callable"]["final"], outs["final"].correct)
    # a target that misclassifies a clean point never counts it robust, even if it classifies the
    # source's adversarial example correctly (labels chosen so that this happens)
    j = targets["final"]
    moved = j.reported_logits(outs["final"].x_adv).argmax(-1) != j.reported_logits(x).argmax(-1)
    assert bool(moved.any())
    y2 = torch.where(moved, j.reported_logits(outs["final"].x_adv).argmax(-1), y)
    _, per2 = transfer_matrix({"src": outs["final"]}, {"final": j}, x, y2, EPS)
    assert not bool(per2["src"]["final"][moved].any())
    # off the diagonal: the target's reported forward on the source's examples, clean-gated
    for s, t in [("final", "early"), ("early", "final")]:
        j = targets[t]
        expect = ((j.reported_logits(outs[s].x_adv).argmax(-1) == y)
                  & (j.reported_logits(x).argmax(-1) == y))
        assert torch.equal(per[s][t], expect)
        assert acc[s][t] == pytest.approx(float(expect.double().mean()))


def test_injected_ball_and_range_violations_are_caught(deq, deq_data, linear, monkeypatch):
    import torchattacks

    x, y = deq_data
    jm = _judged(deq)
    o = pgd_attack(jm, x, y, EPS, EPS / 4, steps=2)
    bad = o.x_adv.clone()
    p = x[0, 0, 0, 0]
    bad[0, 0, 0, 0] = p + 2 * EPS if p < 0.5 else p - 2 * EPS  # outside the ball, inside [0, 1]
    with pytest.raises(ValueError, match=r"\[0\] leave the eps=0.02 ball"):
        transfer_matrix({"fake": dataclasses.replace(o, x_adv=bad)}, {"t": jm}, x, y, EPS)
    with pytest.raises(ValueError, match="ball"):
        rescore(jm, bad, x, y, EPS)

    x0 = x.clone()
    x0[1, 0, 2, 2] = 0.0
    below = x0.clone()
    below[1, 0, 2, 2] = -0.01  # inside the ball, outside [0, 1]
    with pytest.raises(ValueError, match=r"leave \[0, 1\]"):
        rescore(jm, below, x0, y, EPS)
    nan = x.clone()
    nan[2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rescore(jm, nan, x, y, EPS)

    # a library attack that returns examples outside the ball
    model, xl, yl, _ = linear
    lj = JudgedModule(model)

    def fake_runner(judged, eps, seed, budget, device):
        return lambda name, xb, yb: xb + 2 * eps
    monkeypatch.setattr(ev, "_autoattack_runner", fake_runner)
    with pytest.raises(ValueError, match="ball"):
        autoattack_attack(lj, xl, yl, 0.05, attacks=["apgd-ce"])

    class OutOfBall(torchattacks.attack.Attack):
        def __init__(self, model, eps):
            super().__init__("OutOfBall", model)
            self.eps = eps

        def forward(self, images, labels):
            return (images + 2 * self.eps).detach()
    monkeypatch.setattr(torchattacks, "OutOfBall", OutOfBall, raising=False)
    with pytest.raises(ValueError, match="ball"):
        torchattacks_attack(lj, xl, yl, 0.05, "OutOfBall")

    # our own PGD core going astray is caught by the re-scoring too (pgd and grid)
    def stray_core(judged, x, y, eps, *args, **kw):
        return (x + 2 * eps).clamp(0, 1), torch.zeros(len(x), dtype=torch.bool)
    monkeypatch.setattr(ev, "_pgd_core", stray_core)

    # the grid's stacked path (modes full and naive: settings x examples as one batch)
    def stray_stacked(model, base, i, preset, ka, lam, unit, x, y, eps, *args, **kw):
        return (x + 2 * eps).clamp(0, 1), torch.zeros(len(x), dtype=torch.bool)
    monkeypatch.setattr(ev, "_pgd_core_stacked", stray_stacked)
    with pytest.raises(ValueError, match="ball"):
        pgd_attack(jm, x, y, EPS, EPS / 4, steps=2)
    for mode in ("full", "efficient", "naive"):
        for stack in (True, False):
            with pytest.raises(ValueError, match="ball"):
                grid_attack(deq, mz.FinalState(), x, y, EPS, EPS / 4, 2,
                            settings=[UnrolledIntermediate(1, 1, 0.5)], mode=mode, stack=stack)


# ---------------------------------------------------------------------------------------------
# 7. bad configurations
# ---------------------------------------------------------------------------------------------

def test_bad_configurations_give_clear_errors(deq, deq_data, linear):
    x, y = deq_data
    deq.solver = deq.solver.with_options(max_iter=4)
    with pytest.raises(ValueError, match="i=5 exceeds the solver's N=4"):
        JudgedModule(deq, mz.FinalState(), UnrolledIntermediate(5, 1, 0.5))
    with pytest.raises(ValueError, match="i=6 exceeds the solver's N=4"):
        grid_attack(deq, mz.FinalState(), x, y, 0.01, 0.005, 2,
                    settings=[UnrolledIntermediate(1, 1, 0.5), UnrolledIntermediate(6, 1, 0.5)])
    JudgedModule(deq, mz.FinalState(), UnrolledIntermediate(4, 1, 0.5))  # i = N is fine
    with pytest.raises(ValueError, match="ka must be an integer >= 1"):
        UnrolledIntermediate(1, 0, 0.5)
    with pytest.raises(ValueError, match="ka must be an integer >= 1"):
        grid_settings(4, kas=[0])
    for lam in (0, 1.5, -0.5):
        with pytest.raises(ValueError, match=r"lam must be in \(0, 1\]"):
            UnrolledIntermediate(1, 1, lam)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        grid_attack(deq, mz.FinalState(), x, y, -0.01, 0.005, 2,
                    settings=[UnrolledIntermediate(1, 1, 0.5)])
    with pytest.raises(ValueError, match="alpha must be > 0"):
        grid_attack(deq, mz.FinalState(), x, y, 0.01, 0.0, 2,
                    settings=[UnrolledIntermediate(1, 1, 0.5)])
    with pytest.raises(ValueError, match="mode must be 'efficient', 'full' or 'naive'"):
        grid_attack(deq, mz.FinalState(), x, y, 0.01, 0.005, 2,
                    settings=[UnrolledIntermediate(1, 1, 0.5)], mode="bogus")
    with pytest.raises(ValueError, match="empty settings list"):
        grid_attack(deq, mz.FinalState(), x, y, 0.01, 0.005, 2, settings=[])

    model, xl, yl, _ = linear
    lj = JudgedModule(model)
    with pytest.raises(ValueError, match=r"unknown AutoAttack attack\(s\) \['apgd-xx'\]"):
        autoattack_attack(lj, xl, yl, 0.05, attacks=["apgd-ce", "apgd-xx"])
    with pytest.raises(ValueError, match="unknown AutoAttack budget key 'n_iter'"):
        autoattack_attack(lj, xl, yl, 0.05, attacks=["apgd-ce"], budget={"n_iter": 5})
    with pytest.raises(ValueError, match="must be a positive integer"):
        autoattack_attack(lj, xl, yl, 0.05, attacks=["apgd-ce"], budget={"apgd_n_iter": 0})
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        autoattack_attack(lj, xl, yl, -0.05, attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="unknown torchattacks attack 'NoSuchAttack'"):
        torchattacks_attack(lj, xl, yl, 0.05, name="NoSuchAttack")
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        torchattacks_attack(lj, xl, yl, -1.0, name="PGD")


# ---------------------------------------------------------------------------------------------
# 8. torchattacks
# ---------------------------------------------------------------------------------------------

def test_torchattacks_pgd_on_a_deq(deq, deq_data):
    x, y = deq_data
    jm = _judged(deq, mz.EarlyState(6))
    jm.train()  # torchattacks restores the mode it found; the wrapper must leave eval mode
    o = torchattacks_attack(jm, x, y, EPS, "PGD", alpha=EPS / 4, steps=5)
    assert jm.model.training is False and jm.training is False
    assert _in_bounds(o.x_adv, x, EPS)
    clean_ok = jm.reported_logits(x).argmax(-1) == y
    rep = jm.reported_logits(o.x_adv)
    assert torch.equal(o.correct, (rep.argmax(-1) == y) & clean_ok)
    assert torch.allclose(o.margin, reported_margin(rep, y))
    assert bool((o.nfev_grad[clean_ok] > 0).all())
    assert o.name == "torchattacks.PGD" and o.config["kwargs"] == {"alpha": EPS / 4, "steps": 5}
    assert all(b == ["torchattacks.PGD"] for b, c, ok in zip(o.broken_by, o.correct, clean_ok)
               if ok and not c)
    again = torchattacks_attack(jm, x, y, EPS, "PGD", alpha=EPS / 4, steps=5)
    assert torch.equal(o.x_adv, again.x_adv)  # seeded random start


# ---------------------------------------------------------------------------------------------
# 9. obfuscation indicators and surrogate agreement
# ---------------------------------------------------------------------------------------------

def test_obfuscation_flags():
    f = obfuscation_flags({"pgd": 0.40, "apgd": 0.35}, black_box={"square": 0.20})
    assert f["black_box_stronger"]["flag"] is True
    assert f["black_box_stronger"]["white_box"] == 0.35 and f["any"] is True

    f = obfuscation_flags({"pgd": 0.40}, iterations={100: 0.45, 10: 0.30, 50: 0.30})
    assert f["more_iterations_raise_accuracy"]["flag"] is True
    assert list(f["more_iterations_raise_accuracy"]["accuracy"]) == ["10", "50", "100"]
    assert f["any"] is True

    f = obfuscation_flags({"pgd": 0.40}, large_eps=0.3)
    assert f["large_eps_not_zero"] == {"flag": True, "accuracy": 0.3} and f["any"] is True

    f = obfuscation_flags({"pgd": 0.40}, clean_agreement=0.5)
    assert f["surrogate_disagrees_on_clean"]["flag"] is True and f["any"] is True

    clean = obfuscation_flags({"pgd": 0.40, "aa": 0.38}, black_box={"square": 0.45},
                              iterations={10: 0.40, 20: 0.39, 100: 0.385}, large_eps=0.0,
                              clean_agreement=1.0)
    assert set(clean) == {"black_box_stronger", "more_iterations_raise_accuracy",
                          "large_eps_not_zero", "surrogate_disagrees_on_clean", "any"}
    assert not any(v["flag"] for k, v in clean.items() if k != "any")
    assert clean["any"] is False
    assert obfuscation_flags({}) == {"any": False}


def test_surrogate_agreement(deq, linear):
    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    sur = UnrolledIntermediate(1, 1, 0.5)
    jm = JudgedModule(deq, mz.FinalState(), sur)
    a = surrogate_agreement(jm, x, batch_size=5)
    assert 0.0 <= a <= 1.0
    with torch.no_grad():
        expect = (jm.reported_logits(x).argmax(-1) == sur.logits(deq, x).argmax(-1))
    assert a == pytest.approx(float(expect.double().mean()))
    assert surrogate_agreement(JudgedModule(deq, mz.FinalState()), x) == 1.0
    model, xl, _, _ = linear
    assert surrogate_agreement(JudgedModule(model), xl) == 1.0


# ---------------------------------------------------------------------------------------------
# 10. per-example records
# ---------------------------------------------------------------------------------------------

def test_records_one_dict_per_example(deq, deq_data):
    x, y = deq_data
    o = pgd_attack(_judged(deq), x, y, EPS, EPS / 4, steps=3)
    assert isinstance(o, AttackOutcome)
    recs = o.records()
    assert len(recs) == len(x)
    keys = {"example", "attack", "correct", "margin", "broken_by", "nfev_nograd", "nfev_grad",
            "queries", "nonfinite"}
    for b, r in enumerate(recs):
        assert set(r) == keys
        assert r["nonfinite"] is False  # finite logits (model_zoo.scoring)
        assert r["example"] == b and r["attack"] == "pgd"
        assert r["correct"] is bool(o.correct[b])
        assert r["margin"] == pytest.approx(float(o.margin[b]))
        assert r["broken_by"] == o.broken_by[b]
        assert r["nfev_nograd"] == float(o.nfev_nograd[b])
        assert r["nfev_grad"] == float(o.nfev_grad[b])
        assert r["queries"] == float(o.queries[b])
    ids = [100 + 3 * b for b in range(len(x))]
    assert [r["example"] for r in o.records(ids)] == ids
    recs[0]["broken_by"].append("mutated")  # records are copies
    assert "mutated" not in o.broken_by[0]


# ---------------------------------------------------------------------------------------------
# regressions of bugs found while writing these tests
# ---------------------------------------------------------------------------------------------

def test_library_attack_queries_count_judged_module_calls(linear):
    model, x, y, _ = linear
    rows = []
    handle = model.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    try:
        jm = JudgedModule(model)
        rows.clear()
        o = pgd_attack(jm, x, y, 0.001, 0.0005, steps=3)
        assert float(o.queries.sum()) == sum(rows)  # PGD: holds
        rows.clear()
        o = autoattack_attack(jm, x, y, 0.001, attacks=["apgd-ce"], budget={"apgd_n_iter": 10})
        assert float(o.queries.sum()) == sum(rows)  # AutoAttack: 4 per example vs ~15
    finally:
        handle.remove()


def test_pgd_on_an_empty_batch(linear):
    model, x, y, _ = linear
    o = pgd_attack(JudgedModule(model), x[:0], y[:0], 0.1, 0.01)
    assert len(o.correct) == 0 and o.records() == []


# ---------------------------------------------------------------------------------------------
# 8. the shipped zoo: standard training is broken, PGD-AT is not
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_shipped_standard_deq_is_broken_and_shipped_pgdat_deq_is_not():
    from attacks.surrogates import PhantomFinal
    from benchmark.data import load_dataset, subset
    ds = subset(load_dataset("fashion_mnist", "test"), 32, seed=0)
    x, y = ds.images, ds.labels
    eps = 0.1  # the zoo's threat model
    accs = {}
    for name in ("deq_tiny_fmnist_standard", "deq_tiny_fmnist_pgdat_sec33"):
        jm = JudgedModule(mz.load(name), mz.FinalState(), PhantomFinal())
        clean = float((jm.reported_logits(x).argmax(-1) == y).double().mean())
        pgd = pgd_attack(jm, x, y, eps, eps / 4, steps=10, seed=0)
        aa = autoattack_attack(jm, x, y, eps, attacks=["apgd-ce"], budget={"apgd_n_iter": 10})
        assert _in_bounds(pgd.x_adv, x, eps) and _in_bounds(aa.x_adv, x, eps)
        accs[name] = (clean, pgd.accuracy, aa.accuracy)
    clean, pgd, apgd = accs["deq_tiny_fmnist_standard"]
    assert clean >= 0.8 and pgd <= 0.05 and apgd <= 0.05, accs
    clean, pgd, apgd = accs["deq_tiny_fmnist_pgdat_sec33"]
    assert clean >= 0.65 and pgd >= 0.35 and apgd >= 0.35, accs
