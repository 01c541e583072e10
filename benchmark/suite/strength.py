"""``strength``: the binarization attack-strength test (Zimmermann et al., NeurIPS 2022;
:mod:`attacks.binarization`) of the protocol's PGD on every entry.

Per entry, ``n`` points (default 20, spread over the shards in proportion to their size; the
points the tested attack reported robust first -- the ones whose robustness the test is about --
then the other clean-correct ones, then the rest): for each, the binary problem with a guaranteed
adversarial example inside the eps-ball is built on the entry's reported forward, and the SAME
attack runs on it -- ``attack: pgd`` is the ``pgd`` protocol attack with its steps, step size,
random start and, for DEQs, its ``surrogate`` (each defaults to ``attacks.pgd``'s value, so the
test checks exactly the gradient source the protocol used). The entry records the pass rate
with n and its exact 95% Clopper-Pearson interval, and the flag ``pass_rate < threshold``
(default :data:`attacks.binarization.DEFAULT_THRESHOLD` = 0.9, see there why).

Records (attack 'strength'): setting 'binarization', ``correct`` = 1 if the binarized model
still held (the attack did NOT find the adversarial example), 0 if it passed; ``margin`` = the
binary margin at the attack's output; ``extra``: passed, robust_under_attack (the tested
attack's own record on the original model: True/False/None), boundary_margin, random_asr,
score_gap, threshold. Setup failures (no separating readout / guarantee not verified on the
binarized model): setting 'binarization_setup_failed', not counted. None of these records is an
eps-attack on the entry: they never count in ALL.

Cost per point: (n_inner + n_boundary + n_validation) reported forwards + one attack; the
paper's n_inner = 999 costs ~7 s per point for deq_tiny on one CPU thread (the demo measures
what fits, see the README).
"""
from __future__ import annotations

import json
import math

import torch

from attacks.binarization import (DEFAULT_THRESHOLD, BinarizationSettings, binarization_test,
                                  strength_summary)
from attacks.evaluation import autoattack_attack, derive_seed, pgd_attack, setting_name
from attacks.surrogates import JudgedModule
from benchmark.suite._common import plain, surrogate_for
from benchmark.suite._registry import ProtocolAttack, check_int, config_error, register_attack

__all__ = ["Strength", "strength_flag"]

ATTACKS = ("pgd", "apgd-ce")


def _pgd_opt(name, default):
    return lambda ctx: (ctx.cfg.attacks.get("pgd") or {}).get(name, default)


def _selected(ctx, k: int) -> list:
    """Row positions of the k points to test: robust under the tested attack first."""
    att = "autoattack" if ctx.opt("attack") == "apgd-ce" else "pgd"
    rows = ctx.db.conn.execute(
        f"SELECT example, attack, correct FROM records WHERE model = ? AND defense = ? AND "
        f"attack IN ('clean', ?) AND example IN ({','.join('?' * len(ctx.idx))})",
        (ctx.mkey, ctx.dkey, att, *ctx.idx)).fetchall()
    clean = {e: c for e, a, c in rows if a == "clean"}
    robust = {}
    for e, a, c in rows:
        if a == att:
            robust[e] = min(robust.get(e, 1), c)
    order = sorted(range(len(ctx.idx)), key=lambda r: (
        0 if robust.get(ctx.idx[r]) == 1 else 1 if clean.get(ctx.idx[r], 1) else 2, r))
    return order[:k], robust


@register_attack("strength")
class Strength(ProtocolAttack):
    options = {"n": 20, "threshold": DEFAULT_THRESHOLD, "attack": "pgd",
               "steps": _pgd_opt("steps", 10), "alpha": _pgd_opt("alpha", None),
               "random_start": _pgd_opt("random_start", True),
               "surrogate": _pgd_opt("surrogate", "phantom_final"),
               "budget": lambda ctx: (ctx.cfg.attacks.get("autoattack") or {}).get("budget"),
               "n_inner": 999, "n_boundary": 1, "gap": 0.05,
               "boundary": "surface", "threshold_at": 0.5, "n_validation": 0,
               "on_test_time_defenses": True}
    order = 80  # after every attack whose records it reads (pgd, autoattack)
    reads = ("grid", "pgd", "autoattack")  # its surrogate, the points robust under its attack

    def check(self, opts, cfg, attacks):
        p = "attacks.strength."
        if "n" in opts:
            check_int(opts, "n", 20, p)  # the floor: >= 20 points per entry
        for k in ("n_inner", "n_boundary"):
            if k in opts:
                check_int(opts, k, 1, p)
        if "n_validation" in opts:
            check_int(opts, "n_validation", 0, p)
        for k, lo_open, hi_open in (("threshold", False, False), ("gap", False, True),
                                    ("threshold_at", True, True)):
            if k in opts:
                v = opts[k]
                ok = (not isinstance(v, bool) and isinstance(v, (int, float))
                      and (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1))
                if not ok:
                    rng = f"{'(' if lo_open else '['}0, 1{')' if hi_open else ']'}"
                    config_error(f"{p}{k}", f"must be a number in {rng}, got {v!r}")
        if opts.get("boundary", "surface") not in ("surface", "corners"):
            config_error(f"{p}boundary", f"must be 'surface' or 'corners', got {opts['boundary']!r}")
        if opts.get("attack", "pgd") not in ATTACKS:
            config_error(f"{p}attack", f"must be one of {list(ATTACKS)}, got {opts['attack']!r}")
        if opts.get("surrogate") == "strongest" and "grid" not in attacks:
            config_error(f"{p}surrogate", "'strongest' needs the grid attack in the config")
        if opts.get("budget") is not None:
            from benchmark.suite.autoattack import check_autoattack_options
            check_autoattack_options("strength", {"budget": opts["budget"]})

    def applicable(self, model, defense, opts):
        return plain(defense) or opts.get("on_test_time_defenses", True)

    def run(self, ctx):
        eps, seed = ctx.eps, ctx.seed
        n_total = max(int(ctx.cfg.data.get("n", len(ctx.idx))), len(ctx.idx))
        k = min(len(ctx.idx), math.ceil(ctx.opt("n") * len(ctx.idx) / n_total))
        rows, robust = _selected(ctx, k)
        st = BinarizationSettings(n_inner=ctx.opt("n_inner"), n_boundary=ctx.opt("n_boundary"),
                                  gap=ctx.opt("gap"), boundary=ctx.opt("boundary"),
                                  threshold_at=ctx.opt("threshold_at"),
                                  n_validation=ctx.opt("n_validation"))
        sur = surrogate_for(ctx.db, ctx.model, ctx.mkey, ctx.dkey, ctx.idx, ctx.opt("surrogate"))
        which = ctx.opt("attack")
        alpha = ctx.opt("alpha") or eps / 4
        steps, rs = ctx.opt("steps"), ctx.opt("random_start")
        bs = ctx.cfg.batch_size

        calls = [0]

        def attack(x1, y1):
            # a fresh JudgedModule per call: it sees the binarized model (readout swapped)
            judged = JudgedModule(ctx.model, ctx.defense, sur)
            calls[0] += 1
            s = derive_seed(seed, "strength", calls[0])
            if which == "pgd":
                return pgd_attack(judged, x1, y1, eps, alpha, steps, random_start=rs, seed=s,
                                  batch_size=bs).x_adv
            return autoattack_attack(judged, x1, y1, eps, attacks=["apgd-ce"],
                                     budget=ctx.opt("budget"), seed=s, batch_size=bs).x_adv

        results = binarization_test(ctx.model, ctx.x[rows], eps, attack, reported=ctx.defense,
                                    settings=st, seed=seed, batch_size=bs)
        threshold = float(ctx.opt("threshold"))
        recs = []
        for r, res in zip(rows, results):
            e = ctx.idx[r]
            rob = robust.get(e)
            extra = {"setup": res.setup, "robust_under_attack": None if rob is None else bool(rob),
                     "threshold": threshold, "n_features": res.n_features,
                     "score_gap": res.extra.get("score_gap")}
            if res.setup != "ok":
                recs.append({"setting": "binarization_setup_failed", "example": e,
                             "label": int(ctx.y[r]), "correct": 1, "state": ctx.state,
                             "extra": extra})
                continue
            extra.update(passed=res.passed, boundary_margin=res.boundary_margin,
                         random_asr=res.random_asr)
            recs.append({"setting": "binarization", "example": e, "label": int(ctx.y[r]),
                         "correct": int(not res.passed), "margin": res.margin,
                         "state": ctx.state, "extra": extra})
        conf = {"attack": "strength", "tested": which, "eps": eps, "seed": seed,
                "threshold": threshold, "points": len(rows), **st.config(),
                "surrogate_name": setting_name(sur) if sur is not None else "model",
                **JudgedModule(ctx.model, ctx.defense, sur).config()}
        if which == "pgd":
            conf.update(steps=steps, alpha=alpha, random_start=rs)
        else:
            conf.update(budget=ctx.opt("budget"))
        return recs, conf

    def summary(self, g, clean):
        """Not an eps-attack on the entry (None: nothing counts in ALL); fields strength (pass
        rate), strength_n, strength_ci_low/high, strength_flag, strength_setup_failures."""
        f = strength_flag(g)
        if f is None:
            return None, {}
        return None, {"strength": f["pass_rate"], "strength_n": f["n"],
                      "strength_ci_low": f["ci95"][0], "strength_ci_high": f["ci95"][1],
                      "strength_flag": f["flag"], "strength_setup_failures": f["setup_failures"]}


def strength_flag(g):
    """The ``attack_strength`` flag of one entry's records ``g`` (None without strength
    records): {flag, pass_rate, n, passes, ci95 [lo, hi], threshold, setup_failures}."""
    a = g[g.attack == "strength"]
    if a.empty:
        return None
    ok = a[a.setting == "binarization"]
    passed = [not bool(c) for c in ok.correct] + [None] * int((a.setting != "binarization").sum())
    thr = DEFAULT_THRESHOLD
    for x in a.extra:
        ex = json.loads(x) if isinstance(x, str) else x
        if isinstance(ex, dict) and "threshold" in ex:
            thr = float(ex["threshold"])
            break
    s = strength_summary(passed, thr)
    return {"flag": s["flag"], "pass_rate": s["pass_rate"], "n": s["n"], "passes": s["passes"],
            "ci95": [s["ci_low"], s["ci_high"]], "threshold": thr,
            "setup_failures": s["setup_failures"]}
