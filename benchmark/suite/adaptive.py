"""``adaptive``: attacks built for the Sec. 3.2 test-time defense (``EntropyReduction``),
per-example worst case over (a) PGD with BPDA through the purification, (b) PGD with the
unrolled (i, Ka, lambda) surrogate on the defended trajectory, (c) transfer from the undefended
model -- every success judged on the defended forward (:func:`attacks.evaluation.adaptive_attacks`).
Runs only on EntropyReduction forwards of DEQs."""
from __future__ import annotations

from attacks.evaluation import adaptive_attacks
from benchmark.suite._common import outcome_records, plain
from benchmark.suite._registry import ProtocolAttack, register_attack


@register_attack("adaptive")
class Adaptive(ProtocolAttack):
    options = {"steps": 10, "alpha": lambda ctx: ctx.eps / 4, "ka": 9, "lam": 0.5}
    order = 50

    def applicable(self, model, defense, opts):
        return getattr(model, "is_deq", False) and not plain(defense)

    def run(self, ctx):
        out = adaptive_attacks(ctx.model, ctx.defense, ctx.x, ctx.y, ctx.eps, ctx.opt("alpha"),
                               ctx.opt("steps"), seed=ctx.seed, ka=ctx.opt("ka"),
                               lam=ctx.opt("lam"), batch_size=ctx.cfg.batch_size)
        return outcome_records(out, ctx.idx, ctx.y, "worst", ctx.state, ctx.model, ctx.defense,
                               ctx.x), out.config

    def summary(self, g, clean):
        a = g[(g.attack == "adaptive") & (g.setting == "worst")]
        if not len(a):
            return None, {}
        s = a.set_index("example").correct
        return s, {"adaptive": s.reindex(clean.index).fillna(0).mean()}
