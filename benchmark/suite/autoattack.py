"""``autoattack``: the AutoAttack ensemble (Croce & Hein 2020: APGD-CE, APGD-T, FAB-T, Square by
default; pyautoattack) through ``JudgedModule``, so every success is judged on the reported
forward; for DEQs the gradient is the ``surrogate`` (default 'strongest': the grid setting that
broke the most of the shard's examples, else the phantom gradient at the final state)."""
from __future__ import annotations

from attacks.evaluation import AA_STANDARD_BUDGET, AUTOATTACK_NAMES, autoattack_attack
from attacks.surrogates import JudgedModule
from benchmark.suite._common import outcome_records, plain, surrogate_for
from benchmark.suite._registry import ProtocolAttack, check_int, config_error, register_attack


FIRST_MEMBER = "first_member"  # the name of the kept examples of the ensemble's first attack

# the budget knobs each member of pyautoattack reads: two runs of a member with equal knobs (and
# eps, gradient, reported forward) are the same attack up to the seed
MEMBER_KNOBS = {"apgd-ce": ("apgd_n_iter", "apgd_n_restarts"),
                "apgd-dlr": ("apgd_n_iter", "apgd_n_restarts"),
                "apgd-t": ("apgd_n_iter", "apgd_n_restarts", "apgd_t_n_target_classes"),
                "apgd-t-ce": ("apgd_n_iter", "apgd_n_restarts", "apgd_t_n_target_classes"),
                "fab": ("fab_n_iter",), "fab-t": ("fab_n_iter", "fab_n_target_classes"),
                "square": ("square_n_queries",)}


def check_autoattack_options(name: str, opts: dict) -> None:
    """``attacks`` (pyautoattack's names) and ``budget`` (its knobs, integers >= 1) of
    ``attacks.<name>``."""
    if "attacks" in opts and (not isinstance(opts["attacks"], list) or not opts["attacks"]):
        config_error(f"attacks.{name}.attacks", f"must be a non-empty list of "
                                                f"{list(AUTOATTACK_NAMES)}, got {opts['attacks']!r}")
    if opts.get("budget") is not None and not isinstance(opts["budget"], dict):
        config_error(f"attacks.{name}.budget", f"must be a mapping knob -> integer, got "
                                               f"{opts['budget']!r}")
    for a in opts.get("attacks", []):
        if not isinstance(a, str) or a not in AUTOATTACK_NAMES:
            config_error(f"attacks.{name}.attacks", f"unknown attack {a!r} (known: {list(AUTOATTACK_NAMES)})")
    for k, v in (opts.get("budget") or {}).items():
        if k not in AA_STANDARD_BUDGET:
            config_error(f"attacks.{name}.budget.{k}", f"unknown knob (known: {sorted(AA_STANDARD_BUDGET)})")
        check_int({k: v}, k, 1, f"attacks.{name}.budget.")


@register_attack("autoattack")
class AutoAttack(ProtocolAttack):
    options = {"attacks": ("apgd-ce", "apgd-t", "fab-t", "square"), "budget": None,
               "surrogate": "strongest", "on_test_time_defenses": True}
    order = 40
    reads = ("grid",)  # surrogate 'strongest'

    def check(self, opts, cfg, attacks):
        check_autoattack_options("autoattack", opts)

    def applicable(self, model, defense, opts):
        return plain(defense) or opts.get("on_test_time_defenses", True)

    def run(self, ctx):
        sur = surrogate_for(ctx.db, ctx.model, ctx.mkey, ctx.dkey, ctx.idx, ctx.opt("surrogate"))
        out = autoattack_attack(JudgedModule(ctx.model, ctx.defense, sur), ctx.x, ctx.y, ctx.eps,
                                attacks=ctx.opt("attacks"), budget=ctx.opt("budget"),
                                seed=ctx.seed, batch_size=ctx.cfg.batch_size,
                                progress=ctx.progress)
        recs = outcome_records(out, ctx.idx, ctx.y, "ensemble", ctx.state, ctx.model,
                               ctx.defense, ctx.x)
        # each member's own result on the points it ran on (extra.members {attack: [correct,
        # margin]}): the checks' Square reuses the ensemble's Square there (checks.py)
        for k, r in enumerate(recs):
            r["extra"]["members"] = {name: [int(c), m] for name, rows in
                                     out.extra["members"].items() if k in rows
                                     for c, m in [rows[k]]}
        # the first member ran alone on every clean-correct point: where Table 4 runs the same
        # attack at the same gradient, it reuses these examples (top_settings.shared_first)
        from benchmark.suite.top_settings import reuses_first_member
        if reuses_first_member(ctx, sur, ctx.opt("attacks")):
            ctx.keep(FIRST_MEMBER, out.extra["first_x_adv"])
        return recs, out.config

    def summary(self, g, clean):
        a = g[(g.attack == "autoattack") & (g.setting == "ensemble")]
        if not len(a):
            return None, {}
        s = a.set_index("example").correct
        return s, {"autoattack": s.reindex(clean.index).fillna(0).mean()}
