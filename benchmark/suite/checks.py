"""``checks``: the per-example records behind the gradient-obfuscation indicators (Athalye et
al. 2018; Carlini et al. 2019; :func:`attacks.evaluation.obfuscation_flags`): PGD-k and PGD-2k
(more iterations must not help the defense), Square (black box must not beat white box), PGD-2k
at a large eps (accuracy should reach ~0) and, for DEQs, whether the surrogate agrees with the
reported forward on the clean input. Settings 'pgd{k}', 'pgd{2k}', 'square{q}' count in ALL;
'large_eps{e}' and 'clean_agreement' do not (:data:`CHECKS_NOT_ATTACKS`)."""
from __future__ import annotations

import json
from typing import Optional

import torch

from attacks.evaluation import autoattack_attack, obfuscation_flags, pgd_attack, pgd_attack_steps
from attacks.surrogates import JudgedModule
from benchmark.suite._common import outcome_records, plain, surrogate_for
from benchmark.suite._registry import ProtocolAttack, config_error, register_attack
from model_zoo.scoring import predict

CHECKS_NOT_ATTACKS = ("large_eps", "clean_agreement")  # check records that are not eps-attacks


def flags_from_records(g) -> Optional[dict]:
    """The obfuscation flags of one (model, defense) from its 'checks' records (None without)."""
    c = g[g.attack == "checks"]
    if c.empty:
        return None
    acc = c.groupby("setting").correct.mean()
    clean = g[g.attack == "clean"].set_index("example").correct
    def robust(setting):  # robust accuracy over all examples (clean-wrong points count 0)
        s = c[c.setting == setting].set_index("example").correct
        return float((s.reindex(clean.index).fillna(0) * clean).mean())
    pgd = sorted((int(s[3:]), s) for s in acc.index if s.startswith("pgd"))
    white = {s: robust(s) for _, s in pgd}
    black = {s: robust(s) for s in acc.index if s.startswith("square")}
    large = [s for s in acc.index if s.startswith("large_eps")]
    return obfuscation_flags(white, black or None, {k: robust(s) for k, s in pgd},
                             large_eps=robust(large[0]) if large else None,
                             clean_agreement=float(acc["clean_agreement"])
                             if "clean_agreement" in acc.index else None)


def ensemble_square(db, mkey, dkey, idx, eps, q) -> dict:
    """{example: (correct, margin)}: the Square results the AutoAttack ensemble of this (model,
    defense) already has for these examples, where its Square had the same budget (``q``
    queries, ``eps``): the points still robust after its gradient attacks, judged on the
    reported forward at Square's output (``extra.members`` of its records)."""
    rows = db.conn.execute(
        "SELECT r.example, r.extra, u.config FROM records r JOIN units u ON r.unit_id = u.unit_id "
        "WHERE r.model = ? AND r.defense = ? AND r.attack = 'autoattack' AND r.setting = "
        f"'ensemble' AND r.example IN ({','.join('?' * len(idx))})", (mkey, dkey, *idx))
    found, configs = {}, {}
    for ex, extra, config in rows:
        cfg = configs.setdefault(config, json.loads(config or "{}"))
        cfg = cfg.get("attack") if isinstance(cfg.get("attack"), dict) else cfg  # the runner's wrapper
        knobs = cfg.get("budget_knobs") or {}
        if (knobs.get("square_n_queries") != q or cfg.get("eps") != eps
                or cfg.get("norm") != "Linf" or not cfg.get("ensemble", False)):
            continue
        sq = (json.loads(extra or "{}").get("members") or {}).get("square")
        if sq is not None:
            found[int(ex)] = (bool(sq[0]), float(sq[1]))
    return found


def square_records(judged, x, y, idx, eps, q, seed, bs, state, shared: dict):
    """Records of Square-``q`` on every point: the ensemble's own Square result where it ran
    (``shared``, from :func:`ensemble_square`; no f-evaluations charged here, AutoAttack paid
    them), a Square run of this unit's seed on the others (the points AutoAttack's gradient
    attacks broke first, and the clean-misclassified ones)."""
    name = f"square{q}"
    own = [k for k, e in enumerate(idx) if int(e) not in shared]
    recs = []
    if own:
        sel = torch.tensor(own, dtype=torch.long, device=x.device)
        out = autoattack_attack(judged, x[sel], y[sel], eps, attacks=["square"],
                                budget={"square_n_queries": q}, seed=seed, batch_size=bs)
        recs = outcome_records(out, [idx[k] for k in own], y[sel], name, state)
    for k, e in enumerate(idx):
        if int(e) in shared:
            c, m = shared[int(e)]
            recs.append({"setting": name, "example": e, "label": int(y[k]), "correct": int(c),
                         "margin": m, "state": state, "nfev_nograd": 0.0, "nfev_grad": 0.0,
                         "entropies": None, "residuals": None,
                         "extra": {"broken_by": [] if c else ["square"],
                                   "from": "autoattack"}})
    order = {int(e): k for k, e in enumerate(idx)}
    return sorted(recs, key=lambda r: order[int(r["example"])])


@register_attack("checks")
class Checks(ProtocolAttack):
    """``share_square`` (default true): where the run's AutoAttack ensemble ran Square with the
    same budget on a point (the points its gradient attacks left robust), that result is the
    point's Square record here, and Square runs only on the other points: one Square-q per
    point instead of two, and the Square column still covers every point (its records say
    ``extra.from = 'autoattack'``). false: Square on every point with this unit's seed."""
    options = {"steps": 10, "alpha": lambda ctx: ctx.eps / 4, "square_queries": 1000,
               "large_eps": lambda ctx: min(1.0, 5 * ctx.eps), "surrogate": "strongest",
               "on_test_time_defenses": True, "share_square": True}
    order = 60
    reads = ("grid", "autoattack")  # surrogate 'strongest'; the ensemble's Square results

    def check(self, opts, cfg, attacks):
        if "share_square" in opts and not isinstance(opts["share_square"], bool):
            config_error("attacks.checks.share_square",
                         f"must be true or false, got {opts['share_square']!r}")

    def applicable(self, model, defense, opts):
        return plain(defense) or opts.get("on_test_time_defenses", True)

    def run(self, ctx):
        eps, x, y, idx, seed = ctx.eps, ctx.x, ctx.y, ctx.idx, ctx.seed
        steps, alpha = ctx.opt("steps"), ctx.opt("alpha")
        q, big = ctx.opt("square_queries"), ctx.opt("large_eps")
        sur = surrogate_for(ctx.db, ctx.model, ctx.mkey, ctx.dkey, idx, ctx.opt("surrogate"))
        judged = JudgedModule(ctx.model, ctx.defense, sur)
        if not plain(ctx.defense) and ctx.opt("surrogate") == "strongest":
            # a test-time defense's white-box gradient is the one through the defense
            # (attacks.adaptive.ThroughDefense, the adaptive protocol's), not the undefended
            # phantom gradient: the checks then probe the attack that sets its worst case
            from attacks.adaptive import DefenseJudged, ThroughDefense
            from benchmark.suite.adaptive import transfer_surrogate
            base = transfer_surrogate(ctx)
            sur = ThroughDefense(ctx.defense, ka=getattr(base, "ka", 3),
                                 lam=getattr(base, "lam", 0.5))
            judged = DefenseJudged(ctx.model, ctx.defense, sur)
        bs = ctx.cfg.batch_size
        # PGD-k and PGD-2k share seed and start: one 2k-step run gives both (pgd_attack_steps)
        pgd = pgd_attack_steps(judged, x, y, eps, alpha, (steps, 2 * steps), seed=seed,
                               batch_size=bs)
        outs = {
            f"pgd{steps}": pgd[steps],
            f"pgd{2 * steps}": pgd[2 * steps],
            f"large_eps{big:g}": pgd_attack(judged, x, y, big, big / 4, 2 * steps, seed=seed,
                                            batch_size=bs, name="pgd_large_eps"),
        }
        recs = []
        for name, out in outs.items():
            recs += outcome_records(out, idx, y, name, ctx.state)
        shared = ensemble_square(ctx.db, ctx.mkey, ctx.dkey, idx, eps, q) \
            if ctx.opt("share_square") else {}
        recs += square_records(judged, x, y, idx, eps, q, seed, bs, ctx.state, shared)
        if sur is not None:
            with torch.no_grad():
                r = predict(judged.reported_logits(x))  # -1 where non-finite
                agree = (r == predict(sur.logits(ctx.model, x))) & (r >= 0)
        else:
            agree = torch.ones(len(x), dtype=torch.bool)
        for k in range(len(idx)):
            recs.append({"setting": "clean_agreement", "example": idx[k], "label": int(y[k]),
                         "correct": int(agree[k]), "state": ctx.state})
        return recs, {"attack": "checks", "steps": steps, "alpha": alpha, "square_queries": q,
                      "square_from_autoattack": len(shared),
                      "large_eps": big, "eps": eps, "seed": seed, **judged.config()}

    def summary(self, g, clean):
        """PGD-k, PGD-2k and Square of the checks are attacks too (they count in ALL); the
        row's 'flags' names the raised obfuscation indicators ('none')."""
        ch = g[(g.attack == "checks") & ~g.setting.str.startswith(CHECKS_NOT_ATTACKS)]
        if not len(ch):
            return None, {}
        flags = flags_from_records(g)
        return ch.groupby("example").correct.min(), {
            "flags": ",".join(k for k, v in flags.items()
                              if isinstance(v, dict) and v.get("flag")) or "none"}
