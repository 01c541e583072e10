"""The adaptive protocol for the Sec. 3.2 test-time defense (attacks/adaptive.py): the
differentiable replay of EntropyReduction (exact forward values, straight-through sign, memory
with and without checkpointing), and every variant of the protocol lowering accuracy on a case
built so that the weaker, non-adaptive attacks fail, judged on the defended forward."""
import dataclasses

import pytest
import torch

import model_zoo as mz
from attacks.adaptive import (ADAPTIVE_STANDARD_BUDGET, ADAPTIVE_VARIANTS, DefenseJudged,
                              ThroughDefense, _ste_sign, adaptive_protocol, cheaper_defense,
                              saved_tensor_bytes)
from attacks.evaluation import pgd_attack, rescore
from attacks.surrogates import JudgedModule, PhantomFinal

from .conftest import calibrate_batchnorm


def _tiny_deq():
    """MDEQ on 1x8x8 (channels (4, 4)), BatchNorm calibrated, Broyden N=8, float32."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(mz.MDEQ_CONFIGS["deq_tiny"], channels=(4, 4), head_channels=(2, 2),
                              final_channels=8, num_groups=2, expansion=1, dropout=0.0)
    m = mz.MDEQClassifier(cfg, 1, (8, 8))
    return calibrate_batchnorm(m, torch.rand(32, 1, 8, 8))


@pytest.fixture(scope="module")
def deq():
    return _tiny_deq()


def _x(n=4, seed=1):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _grad(src, model, x):
    xv = x.clone().requires_grad_(True)
    out = src.logits(model, xv)
    (g,) = torch.autograd.grad(out.logsumexp(1).sum() - out[:, 0].sum(), xv)
    return out.detach(), g


# ---------------------------------------------------------------------------------------------
# the differentiable replay
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["reference", "paper"])
@pytest.mark.parametrize("readout", [None, mz.EarlyState(5)], ids=["final", "early5"])
def test_replay_equals_the_defended_forward_and_has_a_gradient(deq, preset, readout):
    d = mz.EntropyReduction(beta=0.01, r=3, tf=2, eps=0.05, preset=preset, readout=readout)
    x = _x()
    src = ThroughDefense(d, ka=2)
    out, g = _grad(src, deq, x)
    with torch.no_grad():
        rep = deq.run(x, defense=d).logits
    assert torch.equal(out, rep)                 # exactly the defended logits
    assert src.last_replay_error < 1e-5          # the replayed purified inputs are the real ones
    assert torch.isfinite(g).all() and float(g.abs().max()) > 0
    # the gradient goes through the purification: treating the inner steps as constants
    # (no second-order term, sign step frozen) gives a different gradient
    if preset == "reference":
        assert "straight-through" in src.config()["sign"]
        _, g_const = _grad(ThroughDefense(d, ka=2, sign="constant"), deq, x)
        assert not torch.allclose(g, g_const)
    # DefenseJudged returns the same values with one defended forward per call
    judged = DefenseJudged(deq, d, src)
    xv = x.clone().requires_grad_(True)
    assert torch.equal(judged(xv).detach(), rep)


def test_ste_sign_is_sign_forward_and_rescaled_identity_backward():
    g = torch.tensor([[0.5, -0.25, 0.25, -1.0]], requires_grad=True)
    s = _ste_sign(g)
    assert torch.equal(s.detach(), g.detach().sign())
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    (dg,) = torch.autograd.grad((s * w).sum(), g)
    assert torch.allclose(dg, w / 0.5)           # mean |g| = 0.5, held fixed


@pytest.mark.parametrize("preset", ["reference", "paper"])
def test_checkpointing_keeps_the_gradient_and_cuts_the_memory(deq, preset):
    """The memory claim of the module docstring: what autograd keeps grows with the number of
    inner updates (linearly: the same bytes per extra update from R = 1 to 3 as from 3 to 6),
    and torch.utils.checkpoint keeps the gradient and less than half the bytes."""
    x = _x()

    def run(r, ck):
        src = ThroughDefense(mz.EntropyReduction(beta=0.01, r=r, tf=2, eps=0.05, preset=preset),
                             ka=2, checkpoint=ck)
        xv = x.clone().requires_grad_(True)
        out, nbytes = saved_tensor_bytes(src.logits, deq, xv)
        (g,) = torch.autograd.grad(out.logsumexp(1).sum(), xv)
        return g, nbytes

    _, b1 = run(1, False)
    _, b3 = run(3, False)
    g6, b6 = run(6, False)
    g6c, b6c = run(6, True)
    assert b1 < b3 < b6
    assert 0.7 < ((b3 - b1) / 2) / ((b6 - b3) / 3) < 1.3      # linear in R
    assert torch.allclose(g6, g6c, atol=1e-6, rtol=1e-5)
    assert b6c < 0.5 * b6


def test_cheaper_defense_and_bad_arguments(deq):
    d = mz.EntropyReduction(r=10, tf=2)
    c = cheaper_defense(d)
    assert (c.r, c.tf, d.r) == (2, 2, 10)
    assert cheaper_defense(d, r=1, tf=4).tf == 4
    with pytest.raises(ValueError, match="EntropyReduction"):
        ThroughDefense(mz.FinalState())
    with pytest.raises(ValueError, match="ka must be"):
        ThroughDefense(d, ka=0)
    x, y = _x(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="unknown adaptive variant"):
        adaptive_protocol(deq, d, x, y, 0.02, variants=["bpda"])
    with pytest.raises(ValueError, match="unknown adaptive budget key 'iters'"):
        adaptive_protocol(deq, d, x, y, 0.02, budget={"iters": 3})
    with pytest.raises(ValueError, match="EntropyReduction"):
        adaptive_protocol(deq, mz.FinalState(), x, y, 0.02)


# ---------------------------------------------------------------------------------------------
# the protocol on a case built so that the non-adaptive attacks fail
# ---------------------------------------------------------------------------------------------

EPS = 0.02
# A purification that undoes sign-gradient steps: its ball (0.1) is five times the attack's
# (0.02) and R * beta = 0.2 covers it, so the entropy-reducing sign steps walk an undefended
# perturbation back: the old protocol's transfer (PGD-10 on the undefended model, stopped when
# the UNDEFENDED forward is fooled) leaves 5 of the 8 points robust.
DEFENSE = dict(beta=0.04, r=5, tf=4, eps=0.1, preset="reference")
BUDGET = {"pgd_steps": 10, "apgd_n_iter": 5, "apgd_t_n_target_classes": 1,
          "square_n_queries": 30}


@pytest.fixture(scope="module")
def case(deq):
    d = mz.EntropyReduction(**DEFENSE)
    x = _x(8)
    with torch.no_grad():
        y = deq.run(x, defense=d).logits.argmax(-1)     # every point clean-correct
    out = adaptive_protocol(deq, d, x, y, EPS, budget=BUDGET, ka=2, seed=0)
    # the weaker attack: the old protocol's transfer (PGD-10 on the undefended model,
    # early-stopped on the UNDEFENDED forward), judged on the defended one
    und = pgd_attack(JudgedModule(deq, mz.FinalState(), PhantomFinal()), x, y, EPS, EPS / 4,
                     10, seed=0)
    old_transfer, _ = rescore(JudgedModule(deq, d), und.x_adv, x, y, EPS)
    return deq, d, x, y, out, {"old_transfer": float(old_transfer.double().mean())}


@pytest.mark.slow
def test_every_member_is_judged_on_the_defended_forward_inside_the_ball(case):
    model, d, x, y, out, _ = case
    members = {m.name: m for m in out.extra["members"]}
    assert set(members) == {"transfer:pgd@phantom_final", "transfer:apgd-ce", "transfer:apgd-t",
                            "through:apgd-ce", "through:apgd-t", "objectives:apgd-dlr",
                            "objectives:apgd-t-ce", "cheap:apgd-ce", "cheap:apgd-t", "square"}
    for m in list(members.values()) + [out]:
        dist = (m.x_adv - x).abs().flatten(1).max(1).values
        assert float(dist.max()) <= EPS + 1e-6
        assert float(m.x_adv.min()) >= 0 and float(m.x_adv.max()) <= 1
        with torch.no_grad():
            pred = model.run(m.x_adv, defense=d).logits.argmax(-1)
        assert torch.equal(m.correct, pred == y), m.name      # the defended forward's verdict
    # the worst case is the per-example AND of the members
    both = torch.stack([m.correct for m in members.values()]).all(0)
    assert torch.equal(out.correct, both)
    assert out.config["budget"] == "reduced" and not out.config["reliable"]
    assert out.config["complete"] and out.config["variants"] == list(ADAPTIVE_VARIANTS)
    assert {v["budget"] for v in out.config["members"].values()} == {"standard", "reduced"}
    assert out.config["members"]["transfer:pgd@phantom_final"]["budget"] == "standard"
    assert "straight-through" in out.config["through"]["sign"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["transfer", "through", "cheap", "objectives", "square"])
def test_each_variant_lowers_accuracy_where_the_weaker_attack_fails(case, variant):
    _, _, _, _, out, weak = case
    assert weak["old_transfer"] >= 0.5                 # the weaker attack fails on this case
    acc = {m.name: m.accuracy for m in out.extra["members"]}
    best = min(v for k, v in acc.items() if k.split(":")[0] == variant)
    assert best <= weak["old_transfer"] - 0.25, acc    # clean accuracy is 1.0
    assert out.accuracy <= best


def test_standard_budget_is_labelled_standard(deq):
    d = mz.EntropyReduction(beta=0.02, r=1, tf=4, eps=0.05)
    x = _x(2)
    with torch.no_grad():
        y = deq.run(x, defense=d).logits.argmax(-1)
    out = adaptive_protocol(deq, d, x, y, EPS, variants=["transfer"],
                            budget={"apgd_n_iter": 2, "apgd_t_n_target_classes": 1})
    assert out.config["budget"] == "reduced" and not out.config["complete"]
    assert out.config["members"]["transfer:pgd@phantom_final"]["budget"] == "standard"
    assert out.config["members"]["transfer:apgd-ce"]["budget"] == "reduced"
    assert ADAPTIVE_STANDARD_BUDGET["apgd_n_iter"] == 100


# ---------------------------------------------------------------------------------------------
# the run config and the leaderboard
# ---------------------------------------------------------------------------------------------

def _cfg(adaptive):
    return {"name": "t", "output": "/tmp/unused", "seed": 0, "device": "cpu",
            "data": {"dataset": "fashion_mnist", "n": 4},
            "threat": {"norm": "Linf", "eps": 0.1},
            "models": [{"name": "deq_tiny_fmnist_trades",
                        "defenses": ["final", "entropy_reduction"]}],
            "attacks": {"adaptive": adaptive}}


@pytest.mark.parametrize("opts, message", [
    ({"budget": {"apgd_iters": 5}}, r"attacks\.adaptive\.budget\.apgd_iters: unknown budget key"),
    ({"budget": {"apgd_n_iter": 0}}, r"attacks\.adaptive\.budget\.apgd_n_iter: must be an integer >= 1"),
    ({"variants": ["through", "bpda"]}, r"attacks\.adaptive\.variants: must be a non-empty list"),
    ({"cheap": {"r": 2, "beta": 1}}, r"attacks\.adaptive\.cheap: must be a mapping with keys r"),
    ({"ensemble": "yes"}, r"attacks\.adaptive\.ensemble: must be true or false"),
])
def test_adaptive_config_errors_name_the_key(opts, message):
    from benchmark.run_config import ConfigError, from_dict
    with pytest.raises(ConfigError, match=message):
        from_dict(_cfg(opts))
    cfg = from_dict(_cfg({"steps": 10, "budget": {"apgd_n_iter": 5}, "variants": ["transfer"],
                          "cheap": {"r": 1}, "ensemble": True, "checkpoint": True}))
    assert cfg.attacks["adaptive"]["variants"] == ["transfer"]


def test_test_time_defense_entries_have_their_own_section_and_external(tmp_path):
    from benchmark import leaderboard as lb
    ttd = {"protocol": "croce2022", "variants_run": ["transfer", "square"],
           "variants_missing": ["through", "cheap", "objectives"],
           "members": {"transfer:apgd-ce": "reduced", "square": "standard"},
           "budget": "reduced", "complete": False, "reliable": False}
    common = dict(dataset="fashion_mnist", threat="Linf", eps=0.1, architecture="deq_tiny",
                  number_forward_passes=1)
    plain = lb.make_entry("m", clean_acc=0.7, autoattack_acc=0.45, worst_case_acc=0.45,
                          deq={"defense": "final", "n_examples": 20,
                               "flags": {"black_box_stronger": {"flag": False},
                                         "nonfinite": {"flag": False}}}, **common)
    defended = lb.make_entry("m+entropy_reduction", clean_acc=0.7, autoattack_acc=0.5,
                             worst_case_acc=0.5, unreliable=True,
                             deq={"defense": "entropy_reduction", "n_examples": 20,
                                  "test_time_defense": ttd,
                                  "flags": {"nonfinite": {"flag": False}}}, **common)
    assert "external" not in plain                       # ALL == AutoAttack: no external
    assert defended["external"] == "50.00" and defended["unreliable"] is True
    rows = lb.table_rows([defended, plain])
    assert [(r["model"], r["section"], r["rank"]) for r in rows] == [
        ("m", "main", 1), ("m+entropy_reduction", "test-time defense", 1)]
    assert rows[0]["flags"] == "-"                       # checked, nothing raised
    assert rows[1]["flags"] == "not checked"             # only the non-obfuscation flags
    assert rows[1]["adaptive"].startswith("partial (missing: through, cheap, objectives), reduced")
    for e in (plain, defended):
        lb.write_entry(e, tmp_path)
    paths = lb.render(tmp_path / "fashion_mnist-Linf")
    md = paths["md"].read_text()
    main, _, ttd_part = md.partition("## Test-time defenses (adaptive evaluation)")
    assert "| m+entropy_reduction |" not in main and "| m+entropy_reduction |" in ttd_part
    html = paths["html"].read_text()
    assert 'id="leaderboard-ttd"' in html
    assert html.index('data-name="m+entropy_reduction"') > html.index('id="leaderboard-ttd"')


def test_cli_attack_adaptive_needs_the_test_time_defense(tmp_path):
    """`deqbench attack --attack adaptive` runs the adaptive protocol (attacks.adaptive), which
    evaluates the Sec. 3.2 defense: on a plain forward it is a one-line error, nothing written."""
    import subprocess
    import sys
    from pathlib import Path
    out = tmp_path / "a.json"
    r = subprocess.run([sys.executable, "-m", "benchmark.cli", "attack", "--model",
                        "deq_tiny_fmnist_trades", "--attack", "adaptive", "--n", "2", "--output",
                        str(out)], cwd=Path(__file__).resolve().parent.parent,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--attack adaptive is the adaptive protocol for the Sec. 3.2 test-time defense" in r.stderr
    assert not out.exists()
