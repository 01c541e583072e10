"""``pgd``: ready-made PGD (Madry et al. 2018; l_inf, random start) judged on the reported
forward; for DEQs its gradient is the ``surrogate`` (default: the phantom gradient at the
final state, the usual white-box attack on a DEQ)."""
from __future__ import annotations

from attacks.evaluation import pgd_attack, setting_name
from attacks.surrogates import JudgedModule, make_surrogate
from benchmark.suite._common import outcome_records
from benchmark.suite._registry import ProtocolAttack, register_attack
from benchmark.suite.transfer import pgd_serves_transfer


@register_attack("pgd")
class PGD(ProtocolAttack):
    options = {"steps": 10, "alpha": lambda ctx: ctx.eps / 4, "random_start": True,
               "surrogate": "phantom_final"}
    order = 10
    reads = ()  # nothing: its surrogate is named, never 'strongest'

    def run(self, ctx):
        sur = make_surrogate(ctx.opt("surrogate")) if ctx.is_deq else None
        out = pgd_attack(JudgedModule(ctx.model, ctx.defense, sur), ctx.x, ctx.y, ctx.eps,
                         ctx.opt("alpha"), ctx.opt("steps"), random_start=ctx.opt("random_start"),
                         seed=ctx.seed, batch_size=ctx.cfg.batch_size)
        if pgd_serves_transfer(ctx, ctx.opt("surrogate")):
            ctx.keep("pgd", out.x_adv)  # transfer reuses them where it runs this attack
        return outcome_records(out, ctx.idx, ctx.y, setting_name(sur) if sur else "model",
                               ctx.state, ctx.model, ctx.defense, ctx.x), out.config
