"""``checks``: the per-example records behind the gradient-obfuscation indicators (Athalye et
al. 2018; Carlini et al. 2019; :func:`attacks.evaluation.obfuscation_flags`): PGD-k and PGD-2k
(more iterations must not help the defense), Square (black box must not beat white box), PGD-2k
at a large eps (accuracy should reach ~0) and, for DEQs, whether the surrogate agrees with the
reported forward on the clean input. Settings 'pgd{k}', 'pgd{2k}', 'square{q}' count in ALL;
'large_eps{e}' and 'clean_agreement' do not (:data:`CHECKS_NOT_ATTACKS`)."""
from __future__ import annotations

from typing import Optional

import torch

from attacks.evaluation import autoattack_attack, obfuscation_flags, pgd_attack, pgd_attack_steps
from attacks.surrogates import JudgedModule
from benchmark.suite._common import outcome_records, plain, surrogate_for
from benchmark.suite._registry import ProtocolAttack, register_attack
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


@register_attack("checks")
class Checks(ProtocolAttack):
    options = {"steps": 10, "alpha": lambda ctx: ctx.eps / 4, "square_queries": 1000,
               "large_eps": lambda ctx: min(1.0, 5 * ctx.eps), "surrogate": "strongest",
               "on_test_time_defenses": True}
    order = 60
    reads = ("grid",)  # surrogate 'strongest'

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
            f"square{q}": autoattack_attack(judged, x, y, eps, attacks=["square"],
                                            budget={"square_n_queries": q}, seed=seed,
                                            batch_size=bs),
            f"large_eps{big:g}": pgd_attack(judged, x, y, big, big / 4, 2 * steps, seed=seed,
                                            batch_size=bs, name="pgd_large_eps"),
        }
        recs = []
        for name, out in outs.items():
            recs += outcome_records(out, idx, y, name, ctx.state)
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
